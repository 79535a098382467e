"""The API process's side of the engine: a client of the engine process.

`EngineClient` runs utils/engine/worker.py in its own process (the OpenVINO
pipeline holds the GIL while it steps) and talks to it over one duplex
`multiprocessing` pipe (utils/engine/session.py) with the typed messages of
utils/engine/messages.py. One message per scheduler step holds the outputs of every
running request, fanned out here to per-request asyncio queues.

The worker's process is supervised by utils/engine/supervisor.py: if it dies, every
request in flight gets an `OpenAIError(500)` at once, `ready` turns False and it is
restarted with backoff; if it stalls, the same with a 503 `engine_stalled`; after
VLM_ENGINE_MAX_RESTARTS restarts in a row with no generation served in between, it
stops trying and reports `failed`.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.engine import worker
from utils.engine.launch import model_info, worker_config
from utils.engine.messages import AbortRequest, AddRequest, StepOutputs, WorkerConfig
from utils.engine.model_config import ModelConfig
from utils.engine.supervisor import EngineSupervisor
from utils.engine.types import GenerationEvent, GenerationRequest, ModelInfo, TokenLogprob
from utils.errors import OpenAIError
from utils.settings import Settings


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
        self._model_dir = Path(model_dir)
        self._model = ModelConfig.read(self._model_dir)
        self._info = model_info(settings, self._model_dir, self._model)
        self._engine: EngineSupervisor[StepOutputs] = EngineSupervisor(
            settings,
            self,
            target,
            worker_config(settings, self._model_dir, self._model),
            process_name="vlm-engine",
            label="inference engine",
        )
        self._requests: dict[int, _Request] = {}
        self._ids = itertools.count(1)
        self._served = 0
        self._requests_failed = 0
        self._running = 0
        self._waiting = 0
        self._kv_usage = 0.0
        self._pipeline_seconds = 0.0  # of the current worker process
        self._overhead_seconds = 0.0

    # ------------------------------------------------------------------ state
    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def ready(self) -> bool:
        return self._engine.ready

    @property
    def failed(self) -> bool:
        """True once the engine failed VLM_ENGINE_MAX_RESTARTS restarts in a row."""
        return self._engine.failed

    @property
    def problem(self) -> str | None:
        """Why the engine is not ready (a crash, a stall, a failed restart), if known."""
        return self._engine.problem

    @property
    def backend(self) -> str:
        """`continuous_batching` or `vlm_pipeline` once started."""
        started = self._engine.started
        return started.backend if started is not None else ""

    @property
    def pid(self) -> int | None:
        return self._engine.pid

    def stats(self) -> dict[str, float]:
        in_flight = len(self._requests)
        running = min(self._running, in_flight)
        return {
            "queue_depth": max(0, in_flight - running),
            "running": running,
            "in_flight": in_flight,
            "kv_cache_usage": self._kv_usage,
            "restarts": self._engine.restarts,
            "generations_served": self._served,
            "generations_failed": self._requests_failed,
            "stalls": self._engine.stalls,
            "max_queue": self._settings.max_queue,
            "engine_pipeline_seconds": self._pipeline_seconds,
            "engine_loop_overhead_seconds": self._overhead_seconds,
            "ready": float(self._engine.ready),
        }

    # -------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Starts the worker; returns once the model is loaded and warmed up."""
        await self._engine.start()

    async def stop(self) -> None:
        await self._engine.stop()

    def busy(self) -> bool:
        return bool(self._requests)

    def fail_all(self, error: OpenAIError) -> None:
        requests = list(self._requests.values())
        self._requests.clear()
        for request in requests:
            request.queue.put_nowait(error)

    # ------------------------------------------------------------- streaming
    def on_outputs(self, outputs: StepOutputs) -> None:
        """Fans one step's outputs out to the requests' queues."""
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
        if self._engine.session is not None:
            self._engine.session.send(AbortRequest(rid))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Streams the events of every choice until each has a finish_reason.

        The first event (index 0, empty text, no tokens) means the request was
        accepted by the pipeline; awaiting it before sending response headers turns a
        rejected request into its proper status. `prompt_tokens` (with visual tokens)
        is exact on each choice's final event; earlier events carry it or 0.
        """
        session = self._engine.session
        if self._engine.failed:
            raise OpenAIError(
                503, "The model failed to load; see the server log.", code="model_failed"
            )
        if not self._engine.ready or session is None:
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
            self._engine.served()
        finally:
            timer.cancel()
            if self._requests.pop(rid, None) is not None and not finished:
                session.send(AbortRequest(rid))
