"""The API process's side of the engine: a client of the engine process.

`EngineClient` spawns utils/engine/worker.py in its own process (the OpenVINO
pipeline holds the GIL while it steps) and talks to it over one duplex
`multiprocessing` pipe (utils/engine/session.py) with the typed messages of
utils/engine/messages.py. One message per scheduler step holds the outputs of every
running request, fanned out here to per-request asyncio queues.

If the worker dies, every request in flight gets an `OpenAIError(500)` at once,
`ready` turns False and the worker is restarted (with backoff) by itself. If it
stalls (work pending, no step finished and no CPU time used for
VLM_ENGINE_STALL_TIMEOUT_S; utils/engine/watchdog.py), the same happens with a 503
`engine_stalled` after a SIGKILL. After VLM_ENGINE_MAX_RESTARTS restarts in a row
with no generation served in between, it stops trying and reports `failed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.engine import worker
from utils.engine.launch import model_info, worker_config
from utils.engine.messages import (
    AbortRequest,
    AddRequest,
    StepOutputs,
    StopEngine,
    WorkerConfig,
)
from utils.engine.model_config import ModelConfig
from utils.engine.session import Session
from utils.engine.types import GenerationEvent, GenerationRequest, ModelInfo, TokenLogprob
from utils.engine.watchdog import StallDetector, cpu_seconds
from utils.errors import OpenAIError
from utils.settings import Settings

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 10.0
MAX_RESTART_DELAY_S = 30.0
WATCH_INTERVAL_S = 1.0  # at most; shorter for short stall timeouts


def _joined(
    first: list[TokenLogprob] | None, second: list[TokenLogprob] | None
) -> list[TokenLogprob] | None:
    """The log probabilities of two events merged into one."""
    if first is None or second is None:
        return first if second is None else second
    return first + second


@dataclass(eq=False)
class _Request:
    rid: int
    n: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    started: bool = False  # first token seen


class EngineClient:
    """Implements utils.generation.Engine with the worker process behind it."""

    def __init__(
        self,
        settings: Settings,
        model_dir: Path | str,
        *,
        target: Callable[[Any, WorkerConfig], None] = worker.main,
    ) -> None:
        """`target` is the engine process's entry point (tests give stand-ins)."""
        self._settings = settings
        self._target = target
        self._model_dir = Path(model_dir)
        self._model = ModelConfig.read(self._model_dir)
        self._info = model_info(settings, self._model_dir, self._model)
        self._ctx = multiprocessing.get_context("spawn")
        self._session: Session | None = None
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count(1)
        self._ready = False
        self._stopping = False
        self._restart_task: asyncio.Task | None = None
        self._watch_task: asyncio.Task | None = None
        self._backend = ""
        self._restarts = 0
        self._stalls = 0
        self._strikes = 0  # restarts since a generation was last served
        self._problem: str | None = None  # why the engine is not ready
        self._failed = False  # gave up restarting
        self._served = 0
        self._requests_failed = 0
        self._running = 0
        self._waiting = 0
        self._kv_usage = 0.0
        self._pipeline_seconds = 0.0  # of the current worker process
        self._overhead_seconds = 0.0
        self._started_at = time.monotonic()

    # ------------------------------------------------------------------ state
    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def failed(self) -> bool:
        """True once the engine failed VLM_ENGINE_MAX_RESTARTS restarts in a row."""
        return self._failed

    @property
    def problem(self) -> str | None:
        """Why the engine is not ready (a crash, a stall, a failed restart), if known."""
        return None if self._ready else self._problem

    @property
    def backend(self) -> str:
        """`continuous_batching` or `vlm_pipeline` once started."""
        return self._backend

    @property
    def pid(self) -> int | None:
        session = self._session
        return session.process.pid if session is not None else None

    def stats(self) -> dict[str, float]:
        in_flight = len(self._requests)
        running = min(self._running, in_flight)
        return {
            "queue_depth": max(0, in_flight - running),
            "running": running,
            "in_flight": in_flight,
            "kv_cache_usage": self._kv_usage,
            "restarts": self._restarts,
            "generations_served": self._served,
            "generations_failed": self._requests_failed,
            "stalls": self._stalls,
            "max_queue": self._settings.max_queue,
            "engine_pipeline_seconds": self._pipeline_seconds,
            "engine_loop_overhead_seconds": self._overhead_seconds,
            "ready": float(self._ready),
        }

    # -------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Spawns the worker; returns once the model is loaded and warmed up."""
        self._stopping = False
        await self._spawn()
        self._watch_task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        self._stopping = True
        self._ready = False
        for task in (self._restart_task, self._watch_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        session, self._session = self._session, None
        self._fail_all(OpenAIError(503, "The server is shutting down.", code="shutting_down"))
        if session is not None:
            session.send(StopEngine())
            await asyncio.to_thread(session.reap, STOP_TIMEOUT_S)
            session.close()

    async def _spawn(self) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=self._target,
            args=(child, worker_config(self._settings, self._model_dir, self._model)),
            name="vlm-engine",
            daemon=True,
        )
        await asyncio.to_thread(process.start)
        child.close()
        session = Session(self, asyncio.get_running_loop(), process, parent)
        self._session = session
        session.start()
        try:
            ready = await asyncio.wait_for(session.ready, READY_TIMEOUT_S)
        except BaseException:
            if self._session is session:
                self._session = None
            session.close()
            await asyncio.to_thread(session.reap, STOP_TIMEOUT_S)
            raise
        self._backend = ready.backend
        self._ready = True
        self._problem = None
        logger.info("engine ready (%s, pid %s)", self._backend, process.pid)

    async def _watch(self) -> None:
        """Catches a worker that died without closing its pipe, and one that stalled."""
        timeout = self._settings.engine_stall_timeout_s
        interval = min(WATCH_INTERVAL_S, max(0.1, timeout / 5)) if timeout else WATCH_INTERVAL_S
        detector = StallDetector(timeout)
        watched: Session | None = None
        while not self._stopping:
            await asyncio.sleep(interval)
            session = self._session
            if session is None or not session.alive:
                continue
            if not session.process.is_alive():
                self.on_exit(session, "the engine process exited")
                continue
            if session is not watched:
                watched, detector = session, StallDetector(timeout)
            busy = self._ready and bool(self._requests)
            cpu = cpu_seconds(session.process.pid) if busy else None
            if detector.stalled(time.monotonic(), busy, session.last_message, cpu):
                self._stall(session, time.monotonic() - (detector.active_at or 0.0))

    def _stall(self, session: Session, idle_s: float) -> None:
        pid = session.process.pid
        self._stalls += 1
        reason = (
            f"the engine stalled: no step finished and no CPU time used for {idle_s:.0f} s "
            "with requests pending"
        )
        logger.error("%s; killing the engine process (pid %s)", reason, pid)
        # SIGKILL: a stopped (SIGSTOP) process does not act on SIGTERM until continued.
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        self._lose(
            session,
            reason,
            OpenAIError(
                503,
                "The inference engine stalled while processing this request and is being "
                "restarted; please retry.",
                code="engine_stalled",
                headers={"Retry-After": "5"},
            ),
        )

    def on_exit(self, session: Session, reason: str) -> None:
        """The session's process died or its pipe broke: fail its requests, restart."""
        self._lose(
            session,
            reason,
            OpenAIError(
                500,
                "The inference engine stopped while processing this request; please retry.",
                code="engine_failure",
            ),
        )

    def _lose(self, session: Session, reason: str, error: OpenAIError) -> None:
        if not session.alive and self._session is not session:
            return
        session.resolve(None, reason)
        session.close()
        if self._session is not session:
            return
        self._session = None
        self._ready = False
        self._problem = reason
        if self._stopping:
            return
        logger.error("engine process stopped (%s); restarting", reason)
        self._fail_all(error)
        if self._restart_task is None and self._backend:
            self._restart_task = asyncio.create_task(self._restart(session))

    async def _restart(self, dead: Session) -> None:
        """Restarts the worker: at once after a first failure, then with backoff; gives
        up after VLM_ENGINE_MAX_RESTARTS restarts in a row with nothing served."""
        limit = self._settings.engine_max_restarts
        await asyncio.to_thread(dead.reap, STOP_TIMEOUT_S)
        try:
            while not self._stopping:
                if self._strikes >= limit:
                    self._failed = True
                    logger.error(
                        "engine failed %d restarts in a row with no request served; giving up "
                        "(readiness stays false; restart the server). Last error: %s",
                        self._strikes,
                        self._problem,
                    )
                    return
                if self._strikes:
                    await asyncio.sleep(min(2.0 ** (self._strikes - 1), MAX_RESTART_DELAY_S))
                self._strikes += 1
                try:
                    await self._spawn()
                    self._restarts += 1
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._problem = f"the engine failed to restart: {exc}"
                    logger.error(
                        "engine restart %d of at most %d failed: %s", self._strikes, limit, exc
                    )
        finally:
            self._restart_task = None

    def _fail_all(self, error: OpenAIError) -> None:
        requests = list(self._requests.values())
        self._requests.clear()
        for request in requests:
            request.queue.put_nowait(error)

    # ------------------------------------------------------------- streaming
    def on_step(self, session: Session, outputs: StepOutputs) -> None:
        """Fans one step's outputs out to the requests' queues."""
        if session is not self._session:
            return
        stats = outputs.stats
        self._running, self._waiting, self._kv_usage = (
            stats.running,
            stats.waiting,
            stats.kv_cache_usage,
        )
        self._pipeline_seconds, self._overhead_seconds = (
            stats.pipeline_seconds,
            stats.overhead_seconds,
        )
        requests = self._requests
        for event in outputs.events:
            request = requests.get(event.rid)
            if request is not None:
                request.queue.put_nowait(
                    GenerationEvent(
                        event.choice,
                        event.text,
                        event.completion_tokens,
                        event.finish_reason,
                        event.prompt_tokens,
                        event.visual_tokens,
                        event.logprobs,
                    )
                )
        for error in outputs.errors:
            request = requests.pop(error.rid, None)
            if request is not None:
                headers = {"Retry-After": "1"} if error.status in (429, 503) else None
                request.queue.put_nowait(
                    OpenAIError(
                        error.status,
                        error.message,
                        param=error.param,
                        code=error.code,
                        headers=headers,
                    )
                )

    def _expire(self, rid: int) -> None:
        request = self._requests.pop(rid, None)
        if request is None:
            return
        request.queue.put_nowait(
            OpenAIError(
                504,
                f"The request took longer than {self._settings.request_timeout_s:g} s.",
                code="timeout",
            )
        )
        if self._session is not None:
            self._session.send(AbortRequest(rid))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Streams the events of every choice until each has a finish_reason.

        The first event (index 0, empty text, no tokens) means the request was
        accepted by the pipeline; awaiting it before sending response headers turns a
        rejected request into its proper status. `prompt_tokens` (with visual tokens)
        is exact on each choice's final event; earlier events carry it or 0.
        """
        session = self._session
        if self._failed:
            raise OpenAIError(
                503, "The model failed to load; see the server log.", code="model_failed"
            )
        if not self._ready or session is None:
            raise OpenAIError(
                503,
                "The model is loading; please retry shortly.",
                code="model_not_ready",
                headers={"Retry-After": "5"},
            )
        if len(self._requests) >= self._settings.max_queue:
            raise OpenAIError(
                429,
                f"The server is at capacity ({self._settings.max_queue} requests in flight); "
                "please retry shortly.",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        loop = asyncio.get_running_loop()
        rid = next(self._ids)
        pending = _Request(rid, request.params.n)
        self._requests[rid] = pending
        session.send(AddRequest(rid, request))
        timer = loop.call_at(loop.time() + self._settings.request_timeout_s, self._expire, rid)
        remaining = request.params.n
        finished = False
        carry: GenerationEvent | OpenAIError | None = None
        queue = pending.queue
        try:
            while remaining:
                if carry is not None:
                    item, carry = carry, None
                else:
                    item = await queue.get()
                if isinstance(item, OpenAIError):
                    self._requests_failed += 1
                    raise item
                # A consumer slower than the engine gets the waiting text of a
                # choice as one event instead of one per token.
                while item.finish_reason is None and item.completion_tokens and not queue.empty():
                    carry = queue.get_nowait()
                    if not isinstance(carry, GenerationEvent) or carry.index != item.index:
                        break
                    item = GenerationEvent(
                        item.index,
                        item.text + carry.text,
                        carry.completion_tokens,
                        carry.finish_reason,
                        carry.prompt_tokens,
                        max(item.visual_tokens, carry.visual_tokens),
                        _joined(item.logprobs, carry.logprobs),
                    )
                    carry = None
                if item.finish_reason is not None:
                    remaining -= 1
                yield item
            finished = True
            self._served += 1
            self._strikes = 0
        finally:
            timer.cancel()
            if self._requests.pop(rid, None) is not None and not finished:
                session.send(AbortRequest(rid))
