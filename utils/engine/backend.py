"""What both engine backends share: messages from the API process, text out of the
detokenizers, and the batched step messages back."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, cast

from utils.engine.detokenize import (
    ByteDetokenizer,
    ByteTokenTable,
    IncrementalDetokenizer,
    StopMatcher,
    decode_pending,
)
from utils.engine.heap import HeapTrimmer
from utils.engine.messages import (
    AbortRequest,
    AddRequest,
    EngineStats,
    RequestFailure,
    StepOutputs,
    StopEngine,
    TextEvent,
    ToEngine,
    WorkerConfig,
)
from utils.engine.prompt import Prepared, Preparer, RequestError
from utils.engine.types import FinishReason, GenerationRequest, TokenLogprob

logger = logging.getLogger(__name__)


STOP_MATCHED = "stop-string"  # a choice's finish once a stop string cut its text


class Channel(Protocol):
    """The engine's end of the pipe (multiprocessing's Connection)."""

    def poll(self, timeout: float = 0.0) -> bool: ...

    def recv(self) -> Any: ...

    def send(self, obj: Any) -> None: ...


class ChoiceState:
    """One output sequence (an OpenAI choice): tokens, text stream, stop strings."""

    __slots__ = (
        "closed",
        "detok",
        "finish",
        "held",
        "ids",
        "index",
        "last_sent",
        "logprobs",
        "replayed",
        "stop",
        "tokens",
    )

    def __init__(
        self,
        index: int,
        stops: Sequence[str],
        table: ByteTokenTable | None = None,
        logprobs: bool = False,
    ) -> None:
        self.index = index
        self.closed = False  # its final event is out
        self.detok: IncrementalDetokenizer | ByteDetokenizer = (
            ByteDetokenizer(table) if table is not None else IncrementalDetokenizer()
        )
        self.stop = StopMatcher(stops)
        self.tokens = 0
        self.ids: list[int] = []  # generated so far (to check a replay against)
        self.replayed: int | None = None  # of `ids`, seen again while replaying
        self.finish: str | None = None
        self.held = ""  # text waiting for the stream interval
        self.last_sent = -1.0
        # (token id, log probability) read but not sent yet, when the client asked
        self.logprobs: list[tuple[int, float]] | None = [] if logprobs else None


def finish_reason_name(reason: Any) -> str | None:
    return _FINISH_REASONS.get(getattr(reason, "name", str(reason)))


_FINISH_REASONS = {"LENGTH": "length", "STOP": "stop", "TOOL_CALL": "stop"}


class ActiveRequest:
    __slots__ = ("choices", "handle", "key_to_choice", "lazy", "prep", "rid", "started")

    def __init__(self, rid: int, prep: Prepared, handle: Any, table: ByteTokenTable | None) -> None:
        self.rid = rid
        self.prep = prep
        self.handle = handle
        n = prep.params.n if prep.replicate == 1 else 1
        params = prep.params
        self.choices = [ChoiceState(i, params.stop, table, params.logprobs) for i in range(n)]
        self.key_to_choice: dict[int, ChoiceState] = {}
        self.started = time.monotonic()
        # One choice and no stop strings: nothing to act on between two pieces of text,
        # so its outputs can wait in the pipeline until the next piece is due.
        self.lazy = len(self.choices) == 1 and not prep.params.stop

    def choice_for(self, key: int) -> ChoiceState:
        choice = self.key_to_choice.get(key)
        if choice is None:
            choice = self.choices[min(len(self.key_to_choice), len(self.choices) - 1)]
            self.key_to_choice[key] = choice
        return choice

    @property
    def done(self) -> bool:
        return all(c.finish is not None for c in self.choices)


class Backend:
    """Shared by both pipelines: message handling, streaming text out, batching."""

    name = "base"

    def __init__(self, conn: Channel, ov: Any, genai: Any, cfg: WorkerConfig) -> None:
        self.conn = conn
        self.ov = ov
        self.genai = genai
        self.model_dir = Path(cfg.model_dir)
        self.events: list[TextEvent] = []
        self.errors: list[RequestFailure] = []
        self.stopping = False
        self.preparer: Preparer
        # time inside the pipeline, and time the loop spends around it while busy
        self.step_seconds = 0.0
        self.overhead_seconds = 0.0
        self.stream_interval = 0.0
        self.heap = HeapTrimmer()
        self.table: ByteTokenTable | None = None

    # messages from the API process
    def drain(self, timeout: float) -> None:
        try:
            while self.conn.poll(timeout):
                self.handle_message(self.conn.recv())
                timeout = 0
        except (EOFError, OSError):
            logger.info("engine connection closed; exiting")
            self.stopping = True

    def handle_message(self, message: ToEngine) -> None:
        if isinstance(message, AddRequest):
            self.add(message.rid, message.request)
        elif isinstance(message, AbortRequest):
            self.abort(message.rid)
        elif isinstance(message, StopEngine):
            self.stopping = True

    def add(self, rid: int, request: GenerationRequest) -> None:
        raise NotImplementedError

    def run(self) -> None:
        """Serves messages and steps the pipeline until told to stop."""
        raise NotImplementedError

    def admit(self) -> None:
        """Moves waiting requests into the pipeline (continuous batching only)."""

    def abort(self, rid: int) -> None:
        raise NotImplementedError

    def stats(self) -> EngineStats:
        raise NotImplementedError

    def fail(self, rid: int, exc: BaseException) -> None:
        if isinstance(exc, RequestError):
            self.errors.append(RequestFailure(rid, exc.status, exc.message, exc.code, exc.param))
            return
        logger.warning("request %d failed: %s", rid, exc)
        self.errors.append(
            RequestFailure(rid, 400, "The model could not process this input.", "invalid_input")
        )

    def flush(self) -> None:
        if not self.events and not self.errors:
            return
        self.conn.send(StepOutputs(self.events, self.errors, self.stats()))
        self.events = []
        self.errors = []

    def decode(self, batch: list[list[int]]) -> list[str]:
        return list(self.preparer.tokenizer.decode(batch))

    def emit(self, work: list[tuple[ActiveRequest, ChoiceState, int]]) -> None:
        """Detokenizes the new tokens of (request, choice, prompt_tokens) items, all in
        one tokenizer call, and queues their events."""
        if not work:
            return
        now = time.monotonic()
        finals = [choice.finish is not None for _, choice, _ in work]
        if self.table is not None:
            deltas = [
                cast(ByteDetokenizer, choice.detok).take(final)
                for (_, choice, _), final in zip(work, finals, strict=True)
            ]
        else:
            streams = [cast(IncrementalDetokenizer, choice.detok) for _, choice, _ in work]
            deltas = decode_pending(self.decode, streams, finals)
        for (active, choice, prompt_tokens), delta in zip(work, deltas, strict=True):
            if choice.closed or choice.finish == STOP_MATCHED:
                continue
            text, matched = choice.stop.feed(delta)
            if matched:
                choice.finish = STOP_MATCHED
            elif choice.finish is not None:
                text += choice.stop.flush()
            finish = cast(FinishReason | None, "stop" if matched else choice.finish)
            if not text and finish is None:
                continue
            if finish is None and now - choice.last_sent < self.stream_interval:
                choice.held += text
                continue
            if finish is not None and not prompt_tokens:
                prompt_tokens = self.preparer.prompt_tokens(active.prep)
            self._send_text(active, choice, text, finish, prompt_tokens, now)

    def _send_text(
        self,
        active: ActiveRequest,
        choice: ChoiceState,
        text: str,
        finish: FinishReason | None,
        prompt_tokens: int,
        now: float,
    ) -> None:
        """Queues a choice's held text plus `text` as its next event (one per copy)."""
        if choice.held:
            text, choice.held = choice.held + text, ""
        choice.last_sent = now
        visual = active.prep.visual_tokens if finish is not None else 0
        logprobs = self._token_logprobs(choice)
        for index in self._indices(active, choice):
            self.events.append(
                TextEvent(
                    active.rid, index, text, choice.tokens, finish, prompt_tokens, visual, logprobs
                )
            )

    def _token_logprobs(self, choice: ChoiceState) -> list[TokenLogprob] | None:
        """The choice's tokens since its last event, with their text and bytes."""
        pending = choice.logprobs
        if not pending:
            return None
        choice.logprobs = []
        ids = [token for token, _ in pending]
        if self.table is not None:
            raw = [
                self.table.table[token] if token < len(self.table.table) else b"" for token in ids
            ]
        else:
            raw = [text.encode() for text in self.decode([[token] for token in ids])]
        return [
            (piece.decode("utf-8", "replace"), logprob, piece)
            for piece, (_, logprob) in zip(raw, pending, strict=True)
        ]

    @staticmethod
    def _indices(active: ActiveRequest, choice: ChoiceState) -> range:
        if active.prep.replicate > 1:
            return range(active.prep.replicate)
        return range(choice.index, choice.index + 1)
