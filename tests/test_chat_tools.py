"""Tool calling and log probabilities through the official `openai` client, on the tiny
Qwen3-VL (its chat template renders tools, as the real one does), streamed and not."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.fixtures.server import LiveServers

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Rome"]},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "cet"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
QWEN2VL = "embedded/tiny-qwen2-vl"
TOOLS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ROUND_TRIP = [
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 degrees"},
]


def _linked(source: Path, root: Path) -> Path:
    """The exported tiny model linked into `root`, served under its own directory."""
    root.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if not (root / path.name).exists():
            (root / path.name).symlink_to(path)
    return root


@pytest.fixture(scope="module")
def qwen3_dir(qwen3vl_ir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _linked(qwen3vl_ir, tmp_path_factory.mktemp("tools") / "qwen3-vl")


@pytest.fixture(scope="module")
def base_url(live_server: LiveServers, qwen3_dir: Path) -> str:
    return live_server(model_name=str(qwen3_dir), served_model_name="tiny")


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def matches(arguments: str, tool: dict[str, Any]) -> bool:
    """`arguments` is a JSON object valid against the tool's (flat, enum-only) schema."""
    schema = tool["function"]["parameters"]
    data = json.loads(arguments)
    return (
        isinstance(data, dict)
        and set(data) == set(schema["required"])
        and all(data[key] in schema["properties"][key]["enum"] for key in data)
    )


def create(client: openai.OpenAI, **kwargs: Any) -> Any:
    base: dict[str, Any] = {"model": "tiny", "messages": ASK, "temperature": 0}
    return client.chat.completions.create(**{**base, "max_completion_tokens": 256, **kwargs})


