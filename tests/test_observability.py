"""/health, /ready, /metrics, /status and /queue.

The first tests drive the app through httpx's ASGITransport without loading a
model: readiness while loading, after a failed load, and while an engine
reports itself not ready (a plain object standing in for EngineClient, which
restarts are out of reach for here). The last ones run the live server on the
tiny model and check that metrics move as real requests are served.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.server import asgi_client, data_url, make_app, make_image
from utils.api.metrics import Metrics
from utils.api.state import app_state
from utils.engine.types import GenerationEvent, ModelInfo

_INFO = ModelInfo("tiny", "qwen2_vl", "/models/tiny", True, 4096)


@dataclass
class _StandInEngine:
    ready: bool = True
    failed: bool = False
    problem: str | None = None
    counters: dict[str, float] = field(
        default_factory=lambda: {
            "queue_depth": 3,
            "running": 2,
            "kv_cache_usage": 0.25,
            "restarts": 1,
            "generations_served": 7,
            "engine_pipeline_seconds": 12.5,
            "engine_loop_overhead_seconds": 0.75,
        }
    )
    info: ModelInfo = _INFO
    pid: int | None = None

    def stats(self) -> dict[str, float]:
        return dict(self.counters)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_health_is_always_up_and_public() -> None:
    app = make_app(api_keys="k")
    async with asgi_client(app) as client:
        response = await client.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


async def test_ready_follows_the_engine() -> None:
    app = make_app()
    async with asgi_client(app) as client:
        # Loading: no engine yet.
        app_state(app).engine = None
        response = await client.get("/ready")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "model_loading"
        assert response.headers["retry-after"]
        # Engine present but not ready (restarting after a crash).
        engine = _StandInEngine(ready=False)
        app_state(app).engine = engine
        response = await client.get("/ready")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "model_restarting"
        assert (await client.get("/status")).json()["state"] == "restarting"
        engine.ready = True
        response = await client.get("/ready")
        assert response.status_code == 200 and response.json() == {"status": "ready"}
        assert (await client.get("/health")).status_code == 200


async def test_ready_reports_a_failed_load() -> None:
    app = make_app()

    async def fail() -> None:
        raise RuntimeError("no such model")

    app_state(app).engine = None
    app_state(app).loader = asyncio.create_task(fail())
    with contextlib.suppress(RuntimeError):
        await app_state(app).loader
    async with asgi_client(app) as client:
        response = await client.get("/ready")
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "model_failed"
        assert "no such model" not in response.text
        assert (await client.get("/status")).json()["state"] == "failed"


async def test_status_queue_and_engine_gauges() -> None:
    app = make_app(max_queue=9, max_num_seqs=4, device="cpu")
    app_state(app).engine = _StandInEngine()
    async with asgi_client(app) as client:
        queue = (await client.get("/queue")).json()
        assert queue == {"queue_depth": 3, "running": 2, "max_queue": 9, "max_num_seqs": 4}
        status = (await client.get("/status")).json()
        assert status["state"] == "ready" and status["device"] == "CPU"
        assert status["model"] == "embedded/tiny-qwen2-vl"
        assert status["model_type"] == "qwen2_vl" and status["max_context"] == 4096
        assert status["generations_served"] == 7 and status["engine_restarts"] == 1
        assert status["queue"] == queue and status["uptime_s"] >= 0
        samples = _samples((await client.get("/metrics")).text)
    assert _value(samples, "vlm_queue_depth") == 3
    assert _value(samples, "vlm_running_requests") == 2
    assert _value(samples, "vlm_kv_cache_usage_ratio") == 0.25
    assert _value(samples, "vlm_engine_restarts_total") == 1
    assert _value(samples, "vlm_generations_served_total") == 7
    assert _value(samples, "vlm_engine_pipeline_seconds_total") == 12.5
    assert _value(samples, "vlm_engine_loop_overhead_seconds_total") == 0.75
    assert _value(samples, "vlm_engine_ready") == 1


async def test_request_counts_per_app() -> None:
    first, second = make_app(api_keys="k"), make_app()
    async with asgi_client(first) as a, asgi_client(second) as b:
        for _ in range(3):
            await a.get("/health")
        await a.get("/v1/models")  # 401, counted on its route
        await a.get("/no/such/route", headers={"Authorization": "Bearer k"})
        await b.get("/health")
        samples_a = _samples((await a.get("/metrics", headers={"Authorization": "Bearer k"})).text)
        samples_b = _samples((await b.get("/metrics")).text)
    name = "vlm_http_requests_total"
    assert _value(samples_a, name, route="/health", method="GET", status="200") == 3
    assert _value(samples_a, name, route="/v1/models", method="GET", status="401") == 1
    assert _value(samples_a, name, route="unmatched", method="GET", status="404") == 1
    # Separate registries: the other app saw one request only.
    assert _value(samples_b, name, route="/health", method="GET", status="200") == 1


async def test_track_measures_tokens_ttft_and_tpot() -> None:
    metrics = Metrics()
    closed: list[bool] = []

    async def events() -> AsyncIterator[GenerationEvent]:
        try:
            yield GenerationEvent(0, "", 0, None, prompt_tokens=40, visual_tokens=18)
            for k in range(1, 5):
                finish = "length" if k == 4 else None
                yield GenerationEvent(0, "x", k, finish, prompt_tokens=40, visual_tokens=18)
        finally:
            closed.append(True)

    async for _ in metrics.track(events()):
        pass
    # Closing early (a client that went away) closes the engine's stream too.
    stream = metrics.track(events())
    await anext(stream)
    await anext(stream)
    await stream.aclose()
    assert closed == [True, True]

    samples = _samples(generate_latest(metrics.registry).decode())
    assert _value(samples, "vlm_prompt_tokens_total") == 80
    assert _value(samples, "vlm_prompt_visual_tokens_total") == 36
    assert _value(samples, "vlm_completion_tokens_total") == 5
    assert _value(samples, "vlm_time_to_first_token_seconds_count") == 2
    assert _value(samples, "vlm_time_per_output_token_seconds_count") == 1  # needs 2+ tokens
    assert _value(samples, "vlm_generations_total", finish_reason="length") == 1
    assert _value(samples, "vlm_generations_total", finish_reason="aborted") == 1


# --- live server --------------------------------------------------------------------


async def test_metrics_move_as_requests_are_served(live_server: Callable[..., str]) -> None:
    base = live_server()
    image = data_url(make_image("png", 64, 48), "image/png")
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": image}},
                ],
            }
        ],
        "max_completion_tokens": 4,
        "temperature": 0,
    }
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        assert (await client.get("/ready")).status_code == 200
        before = _samples((await client.get("/metrics")).text)
        status_before = (await client.get("/status")).json()

        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        async with client.stream(
            "POST", "/v1/chat/completions", json={**body, "stream": True}
        ) as stream:
            assert stream.status_code == 200
            text = "".join([line async for line in stream.aiter_lines()])
        assert "[DONE]" in text
        bad = await client.post("/v1/chat/completions", json={"messages": []})
        assert bad.status_code == 400

        after = _samples((await client.get("/metrics")).text)
        status_after = (await client.get("/status")).json()
        queue = (await client.get("/queue")).json()

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    route = "/v1/chat/completions"
    assert delta("vlm_http_requests_total", route=route, method="POST", status="200") == 2
    assert delta("vlm_http_requests_total", route=route, method="POST", status="400") == 1
    assert delta("vlm_prompt_tokens_total") == 2 * usage["prompt_tokens"]
    # a 64x48 image is 2x2 merged patches on the tiny Qwen2-VL (its start and end
    # markers are text of the template)
    assert delta("vlm_prompt_visual_tokens_total") == 2 * 2 * 2
    assert delta("vlm_completion_tokens_total") == 2 * usage["completion_tokens"]
    assert delta("vlm_time_to_first_token_seconds_count") == 2
    assert delta("vlm_time_per_output_token_seconds_count") == 2
    assert delta("vlm_media_items_total", kind="image") == 2
    # the same image twice: the second one at least comes from the cache
    assert delta("vlm_image_cache_hits_total") + delta("vlm_image_cache_misses_total") == 2
    assert delta("vlm_image_cache_hits_total") >= 1
    assert _value(after, "vlm_image_cache_bytes") >= 64 * 48 * 3
    assert delta("vlm_generations_served_total") == 2
    assert delta("vlm_engine_pipeline_seconds_total") > 0  # two generations ran steps
    assert delta("vlm_engine_loop_overhead_seconds_total") > 0
    assert _value(after, "vlm_engine_ready") == 1
    assert status_after["state"] == "ready" and status_after["model_type"] == "qwen2_vl"
    assert status_after["generations_served"] - status_before["generations_served"] == 2
    assert status_after["uptime_s"] > status_before["uptime_s"]
    assert queue["queue_depth"] == 0 and queue["running"] == 0


async def test_not_ready_while_the_engine_restarts(live_server: Callable[..., str]) -> None:
    """Kill the engine process: /ready says 503 until it is back, /health stays up."""
    base = live_server(max_queue=7)  # a server of its own: its engine gets killed
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        status = (await client.get("/status")).json()
        assert status["state"] == "ready" and status["engine_pid"]
        os.kill(status["engine_pid"], signal.SIGKILL)
        seen: list[int] = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            ready = await client.get("/ready")
            seen.append(ready.status_code)
            assert (await client.get("/health")).status_code == 200
            if ready.status_code == 200 and 503 in seen:
                break
            if ready.status_code == 503:
                assert ready.json()["error"]["code"] == "model_restarting"
            await asyncio.sleep(0.01)
        assert 503 in seen and seen[-1] == 200
        after = (await client.get("/status")).json()
        samples = _samples((await client.get("/metrics")).text)
        response = await client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 2},
        )
    assert after["engine_restarts"] == 1 and after["engine_pid"] != status["engine_pid"]
    assert _value(samples, "vlm_engine_restarts_total") == 1
    assert response.status_code == 200
