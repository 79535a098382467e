"""The ContinuousBatchingPipeline backend: every running request advances one token
per step."""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from utils.engine.backend import ActiveRequest, Backend, Channel, ChoiceState, finish_reason_name
from utils.engine.detokenize import ByteTokenTable
from utils.engine.messages import EngineStats, RequestFailure, TextEvent, WorkerConfig
from utils.engine.prompt import Prepared, Preparer
from utils.engine.types import GenerationRequest

logger = logging.getLogger(__name__)


# Time the engine spends adding waiting requests between two steps (see CBBackend.admit)
ADMIT_BUDGET_S = 0.05


def scheduler_config(genai: Any, cfg: WorkerConfig) -> Any:
    """The continuous-batching SchedulerConfig for `cfg` (scripts/benchmark.py's raw mode
    uses it too, so both run the same scheduler)."""
    sc = genai.SchedulerConfig()
    sc.cache_size = cfg.kv_cache_size_gb
    if cfg.kv_cache_blocks:
        sc.num_kv_blocks = cfg.kv_cache_blocks
    sc.max_num_seqs = cfg.max_num_seqs
    sc.max_num_batched_tokens = cfg.max_num_batched_tokens
    sc.enable_prefix_caching = cfg.enable_prefix_caching
    sc.dynamic_split_fuse = cfg.dynamic_split_fuse
    return sc


def _kv_cache_full(rid: int) -> RequestFailure:
    return RequestFailure(
        rid,
        503,
        "The engine's KV cache filled up while this request ran; please retry.",
        "kv_cache_full",
    )


