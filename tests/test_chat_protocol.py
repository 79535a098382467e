"""The wire schema, the request-to-engine mapping and the prompt building,
without a server (media come as data URLs through the real fetcher)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from tests.fixtures.server import data_url, make_image, make_video
from utils.api.disconnect import unless_disconnected
from utils.api.models import resolve_model
from utils.api.protocol import ChatCompletionChunk, ChunkChoice, Delta, parse_max_pixels
from utils.api.requests import build_generation_request, to_sampling_params
from utils.api.validation import check_request, parse_request
from utils.engine.types import ModelInfo
from utils.errors import OpenAIError
from utils.media.fetch import MediaFetcher
from utils.settings import Settings

PNG = data_url(make_image("png"), "image/png")
MP4 = data_url(make_video(frames=20, fps=10), "video/mp4")
QWEN = ModelInfo("m", "qwen2_vl", "/m", supports_video=True, max_context=4096)
LLAVA = ModelInfo("m", "llava", "/m", supports_video=False, max_context=4096)


def user(*parts: Any) -> dict[str, Any]:
    return {"role": "user", "content": list(parts)}


def image(url: str = PNG, **extra: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


CALL = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}


def body(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "m", "messages": list(messages), **fields}


def refused(payload: Any) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        check_request(parse_request(payload), Settings())
    assert info.value.status == 400
    return info.value


# --- schema -------------------------------------------------------------------


def test_parses_every_content_part_and_ignores_unknown_fields() -> None:
    request = parse_request(
        body(
            {"role": "developer", "content": "be brief"},
            user(
                text("look"),
                image(detail="low"),
                {"type": "video", "video": ["a", "b"]},
                {"type": "video_url", "video_url": {"url": "v", "max_pixels": "360*420", "fps": 2}},
            ),
            {"role": "assistant", "content": None},
            some_vendor_field={"x": 1},
            metadata={"k": "v"},
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    parts = request.messages[1].content
    assert isinstance(parts, list)
    assert [p.type for p in parts] == ["text", "image_url", "video", "video_url"]
    assert parts[3].effective_max_pixels == 360 * 420
    assert parts[3].effective_fps == 2
    assert request.unsupported_param() is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [(153600, 153600), ("153600", 153600), ("360*420", 151200), (" 360 x 420 ", 151200), (2.0, 2)],
)
def test_max_pixels_forms(value: Any, expected: int) -> None:
    assert parse_max_pixels(value) == expected


@pytest.mark.parametrize(
    "value", ["__import__('os').system('true')", "360*", "1e9", "-5", 0, True, "9" * 30, [1]]
)
def test_max_pixels_is_never_evaluated(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_max_pixels(value)


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        (body(), "messages"),
        ({"messages": "hi"}, "messages"),
        (body({"role": "user"}), "messages[0]"),
        (body({"role": "robot", "content": "x"}), "messages[0].role"),
        (body({"role": "tool", "content": "x"}), "messages[0].tool_call_id"),
        (body({"role": "function", "content": "x"}), "messages[0].role"),
        (body(user(text("x")) | {"tool_calls": [CALL]}), "messages[0].tool_calls"),
        (body(user({"type": "input_audio"})), "messages[0].content[0]"),
        (
            body(user(text("a"), {"type": "image_url", "image_url": {}})),
            "messages[0].content[1].image_url.url",
        ),
        (body(user(image(detail="ultra"))), "messages[0].content[0].image_url.detail"),
        (body(user({"type": "video", "video": []})), "messages[0].content[0].video"),
        (
            body(user({"type": "video_url", "video_url": {"url": "v", "max_pixels": "2**40"}})),
            "messages[0].content[0].video_url.max_pixels",
        ),
        (
            body(user({"type": "video_url", "video_url": {"url": "v", "fps": 0}})),
            "messages[0].content[0].video_url.fps",
        ),
        (body(user(text("x")), temperature=3), "temperature"),
        (body(user(text("x")), max_tokens=0), "max_tokens"),
        (body(user(text("x")), n=0), "n"),
        (body(user(text("x")), stop=[""]), "stop"),
        (body(user(text("x")), response_format={"type": "xml"}), "response_format.type"),
        (body(user(text("x")), response_format={"type": "json_schema"}), "response_format"),
        (body(user(text("x")), tools=[{"type": "function"}]), "tools[0].function"),
        (body(user(text("x")), tool_choice="required"), "tool_choice"),
        (body(user(text("x")), logprobs=True, top_logprobs=1), "top_logprobs"),
        (body(user(text("x")), logprobs=True, top_logprobs=21), "top_logprobs"),
        (body(user(text("x")), top_logprobs=3), "top_logprobs"),
        (body(user(text("x")), logit_bias={"42": 10}), "logit_bias"),
        (body(user(text("x")), modalities=["text", "audio"]), "modalities"),
        (body(user(text("x")), audio={"voice": "x"}), "audio"),
        (body(user(text("x")), stream_options={"include_usage": True}), "stream_options"),
    ],
)
def test_bad_requests_name_the_param(payload: dict[str, Any], param: str) -> None:
    assert refused(payload).param == param


def test_harmless_defaults_of_unsupported_fields_are_accepted() -> None:
    request = parse_request(
        body(
            user(text("x")), logprobs=False, tool_choice="none", logit_bias={}, modalities=["text"]
        )
    )
    assert request.unsupported_param() is None


def test_chunk_json_matches_openai() -> None:
    chunk = ChatCompletionChunk(
        id="c", created=1, model="m", choices=[ChunkChoice(index=0, delta=Delta(content="hé"))]
    )
    data = json.loads(chunk.to_json(with_usage_field=False))
    assert data["choices"][0] == {
        "index": 0,
        "delta": {"content": "hé"},
        "logprobs": None,
        "finish_reason": None,
    }
    assert "usage" not in data
    assert json.loads(chunk.to_json(with_usage_field=True))["usage"] is None
    assert "hé" in chunk.to_json(with_usage_field=False)  # not \\u-escaped


# --- request fields -> engine parameters ------------------------------------------


def test_sampling_defaults_come_from_settings() -> None:
    settings = Settings(seed=7, default_max_tokens=99)
    params = to_sampling_params(parse_request(body(user(text("x")))), settings)
    assert params.seed == 7
    assert params.max_new_tokens == 99
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.top_k == 0
    assert params.stop == () and params.n == 1 and params.json_schema is None


def test_every_sampling_field_is_mapped() -> None:
    request = parse_request(
        body(
            user(text("x")),
            max_completion_tokens=5,
            max_tokens=50,
            temperature=0,
            top_p=0.5,
            top_k=3,
            frequency_penalty=0.5,
            presence_penalty=-0.5,
            repetition_penalty=1.2,
            seed=-1,
            stop="END",
            n=2,
            min_tokens=2,
            ignore_eos=True,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "array"}},
            },
        )
    )
    params = to_sampling_params(request, Settings())
    assert params.max_new_tokens == 5  # max_completion_tokens wins over max_tokens
    assert params.temperature == 0.0
    assert (params.top_p, params.top_k) == (0.5, 3)
    assert (params.frequency_penalty, params.presence_penalty) == (0.5, -0.5)
    assert params.repetition_penalty == 1.2
    assert params.seed == 2**64 - 1
    assert params.stop == ("END",)
    assert params.n == 2 and params.min_new_tokens == 2 and params.ignore_eos
    assert json.loads(params.json_schema or "") == {"type": "array"}
    json_object = parse_request(body(user(text("x")), response_format={"type": "json_object"}))
    assert json.loads(to_sampling_params(json_object, Settings()).json_schema or "") == {
        "type": "object"
    }
    top_k_off = parse_request(body(user(text("x")), top_k=-1, max_tokens=7))
    assert to_sampling_params(top_k_off, Settings()).top_k == 0
    assert to_sampling_params(top_k_off, Settings()).max_new_tokens == 7


def test_min_tokens_above_max_tokens_is_refused() -> None:
    request = parse_request(body(user(text("x")), max_tokens=3, min_tokens=4))
    with pytest.raises(OpenAIError) as info:
        check_request(request, Settings())
    assert info.value.param == "min_tokens"


def test_model_names() -> None:
    settings = Settings(model_name="org/model", served_model_name="served")
    assert resolve_model(None, settings, None) == "served"
    assert resolve_model("default", settings, None) == "served"
    assert resolve_model("org/model", settings, None) == "served"
    with pytest.raises(OpenAIError) as info:
        resolve_model("gpt-4o", settings, None)
    assert (info.value.status, info.value.code, info.value.param) == (
        404,
        "model_not_found",
        "model",
    )


# --- prompt building ------------------------------------------------------------


@pytest.fixture
async def fetcher() -> AsyncIterator[MediaFetcher]:
    fetcher = MediaFetcher(Settings())
    yield fetcher
    await fetcher.aclose()


async def build(
    payload: dict[str, Any], fetcher: MediaFetcher, info: ModelInfo = QWEN, **settings: Any
) -> Any:
    request = parse_request(payload)
    config = Settings(**settings)
    check_request(request, config)
    return await build_generation_request(
        request,
        to_sampling_params(request, config),
        settings=config,
        fetcher=fetcher,
        info=info,
        request_id="r",
    )


async def test_tags_mark_each_media_position_across_turns(fetcher: MediaFetcher) -> None:
    gen = await build(
        body(
            {"role": "system", "content": "sys"},
            user(image(), text("first"), image(data_url(make_image("jpeg"), "image/jpeg"))),
            {"role": "assistant", "content": "answer"},
            user(text("then"), text("this"), {"type": "video_url", "video_url": {"url": MP4}}),
        ),
        fetcher,
    )
    assert gen.messages == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "<ov_genai_image_0>first<ov_genai_image_1>"},
        {"role": "assistant", "content": "answer"},
        {"role": "user", "content": "then\nthis<ov_genai_video_0>"},
    ]
    assert [i.shape for i in gen.images] == [(48, 64, 3), (48, 64, 3)]
    assert len(gen.videos) == 1 and gen.videos[0].shape == (2, 48, 64, 3)
    assert all(a.dtype == np.uint8 for a in [*gen.images, *gen.videos])


async def test_video_becomes_frames_for_models_without_video(fetcher: MediaFetcher) -> None:
    gen = await build(
        body(user(image(), {"type": "video", "video": [PNG, PNG, PNG]}, text("?"))), fetcher, LLAVA
    )
    assert gen.videos == []
    assert len(gen.images) == 4
    assert gen.messages[0]["content"] == "".join(f"<ov_genai_image_{k}>" for k in range(4)) + "?"


async def test_video_options_and_caps(fetcher: MediaFetcher) -> None:
    part = {"type": "video_url", "video_url": {"url": MP4, "fps": 10, "max_pixels": "32*24"}}
    gen = await build(body(user(part)), fetcher, max_video_frames=4)
    video = gen.videos[0]
    assert video.shape[0] == 4  # 20 frames at 10 fps capped at max_video_frames
    assert video.shape[1] * video.shape[2] <= 32 * 24
    # the request cannot raise the server's per-frame budget
    big = {"type": "video_url", "video_url": {"url": MP4, "max_pixels": 10**8}}
    gen = await build(body(user(big)), fetcher, video_max_pixels=32 * 32)
    assert gen.videos[0].shape[1] * gen.videos[0].shape[2] <= 32 * 32


async def test_media_errors_name_the_part(fetcher: MediaFetcher) -> None:
    bad_image = data_url(b"not an image" * 5, "image/png")
    with pytest.raises(OpenAIError) as info:
        await build(body(user(text("x")), user(text("y"), image(bad_image))), fetcher)
    assert info.value.status == 400 and info.value.param == "messages[1].content[1]"
    assert "Could not decode image at messages[1].content[1]" in info.value.message

    bad_video = {"type": "video_url", "video_url": {"url": data_url(b"x" * 500, "video/mp4")}}
    with pytest.raises(OpenAIError) as info:
        await build(body(user(bad_video)), fetcher)
    assert "Could not decode video at messages[0].content[0]" in info.value.message

    with pytest.raises(OpenAIError) as info:
        await build(body(user({"type": "video", "video": [PNG, bad_image]})), fetcher)
    assert info.value.param == "messages[0].content[0].video[1]"

    with pytest.raises(OpenAIError) as info:
        await build(body(user(image("ftp://example.com/a.png"))), fetcher)
    assert info.value.status == 400 and "ftp://example.com/a.png" in info.value.message
    assert info.value.param == "messages[0].content[0]"


async def test_media_limits(fetcher: MediaFetcher) -> None:
    with pytest.raises(OpenAIError) as info:
        await build(body(user(image(), image(), image())), fetcher, max_images_per_request=2)
    assert "max_images_per_request=2" in info.value.message
    with pytest.raises(OpenAIError) as info:
        await build(body(user({"type": "video", "video": [PNG] * 5})), fetcher, max_video_frames=4)
    assert "max_video_frames=4" in info.value.message
    video = {"type": "video_url", "video_url": {"url": MP4}}
    with pytest.raises(OpenAIError) as info:
        await build(body(user(video, video)), fetcher, max_videos_per_request=1)
    assert "max_videos_per_request=1" in info.value.message
    with pytest.raises(OpenAIError) as info:
        await build(body({"role": "system", "content": [image()]}, user(text("x"))), fetcher)
    assert info.value.param == "messages[0].content[0]"


async def test_reserved_tags_in_text_are_refused(fetcher: MediaFetcher) -> None:
    for messages, param in [
        ((user(image(), text("and <ov_genai_image_0> again")),), "messages[0].content[1].text"),
        (
            ({"role": "system", "content": "<ov_genai_video_0>"}, user(text("x"))),
            "messages[0].content",
        ),
    ]:
        with pytest.raises(OpenAIError) as info:
            await build(body(*messages), fetcher)
        assert info.value.status == 400 and info.value.param == param


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "bogus"},
        {"type": ["string", "bogus"]},
        {"$ref": "#/nope"},
        {"$ref": "http://example.com/schema.json"},
        {"enum": []},
        {"anyOf": []},
        {"items": 3},
        {"type": "object", "properties": {"a": 5}},
        {"type": "string", "minLength": 5, "maxLength": 2},
        {"type": "array", "minItems": -1},
        {"type": "integer", "minimum": 5, "maximum": 1},
        {"type": "integer", "exclusiveMinimum": 5, "exclusiveMaximum": 6},
        {"type": "number", "exclusiveMinimum": 5, "maximum": 5},
        {"type": "number", "multipleOf": 0},
        {"type": "string", "pattern": "("},
        {"type": "string", "pattern": "(?=a)b"},
        {"type": "string", "pattern": "(a)\\1"},
        {"properties": {"a": {"properties": {"b": {"type": "nope"}}}}},
    ],
)
def test_json_schemas_the_grammar_cannot_take_are_refused(schema: dict[str, Any]) -> None:
    payload = body(
        user(text("x")),
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )
    assert refused(payload).param == "response_format.json_schema.schema"


@pytest.mark.parametrize(
    "schema",
    [
        {},
        {"type": "object", "properties": {"a": {"$ref": "#"}}},
        {"$defs": {"a": {"type": "string"}}, "$ref": "#/$defs/a"},
        {"type": "string", "pattern": "^[a-z]+\\d*$", "format": "date-time"},
        {"type": "integer", "exclusiveMinimum": 5, "exclusiveMaximum": 7},
        {"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 3},
        {"anyOf": [{"type": "string"}, {"type": "null"}], "enum": ["a", None]},
    ],
)
def test_valid_json_schemas_pass(schema: dict[str, Any]) -> None:
    payload = body(
        user(text("x")),
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )
    assert parse_request(payload).json_schema_text == json.dumps(schema)


class _Connection:
    """Stands in for a Starlette request: `receive` reports a disconnect once told to."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def receive(self) -> dict[str, str]:
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def test_work_runs_in_the_calling_task_until_the_client_goes_away() -> None:
    connection = _Connection()
    runs_in: list[asyncio.Task | None] = []

    async def quick() -> str:
        runs_in.append(asyncio.current_task())
        return "done"

    assert await unless_disconnected(connection, quick()) == "done"  # type: ignore[arg-type]
    assert runs_in == [asyncio.current_task()]
    connection.gone.set()  # a disconnect after the work ended cancels nothing
    await asyncio.sleep(0.01)

    cleaned_up = asyncio.Event()

    async def endless() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned_up.set()

    connection = _Connection()
    asyncio.get_running_loop().call_later(0.01, connection.gone.set)
    with pytest.raises(OpenAIError) as caught:
        await unless_disconnected(connection, endless())  # type: ignore[arg-type]
    assert caught.value.status == 499 and cleaned_up.is_set()
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_a_cancellation_from_elsewhere_is_not_reported_as_a_disconnect() -> None:
    async def handler() -> None:
        await unless_disconnected(_Connection(), asyncio.sleep(3600))  # type: ignore[arg-type]

    task = asyncio.create_task(handler())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_ignored_fields_are_named_in_a_debug_line(caplog: pytest.LogCaptureFixture) -> None:
    """Unknown fields are accepted (clients send extensions), but a typo can be found."""
    with caplog.at_level(logging.DEBUG, logger="utils.api.validation"):
        request = parse_request(body(user(text("x")), max_token=5, vendor_extension={}))
    assert request.max_new_tokens is None  # the typo did not set the limit
    assert "ignored request fields: max_token, vendor_extension" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="utils.api.validation"):
        parse_request(body(user(text("x")), max_tokens=5))
    assert "ignored" not in caplog.text
