"""Health, readiness, Prometheus metrics and JSON status.

- `/health`: liveness, 200 while the process serves HTTP (no key needed);
- `/ready`: 200 once the engine is loaded and warmed up, 503 (OpenAI error
  body) while loading, restarting or after a failed load;
- `/metrics`: Prometheus text from a registry owned by the app (several apps
  in one process keep separate counts);
- `/status` and `/queue`: JSON summaries.

The chat layer reports generations through `Metrics.track(events)`, which
wraps an engine's event stream, or the lower-level `observe_ttft`,
`observe_tpot` and `add_tokens`. HTTP requests are counted by
`MetricsMiddleware` (route template, method, status).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from utils.errors import OpenAIError
from utils.generation import GenerationEvent, GenerationRequest

__all__ = ["Metrics", "MetricsMiddleware", "install_observability", "router", "track_generation"]

logger = logging.getLogger(__name__)

router = APIRouter(tags=["observability"])

_TTFT_BUCKETS = (0.02, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
_TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _EngineCollector:
    """Metrics read from `engine.stats()` and the decoded-image cache when Prometheus
    scrapes."""

    def __init__(self, app: FastAPI, metrics: Metrics) -> None:
        self._app = app
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # collected lazily; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        engine = getattr(self._app.state, "engine", None)
        stats = _engine_stats(engine)
        ready = GaugeMetricFamily("vlm_engine_ready", "1 when the engine serves requests.")
        ready.add_metric([], 1.0 if engine is not None and engine.ready else 0.0)
        yield ready
        gauges = (
            ("queue_depth", "vlm_queue_depth", "Requests waiting for the engine."),
            ("running", "vlm_running_requests", "Requests being generated."),
            ("kv_cache_usage", "vlm_kv_cache_usage_ratio", "Share of the KV cache in use (0-1)."),
        )
        for key, name, doc in gauges:
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], float(stats.get(key, 0.0) or 0.0))
            yield gauge
        for key, name, doc in (
            ("restarts", "vlm_engine_restarts", "Times the engine process was restarted."),
            ("generations_served", "vlm_generations_served", "Generations the engine finished."),
            (
                "engine_pipeline_seconds",
                "vlm_engine_pipeline_seconds",
                "Seconds the engine process spent in the OpenVINO pipeline (since it started).",
            ),
            (
                "engine_loop_overhead_seconds",
                "vlm_engine_loop_overhead_seconds",
                "Seconds the engine process spent around the pipeline: requests in, "
                "detokenizing, messages out (since it started).",
            ),
        ):
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], float(stats.get(key, 0) or 0))
            yield counter
        yield from _image_cache_metrics(getattr(self._app.state, "image_cache", None))
        uptime = GaugeMetricFamily("vlm_uptime_seconds", "Seconds since the server started.")
        uptime.add_metric([], self._metrics.uptime_s)
        yield uptime


def _image_cache_metrics(cache: Any) -> Iterator[Metric]:
    hits = CounterMetricFamily("vlm_image_cache_hits", "Images taken from the decoded-image cache.")
    hits.add_metric([], float(cache.hits if cache else 0))
    misses = CounterMetricFamily(
        "vlm_image_cache_misses", "Images decoded because the decoded-image cache lacked them."
    )
    misses.add_metric([], float(cache.misses if cache else 0))
    size = GaugeMetricFamily("vlm_image_cache_bytes", "Memory held by the decoded-image cache.")
    size.add_metric([], float(cache.bytes if cache else 0))
    return iter((hits, misses, size))


class Metrics:
    """Prometheus metrics of one app, in a registry of its own."""

    def __init__(self, app: FastAPI | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.started = time.monotonic()
        r = self.registry
        self.requests = Counter(
            "vlm_http_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "vlm_http_request_duration_seconds",
            "Time to the end of the response body, by route template.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "vlm_time_to_first_token_seconds",
            "Time from request arrival to the first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "vlm_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per generation.",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "vlm_prompt_tokens", "Prompt tokens processed (visual tokens included).", registry=r
        )
        self.visual_tokens = Counter(
            "vlm_prompt_visual_tokens", "Prompt tokens that encode images or video.", registry=r
        )
        self.completion_tokens = Counter(
            "vlm_completion_tokens", "Output tokens generated.", registry=r
        )
        self.generations = Counter(
            "vlm_generations",
            "Generations that ended, by finish reason (aborted: cancelled or failed).",
            ["finish_reason"],
            registry=r,
        )
        self.media = Counter(
            "vlm_media_items", "Images and videos received, by kind.", ["kind"], registry=r
        )
        # Plain totals for /status (reading Prometheus objects back is clumsy).
        self.totals = {"requests": 0, "generations": 0, "prompt_tokens": 0, "completion_tokens": 0}
        if app is not None:
            self.registry.register(_EngineCollector(app, self))  # type: ignore[arg-type]

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started

    # --- the API the HTTP layer calls ------------------------------------------

    def observe_request(self, route: str, method: str, status: int, duration_s: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(duration_s)
        self.totals["requests"] += 1

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(max(0.0, seconds))

    def observe_tpot(self, seconds: float) -> None:
        self.tpot.observe(max(0.0, seconds))

    def add_tokens(self, prompt: int, completion: int, *, visual: int = 0) -> None:
        if prompt > 0:
            self.prompt_tokens.inc(prompt)
            self.totals["prompt_tokens"] += prompt
        if visual > 0:
            self.visual_tokens.inc(visual)
        if completion > 0:
            self.completion_tokens.inc(completion)
            self.totals["completion_tokens"] += completion

    def add_media(self, *, images: int = 0, videos: int = 0) -> None:
        if images:
            self.media.labels("image").inc(images)
        if videos:
            self.media.labels("video").inc(videos)

    def observe_generation(self, finish_reason: str) -> None:
        self.generations.labels(finish_reason).inc()
        self.totals["generations"] += 1

    async def track(
        self,
        events: AsyncIterator[GenerationEvent],
        *,
        started: float | None = None,
        visual_tokens: int = 0,
    ) -> AsyncIterator[GenerationEvent]:
        """Pass `events` through, measuring TTFT, time per output token and tokens.

        `started` is the `time.monotonic()` of the request's arrival (default:
        now). Closing this iterator closes `events`, so cancellation reaches
        the engine as before.
        """
        t0 = time.monotonic() if started is None else started
        first_token: float | None = None
        last_token = t0
        prompt = 0
        visual = visual_tokens
        completion: dict[int, int] = {}
        finish: dict[int, str] = {}
        try:
            async for event in events:
                now = time.monotonic()
                prompt = max(prompt, event.prompt_tokens)
                visual = max(visual, getattr(event, "visual_tokens", 0) or 0)
                if event.completion_tokens > completion.get(event.index, 0):
                    completion[event.index] = event.completion_tokens
                    if first_token is None:
                        first_token = now
                        self.observe_ttft(now - t0)
                    last_token = now
                if event.finish_reason:
                    finish[event.index] = event.finish_reason
                yield event
        finally:
            try:
                aclose = getattr(events, "aclose", None)
                if aclose is not None:
                    await aclose()
            finally:
                self._record(first_token, last_token, prompt, visual, completion, finish)

    def _record(
        self,
        first_token: float | None,
        last_token: float,
        prompt: int,
        visual: int,
        completion: dict[int, int],
        finish: dict[int, str],
    ) -> None:
        longest = max(completion.values(), default=0)
        if first_token is not None and longest > 1:
            self.observe_tpot((last_token - first_token) / (longest - 1))
        self.add_tokens(prompt, sum(completion.values()), visual=visual)
        if prompt or completion or finish:  # admitted by the engine (not refused)
            reasons = set(finish.values())
            self.observe_generation(
                "aborted" if not finish else reasons.pop() if len(reasons) == 1 else "mixed"
            )


def track_generation(
    request: Request, events: AsyncIterator[GenerationEvent], generation: GenerationRequest
) -> AsyncIterator[GenerationEvent]:
    """`events` measured into the app's metrics (unchanged when it has none).

    TTFT counts from the request's arrival, as `MetricsMiddleware` noted it.
    """
    metrics: Metrics | None = getattr(request.app.state, "metrics", None)
    if metrics is None:
        return events
    metrics.add_media(images=len(generation.images), videos=len(generation.videos))
    started = request.scope.get("state", {}).get("started")
    return metrics.track(events, started=started)


class MetricsMiddleware:
    """Counts every HTTP request by route template, method and final status."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Any) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")
        path = getattr(route, "path", None)
        if path:
            return str(path)
        return _match_template(self.routes, scope) or "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        scope.setdefault("state", {})["started"] = started
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(
                self._route(scope), scope["method"], status, time.monotonic() - started
            )


