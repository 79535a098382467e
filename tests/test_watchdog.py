"""The engine watchdog, the pipe's framed reads and bounded restarts.

Stand-in engine processes (tests/fixtures/fake_engine.py) speak the real pipe protocol
without OpenVINO: one that computes for longer than the stall timeout without a step
(a slow prefill), one that stops half-way through writing a message, one that dies on
every load after the first. The last test stops (SIGSTOP) the real tiny model's
engine under a live server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures import fake_engine
from tests.fixtures.server import asgi_client, make_app
from utils.api.state import app_state
from utils.engine.client import EngineClient
from utils.engine.types import GenerationEvent, GenerationRequest, SamplingParams
from utils.engine.watchdog import StallDetector, cpu_seconds
from utils.errors import OpenAIError
from utils.settings import Settings

on_loop = pytest.mark.asyncio(loop_scope="session")


def _request() -> GenerationRequest:
    return GenerationRequest(
        request_id="t",
        messages=[{"role": "user", "content": "Hi"}],
        params=SamplingParams(max_new_tokens=4),
    )


def _model_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_vl"}')
    return tmp_path


def _fake(tmp_path: Path, target: Any = fake_engine.main, **settings: Any) -> EngineClient:
    settings_ = Settings(model_name="fake", **settings)
    return EngineClient(settings_, _model_dir(tmp_path), target=target)


async def _drain(stream: AsyncIterator[GenerationEvent]) -> list[GenerationEvent]:
    return [event async for event in stream]


# --- the stall rule ---------------------------------------------------------------


def test_stall_detector_rule() -> None:
    detector = StallDetector(timeout_s=10)
    assert not detector.stalled(0, False, 0, 5.0)  # idle: never a stall
    # busy, no message, CPU time advancing (a long prefill): not a stall
    for t in range(1, 40):
        assert not detector.stalled(t, True, 0, 5.0 + t * 0.5)
    # busy, CPU time frozen: a stall once the timeout has passed since it last moved
    stalled = [t for t in range(40, 60) if detector.stalled(t, True, 0, 5.0 + 39 * 0.5)]
    assert stalled and stalled[0] == 49
    # a message is progress
    detector = StallDetector(timeout_s=10)
    detector.stalled(0, False, 0, 1.0)
    assert not detector.stalled(9, True, 0, 1.0)
    assert not detector.stalled(15, True, 8, 1.0)
    assert detector.stalled(18, True, 8, 1.0)
    # a timeout of 0 turns the watchdog off
    off = StallDetector(timeout_s=0)
    assert not any(off.stalled(t, True, 0, 1.0) for t in range(100))


def test_cpu_seconds_counts_every_thread() -> None:
    before = cpu_seconds(os.getpid())
    assert before is not None

    def burn() -> None:
        deadline = time.thread_time() + 0.3
        while time.thread_time() < deadline:
            pass

    thread = threading.Thread(target=burn)
    thread.start()
    thread.join()
    after = cpu_seconds(os.getpid())
    assert after is not None and after - before >= 0.25
    assert cpu_seconds(2**22 + 12345) is None  # no such process


# --- stand-in engines ---------------------------------------------------------------


@on_loop
async def test_slow_prefill_longer_than_the_stall_timeout_is_not_a_stall(tmp_path: Path) -> None:
    """An engine busy for 6 s (3 times the stall timeout) without a step message but
    using CPU time is working: the request completes."""
    client = _fake(tmp_path, engine_stall_timeout_s=2.0, ov_config={"fake": "burn", "seconds": 6.0})
    await client.start()
    try:
        pid = client.pid
        events = await asyncio.wait_for(_drain(client.generate(_request())), 120)
        assert events[-1].text == "done" and events[-1].finish_reason == "stop"
        assert client.stats()["stalls"] == 0 and client.pid == pid and client.ready
    finally:
        await client.stop()


@on_loop
async def test_worker_frozen_half_way_through_a_message(tmp_path: Path) -> None:
    """The worker writes half a message and stops: the event loop keeps serving
    /health at once, and the watchdog fails the request with `engine_stalled`, kills
    the worker and starts a new one."""
    client = _fake(tmp_path, engine_stall_timeout_s=5.0, ov_config={"fake": "half_frame"})
    await client.start()
    app = make_app()
    first_pid = client.pid
    assert first_pid is not None
    # Without non-blocking reads the event loop would block in recv() for good; this
    # timer ends such a test by killing the worker (recv then fails) instead of hanging.
    rescue = threading.Timer(60, lambda: os.kill(first_pid, signal.SIGKILL))
    rescue.start()
    gaps: list[float] = []

    async def ticker() -> None:  # the event loop's longest pause
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    try:
        stream = client.generate(_request())
        await asyncio.wait_for(stream.__anext__(), 30)  # accepted; half a frame follows
        started = time.monotonic()
        latencies = []
        async with asgi_client(app) as http:
            while time.monotonic() - started < 1.5:
                t0 = time.monotonic()
                assert (await http.get("/health")).status_code == 200
                latencies.append(time.monotonic() - t0)
                await asyncio.sleep(0.05)
        # generous bounds: the machine is shared
        assert max(latencies) < 2.0, latencies
        assert max(gaps) < 2.0, max(gaps)
        assert client.ready  # not stalled yet: the timeout has not passed
        with pytest.raises(OpenAIError) as info:
            await asyncio.wait_for(_drain(stream), 5.0 + 15)
        assert info.value.code == "engine_stalled" and info.value.status == 503
        assert time.monotonic() - started < 5.0 + 15
        assert not client.ready and "stalled" in (client.problem or "")
        assert client.stats()["stalls"] == 1
        for _ in range(600):  # restarted (a fake engine starts in a second or two)
            if client.ready:
                break
            await asyncio.sleep(0.1)
        assert client.ready and client.pid != first_pid
        assert client.stats()["restarts"] == 1
        assert max(gaps) < 2.0, max(gaps)
    finally:
        ticking.cancel()
        rescue.cancel()
        await client.stop()


@on_loop
async def test_crash_loop_is_bounded(tmp_path: Path) -> None:
    """An engine that dies on every load after the first: a bounded number of restarts
    with backoff, then `failed` in /ready with the last error, and no more attempts."""
    counter = tmp_path / "loads.txt"
    client = _fake(
        tmp_path,
        target=fake_engine.crashing_after_first_load,
        engine_max_restarts=3,
        ov_config={"counter": str(counter)},
    )
    await client.start()
    app = make_app()
    app_state(app).engine = client
    try:
        pid = client.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        for _ in range(1200):
            if client.failed:
                break
            await asyncio.sleep(0.1)
        assert client.failed and not client.ready
        elapsed = time.monotonic() - started
        assert elapsed >= 1 + 2  # backoff between the attempts
        assert len(counter.read_text().split()) == 1 + 3  # the first load and 3 restarts
        async with asgi_client(app) as http:
            response = await http.get("/ready")
            status = (await http.get("/status")).json()
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "model_failed" and "restart" in error["message"]
        assert status["state"] == "failed" and status["engine_restarts"] == 0
        with pytest.raises(OpenAIError) as info:
            await client.generate(_request()).__anext__()
        assert info.value.status == 503 and info.value.code == "model_failed"
        await asyncio.sleep(3)  # no further attempt
        assert len(counter.read_text().split()) == 1 + 3
    finally:
        await client.stop()


# --- the real engine, stopped -----------------------------------------------------


def _events(raw: bytes) -> list[str]:
    return [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]


@on_loop
async def test_sigstopped_engine_mid_stream(live_server: Callable[..., str]) -> None:
    """SIGSTOP the engine during a stream: the stream ends with an `engine_stalled`
    error event within the stall timeout plus a few seconds, /ready is 503 with the
    reason, the engine is killed and restarted, and a new request succeeds."""
    timeout_s = 4.0
    base = live_server(engine_stall_timeout_s=timeout_s)
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "max_completion_tokens": 30000,
        "ignore_eos": True,
    }
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        status = (await client.get("/status")).json()
        pid = status["engine_pid"]
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            async for line in lines:
                if line.startswith("data: ") and '"content"' in line:
                    break  # streaming
            os.kill(pid, signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                rest = []
                async for line in lines:
                    rest.append(line)
                waited = time.monotonic() - stopped
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        payloads = [line[6:] for line in rest if line.startswith("data: ")]
        assert payloads[-1] == "[DONE]"
        error = json.loads(payloads[-2])["error"]
        assert error["code"] == "engine_stalled" and error["message"]
        assert waited < timeout_s + 10
        ready = await client.get("/ready")
        assert ready.status_code == 503
        assert "stalled" in ready.json()["error"]["message"]
        deadline = time.monotonic() + 300
        while (await client.get("/ready")).status_code != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        after = (await client.get("/status")).json()
        metrics = (await client.get("/metrics")).text
        answer = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 3},
        )
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
    assert after["engine_pid"] != pid and after["engine_stalls"] == 1
    assert after["engine_restarts"] == 1
    assert "vlm_engine_stalls_total 1.0" in metrics
    assert "vlm_engine_restarts_total 1.0" in metrics
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the stopped process was killed (and reaped)
