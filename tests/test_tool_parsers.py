"""Tool calls parsed out of model text (`tool_choice: auto`, `required`, a named
function): on what the real chat template writes for calls, on malformed and cut-off
calls, and streamed against non-streamed answers through the response renderers."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from utils.api.choice_output import OutputShape, output_shape
from utils.api.protocol import ChatCompletionRequest
from utils.api.responses import ResponseMeta, complete, stream
from utils.api.tool_parsers import HERMES, CallSplitter, ParsedCall, parse_call_list
from utils.api.tools import tool_plan
from utils.engine.types import GenerationEvent

NAMES = frozenset({"get_weather", "get_time"})
WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}'
TIME = '{"name": "get_time", "arguments": {"zone": "utc"}}'


def split(text: str, cuts: list[int] | None = None) -> list[str | ParsedCall]:
    """The splitter's pieces for `text` fed whole, or in pieces cut at `cuts`."""
    splitter = CallSplitter(HERMES, NAMES)
    bounds = [0, *(cuts or []), len(text)]
    out: list[str | ParsedCall] = []
    for a, b in itertools.pairwise(bounds):
        out += splitter.feed(text[a:b])
    return out + splitter.finish()


def joined(pieces: list[str | ParsedCall]) -> tuple[str, list[ParsedCall]]:
    content = "".join(p for p in pieces if isinstance(p, str))
    return content, [p for p in pieces if isinstance(p, ParsedCall)]


def every_split(text: str) -> list[tuple[str, list[ParsedCall]]]:
    """The result for the whole text, then for every cut in two, then char by char."""
    results = [joined(split(text))]
    results += [joined(split(text, [i])) for i in range(1, len(text))]
    results.append(joined(split(text, list(range(1, len(text))))))
    return results


def test_calls_and_text_split_the_same_in_any_pieces() -> None:
    text = f"Let me look.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{TIME}\n</tool_call>"
    for content, calls in every_split(text):
        assert content == "Let me look."
        assert [c.name for c in calls] == ["get_weather", "get_time"]
        assert json.loads(calls[0].arguments) == {"city": "Paris", "unit": "c"}


def test_text_without_calls_is_content_untouched() -> None:
    for text in ("plain answer ", "a < b and <tool", "x <tool_cal", "  \n"):
        for content, calls in every_split(text):
            assert (content, calls) == (text, [])


@pytest.mark.parametrize(
    "body",
    [
        '{"name": "get_weather", "arguments": {"city": "Par',  # cut off
        '{"name": "get_weather" "arguments": {}}',  # not JSON
        '{"name": "send_mail", "arguments": {}}',  # not an offered function
        '{"name": "get_weather", "arguments": [1]}',  # arguments not an object
        '["get_weather"]',
    ],
)
def test_malformed_calls_come_back_as_content(body: str) -> None:
    closed = f"Sure. <tool_call>\n{body}\n</tool_call>"
    for content, calls in every_split(closed):
        assert (content, calls) == (closed, [])
    unclosed = f"Sure. <tool_call>\n{body}"  # the token limit cut the call
    for content, calls in every_split(unclosed):
        assert (content, calls) == (unclosed, [])


def test_arguments_as_a_json_string_are_accepted() -> None:
    text = '<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"cet\\"}"}</tool_call>'
    content, calls = joined(split(text))
    assert content == "" and calls == [ParsedCall("get_time", '{"zone": "cet"}')]


def test_required_output_is_a_list_of_calls() -> None:
    assert parse_call_list(f"[{WEATHER}, {TIME}]", NAMES) == [
        ParsedCall("get_weather", '{"city": "Paris", "unit": "c"}'),
        ParsedCall("get_time", '{"zone": "utc"}'),
    ]
    for bad in (f"[{WEATHER}", "[]", "{}", '[{"name": "x", "arguments": {}}]', "[1]"):
        assert parse_call_list(bad, NAMES) is None