def _match_template(routes: Any, scope: Scope, prefix: str = "") -> str | None:
    """Route template for a request no router saw (refused by a middleware)."""
    for candidate in routes:
        included = getattr(candidate, "original_router", None)  # FastAPI's included router
        if included is not None:
            context = getattr(candidate, "include_context", None)
            sub_prefix = prefix + (getattr(context, "prefix", "") or "")
            found = _match_template(included.routes, scope, sub_prefix)
            if found:
                return found
            continue
        path = getattr(candidate, "path", None)
        if not path:
            continue
        sub_scope = {**scope, "path": scope["path"].removeprefix(prefix)} if prefix else scope
        match, _ = candidate.matches(sub_scope)
        if match is Match.FULL:
            return prefix + str(path)
    return None


def _engine_stats(engine: Any) -> dict[str, Any]:
    if engine is None:
        return {}
    try:
        return dict(engine.stats())
    except Exception:  # a dying engine must not break /metrics or /status
        logger.debug("engine.stats() failed", exc_info=True)
        return {}


def _state(request: Request) -> str:
    engine = getattr(request.app.state, "engine", None)
    if engine is not None:
        return "ready" if engine.ready else "restarting"
    loader = getattr(request.app.state, "loader", None)
    if loader is not None and loader.done() and not loader.cancelled() and loader.exception():
        return "failed"
    return "loading"