def streamed(client: openai.OpenAI, **kwargs: Any) -> tuple[str, list[dict[str, str]], str, list]:
    """Content, calls, finish reason and the tool-call deltas of a streamed answer."""
    content, calls, deltas, finish = "", [], [], ""
    for chunk in create(client, stream=True, **kwargs):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            deltas.append(delta)
            if delta.id is not None:
                assert delta.index == len(calls) and delta.function.name
                calls.append({"id": delta.id, "name": delta.function.name, "arguments": ""})
            else:
                assert delta.function.name is None and delta.type is None
            calls[delta.index]["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, calls, finish, deltas


def as_calls(message: Any) -> list[dict[str, str]]:
    return [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        for c in message.tool_calls or []
    ]


def same_calls(a: list[dict[str, str]], b: list[dict[str, str]]) -> bool:
    """Equal but for the ids, which are new for every answer."""
    return [(c["name"], c["arguments"]) for c in a] == [(c["name"], c["arguments"]) for c in b]


def test_a_named_function_returns_one_valid_call(client: openai.OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    response = create(client, tools=[WEATHER, TIME], tool_choice=choice)
    message = response.choices[0].message
    calls = as_calls(message)
    assert len(calls) == 1 and calls[0]["name"] == "get_weather"
    assert calls[0]["id"].startswith("call_")
    assert matches(calls[0]["arguments"], WEATHER), calls
    assert message.content is None
    assert response.choices[0].finish_reason == "tool_calls"

    content, stream_calls, finish, deltas = streamed(
        client, tools=[WEATHER, TIME], tool_choice=choice
    )
    assert content == "" and finish == "tool_calls"
    assert same_calls(stream_calls, calls)
    assert deltas[0].function.arguments == "" and len(deltas) > 2  # arguments come in pieces


@pytest.mark.parametrize("parallel", [False, None])
def test_required_returns_valid_calls(client: openai.OpenAI, parallel: bool | None) -> None:
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    for seed in range(3):
        kwargs = {"tools": [WEATHER, TIME], "tool_choice": "required", "seed": seed, **extra}
        response = create(client, temperature=1.0, **kwargs)
        calls = as_calls(response.choices[0].message)
        assert calls and (len(calls) == 1 or parallel is None)
        assert all(matches(c["arguments"], TOOLS[c["name"]]) for c in calls), calls
        assert response.choices[0].finish_reason == "tool_calls"
        content, stream_calls, finish, _ = streamed(client, temperature=1.0, **kwargs)
        assert content == "" and finish == "tool_calls"
        assert same_calls(stream_calls, calls)


def test_auto_with_random_weights_answers_as_content(client: openai.OpenAI) -> None:
    response = create(client, tools=[WEATHER], max_completion_tokens=16)
    message = response.choices[0].message
    content, calls, finish, _ = streamed(client, tools=[WEATHER], max_completion_tokens=16)
    assert (message.content or "", as_calls(message)) == (content, calls)
    assert "<tool_call>" not in content
    assert response.choices[0].finish_reason == finish


def test_a_round_trip_renders_through_the_template(client: openai.OpenAI) -> None:
    for stream in (False, True):
        answer = create(
            client, messages=ROUND_TRIP, tools=[WEATHER], max_completion_tokens=8, stream=stream
        )
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
        else:
            text = answer.choices[0].message.content
        assert isinstance(text, str)


def test_tool_choice_none_is_plain_text(client: openai.OpenAI) -> None:
    response = create(client, tools=[WEATHER], tool_choice="none", max_completion_tokens=8)
    assert response.choices[0].message.tool_calls is None
    assert response.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice.function.name"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]},
         "tools[0].function.name"),
        ({"tools": [WEATHER], "tool_choice": "required",
          "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [*ASK, {"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
        ({"logprobs": True, "top_logprobs": 2}, "top_logprobs"),
        ({"top_logprobs": 0}, "top_logprobs"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)  # fmt: skip
def test_tool_refusals_name_the_field(
    client: openai.OpenAI, extra: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        create(client, **extra)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param  # type: ignore[index]


def test_a_model_without_tool_support_refuses_tools(live_server: LiveServers) -> None:
    """The tiny Qwen2-VL's template, like the real one, has no tools."""
    with openai.OpenAI(base_url=f"{live_server()}/v1", api_key="unused", max_retries=0) as c:
        with pytest.raises(openai.BadRequestError) as caught:
            create(c, model=QWEN2VL, tools=[WEATHER])
        assert caught.value.body["param"] == "tools"  # type: ignore[index]
        # tool_choice none leaves the tools out of the prompt: no refusal
        answer = create(c, model=QWEN2VL, tools=[WEATHER], tool_choice="none")
        assert answer.choices[0].message.tool_calls is None


def test_langchain_and_agents_sdk_requests_are_accepted(base_url: str) -> None:
    """Bodies as LangChain's `bind_tools` and the OpenAI Agents SDK send them."""
    langchain = {
        "model": "tiny",
        "stream": False,
        "n": 1,
        "temperature": 0.0,
        "max_completion_tokens": 8,
        "messages": [
            {"role": "system", "content": "You are helpful."},
            *ROUND_TRIP[:1],
            {**ROUND_TRIP[1], "content": ""},
            ROUND_TRIP[2],
        ],
        "tools": [WEATHER],
    }
    agents = {
        "model": "tiny",
        "messages": [{"role": "system", "content": "Be brief."}, *ROUND_TRIP],
        "tools": [
            {
                "type": "function",
                "function": {**WEATHER["function"], "strict": True},
            }
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "temperature": 0.0,
        "top_p": 1.0,
        "max_tokens": 8,
        "store": False,
        "stream": True,
        "stream_options": {"include_usage": True},
        "extra_headers": None,
    }
    with httpx.Client(base_url=base_url, timeout=120) as http:
        reply = http.post("/v1/chat/completions", json=langchain)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["role"] == "assistant"
        reply = http.post("/v1/chat/completions", json=agents)
        assert reply.status_code == 200, reply.text
        assert reply.text.rstrip().endswith("data: [DONE]")
        assert '"usage":{"prompt_tokens"' in reply.text


def _engine_logprobs(model_dir: Path, tokens: int) -> list[float]:
    """The same greedy answer straight from a ContinuousBatchingPipeline."""
    import openvino_genai

    scheduler = openvino_genai.SchedulerConfig()
    scheduler.cache_size = 1
    pipe = openvino_genai.ContinuousBatchingPipeline(
        str(model_dir), scheduler, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    prompt = pipe.get_tokenizer().apply_chat_template(ASK, add_generation_prompt=True)
    config = openvino_genai.GenerationConfig(str(model_dir / "generation_config.json"))
    config.apply_chat_template = False  # the prompt is templated already
    config.max_new_tokens = tokens
    config.ignore_eos = True
    config.do_sample = False
    config.logprobs = 1
    handle = pipe.add_request(0, prompt, [], [], config)
    values: list[float] = []
    while pipe.has_non_finished_requests():
        pipe.step()
        while handle.can_read():
            for output in handle.read().values():
                values += list(output.generated_log_probs)
    return values


def test_logprobs_are_what_the_engine_reports(client: openai.OpenAI, qwen3_dir: Path) -> None:
    kwargs: dict[str, Any] = {
        "max_completion_tokens": 8,
        "logprobs": True,
        "top_logprobs": 0,
        "extra_body": {"ignore_eos": True},
    }
    expected = _engine_logprobs(qwen3_dir, 8)
    assert len(expected) == 8 and all(value < 0 for value in expected)

    response = create(client, **kwargs)
    entries = response.choices[0].logprobs.content
    assert [e.logprob for e in entries] == pytest.approx(expected, abs=1e-5)
    assert all(e.top_logprobs == [] for e in entries)  # the requested count, 0
    text = b"".join(bytes(e.bytes or []) for e in entries).decode("utf-8", "replace")
    assert text == response.choices[0].message.content

    streamed_entries, content = [], ""
    for chunk in create(client, stream=True, **kwargs):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed_entries += chunk.choices[0].logprobs.content or []
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
    assert [(e.token, e.logprob) for e in streamed_entries] == [
        (e.token, e.logprob) for e in entries
    ]
    assert content == response.choices[0].message.content
    # without logprobs, none
    assert create(client, max_completion_tokens=4).choices[0].logprobs is None


def test_the_vlm_pipeline_calls_tools_and_refuses_logprobs(
    live_server: LiveServers, qwen3_dir: Path
) -> None:
    base_url = live_server(
        model_name=str(qwen3_dir), served_model_name="tiny", engine="vlm_pipeline"
    )
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as vlm:
        choice = {"type": "function", "function": {"name": "get_weather"}}
        response = create(vlm, tools=[WEATHER], tool_choice=choice)
        calls = as_calls(response.choices[0].message)
        assert len(calls) == 1 and matches(calls[0]["arguments"], WEATHER)
        _, stream_calls, finish, _ = streamed(vlm, tools=[WEATHER], tool_choice=choice)
        assert same_calls(stream_calls, calls) and finish == "tool_calls"
        with pytest.raises(openai.BadRequestError) as caught:
            create(vlm, logprobs=True, max_completion_tokens=4)
        assert caught.value.body["param"] == "logprobs"  # type: ignore[index]