def test_real_template_output_parses_back(qwen3vl_ir: Path) -> None:
    """The tiny Qwen3-VL's chat template (the real one's) writes an assistant's calls;
    the parser reads the same calls out of that text."""
    import openvino_genai

    tokenizer = openvino_genai.Tokenizer(str(qwen3vl_ir))
    calls = [
        {"name": "get_weather", "arguments": {"city": "Rome", "unit": "f"}},
        {"name": "get_time", "arguments": {"zone": "cet"}},
    ]
    history = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [{"id": "c1", "type": "function", "function": c} for c in calls],
        },
    ]
    tools = [{"type": "function", "function": {"name": n}} for n in sorted(NAMES)]
    prompt = tokenizer.apply_chat_template(history, add_generation_prompt=False, tools=tools)
    answer = prompt.rsplit("<|im_start|>assistant\n", 1)[1].removesuffix("<|im_end|>\n")
    assert answer.count("<tool_call>") == 2
    for content, parsed in every_split(answer):
        assert content == "Checking."
        assert [(c.name, json.loads(c.arguments)) for c in parsed] == [
            (c["name"], c["arguments"]) for c in calls
        ]


# --- the response renderers, streamed against non-streamed ---------------------


def shape_of(tool_choice: Any, logprobs: bool = False) -> OutputShape:
    tools = [
        {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
        for name in sorted(NAMES)
    ]
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "x"}], "tools": tools}
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    body["logprobs"] = logprobs
    req = ChatCompletionRequest.model_validate(body)
    assert tool_plan(req) is not None
    shape = output_shape(req, "qwen3_vl")
    assert shape is not None
    return shape


def events_of(text: str, size: int, finish: str = "stop") -> list[GenerationEvent]:
    pieces = [text[i : i + size] for i in range(0, len(text), size)] or [""]
    out = [GenerationEvent(0, "", 0)]  # the acceptance event
    for i, piece in enumerate(pieces, 1):
        last = i == len(pieces)
        out.append(
            GenerationEvent(
                0,
                piece,
                i,
                finish if last else None,  # type: ignore[arg-type]
                5 if last else 0,
                logprobs=[(piece, -0.5 * i, piece.encode())],
            )
        )
    return out


async def _aiter(items: list[GenerationEvent]) -> AsyncIterator[GenerationEvent]:
    for item in items:
        yield item


def render_both(shape: OutputShape, events: list[GenerationEvent]) -> tuple[Any, dict[str, Any]]:
    """The non-streamed body, and the streamed chunks put back together."""
    meta = ResponseMeta("chatcmpl-x", 0, "m", "fp", 1, shape)

    async def run() -> tuple[Any, bytes]:
        body = await complete(_aiter(events[1:]), events[0], meta)
        chunks = b"".join(
            [c async for c in stream(_aiter(events[1:]), events[0], meta, include_usage=False)]
        )
        return body, chunks

    body, raw = asyncio.run(run())
    content, calls, finish, logprobs = "", [], None, []
    for line in raw.decode().split("\n\n"):
        if not line.startswith("data: {"):
            continue
        choice = json.loads(line[6:])["choices"][0]
        delta = choice["delta"]
        assert not ("content" in delta and "tool_calls" in delta)
        content += delta.get("content") or ""
        for call in delta.get("tool_calls", []):
            if "id" in call:
                assert set(call) == {"index", "id", "type", "function"}
                calls.append({"name": call["function"]["name"], "arguments": ""})
            calls[call["index"]]["arguments"] += call["function"].get("arguments", "")
        finish = choice["finish_reason"] or finish
        logprobs += (choice["logprobs"] or {}).get("content") or []
    assert raw.endswith(b"data: [DONE]\n\n")
    return body, {"content": content, "calls": calls, "finish": finish, "logprobs": logprobs}


def as_dict(body: Any) -> dict[str, Any]:
    choice = body.choices[0]
    logprobs = choice.logprobs.model_dump(mode="json")["content"] if choice.logprobs else []
    return {
        "content": choice.message.content or "",
        "calls": [
            {"name": c.function.name, "arguments": c.function.arguments}
            for c in choice.message.tool_calls or []
        ],
        "finish": choice.finish_reason,
        "logprobs": logprobs,
    }


