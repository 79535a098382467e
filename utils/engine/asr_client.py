"""The API process's side of the speech engine: a client of utils/engine/asr_worker.py.

The worker runs in its own process and talks over the same framed pipe as the chat
engine (utils/engine/session.py): audio is written by the session's writer thread when
it is large, and the event loop reads transcripts without ever waiting. Transcriptions
run one at a time in the order they came; at most VLM_MAX_QUEUE wait or run.

If the worker dies, the transcriptions in flight get a 500 at once and it restarts
(with backoff, at most VLM_ENGINE_MAX_RESTARTS times in a row with nothing served).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from utils.devices import engine_properties
from utils.engine import asr_worker
from utils.engine.asr_messages import (
    AsrOutput,
    AsrTask,
    AsrWorkerConfig,
    Transcribe,
    TranscribeFailure,
    Transcript,
)
from utils.engine.messages import StopEngine
from utils.engine.session import Session
from utils.errors import OpenAIError
from utils.settings import Settings

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 10.0
MAX_RESTART_DELAY_S = 30.0


class AsrClient:
    """Transcribes audio in the speech engine process."""

    def __init__(
        self,
        settings: Settings,
        model_dir: Path | str,
        *,
        target: Callable[[Any, AsrWorkerConfig], None] = asr_worker.main,
    ) -> None:
        self._settings = settings
        self._target = target
        self.name = settings.asr_model or ""
        self.path = str(model_dir)
        self._config = AsrWorkerConfig(
            model_dir=str(model_dir),
            device=settings.device,
            ov_config=engine_properties(settings),
            log_level=settings.log_level,
        )
        self._ctx = multiprocessing.get_context("spawn")
        self._session: Session | None = None
        self._pending: dict[int, asyncio.Future[Transcript]] = {}
        self._ids = itertools.count(1)
        self._ready = False
        self._stopping = False
        self._restart_task: asyncio.Task[None] | None = None
        self._strikes = 0
        self._counts = {
            "transcriptions": 0.0,
            "failures": 0.0,
            "audio_seconds": 0.0,
            "pipeline_seconds": 0.0,
            "restarts": 0.0,
        }

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def pid(self) -> int | None:
        session = self._session
        return session.process.pid if session is not None else None

    def stats(self) -> dict[str, float]:
        return {**self._counts, "in_flight": float(len(self._pending)), "ready": self._ready}

    async def start(self) -> None:
        self._stopping = False
        await self._spawn()

    async def stop(self) -> None:
        self._stopping = True
        self._ready = False
        if self._restart_task is not None:
            self._restart_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._restart_task
        session, self._session = self._session, None
        self._fail_all(OpenAIError(503, "The server is shutting down.", code="shutting_down"))
        if session is not None:
            session.send(StopEngine())
            await asyncio.to_thread(session.reap, STOP_TIMEOUT_S)
            session.close()

    async def _spawn(self) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=self._target, args=(child, self._config), name="vlm-asr", daemon=True
        )
        await asyncio.to_thread(process.start)
        child.close()
        session = Session(self, asyncio.get_running_loop(), process, parent)
        self._session = session
        session.start()
        try:
            await asyncio.wait_for(session.ready, READY_TIMEOUT_S)
        except BaseException:
            if self._session is session:
                self._session = None
            session.close()
            await asyncio.to_thread(session.reap, STOP_TIMEOUT_S)
            raise
        self._ready = True
        logger.info("speech engine ready (pid %s)", process.pid)

    # ---------------------------------------------------------------- pipe events
    def on_step(self, session: Session, outputs: AsrOutput) -> None:
        if session is not self._session:
            return
        future = self._pending.pop(outputs.rid, None)
        if future is None or future.done():
            return  # its client went away or timed out
        if isinstance(outputs, TranscribeFailure):
            self._counts["failures"] += 1
            future.set_exception(
                OpenAIError(outputs.status, outputs.message, param=outputs.param, code=outputs.code)
            )
            return
        self._counts["transcriptions"] += 1
        self._counts["audio_seconds"] += outputs.duration_s
        self._counts["pipeline_seconds"] += outputs.seconds
        self._strikes = 0
        future.set_result(outputs)

    def on_exit(self, session: Session, reason: str) -> None:
        if not session.alive and self._session is not session:
            return
        session.resolve(None, reason)
        session.close()
        if self._session is not session:
            return
        self._session = None
        self._ready = False
        if self._stopping:
            return
        logger.error("speech engine process stopped (%s); restarting", reason)
        self._fail_all(
            OpenAIError(
                500,
                "The speech engine stopped while processing this request; please retry.",
                code="engine_failure",
            )
        )
        if self._restart_task is None:
            self._restart_task = asyncio.create_task(self._restart(session))

    async def _restart(self, dead: Session) -> None:
        await asyncio.to_thread(dead.reap, STOP_TIMEOUT_S)
        try:
            while not self._stopping and self._strikes < self._settings.engine_max_restarts:
                if self._strikes:
                    await asyncio.sleep(min(2.0 ** (self._strikes - 1), MAX_RESTART_DELAY_S))
                self._strikes += 1
                try:
                    await self._spawn()
                    self._counts["restarts"] += 1
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    logger.error("speech engine restart %d failed: %s", self._strikes, exc)
            if not self._stopping:
                logger.error("the speech engine failed every restart; giving up")
        finally:
            self._restart_task = None

    def _fail_all(self, error: OpenAIError) -> None:
        pending = list(self._pending.values())
        self._pending.clear()
        for future in pending:
            if not future.done():
                future.set_exception(error)

    # --------------------------------------------------------------------- requests
    async def transcribe(
        self,
        audio: np.ndarray,
        *,
        task: AsrTask = "transcribe",
        language: str | None = None,
        prompt: str | None = None,
        temperature: float = 0.0,
        timestamps: bool = False,
    ) -> Transcript:
        session = self._session
        if not self._ready or session is None:
            raise OpenAIError(
                503,
                "The speech model is loading; please retry shortly.",
                code="model_not_ready",
                headers={"Retry-After": "5"},
            )
        if len(self._pending) >= self._settings.max_queue:
            raise OpenAIError(
                429,
                f"The speech engine is at capacity ({self._settings.max_queue} transcriptions "
                "in flight); please retry shortly.",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        rid = next(self._ids)
        future: asyncio.Future[Transcript] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        session.send(Transcribe(rid, audio, task, language, prompt, temperature, timestamps))
        timeout = self._settings.request_timeout_s
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise OpenAIError(
                504, f"The transcription took longer than {timeout:g} s.", code="timeout"
            ) from None
        finally:
            self._pending.pop(rid, None)
