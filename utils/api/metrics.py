"""Prometheus metrics, in a registry owned by the app (several apps in one process
keep separate counts); utils/api/health.py serves them at `/metrics`.

The chat layer reports generations through `Metrics.track(events)`, which
wraps an engine's event stream, or the lower-level `observe_ttft`,
`observe_tpot` and `add_tokens`. HTTP requests are counted by
`MetricsMiddleware` (route template, method, status).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from utils.api.state import AppState, app_state
from utils.api.usage import UsageCounter
from utils.engine.types import Engine, GenerationEvent, GenerationRequest
from utils.media.cache import DecodedImageCache

logger = logging.getLogger(__name__)

_TTFT_BUCKETS = (0.02, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120)
_TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class _EngineCollector:
    """Metrics read from `engine.stats()` and the decoded-image cache when Prometheus
    scrapes."""

    def __init__(self, state: AppState, metrics: Metrics) -> None:
        self._state = state
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # collected lazily; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        engine = self._state.engine
        stats = engine_stats(engine)
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
            (
                "stalls",
                "vlm_engine_stalls",
                "Times the engine process stalled (work pending, no step, no CPU time) and "
                "was killed.",
            ),
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
        yield from _image_cache_metrics(self._state.image_cache)
        uptime = GaugeMetricFamily("vlm_uptime_seconds", "Seconds since the server started.")
        uptime.add_metric([], self._metrics.uptime_s)
        yield uptime


def _image_cache_metrics(cache: DecodedImageCache | None) -> Iterator[Metric]:
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

    def __init__(self, state: AppState | None = None) -> None:
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
        if state is not None:
            self.registry.register(_EngineCollector(state, self))

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
        n: int = 1,
        started: float | None = None,
    ) -> AsyncIterator[GenerationEvent]:
        """Pass `events` through, measuring TTFT, time per output token and tokens.

        `started` is the `time.monotonic()` of the request's arrival (default:
        now). Closing this iterator closes `events`, so cancellation reaches
        the engine as before.
        """
        t0 = time.monotonic() if started is None else started
        first_token: float | None = None
        last_token = t0
        usage = UsageCounter(n)
        finish: dict[int, str] = {}
        try:
            async for event in events:
                generated = usage.completion_tokens
                usage.add(event)
                if usage.completion_tokens > generated:
                    now = time.monotonic()
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
                self._record(first_token, last_token, usage, finish)

    def _record(
        self,
        first_token: float | None,
        last_token: float,
        usage: UsageCounter,
        finish: dict[int, str],
    ) -> None:
        longest = max(usage.completion, default=0)
        if first_token is not None and longest > 1:
            self.observe_tpot((last_token - first_token) / (longest - 1))
        self.add_tokens(usage.prompt_tokens, usage.completion_tokens, visual=usage.visual_tokens)
        if usage.prompt_tokens or usage.completion_tokens or finish:  # admitted, not refused
            reasons = set(finish.values())
            self.observe_generation(
                "aborted" if not finish else reasons.pop() if len(reasons) == 1 else "mixed"
            )


def track_generation(
    state: AppState,
    request: Request,
    events: AsyncIterator[GenerationEvent],
    generation: GenerationRequest,
) -> AsyncIterator[GenerationEvent]:
    """`events` measured into the app's metrics (unchanged when it has none).

    TTFT counts from the request's arrival, as `MetricsMiddleware` noted it.
    """
    metrics = state.metrics
    if metrics is None:
        return events
    metrics.add_media(images=len(generation.images), videos=len(generation.videos))
    started = request.scope.get("state", {}).get("started")
    return metrics.track(events, n=generation.params.n, started=started)


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


def install_metrics(app: FastAPI) -> Metrics:
    """Make the app's `Metrics` and count its requests.

    Call after `install_security`: the counting middleware then sits outside
    the key and body-size checks, so their 401 and 413 answers are counted.
    """
    metrics = Metrics(app_state(app))
    app_state(app).metrics = metrics
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app.router.routes)
    return metrics


def engine_stats(engine: Engine | None) -> dict[str, float]:
    if engine is None:
        return {}
    try:
        return dict(engine.stats())
    except Exception:  # a dying engine must not break /metrics or /status
        logger.debug("engine.stats() failed", exc_info=True)
        return {}
