"""The API process's side of the speech engine: a client of utils/engine/asr_worker.py.

The worker runs in its own process and talks over the same framed pipe as the chat
engine (utils/engine/session.py): audio is written by the session's writer thread when
it is large, and the event loop reads transcripts without ever waiting. Transcriptions
run one at a time in the order they came; at most VLM_MAX_QUEUE wait or run.

Its process is supervised as the chat engine's is (utils/engine/supervisor.py): if it
dies, the transcriptions in flight get a 500 at once and it restarts with backoff; if
it stalls (a transcription pending, no reply and no CPU time for
VLM_ENGINE_STALL_TIMEOUT_S), they get a 503 `engine_stalled` and it is killed and
restarted; after VLM_ENGINE_MAX_RESTARTS restarts in a row with nothing served, it
stops trying.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
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
from utils.engine.supervisor import EngineSupervisor
from utils.errors import OpenAIError
from utils.settings import Settings

logger = logging.getLogger(__name__)


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
        self.name = settings.asr_model or ""
        self.path = str(model_dir)
        config = AsrWorkerConfig(
            model_dir=str(model_dir),
            device=settings.device,
            ov_config=engine_properties(settings),
            log_level=settings.log_level,
        )
        # A transcription is a batch job, a chat stream is someone waiting for the
        # next token; on a CPU the two engines share the cores.
        self._engine: EngineSupervisor[AsrOutput] = EngineSupervisor(
            settings,
            self,
            target,
            config,
            process_name="vlm-asr",
            label="speech engine",
            niceness=settings.asr_niceness,
        )
        self._pending: dict[int, asyncio.Future[Transcript]] = {}
        self._ids = itertools.count(1)
        self._counts = {
            "transcriptions": 0.0,
            "failures": 0.0,
            "audio_seconds": 0.0,
            "pipeline_seconds": 0.0,
        }

    @property
    def ready(self) -> bool:
        return self._engine.ready

    @property
    def pid(self) -> int | None:
        return self._engine.pid

    def stats(self) -> dict[str, float]:
        return {
            **self._counts,
            "restarts": float(self._engine.restarts),
            "stalls": float(self._engine.stalls),
            "in_flight": float(len(self._pending)),
            "ready": self._engine.ready,
        }

    async def start(self) -> None:
        await self._engine.start()

    async def stop(self) -> None:
        await self._engine.stop()

    # ------------------------------------------------------------- engine events
    def busy(self) -> bool:
        return bool(self._pending)

    def on_outputs(self, outputs: AsrOutput) -> None:
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
        self._engine.served()
        future.set_result(outputs)

    def fail_all(self, error: OpenAIError) -> None:
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
        session = self._engine.session
        if self._engine.failed:
            raise OpenAIError(
                503,
                "The speech model failed every restart; see the server log.",
                code="model_failed",
            )
        if not self._engine.ready or session is None:
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