AUTO_TEXTS = [
    f"Looking.\n<tool_call>\n{WEATHER}\n</tool_call>",
    f"<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n{TIME}\n</tool_call>\n",
    f"Hmm <tool_call>\n{WEATHER[:30]}",  # cut off: content
    "<tool_call>not json</tool_call> and then text",
    "just text, no call",
]


@pytest.mark.parametrize("text", AUTO_TEXTS)
@pytest.mark.parametrize("size", [1, 3, 1000])
def test_auto_streams_what_it_answers(text: str, size: int) -> None:
    body, streamed = render_both(shape_of("auto", logprobs=True), events_of(text, size))
    assert as_dict(body) == streamed
    assert len(streamed["logprobs"]) == len(events_of(text, size)) - 1
    if streamed["calls"]:
        assert streamed["finish"] == "tool_calls"
        assert "<tool_call>" not in streamed["content"]
    else:
        assert streamed["content"] == text and streamed["finish"] == "stop"


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_required_and_named_stream_what_they_answer(size: int) -> None:
    required = f"[{WEATHER}, {TIME}]"
    body, streamed = render_both(shape_of("required"), events_of(required, size))
    assert as_dict(body) == streamed
    assert [c["name"] for c in streamed["calls"]] == ["get_weather", "get_time"]
    assert streamed["content"] == "" and body.choices[0].message.content is None

    cut = required[:-5]  # the token limit cut it: content, not a call
    body, streamed = render_both(shape_of("required"), events_of(cut, size, "length"))
    assert as_dict(body) == streamed
    assert (streamed["content"], streamed["calls"], streamed["finish"]) == (cut, [], "length")

    named = {"type": "function", "function": {"name": "get_time"}}
    arguments = '{ "zone" : "utc" }'
    body, streamed = render_both(shape_of(named), events_of(arguments, size))
    assert as_dict(body) == streamed
    assert streamed["calls"] == [{"name": "get_time", "arguments": arguments}]
    assert streamed["finish"] == "tool_calls"


# --- the request side ------------------------------------------------------------


def test_forced_calls_become_the_engines_json_schema() -> None:
    from utils.api.requests import to_sampling_params
    from utils.api.tool_schema import ToolCall
    from utils.api.tools import history_tool_calls
    from utils.settings import Settings

    weather = {"type": "object", "properties": {"city": {"enum": ["Paris"]}}}
    tools = [
        {"type": "function", "function": {"name": "get_weather", "parameters": weather}},
        {"type": "function", "function": {"name": "get_time"}},
    ]
    base = {"messages": [{"role": "user", "content": "x"}], "tools": tools}

    def params(**fields: Any) -> Any:
        req = ChatCompletionRequest.model_validate({**base, **fields})
        return to_sampling_params(req, Settings())

    named = params(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert json.loads(named.json_schema) == weather
    required = json.loads(params(tool_choice="required", parallel_tool_calls=False).json_schema)
    assert required["type"] == "array" and required["minItems"] == required["maxItems"] == 1
    options = required["items"]["anyOf"]
    assert [o["properties"]["name"] for o in options] == [
        {"const": "get_weather"},
        {"const": "get_time"},
    ]
    assert options[0]["properties"]["arguments"] == weather
    assert options[1]["properties"]["arguments"] == {"type": "object"}  # no parameters: any
    assert "maxItems" not in json.loads(params(tool_choice="required").json_schema)
    assert params().json_schema is None and params(tool_choice="none").json_schema is None
    assert params(logprobs=True).logprobs and not params().logprobs

    calls = [
        ToolCall.model_validate(
            {"id": "a", "function": {"name": "get_time", "arguments": '{"zone": "utc"}'}}
        ),
        ToolCall.model_validate({"id": "b", "function": {"name": "get_time", "arguments": "x"}}),
    ]
    rendered = history_tool_calls(calls)
    assert rendered[0]["function"]["arguments"] == {"zone": "utc"}  # an object for `tojson`
    assert rendered[1]["function"]["arguments"] == "x"  # not JSON: passed as it came
