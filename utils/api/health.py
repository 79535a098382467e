"""Health, readiness, Prometheus metrics and JSON status.

- `/health`: liveness, 200 while the process serves HTTP (no key needed);
- `/ready`: 200 once the engine is loaded and warmed up, 503 (OpenAI error
  body) while loading, restarting (with the reason: a crash, a stall) or after a
  failed load or too many failed restarts (with the last error);
- `/metrics`: Prometheus text (utils/api/metrics.py);
- `/status` and `/queue`: JSON summaries.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from utils.api.metrics import engine_stats
from utils.api.state import AppState, State
from utils.errors import OpenAIError

router = APIRouter(tags=["observability"])


@router.get("/health", include_in_schema=True)
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "Loading, restarting or failed."}})
async def ready(state: State) -> JSONResponse:
    phase = state.phase
    if phase == "ready":
        return JSONResponse({"status": "ready"})
    messages = {
        "loading": "The model is loading; retry shortly.",
        "restarting": "The engine is restarting; retry shortly.",
        "failed": "The model failed to load; see the server log.",
    }
    message = messages[phase]
    problem = state.engine.problem if state.engine is not None else None
    if problem:
        message = f"{message} Cause: {problem}."
    raise OpenAIError(
        503,
        message,
        code=f"model_{phase}",
        headers={"Retry-After": "5"} if phase != "failed" else None,
    )


@router.get("/metrics", response_class=Response)
async def metrics(state: State) -> Response:
    registry = state.metrics.registry if state.metrics is not None else CollectorRegistry()
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def _queue(state: AppState) -> dict[str, Any]:
    settings = state.settings
    stats = engine_stats(state.engine)
    return {
        "queue_depth": int(stats.get("queue_depth", 0) or 0),
        "running": int(stats.get("running", 0) or 0),
        "max_queue": settings.max_queue,
        "max_num_seqs": settings.max_num_seqs,
    }


@router.get("/queue")
async def queue(state: State) -> dict[str, Any]:
    return _queue(state)


@router.get("/status")
async def status(state: State) -> dict[str, Any]:
    settings = state.settings
    engine = state.engine
    stats = engine_stats(engine)
    info = engine.info if engine is not None else None
    uptime = state.metrics.uptime_s if state.metrics is not None else 0.0
    totals = dict(state.metrics.totals) if state.metrics is not None else {}
    return {
        "state": state.phase,
        "model": settings.public_model_name,
        "model_type": info.model_type if info else None,
        "max_context": info.max_context if info else None,
        "supports_video": info.supports_video if info else None,
        "device": settings.device,
        "engine": settings.engine,
        "uptime_s": round(uptime, 3),
        "pid": os.getpid(),
        "engine_pid": engine.pid if engine is not None else None,
        "queue": _queue(state),
        "generations_served": int(stats.get("generations_served", 0) or 0),
        "engine_restarts": int(stats.get("restarts", 0) or 0),
        "engine_stalls": int(stats.get("stalls", 0) or 0),
        "engine_problem": engine.problem if engine is not None else None,
        "kv_cache_usage": float(stats.get("kv_cache_usage", 0.0) or 0.0),
        "totals": totals,
    }