class CBBackend(Backend):
    """Continuous batching: every running request advances one token per step."""

    name = "continuous_batching"

    def __init__(self, conn: Channel, ov: Any, genai: Any, cfg: WorkerConfig) -> None:
        super().__init__(conn, ov, genai, cfg)
        self.pipe = genai.ContinuousBatchingPipeline(
            str(cfg.model_dir), scheduler_config(genai, cfg), cfg.device, dict(cfg.ov_config)
        )
        self.preparer = Preparer(ov, genai, self.pipe.get_tokenizer(), self.model_dir, cfg.model)
        self.table = ByteTokenTable.build(self.preparer.tokenizer)
        self.active: dict[int, ActiveRequest] = {}
        self.finished_status = {
            genai.GenerationStatus.FINISHED,
            genai.GenerationStatus.STOP,
            genai.GenerationStatus.CANCEL,
        }
        self.ignored_status = genai.GenerationStatus.IGNORED
        self.running_status = genai.GenerationStatus.RUNNING
        self.reasons = {
            value: finish_reason_name(value)
            for value in genai.GenerationFinishReason.__members__.values()
        }
        self._stats = (0, 0, 0.0)
        self.add_seconds = 0.0  # moving average of add_request's duration
        self.pending: deque[tuple[int, GenerationRequest]] = deque()  # not added yet
        # Requests the pipeline dropped when its KV cache ran out while others ran: they
        # run again, each alone (see _out_of_memory).
        self.solo: deque[ActiveRequest] = deque()
        self.exclusive: int | None = None  # the one running alone
        self.crowded = False  # more than one request was in the pipeline at this step

    def add(self, rid: int, request: GenerationRequest) -> None:
        self.pending.append((rid, request))

    def admit(self) -> None:
        """Adds waiting requests to the pipeline, until ADMIT_BUDGET_S has passed (at
        least one). `add_request` encodes the request's images before it returns
        (about a second per image for a 2B model on a CPU) and nothing steps
        meanwhile; so a burst of image requests is added one per step, each one
        streaming as soon as it is in, and running answers never wait for more than
        one add. Text-only requests are quick to add and go in together."""
        if self.exclusive is not None:
            if self.exclusive in self.active:
                return
            self.exclusive = None
        if self.solo:
            if not self.active and not self.pipe.has_non_finished_requests():
                self._replay(self.solo.popleft())
            return
        deadline = time.perf_counter() + ADMIT_BUDGET_S
        while self.pending:
            self._start(*self.pending.popleft())
            if time.perf_counter() >= deadline:
                break

    def _start(self, rid: int, request: GenerationRequest) -> None:
        if self.stream_interval and self.add_seconds > self.stream_interval:
            self.release_held()
        try:
            prep = self.preparer.prepare(request)
        except Exception as exc:
            self.fail(rid, exc)
            return
        if self._add(rid, prep):
            self.events.append(
                TextEvent(rid, 0, "", 0, None, prep.prompt_tokens, prep.visual_tokens)
            )

    def _add(self, rid: int, prep: Prepared) -> bool:
        try:
            started = time.perf_counter()
            handle = self._add_request(rid, prep)
            self.add_seconds += 0.2 * (time.perf_counter() - started - self.add_seconds)
        except Exception as exc:
            self.fail(rid, exc)
            return False
        self.active[rid] = ActiveRequest(rid, prep, handle, self.table)
        return True

    def _add_request(self, rid: int, prep: Prepared) -> Any:
        # Each request is a conversation of its own. The pipeline's inputs embedder
        # keeps the tokens of every prompt it embeds as chat history (some 24 bytes a
        # prompt token, never released outside a chat), so the engine would grow with
        # every request served; finish_chat() clears that history. What the requests
        # already running need was handed to the pipeline when they were added.
        self.pipe.finish_chat()
        return self.pipe.add_request(
            rid, prep.prompt, prep.images, prep.videos, prep.config, **prep.media_kwargs()
        )

    def _replay(self, active: ActiveRequest) -> None:
        """Runs a request the pipeline dropped again, alone; the tokens it had already
        made must come again (they are not sent twice), else it fails (_read_outputs)."""
        prep = active.prep
        try:
            handle = self._add_request(active.rid, prep)
        except Exception as exc:
            self.fail(active.rid, exc)
            return
        active.handle = handle
        active.key_to_choice = {}
        for choice in active.choices:
            choice.replayed = 0 if choice.ids else None
        self.active[active.rid] = active
        self.exclusive = active.rid

    def release_held(self) -> None:
        """Sends the text the stream interval holds back. `add_request` encodes the new
        request's images before it returns; when that takes longer than the interval
        (`add_seconds`, a moving average), no piece of a running answer should wait
        behind it."""
        self.collect(every=True)
        now = time.monotonic()
        for active in self.active.values():
            for choice in active.choices:
                if choice.held and not choice.closed:
                    self._send_text(active, choice, "", None, active.prep.prompt_tokens, now)
        self.flush()

    def abort(self, rid: int) -> None:
        active = self.active.pop(rid, None)
        if active is not None:
            active.handle.cancel()
        elif self.pending:
            self.pending = deque(item for item in self.pending if item[0] != rid)
        if self.solo:
            self.solo = deque(item for item in self.solo if item.rid != rid)

    def stats(self) -> EngineStats:
        running, waiting, usage = self._stats
        waiting += len(self.pending) + len(self.solo)
        return EngineStats(running, waiting, usage, self.step_seconds, self.overhead_seconds)

    def run(self) -> None:
        clock = time.perf_counter
        while not self.stopping:
            busy = bool(self.active or self.pending or self.solo)
            busy = busy or self.pipe.has_non_finished_requests()
            started = clock()
            self.drain(0 if busy else 0.2)
            if self.stopping:
                break
            self.admit()
            stepped = bool(self.active or self.pipe.has_non_finished_requests())
            if stepped:
                before_step = clock()
                try:
                    self.pipe.step()
                except Exception:
                    logger.exception("pipeline step failed; restarting the engine")
                    for rid in list(self.active):
                        self.errors.append(
                            RequestFailure(rid, 500, "The engine failed.", "engine_failure")
                        )
                    self.flush()
                    raise
                after_step = clock()
                self.step_seconds += after_step - before_step
                self.collect()
                self.overhead_seconds += (before_step - started) + (clock() - after_step)
            self.flush()
            self.heap.tick(busy=stepped)

    def collect(self, every: bool = False) -> None:
        """Reads the new outputs and queues their events. A lazy request (see ActiveRequest)
        whose next piece is not due yet is skipped unless `every`: reading a step's
        outputs costs more than a fast model's step does per sequence, and the tokens
        wait in the pipeline's queue until the piece is due (or the request ends)."""
        self.crowded = len(self.active) > 1
        metrics = self.pipe.get_metrics()
        self._stats = (
            int(metrics.scheduled_requests),
            max(0, int(metrics.requests) - int(metrics.scheduled_requests)),
            float(metrics.cache_usage),
        )
        work: list[tuple[ActiveRequest, ChoiceState, int]] = []
        not_due = time.monotonic() - self.stream_interval
        for rid, active in list(self.active.items()):
            if (
                active.lazy
                and not every
                and active.choices[0].last_sent > not_due
                and active.handle.get_status() == self.running_status
            ):
                continue
            try:
                work.extend(self._read_outputs(active))
            except Exception as exc:
                logger.exception("request %d failed while streaming", rid)
                self.active.pop(rid, None)
                active.handle.cancel()
                self.fail(rid, exc)
        self.emit(work)
        for _, choice, _ in work:
            choice.closed = choice.finish is not None
        for active in {id(item[0]): item[0] for item in work}.values():
            if (
                active.done
                and self.active.pop(active.rid, None) is not None
                and active.handle.get_status() == self.genai.GenerationStatus.RUNNING
            ):
                active.handle.stop()  # a stop string ended every choice

    def _read_outputs(self, active: ActiveRequest) -> list[tuple[ActiveRequest, ChoiceState, int]]:
        handle = active.handle
        touched: dict[int, ChoiceState] = {}
        read = finished = False
        while handle.can_read():
            read = True
            for key, output in handle.read().items():
                choice = active.choice_for(key)
                if choice.finish is not None:
                    continue
                ids = list(output.generated_ids)
                reason = self.reasons.get(output.finish_reason)
                if choice.replayed is not None:
                    new = self._skip_replayed(choice, ids, reason is not None)
                    if new is None:
                        handle.cancel()
                        self.active.pop(active.rid, None)
                        self.errors.append(_kv_cache_full(active.rid))
                        return []
                    ids = new
                if choice.logprobs is not None and ids:
                    scores = list(output.generated_log_probs)[-len(ids) :]
                    choice.logprobs.extend(zip(ids, scores, strict=True))
                choice.ids += ids
                choice.detok.add(ids)
                choice.tokens += len(ids)
                if reason is not None:
                    choice.finish = reason
                    finished = True
                touched[choice.index] = choice
        if read and not finished:  # still running (a status change shows next step)
            return [(active, choice, active.prep.prompt_tokens) for choice in touched.values()]
        status = handle.get_status()
        if status == self.ignored_status:
            self.active.pop(active.rid, None)
            self._out_of_memory(active)
            return []
        over = status in self.finished_status
        if over:
            limit = active.prep.config.max_new_tokens
            for choice in active.choices:
                if choice.closed:
                    continue
                if choice.finish is None:
                    choice.finish = "length" if choice.tokens >= limit else "stop"
                touched[choice.index] = choice
        prompt_tokens = active.prep.prompt_tokens
        if over:
            prompt_tokens = self._exact_prompt_tokens(handle, prompt_tokens)
        return [(active, choice, prompt_tokens) for choice in touched.values()]

    def _out_of_memory(self, active: ActiveRequest) -> None:
        """The pipeline dropped `active` (IGNORED): its KV cache ran out. When that happens
        with several requests in it, the pipeline drops every running one, also those
        that would fit alone. A request dropped while alone does not fit the cache at
        all: 400. One dropped among others runs again later, alone, from the start: its
        client sees only a delay, since the tokens it already has are checked and not
        sent again (greedy and seeded sampling make the same tokens again); if the
        replay makes other tokens, it fails with 503 and Retry-After."""
        rid = active.rid
        if not self.crowded or rid == self.exclusive:
            self.errors.append(
                RequestFailure(
                    rid,
                    400,
                    "The request does not fit in the engine's KV cache; "
                    "send a shorter prompt, fewer images or a lower max_tokens.",
                    "context_length_exceeded",
                )
            )
        else:
            logger.info("request %d: the KV cache ran out; it runs again alone", rid)
            self.solo.append(active)

    @staticmethod
    def _skip_replayed(choice: ChoiceState, ids: list[int], final: bool) -> list[int] | None:
        """The ids beyond those a replayed choice had already made; None when the replay
        made other tokens (or ended sooner) than the first run."""
        start = choice.replayed or 0
        expected = choice.ids[start : start + len(ids)]
        if ids[: len(expected)] != expected:
            return None
        start += len(expected)
        if start >= len(choice.ids):
            choice.replayed = None  # caught up
        elif final:
            return None
        else:
            choice.replayed = start
        return ids[len(expected) :]

    @staticmethod
    def _exact_prompt_tokens(handle: Any, estimate: int) -> int:
        try:
            return int(handle.get_perf_metrics().get_num_input_tokens()) or estimate
        except Exception:
            return estimate