@router.get("/health", include_in_schema=True)
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "Loading, restarting or failed."}})
async def ready(request: Request) -> JSONResponse:
    state = _state(request)
    if state == "ready":
        return JSONResponse({"status": "ready"})
    messages = {
        "loading": "The model is loading; retry shortly.",
        "restarting": "The engine is restarting; retry shortly.",
        "failed": "The model failed to load; see the server log.",
    }
    raise OpenAIError(
        503,
        messages[state],
        code=f"model_{state}",
        headers={"Retry-After": "5"} if state != "failed" else None,
    )


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _queue(request: Request) -> dict[str, Any]:
    settings = request.app.state.settings
    stats = _engine_stats(getattr(request.app.state, "engine", None))
    return {
        "queue_depth": int(stats.get("queue_depth", 0) or 0),
        "running": int(stats.get("running", 0) or 0),
        "max_queue": settings.max_queue,
        "max_num_seqs": settings.max_num_seqs,
    }


@router.get("/queue")
async def queue(request: Request) -> dict[str, Any]:
    return _queue(request)


@router.get("/status")
async def status(request: Request) -> dict[str, Any]:
    app_state = request.app.state
    settings = app_state.settings
    engine = getattr(app_state, "engine", None)
    stats = _engine_stats(engine)
    metrics: Metrics = app_state.metrics
    info = getattr(engine, "info", None) if engine is not None else None
    return {
        "state": _state(request),
        "model": settings.public_model_name,
        "model_type": getattr(info, "model_type", None),
        "max_context": getattr(info, "max_context", None),
        "supports_video": getattr(info, "supports_video", None),
        "device": settings.device,
        "engine": settings.engine,
        "uptime_s": round(metrics.uptime_s, 3),
        "pid": os.getpid(),
        "engine_pid": getattr(engine, "pid", None),
        "queue": _queue(request),
        "generations_served": int(stats.get("generations_served", 0) or 0),
        "engine_restarts": int(stats.get("restarts", 0) or 0),
        "kv_cache_usage": float(stats.get("kv_cache_usage", 0.0) or 0.0),
        "totals": dict(metrics.totals),
    }


def install_observability(app: FastAPI) -> Metrics:
    """Create `app.state.metrics`, count requests and add the routes above.

    Call after `install_security`: the counting middleware then sits outside
    the key and body-size checks, so their 401 and 413 answers are counted.
    """
    metrics = Metrics(app)
    app.state.metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app.router.routes)
    app.include_router(router)
    return metrics
