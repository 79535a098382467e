"""Raw HTTP against the real server: the SSE bytes, every error a client can
cause, and generations stopped when the client goes away."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from app import create_app
from tests.fixtures.server import LiveServers, MediaServer, data_url, make_image
from utils.api.state import app_state
from utils.settings import Settings

MODEL = "embedded/tiny-qwen2-vl"
PNG = data_url(make_image("png"), "image/png")


@pytest.fixture(scope="module")
def base_url(live_server: LiveServers) -> str:
    return live_server(media_allow_private_networks=True)


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


def chat(http: httpx.Client, **fields: Any) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **fields}
    return http.post("/v1/chat/completions", json=body)


def events(raw: bytes) -> list[str]:
    """`data:` payloads of an SSE body, checking the framing on the way."""
    text = raw.decode()
    assert text.endswith("\n\n")
    out = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        assert "\n" not in block
        out.append(block.removeprefix("data: "))
    return out


def wait_until_idle(live_server: LiveServers, base_url: str, timeout: float = 20.0) -> bool:
    engine = app_state(live_server.app(base_url)).engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.stats()["in_flight"] == 0:
            return True
        time.sleep(0.1)
    return False


# --- streaming bytes ------------------------------------------------------------------


def test_sse_bytes_with_usage(http: httpx.Client) -> None:
    response = chat(
        http,
        stream=True,
        stream_options={"include_usage": True},
        max_completion_tokens=5,
        temperature=0,
        ignore_eos=True,
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = events(response.content)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert all("usage" in c for c in chunks)  # null until the last one
    first, *middle, final, usage = chunks
    assert first["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    assert middle and all(
        set(c["choices"][0]["delta"]) == {"content"} and c["choices"][0]["finish_reason"] is None
        for c in middle
    )
    assert final["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    ]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 5
    assert usage["usage"]["total_tokens"] == (
        usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]
    )
    assert all(c["usage"] is None for c in chunks[:-1])


def test_sse_without_usage_has_no_usage_member(http: httpx.Client) -> None:
    response = chat(http, stream=True, max_completion_tokens=3)
    payloads = events(response.content)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_tokens_arrive_while_generating(http: httpx.Client) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "max_completion_tokens": 40,
        "ignore_eos": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    contents = [
        json.loads(line[6:])["choices"][0]["delta"].get("content")
        for line in lines[1:-2]  # role chunk ... final chunk, [DONE]
    ]
    assert len([c for c in contents if c]) > 10


def test_non_streaming_body(http: httpx.Client) -> None:
    response = chat(http, max_completion_tokens=3, user="someone", metadata={"a": "b"})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {
        "id",
        "object",
        "created",
        "model",
        "system_fingerprint",
        "choices",
        "usage",
    }
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["logprobs"] is None


def test_model_may_be_omitted(http: httpx.Client) -> None:
    for model in (None, "default"):
        body: dict[str, Any] = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        if model:
            body["model"] = model
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200
        assert response.json()["model"] == MODEL


# --- errors -----------------------------------------------------------------------


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"]
    return error


def test_unknown_model(http: httpx.Client) -> None:
    error = error_of(chat(http, model="gpt-4o"), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    error = error_of(http.get("/v1/models/gpt-4o"), 404)
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": None}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0].image_url",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}
                ]
            },
            "messages[0].content[0].image_url.url",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]},
            "messages[0].content[0]",
        ),
        (
            {"messages": [{"role": "user", "content": [{"text": "no type"}]}]},
            "messages[0].content[0]",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "video", "video": "x", "max_pixels": "1/0"}],
                    }
                ]
            },
            "messages[0].content[0].max_pixels",
        ),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logprobs": True, "top_logprobs": 2}, "top_logprobs"),
        ({"n": 100}, "n"),
        ({"temperature": "hot"}, "temperature"),
        ({"seed": 2**70}, "seed"),
        ({"max_tokens": -1}, "max_tokens"),
        (
            {"stream": True, "stream_options": {"include_usage": "maybe"}},
            "stream_options.include_usage",
        ),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
            "response_format.json_schema.schema",
        ),
    ],
)
def test_bad_fields_name_the_param(http: httpx.Client, fields: dict[str, Any], param: str) -> None:
    error = error_of(chat(http, **fields), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b"[]",
        b'"text"',
        b"null",
        b"\xff\xfe",
        b'{"messages": [{"role": "user", "content": "x"}]' * 3,
    ],
)
def test_malformed_bodies(http: httpx.Client, raw: bytes) -> None:
    response = http.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    error_of(response, 400)


def test_undecodable_media(http: httpx.Client, media_server: MediaServer) -> None:
    def with_part(part: dict[str, Any]) -> httpx.Response:
        content = [{"type": "text", "text": "x"}, part]
        return chat(http, messages=[{"role": "user", "content": content}])

    error = error_of(
        with_part(
            {"type": "image_url", "image_url": {"url": media_server.url("not-an-image.png")}}
        ),
        400,
    )
    assert error["param"] == "messages[0].content[1]"
    assert error["message"].startswith("Could not decode image at messages[0].content[1]")
    error = error_of(
        with_part({"type": "image_url", "image_url": {"url": data_url(b"\x00" * 64, "image/png")}}),
        400,
    )
    assert "Could not decode image" in error["message"]
    error = error_of(
        with_part({"type": "video_url", "video_url": {"url": media_server.url("not-a-video.mp4")}}),
        400,
    )
    assert error["message"].startswith("Could not decode video at messages[0].content[1]")
    error = error_of(
        with_part({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}), 400
    )
    assert error["param"] == "messages[0].content[1]"


def test_unreachable_media_names_the_url(http: httpx.Client, media_server: MediaServer) -> None:
    missing = media_server.url("missing.png")
    error = error_of(
        chat(
            http,
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": missing}}]}
            ],
        ),
        400,
    )
    assert missing in error["message"]
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/a.png"
    error = error_of(
        chat(
            http,
            messages=[
                {"role": "user", "content": [{"type": "video_url", "video_url": {"url": closed}}]}
            ],
        ),
        400,
    )
    assert closed in error["message"]
    assert error["param"] == "messages[0].content[0]"


def test_openai_client_sees_proper_exceptions(base_url: str) -> None:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError) as not_found:
            client.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "x"}]
            )
        assert not_found.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], logit_bias={"1": 5}
            )
        assert bad.value.param == "logit_bias"


async def test_loading_model_answers_503() -> None:
    app = create_app(Settings(model_name="embedded/tiny-qwen2-vl"))  # lifespan not run: no engine
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post(
            "/v1/chat/completions",
            json={
                "model": "embedded/tiny-qwen2-vl",
                "messages": [{"role": "user", "content": "x"}],
            },
        )
        assert response.status_code == 503
        assert response.headers["retry-after"]
        assert response.json()["error"]["code"] == "model_not_ready"
        # validation still comes first
        response = await client.post("/v1/chat/completions", json={"messages": []})
        assert response.status_code == 400
        models = await client.get("/v1/models")
        assert models.json()["data"][0]["id"] == "embedded/tiny-qwen2-vl"


# --- disconnects ---------------------------------------------------------------------


def test_stream_disconnect_stops_the_generation(live_server: LiveServers, base_url: str) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "max_completion_tokens": 32000,  # a minute of work if it were not cancelled
        "ignore_eos": True,
    }
    with (
        httpx.Client(base_url=base_url, timeout=60) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        received = 0
        for line in response.iter_lines():
            if line.startswith("data: "):
                received += 1
            if received >= 5:
                break
    assert wait_until_idle(live_server, base_url)


def test_non_streaming_disconnect_stops_the_generation(
    live_server: LiveServers, base_url: str
) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_completion_tokens": 30000,
        "ignore_eos": True,
    }
    with (
        httpx.Client(base_url=base_url, timeout=httpx.Timeout(60, read=1.0)) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        client.post("/v1/chat/completions", json=body)
    assert wait_until_idle(live_server, base_url)


def test_error_after_headers_goes_into_the_stream(live_server: LiveServers) -> None:
    url = live_server(request_timeout_s=3.0)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "max_completion_tokens": 30000,
        "ignore_eos": True,
    }
    with httpx.Client(base_url=url, timeout=120) as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    payloads = events(response.content)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["code"] == "timeout"
    assert json.loads(payloads[0])["choices"][0]["delta"]["role"] == "assistant"
