"""One engine process, supervised: started, watched, and restarted when it is lost.

Both engines (chat: utils/engine/client.py; speech: utils/engine/asr_client.py) run in
a process of their own and talk over a Session (utils/engine/session.py). What happens
to that process is decided here, the same way for both:

- it is started (utils/engine/process.py) and awaited until it reports ready;
- a watch task catches a death the pipe did not report, and a stall (work pending,
  no message and no CPU time for VLM_ENGINE_STALL_TIMEOUT_S; utils/engine/watchdog.py),
  which it ends with a SIGKILL;
- a lost process fails everything its owner has in flight at once (a 500, or a 503
  `engine_stalled`) and is restarted: at once after a first failure, then with
  backoff, until VLM_ENGINE_MAX_RESTARTS restarts in a row have served nothing; then
  it gives up, and `failed` and `problem` say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from utils.engine.messages import EngineReady, StopEngine
from utils.engine.process import EngineProcess
from utils.engine.session import Session
from utils.engine.watchdog import StallDetector, cpu_seconds
from utils.errors import OpenAIError
from utils.settings import Settings

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 10.0
MAX_RESTART_DELAY_S = 30.0
WATCH_INTERVAL_S = 1.0  # at most; shorter for short stall timeouts

OutputT = TypeVar("OutputT", contravariant=True)


class EngineOwner(Protocol[OutputT]):
    """The client an engine process works for."""

    def on_outputs(self, outputs: OutputT) -> None:
        """A message from the current engine process."""

    def fail_all(self, error: OpenAIError) -> None:
        """Ends every request in flight with `error`."""

    def busy(self) -> bool:
        """Whether requests are in flight (a silent engine is then suspect)."""


class EngineSupervisor(Generic[OutputT]):
    """Starts, watches and restarts the engine process of `owner`."""

    def __init__(
        self,
        settings: Settings,
        owner: EngineOwner[OutputT],
        target: Callable[[Any, Any], None],
        config: Any,
        *,
        process_name: str,
        label: str,
        niceness: int = 0,
    ) -> None:
        """`target(conn, config)` is the process's entry point; `label` names the
        engine in logs and error messages ("inference engine", "speech engine");
        `niceness` lowers the process's CPU priority by that much."""
        self._settings = settings
        self._owner = owner
        self._target = target
        self._config = config
        self._process_name = process_name
        self._niceness = niceness
        self.label = label
        self.session: Session | None = None
        self.ready = False
        self.started: EngineReady | None = None  # what the last ready process reported
        self.failed = False  # gave up restarting
        self.problem: str | None = None  # why the engine is not ready
        self.restarts = 0
        self.stalls = 0
        self._strikes = 0  # restarts since the owner last served something
        self._stopping = False
        self._restart_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        session = self.session
        return session.process.pid if session is not None else None

    def served(self) -> None:
        """The owner completed a request: the engine works, restarts count from zero."""
        self._strikes = 0

    # -------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Starts the process; returns once it is loaded and warmed up."""
        self._stopping = False
        await self._launch()
        self._watch_task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        self._stopping = True
        self.ready = False
        for task in (self._restart_task, self._watch_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        session, self.session = self.session, None
        self._owner.fail_all(OpenAIError(503, "The server is shutting down.", code="shutting_down"))
        if session is not None:
            session.send(StopEngine())
            await asyncio.to_thread(session.reap, STOP_TIMEOUT_S)
            session.close()

    async def _launch(self) -> None:
        process, parent = await asyncio.to_thread(
            EngineProcess.start, self._target, self._config, self._process_name, self._niceness
        )
        session = Session(self, asyncio.get_running_loop(), process, parent)
        self.session = session
        session.start()
        try:
            self.started = await asyncio.wait_for(session.ready, READY_TIMEOUT_S)
        except BaseException:
            if self.session is session:
                self.session = None
            session.close()
            await asyncio.to_thread(session.reap, STOP_TIMEOUT_S)
            raise
        self.ready = True
        self.problem = None
        logger.info("%s ready (%s, pid %s)", self.label, self.started.backend, process.pid)

    async def _watch(self) -> None:
        """Catches a process that died without closing its pipe, and one that stalled."""
        timeout = self._settings.engine_stall_timeout_s
        interval = min(WATCH_INTERVAL_S, max(0.1, timeout / 5)) if timeout else WATCH_INTERVAL_S
        detector = StallDetector(timeout)
        watched: Session | None = None
        while not self._stopping:
            await asyncio.sleep(interval)
            session = self.session
            if session is None or not session.alive:
                continue
            if not session.process.is_alive():
                self.on_exit(session, f"the {self.label} process exited")
                continue
            if session is not watched:
                watched, detector = session, StallDetector(timeout)
            busy = self.ready and self._owner.busy()
            cpu = cpu_seconds(session.process.pid) if busy else None
            if detector.stalled(time.monotonic(), busy, session.last_message, cpu):
                self._stall(session, time.monotonic() - (detector.active_at or 0.0))

    def _stall(self, session: Session, idle_s: float) -> None:
        pid = session.process.pid
        self.stalls += 1
        reason = (
            f"the {self.label} stalled: no step finished and no CPU time used for "
            f"{idle_s:.0f} s with requests pending"
        )
        logger.error("%s; killing its process (pid %s)", reason, pid)
        # SIGKILL: a stopped (SIGSTOP) process does not act on SIGTERM until continued.
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
        self._lose(
            session,
            reason,
            OpenAIError(
                503,
                f"The {self.label} stalled while processing this request and is being "
                "restarted; please retry.",
                code="engine_stalled",
                headers={"Retry-After": "5"},
            ),
        )

    # ------------------------------------------------------ session events
    def on_step(self, session: Session, outputs: OutputT) -> None:
        if session is self.session:
            self._owner.on_outputs(outputs)

    def on_exit(self, session: Session, reason: str) -> None:
        """The session's process died or its pipe broke: fail its requests, restart."""
        self._lose(
            session,
            reason,
            OpenAIError(
                500,
                f"The {self.label} stopped while processing this request; please retry.",
                code="engine_failure",
            ),
        )

    def _lose(self, session: Session, reason: str, error: OpenAIError) -> None:
        if not session.alive and self.session is not session:
            return
        session.resolve(None, reason)
        session.close()
        if self.session is not session:
            return
        self.session = None
        self.ready = False
        self.problem = reason
        if self._stopping:
            return
        logger.error("%s process stopped (%s); restarting", self.label, reason)
        self._owner.fail_all(error)
        # a process that never became ready is start()'s failure, not restarted here
        if self._restart_task is None and self.started is not None:
            self._restart_task = asyncio.create_task(self._restart(session))

    async def _restart(self, dead: Session) -> None:
        limit = self._settings.engine_max_restarts
        await asyncio.to_thread(dead.reap, STOP_TIMEOUT_S)
        try:
            while not self._stopping:
                if self._strikes >= limit:
                    self.failed = True
                    logger.error(
                        "%s failed %d restarts in a row with no request served; giving up "
                        "(readiness stays false; restart the server). Last error: %s",
                        self.label,
                        self._strikes,
                        self.problem,
                    )
                    return
                if self._strikes:
                    await asyncio.sleep(min(2.0 ** (self._strikes - 1), MAX_RESTART_DELAY_S))
                self._strikes += 1
                try:
                    await self._launch()
                    self.restarts += 1
                    return
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.problem = f"the {self.label} failed to restart: {exc}"
                    logger.error(
                        "%s restart %d of at most %d failed: %s",
                        self.label,
                        self._strikes,
                        limit,
                        exc,
                    )
        finally:
            self._restart_task = None
