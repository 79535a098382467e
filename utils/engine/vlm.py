"""The VLMPipeline backend: one request at a time, for models continuous batching
cannot run."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from utils.engine.backend import ActiveRequest, Backend, Channel, ChoiceState
from utils.engine.detokenize import ByteTokenTable
from utils.engine.messages import EngineStats, TextEvent, WorkerConfig
from utils.engine.prompt import Prepared, Preparer, RequestError
from utils.engine.types import GenerationRequest

logger = logging.getLogger(__name__)


class VLMBackend(Backend):
    """VLMPipeline: one request at a time, for models continuous batching cannot run."""

    name = "vlm_pipeline"

    def __init__(self, conn: Channel, ov: Any, genai: Any, cfg: WorkerConfig) -> None:
        super().__init__(conn, ov, genai, cfg)
        self.pipe = genai.VLMPipeline(str(cfg.model_dir), cfg.device, **dict(cfg.ov_config))
        self.preparer = Preparer(ov, genai, self.pipe.get_tokenizer(), self.model_dir, cfg.model)
        self.table = ByteTokenTable.build(self.preparer.tokenizer)
        self.queue: deque[tuple[int, Prepared]] = deque()
        self.current: ActiveRequest | None = None
        self.cancelled: set[int] = set()

    def add(self, rid: int, request: GenerationRequest) -> None:
        if request.params.logprobs:
            # generate() reports a sequence's summed score, not each token's
            self.fail(
                rid,
                RequestError(
                    400,
                    "'logprobs' is not available with the VLMPipeline engine: it does not "
                    "report per-token log probabilities (the continuous batching engine "
                    "does).",
                    "unsupported_parameter",
                    param="logprobs",
                ),
            )
            return
        try:
            prep = self.preparer.prepare(request)
        except Exception as exc:
            self.fail(rid, exc)
            return
        self.queue.append((rid, prep))
        self.events.append(TextEvent(rid, 0, "", 0, None, prep.prompt_tokens, prep.visual_tokens))

    def abort(self, rid: int) -> None:
        if self.current is not None and self.current.rid == rid:
            self.cancelled.add(rid)
        self.queue = deque(item for item in self.queue if item[0] != rid)

    def stats(self) -> EngineStats:
        running = 1 if self.current else 0
        return EngineStats(running, len(self.queue), 0.0, self.step_seconds, self.overhead_seconds)

    def run(self) -> None:
        while not self.stopping:
            self.drain(0 if self.queue else 0.2)
            self.flush()
            worked = bool(self.queue) and not self.stopping
            if worked:
                rid, prep = self.queue.popleft()
                self.generate(rid, prep)
                self.flush()
            self.heap.tick(busy=worked)

    def generate(self, rid: int, prep: Prepared) -> None:
        runs = 1 if prep.replicate > 1 else prep.params.n
        active = ActiveRequest(rid, prep, None, self.table)
        self.current = active
        try:
            for index in range(runs):
                if rid in self.cancelled or self.stopping:
                    break
                self._run_one(active, active.choices[index], index)
        except Exception as exc:
            logger.exception("request %d failed", rid)
            self.fail(rid, exc)
        finally:
            self.current = None
            self.cancelled.discard(rid)

    def _run_one(self, active: ActiveRequest, choice: ChoiceState, index: int) -> None:
        backend = self
        genai = self.genai
        config = active.prep.config
        if index:
            config.rng_seed = active.prep.params.seed + index
        config.num_return_sequences = 1

        class _Streamer(genai.StreamerBase):  # type: ignore[name-defined]
            def write(self, token: Any) -> Any:
                started = time.perf_counter()
                try:
                    return self._write(token)
                finally:
                    backend.overhead_seconds += time.perf_counter() - started

            def _write(self, token: Any) -> Any:
                ids = [token] if isinstance(token, int) else list(token)
                choice.detok.add(ids)
                choice.tokens += len(ids)
                backend.emit([(active, choice, active.prep.prompt_tokens)])
                backend.drain(0)
                backend.flush()
                if choice.finish is not None:
                    return genai.StreamingStatus.STOP
                if active.rid in backend.cancelled or backend.stopping:
                    return genai.StreamingStatus.CANCEL
                return genai.StreamingStatus.RUNNING

            def end(self) -> None:
                return None

        started, overhead = time.perf_counter(), self.overhead_seconds
        # Outside a chat the pipeline still keeps every prompt's tokens as history, so
        # the engine would grow with every request; each request starts a fresh one.
        self.pipe.finish_chat()
        result = self.pipe.generate(
            active.prep.prompt,
            images=active.prep.images,
            videos=active.prep.videos,
            generation_config=config,
            streamer=_Streamer(),
            **active.prep.media_kwargs(),
        )
        elapsed = time.perf_counter() - started
        self.step_seconds += elapsed - (self.overhead_seconds - overhead)
        if active.rid in self.cancelled:
            return
        try:
            prompt_tokens = int(result.perf_metrics.get_num_input_tokens())
        except Exception:
            prompt_tokens = active.prep.prompt_tokens
        if choice.finish is None:
            choice.finish = "length" if choice.tokens >= config.max_new_tokens else "stop"
            self.emit([(active, choice, prompt_tokens)])
