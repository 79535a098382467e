"""API keys, CORS, body size, request ids and log scrubbing.

These run the real app (its middleware, routers and error handlers) without
loading a model: through httpx's ASGITransport (no lifespan), or a uvicorn
server on loopback with the lifespan off where real sockets matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

import utils.api.security
from tests.fixtures.server import asgi_client, make_app
from utils.api.security import RequestIdLogFilter, install_log_filter

KEYS = "key-one,key-two,key-three"


@contextlib.contextmanager
def _uvicorn(app: FastAPI) -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


# --- API keys -----------------------------------------------------------------------


async def test_no_keys_means_open() -> None:
    async with asgi_client(make_app()) as client:
        for path in ("/health", "/v1/models", "/status", "/metrics"):
            assert (await client.get(path)).status_code == 200, path


async def test_keys_required_everywhere_but_liveness() -> None:
    async with asgi_client(make_app(api_keys=KEYS)) as client:
        assert (await client.get("/health")).status_code == 200
        for path in ("/v1/models", "/status", "/queue", "/metrics", "/ready", "/openapi.json"):
            response = await client.get(path)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == "Bearer"
            error = response.json()["error"]
            assert error["code"] == "invalid_api_key" and error["message"]
            assert set(error) == {"message", "type", "param", "code"}
        response = await client.post("/v1/chat/completions", json={"messages": []})
        assert response.status_code == 401
        for header in ("Bearer wrong", "Bearer key-one2", "Basic key-one", "key-one", "Bearer "):
            response = await client.get("/v1/models", headers={"Authorization": header})
            assert response.status_code == 401, header
            assert "key-one" not in response.text
        for key in KEYS.split(","):
            response = await client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 200
        response = await client.get("/v1/models", headers={"Authorization": "bearer  key-two "})
        assert response.status_code == 200


async def test_keys_compared_in_constant_time_against_every_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = utils.api.security.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(utils.api.security.hmac, "compare_digest", spy)
    async with asgi_client(make_app(api_keys=KEYS)) as client:
        response = await client.get("/v1/models", headers={"Authorization": "Bearer key-one"})
        assert response.status_code == 200
        # The first key matched, and every key was still compared.
        assert calls == [(b"key-one", k.encode()) for k in KEYS.split(",")]
        calls.clear()
        response = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert response.status_code == 401
        assert len(calls) == 3


# --- body size ------------------------------------------------------------------------


async def test_body_over_limit_by_content_length() -> None:
    async with asgi_client(make_app(max_body_bytes=2048)) as client:
        response = await client.post(
            "/v1/chat/completions",
            content=b"x" * 5000,
            headers={"Content-Type": "application/json"},
        )
    assert response.status_code == 413
    error = response.json()["error"]
    assert "max_body_bytes" in error["message"] and error["code"] == "request_too_large"


async def test_streamed_body_over_limit_is_counted() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 1000

    async with asgi_client(make_app(max_body_bytes=2048)) as client:
        response = await client.post(
            "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}
        )
    assert response.status_code == 413
    assert "max_body_bytes" in response.json()["error"]["message"]


async def test_body_under_limit_passes() -> None:
    async with asgi_client(make_app(max_body_bytes=2048)) as client:
        response = await client.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"Content-Type": "application/json"},
        )
    assert response.status_code == 400  # reached the route, which refused the JSON


def test_oversized_body_refused_before_it_is_sent() -> None:
    """Over a real socket: the 413 comes back although the client has sent
    only the headers of a body announced at 1 GB."""
    with (
        _uvicorn(make_app(max_body_bytes=4096)) as port,
        socket.create_connection(("127.0.0.1", port), timeout=10) as conn,
    ):
        conn.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n{"
        )
        reply = b""
        while b"\r\n\r\n" not in reply or b"}}" not in reply:
            data = conn.recv(65536)
            if not data:
                break
            reply += data
    assert reply.startswith(b"HTTP/1.1 413")
    assert b"max_body_bytes" in reply


def test_streaming_responses_are_not_buffered() -> None:
    """The first chunk reaches the client while the stream is still open."""
    app = make_app(api_keys="k", max_body_bytes=4096)
    released = threading.Event()
    outcome: list[str] = []

    async def stream() -> AsyncIterator[bytes]:
        yield b"first\n"
        for _ in range(200):
            if released.is_set():
                outcome.append("released")
                break
            await asyncio.sleep(0.05)
        else:
            outcome.append("timed out")
        yield b"last\n"

    app.add_api_route("/_stream", lambda: StreamingResponse(stream()), methods=["GET"])
    with (
        _uvicorn(app) as port,
        httpx.stream(
            "GET", f"http://127.0.0.1:{port}/_stream", headers={"Authorization": "Bearer k"}
        ) as response,
    ):
        lines = response.iter_lines()
        assert next(lines) == "first"
        released.set()
        assert next(lines) == "last"
    assert outcome == ["released"]


# --- CORS -------------------------------------------------------------------------------


async def test_cors_off_by_default() -> None:
    async with asgi_client(make_app()) as client:
        response = await client.get("/v1/models", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in response.headers
        preflight = await client.options(
            "/v1/chat/completions",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in preflight.headers


async def test_cors_allows_configured_origins_only() -> None:
    app = make_app(cors_origins="https://app.example", api_keys="k")
    async with asgi_client(app) as client:
        # A preflight carries no key: CORS answers it before the key check.
        preflight = await client.options(
            "/v1/chat/completions",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        response = await client.get(
            "/v1/models", headers={"Origin": "https://app.example", "Authorization": "Bearer k"}
        )
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        # Even a refusal carries the CORS header, so browsers can read the error.
        response = await client.get("/v1/models", headers={"Origin": "https://app.example"})
        assert response.status_code == 401
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        response = await client.get(
            "/v1/models", headers={"Origin": "https://evil.example", "Authorization": "Bearer k"}
        )
        assert "access-control-allow-origin" not in response.headers
        preflight = await client.options(
            "/v1/chat/completions",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert preflight.status_code == 400


# --- request ids and logs ----------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_request_ids_and_scrubbed_logs() -> None:
    log = logging.getLogger("tests.security.requests")
    handler = _Records()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    install_log_filter(log)
    app = make_app()
    payload = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"

    async def noisy() -> dict[str, str]:
        log.info("got %s", f"data:image/png;base64,{payload}")
        log.info("header was Authorization: Bearer sk-secret-value")
        return {"ok": "yes"}

    app.add_api_route("/_log", noisy, methods=["GET"])
    try:
        async with asgi_client(app) as client:
            response = await client.get("/_log", headers={"X-Request-ID": "abc-123"})
            assert response.headers["x-request-id"] == "abc-123"
            generated = (await client.get("/health")).headers["x-request-id"]
            assert len(generated) == 32
            for bad in ("has space", "x" * 200, "new\tline"):
                response = await client.get("/health", headers={"X-Request-ID": bad})
                assert response.headers["x-request-id"] != bad
    finally:
        log.removeHandler(handler)
    assert [r.request_id for r in handler.records] == ["abc-123", "abc-123"]
    text = "\n".join(r.getMessage() for r in handler.records)
    assert payload[:20] not in text and "data:image/png;base64,..." in text
    assert "sk-secret-value" not in text and "Bearer ***" in text


def test_log_filter_outside_requests() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "plain %s", ("message",), None)
    assert RequestIdLogFilter().filter(record)
    assert record.request_id == "-" and record.getMessage() == "plain message"


# --- end to end with the official client ---------------------------------------------------


def test_openai_client_with_api_key(live_server: Callable[..., str]) -> None:
    import openai

    base = live_server(api_keys="sk-test-one,sk-test-two")
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test-two", max_retries=0)
    completion = client.chat.completions.create(
        model="embedded/tiny-qwen2-vl",
        messages=[{"role": "user", "content": "Hi"}],
        max_completion_tokens=2,
    )
    assert completion.choices[0].finish_reason in ("stop", "length")
    wrong = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    assert httpx.get(f"{base}/health").status_code == 200
    assert httpx.get(f"{base}/ready").status_code == 401


async def test_request_id_reaches_the_log_of_a_500() -> None:
    log = logging.getLogger("utils.errors")
    handler = _Records()
    log.addHandler(handler)
    install_log_filter(log)
    app = make_app()

    async def broken() -> None:
        raise RuntimeError("boom")

    app.add_api_route("/_broken", broken, methods=["GET"])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/_broken", headers={"X-Request-ID": "req-500"})
    finally:
        log.removeHandler(handler)
    assert response.status_code == 500 and "boom" not in response.text
    assert [r.request_id for r in handler.records] == ["req-500"]
