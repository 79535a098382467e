"""The engine process: owns the OpenVINO GenAI pipeline and runs its step loop.

`ContinuousBatchingPipeline.add_request` and `.step` hold the Python GIL for their
whole duration, so the pipeline lives in this process and the API process talks to
it over a `multiprocessing` pipe (see utils/engine.py):

- API -> worker: ``("add", rid, GenerationRequest)``, ``("abort", rid)``, ``("stop",)``.
- worker -> API: ``("ready", info)`` once loaded and warmed up, ``("fatal", message)``
  when loading failed, and after every scheduler step one
  ``("step", events, errors, stats)`` message that batches the outputs of all
  requests: ``events`` are ``(rid, index, text, completion_tokens, finish_reason,
  prompt_tokens)`` tuples, ``errors`` are ``(rid, status, message, code)`` tuples and
  ``stats`` is ``(running, waiting, kv_cache_usage, pipeline_seconds,
  overhead_seconds)``.

The first event of every request is an acceptance event (index 0, empty text, no
tokens) sent once the request is in the pipeline. Prompt lengths (with visual tokens)
are exact on the final events; the acceptance event carries one only when it was
counted up front (a prompt that may come near the context), else 0.

Text is detokenized incrementally (a Python byte table for byte-level BPE
tokenizers, else one batched tokenizer call per step for every running sequence),
never ends inside a multi-byte character, and stop strings are cut here so that
neither a stop string nor anything after it is ever sent. Text of one stream is
sent at most every `stream_interval_s` (the first piece at once).

`openvino` and `openvino_genai` are imported inside functions: importing this module
(as utils/engine.py does for the model helpers) loads nothing.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from utils.generation import GenerationRequest, SamplingParams

logger = logging.getLogger(__name__)

# Model types whose OpenVINO GenAI pipeline takes `videos=` natively.
VIDEO_MODEL_TYPES = frozenset(
    {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_next_video"}
)
TAG_RE = re.compile(r"<ov_genai_(image|video)_(\d+)>")
REPLACEMENT_CHAR = "\ufffd"
STOP_MATCHED = "stop-string"  # a choice's finish once a stop string cut its text
# Time the engine spends adding waiting requests between two steps (see CBBackend.admit)
ADMIT_BUDGET_S = 0.05

Event = tuple[int, int, str, int, str | None, int]
ErrorItem = tuple[int, int, str, str | None]
# running, waiting, KV cache usage, seconds in the pipeline, seconds of loop overhead
Stats = tuple[int, int, float, float, float]


# --------------------------------------------------------------------------- model


def read_model_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def model_type_of(config: dict[str, Any]) -> str:
    return str(config.get("model_type", "unknown"))


def max_context_of(config: dict[str, Any]) -> int:
    for section in (config.get("text_config") or {}, config.get("llm_config") or {}, config):
        value = section.get("max_position_embeddings")
        if isinstance(value, int) and value > 0:
            return value
    return 32768


def supports_video(model_type: str) -> bool:
    return model_type in VIDEO_MODEL_TYPES


def _smart_resize(
    height: int, width: int, factor: int, min_px: int, max_px: int
) -> tuple[int, int]:
    """Qwen2-VL's resize rule: both sides multiples of `factor`, area within bounds."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_px:
        beta = math.sqrt(height * width / max_px)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_px:
        beta = math.sqrt(min_px / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


@dataclass(frozen=True)
class VisualTokenCounter:
    """Visual tokens an image or video adds to the prompt, per model family.

    Exact for Qwen2-VL-style and LLaVA-1.5-style models; for other families an
    estimate (the exact count still reaches the client from the pipeline when the
    request finishes).
    """

    model_type: str
    patch: int = 14
    merge: int = 2
    temporal: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    video_min_pixels: int = 56 * 56
    video_max_pixels: int = 28 * 28 * 1280
    llava_tokens: int = 576
    # what the pipeline puts in place of a tag before tokenizing (counted as text)
    tag_text: str = ""

    @classmethod
    def from_model_dir(cls, model_dir: Path, config: dict[str, Any]) -> VisualTokenCounter:
        model_type = model_type_of(config)
        kwargs: dict[str, Any] = {"model_type": model_type}
        pre = _read_json(Path(model_dir) / "preprocessor_config.json")
        vpre = _read_json(Path(model_dir) / "video_preprocessor_config.json") or pre
        vision = config.get("vision_config") or {}
        if model_type.startswith("qwen"):
            kwargs["patch"] = int(pre.get("patch_size") or vision.get("patch_size") or 14)
            kwargs["merge"] = int(pre.get("merge_size") or vision.get("spatial_merge_size") or 2)
            kwargs["temporal"] = int(
                pre.get("temporal_patch_size") or vision.get("temporal_patch_size") or 2
            )
            for prefix, conf in (("", pre), ("video_", vpre)):
                size = conf.get("size") or {}
                lo = conf.get("min_pixels") or size.get("shortest_edge")
                hi = conf.get("max_pixels") or size.get("longest_edge")
                if lo:
                    kwargs[f"{prefix}min_pixels"] = int(lo)
                if hi:
                    kwargs[f"{prefix}max_pixels"] = int(hi)
        else:
            image = int(vision.get("image_size") or 336)
            patch = int(vision.get("patch_size") or 14)
            tokens = (image // patch) ** 2
            if config.get("vision_feature_select_strategy") == "full":
                tokens += 1
            if model_type.startswith("llava_next"):
                tokens *= 5  # base image plus up to four tiles (an upper estimate)
            if model_type.startswith("llava"):
                kwargs["tag_text"] = "<image>\n"
                tokens -= 1  # the <image> token of tag_text becomes these tokens
            kwargs["llava_tokens"] = tokens
        return cls(**kwargs)

    def image(self, shape: Sequence[int]) -> int:
        height, width = int(shape[-3]), int(shape[-2])
        if self.model_type.startswith("qwen"):
            factor = self.patch * self.merge
            h, w = _smart_resize(height, width, factor, self.min_pixels, self.max_pixels)
            return (h // factor) * (w // factor) + 2
        return self.llava_tokens

    def video(self, shape: Sequence[int]) -> int:
        frames, height, width = int(shape[0]), int(shape[1]), int(shape[2])
        if self.model_type.startswith("qwen"):
            factor = self.patch * self.merge
            h, w = _smart_resize(
                height, width, factor, self.video_min_pixels, self.video_max_pixels
            )
            groups = math.ceil(frames / self.temporal)
            return groups * (h // factor) * (w // factor) + 2
        return self.llava_tokens * frames


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ----------------------------------------------------------------- text streaming


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    The offsets scheme of text-generation servers: the new text is the difference
    between decoding a short window of already emitted tokens and the same window
    extended by the new tokens, so tokenizers whose decoding depends on neighbours
    (leading spaces, byte fallback) come out right. A delta that ends in U+FFFD (a
    multi-byte character cut in the middle) is held back until the rest of its bytes
    arrive. The decoded window text is kept, so a step usually needs one decode per
    sequence; the window restarts every `WINDOW` tokens (one extra decode then).
    Decoding is done by the caller, batched across sequences: `windows()` lists the
    token windows to decode, `advance()` takes their texts.
    """

    WINDOW = 16
    CONTEXT = 4

    __slots__ = ("ids", "prefix_offset", "prefix_text", "read_offset")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.prefix_text: str | None = ""

    def add(self, ids: Sequence[int]) -> None:
        self.ids.extend(ids)

    def windows(self) -> list[list[int]]:
        full = self.ids[self.prefix_offset :]
        if self.prefix_text is None:
            return [self.ids[self.prefix_offset : self.read_offset], full]
        return [full]

    def advance(self, texts: Sequence[str], *, final: bool = False) -> str:
        if self.prefix_text is None:
            self.prefix_text = texts[0]
        prefix_text, full_text = self.prefix_text, texts[-1]
        if not final and (
            len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR)
        ):
            return ""
        delta = full_text[len(prefix_text) :]
        self.read_offset = len(self.ids)
        if self.read_offset - self.prefix_offset > self.WINDOW:
            self.prefix_offset = self.read_offset - self.CONTEXT
            self.prefix_text = None
        else:
            self.prefix_text = full_text
        return delta


def decode_pending(
    decode: Callable[[list[list[int]]], list[str]],
    streams: Sequence[IncrementalDetokenizer],
    final: Sequence[bool],
) -> list[str]:
    """One batched `decode` call for every stream; returns each stream's new text."""
    batch: list[list[int]] = []
    spans: list[tuple[int, int]] = []
    for stream in streams:
        windows = stream.windows()
        spans.append((len(batch), len(batch) + len(windows)))
        batch.extend(windows)
    texts = decode(batch) if batch else []
    return [
        stream.advance(texts[lo:hi], final=final[i])
        for i, (stream, (lo, hi)) in enumerate(zip(streams, spans, strict=True))
    ]


class ByteTokenTable:
    """The bytes of every token, for tokenizers whose decoding is plain concatenation.

    Byte-level BPE tokenizers (Qwen, Llama 3, GPT-style) decode a token sequence by
    joining the tokens' bytes; the table makes that a Python join plus an incremental
    UTF-8 decoder instead of one tokenizer-model call per step. `build()` checks the
    equivalence against the tokenizer on every token and on random sequences, and
    returns None (use the tokenizer) for anything else, such as SentencePiece.
    """

    __slots__ = ("table",)

    def __init__(self, table: list[bytes]) -> None:
        self.table = table

    @classmethod
    def build(cls, tokenizer: Any, samples: int = 200) -> ByteTokenTable | None:
        try:
            vocab = tokenizer.get_vocab()
        except Exception:
            return None
        if not vocab:
            return None
        size = max(vocab.values()) + 1
        table = [b""] * size
        for key, index in vocab.items():
            table[index] = key if isinstance(key, bytes) else str(key).encode()
        chunk = 8192
        for start in range(0, size, chunk):
            ids = range(start, min(start + chunk, size))
            for index, text in zip(ids, tokenizer.decode([[i] for i in ids]), strict=True):
                if text == table[index].decode("utf-8", "replace"):
                    continue
                if text == "":  # a special token: skipped when decoding
                    table[index] = b""
                    continue
                return None
        # Sequences of whole characters: decoding must be plain concatenation. (Bytes
        # that are not UTF-8 become U+FFFD in both, though not always as many of them.)
        whole = [i for i, b in enumerate(table) if b and _is_utf8(b)]
        if not whole:
            return None
        rng = np.random.default_rng(0)
        sequences = [
            [whole[j] for j in rng.integers(0, len(whole), int(rng.integers(2, 24)))]
            for _ in range(samples)
        ]
        probe = "Hello, wörld! Привет 你好 😀 ok\n  x"
        sequences.append(
            tokenizer.encode(probe, add_special_tokens=False).input_ids.data[0].tolist()
        )
        for sequence, text in zip(sequences, tokenizer.decode(sequences), strict=True):
            if text != b"".join(table[i] for i in sequence).decode("utf-8", "replace"):
                return None
        return cls(table)

    def join(self, ids: Sequence[int]) -> bytes:
        table, size = self.table, len(self.table)
        return b"".join(table[i] if 0 <= i < size else b"" for i in ids)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class ByteDetokenizer:
    """Text of a token stream from a `ByteTokenTable`; an incremental UTF-8 decoder
    holds back the bytes of a character that is not complete yet."""

    __slots__ = ("_decoder", "_table", "_text")

    def __init__(self, table: ByteTokenTable) -> None:
        self._table = table
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._text = ""

    def add(self, ids: Sequence[int]) -> None:
        self._text += self._decoder.decode(self._table.join(ids))

    def take(self, final: bool = False) -> str:
        text = self._text
        if final:
            text += self._decoder.decode(b"", final=True)
        self._text = ""
        return text


class StopMatcher:
    """Cuts text at the first stop string; holds back a tail that may start one."""

    __slots__ = ("_buffer", "_stops")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._buffer = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to send, whether a stop string matched)."""
        if not self._stops:
            return text, False
        buffer = self._buffer + text
        cut = -1
        for stop in self._stops:
            at = buffer.find(stop)
            if at >= 0 and (cut < 0 or at < cut):
                cut = at
        if cut >= 0:
            self._buffer = ""
            return buffer[:cut], True
        hold = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buffer)), hold, -1):
                if buffer.endswith(stop[:k]):
                    hold = k
                    break
        self._buffer = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        text, self._buffer = self._buffer, ""
        return text


class ChoiceState:
    """One output sequence (an OpenAI choice): tokens, text stream, stop strings."""

    __slots__ = ("closed", "detok", "finish", "held", "index", "last_sent", "stop", "tokens")

    def __init__(
        self, index: int, stops: Sequence[str], table: ByteTokenTable | None = None
    ) -> None:
        self.index = index
        self.closed = False  # its final event is out
        self.detok: IncrementalDetokenizer | ByteDetokenizer = (
            ByteDetokenizer(table) if table is not None else IncrementalDetokenizer()
        )
        self.stop = StopMatcher(stops)
        self.tokens = 0
        self.finish: str | None = None
        self.held = ""  # text waiting for the stream interval
        self.last_sent = -1.0


# ----------------------------------------------------------------------- requests


class RequestError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


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


@dataclass
class WorkerConfig:
    model_dir: str
    device: str = "CPU"
    engine: str = "auto"  # auto | continuous_batching | vlm_pipeline
    ov_config: dict[str, Any] = field(default_factory=dict)
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    kv_cache_size_gb: int = 2
    kv_cache_blocks: int | None = None
    enable_prefix_caching: bool = True
    dynamic_split_fuse: bool = True
    log_level: str = "info"
    stream_interval_s: float = 0.0


@dataclass
class Prepared:
    prompt: str
    images: list[Any]
    videos: list[Any]
    config: Any  # openvino_genai.GenerationConfig
    params: SamplingParams
    prompt_tokens: int  # 0 until counted
    replicate: int  # greedy n > 1: one sequence, copied to n choices
    visual_tokens: int = 0


class Preparer:
    """Chat template, input checks, context check and generation config."""

    def __init__(self, ov: Any, genai: Any, tokenizer: Any, model_dir: Path) -> None:
        self.ov = ov
        self.genai = genai
        self.tokenizer = tokenizer
        self.model_dir = Path(model_dir)
        config = read_model_config(model_dir)
        self.model_type = model_type_of(config)
        self.max_context = max_context_of(config)
        self.visual = VisualTokenCounter.from_model_dir(model_dir, config)
        self.video_native = supports_video(self.model_type)
        self.base_config_path = self.model_dir / "generation_config.json"
        self.eos_token_id = int(tokenizer.get_eos_token_id())

    def prepare(self, request: GenerationRequest) -> Prepared:
        params = request.params
        images, videos = request.images, request.videos
        self._check_tags(request.messages, len(images), len(videos))
        if videos and not self.video_native:
            raise RequestError(
                400, f"Model type {self.model_type} does not take video input.", "invalid_media"
            )
        prompt = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True)
        visual = sum(self.visual.image(img.shape) for img in images)
        visual += sum(self.visual.video(vid.shape) for vid in videos)
        prompt_tokens = 0  # counted later, unless the prompt may come near the context
        # Tokenizing costs more than the rest of the preparation; a token has at least
        # one byte, so a prompt whose bytes fit with room to spare needs no count yet.
        upper = len(prompt.encode()) + visual + 8
        if upper + params.max_new_tokens > self.max_context:
            prompt_tokens = self.count(prompt, visual)
            if prompt_tokens >= self.max_context:
                raise RequestError(
                    400,
                    f"This model's maximum context length is {self.max_context} tokens. "
                    f"However, your messages resulted in {prompt_tokens} tokens ({visual} of "
                    "them for images and videos). Please reduce the length of the messages "
                    "or media.",
                    "context_length_exceeded",
                )
        used = prompt_tokens or upper
        max_new = max(1, min(params.max_new_tokens, self.max_context - used))
        config, replicate = self._generation_config(params, max_new)
        return Prepared(
            prompt=prompt,
            images=[self.ov.Tensor(np.ascontiguousarray(img, dtype=np.uint8)) for img in images],
            videos=[self.ov.Tensor(np.ascontiguousarray(vid, dtype=np.uint8)) for vid in videos],
            config=config,
            params=params,
            prompt_tokens=prompt_tokens,
            replicate=replicate,
            visual_tokens=visual,
        )

    def count(self, prompt: str, visual: int) -> int:
        """Prompt tokens with visual tokens, as the pipeline will see them."""
        text = TAG_RE.sub(self.visual.tag_text, prompt)
        return int(self.tokenizer.encode(text).input_ids.get_shape()[1]) + visual

    def prompt_tokens(self, prep: Prepared) -> int:
        if not prep.prompt_tokens:
            prep.prompt_tokens = self.count(prep.prompt, prep.visual_tokens)
        return prep.prompt_tokens

    @staticmethod
    def _check_tags(messages: list[dict[str, str]], n_images: int, n_videos: int) -> None:
        for message in messages:
            for kind, index in TAG_RE.findall(str(message.get("content", ""))):
                limit = n_images if kind == "image" else n_videos
                if int(index) >= limit:
                    raise RequestError(
                        400, f"The prompt refers to {kind} {index}, which was not given."
                    )

    def _generation_config(self, params: SamplingParams, max_new: int) -> tuple[Any, int]:
        genai = self.genai
        if self.base_config_path.exists():
            cfg = genai.GenerationConfig(str(self.base_config_path))
        else:
            cfg = genai.GenerationConfig()
        if cfg.eos_token_id < 0 and self.eos_token_id >= 0:
            cfg.set_eos_token_id(self.eos_token_id)
        cfg.apply_chat_template = False
        cfg.max_new_tokens = max_new
        cfg.min_new_tokens = min(params.min_new_tokens, max_new)
        cfg.ignore_eos = params.ignore_eos
        cfg.repetition_penalty = params.repetition_penalty
        cfg.presence_penalty = params.presence_penalty
        cfg.frequency_penalty = params.frequency_penalty
        cfg.num_beams = 1
        replicate = 1
        greedy = params.temperature <= 1e-5
        if greedy:
            cfg.do_sample = False
            cfg.num_return_sequences = 1
            replicate = params.n
        else:
            cfg.do_sample = True
            cfg.temperature = params.temperature
            cfg.top_p = params.top_p
            if params.top_k > 0:
                cfg.top_k = params.top_k
            cfg.rng_seed = params.seed
            cfg.num_return_sequences = params.n
        if params.json_schema:
            cfg.structured_output_config = genai.StructuredOutputConfig(
                json_schema=params.json_schema
            )
        try:
            cfg.validate()
        except Exception as exc:
            raise RequestError(400, f"Invalid generation parameters: {exc}") from exc
        return cfg, replicate


def finish_reason_name(reason: Any) -> str | None:
    return _FINISH_REASONS.get(getattr(reason, "name", str(reason)))


_FINISH_REASONS = {"LENGTH": "length", "STOP": "stop", "TOOL_CALL": "stop"}


# ----------------------------------------------------------------------- backends


class _Active:
    __slots__ = ("choices", "handle", "key_to_choice", "lazy", "prep", "rid", "started")

    def __init__(self, rid: int, prep: Prepared, handle: Any, table: ByteTokenTable | None) -> None:
        self.rid = rid
        self.prep = prep
        self.handle = handle
        n = prep.params.n if prep.replicate == 1 else 1
        self.choices = [ChoiceState(i, prep.params.stop, table) for i in range(n)]
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

    def __init__(self, conn: Connection, ov: Any, genai: Any, model_dir: Path) -> None:
        self.conn = conn
        self.ov = ov
        self.genai = genai
        self.model_dir = model_dir
        self.events: list[Event] = []
        self.errors: list[ErrorItem] = []
        self.stopping = False
        self.preparer: Preparer
        # time inside the pipeline, and time the loop spends around it while busy
        self.step_seconds = 0.0
        self.overhead_seconds = 0.0
        self.stream_interval = 0.0
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

    def handle_message(self, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            self.add(message[1], message[2])
        elif kind == "abort":
            self.abort(message[1])
        elif kind == "stop":
            self.stopping = True

    def add(self, rid: int, request: GenerationRequest) -> None:
        raise NotImplementedError

    def admit(self) -> None:
        """Moves waiting requests into the pipeline (continuous batching only)."""

    def abort(self, rid: int) -> None:
        raise NotImplementedError

    def stats(self) -> Stats:
        raise NotImplementedError

    def fail(self, rid: int, exc: BaseException) -> None:
        if isinstance(exc, RequestError):
            self.errors.append((rid, exc.status, exc.message, exc.code))
            return
        logger.warning("request %d failed: %s", rid, exc)
        self.errors.append((rid, 400, "The model could not process this input.", "invalid_input"))

    def flush(self) -> None:
        if not self.events and not self.errors:
            return
        self.conn.send(("step", self.events, self.errors, self.stats()))
        self.events = []
        self.errors = []

    def decode(self, batch: list[list[int]]) -> list[str]:
        return list(self.preparer.tokenizer.decode(batch))

    def emit(self, work: list[tuple[_Active, ChoiceState, int]]) -> None:
        """Detokenizes the new tokens of (request, choice, prompt_tokens) items, all in
        one tokenizer call, and queues their events."""
        if not work:
            return
        now = time.monotonic()
        finals = [choice.finish is not None for _, choice, _ in work]
        if self.table is not None:
            deltas = [
                choice.detok.take(final)  # type: ignore[union-attr]
                for (_, choice, _), final in zip(work, finals, strict=True)
            ]
        else:
            streams = [choice.detok for _, choice, _ in work]
            deltas = decode_pending(self.decode, streams, finals)  # type: ignore[arg-type]
        for (active, choice, prompt_tokens), delta in zip(work, deltas, strict=True):
            if choice.closed or choice.finish == STOP_MATCHED:
                continue
            text, matched = choice.stop.feed(delta)
            if matched:
                choice.finish = STOP_MATCHED
            elif choice.finish is not None:
                text += choice.stop.flush()
            finish = "stop" if matched else choice.finish
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
        active: _Active,
        choice: ChoiceState,
        text: str,
        finish: str | None,
        prompt_tokens: int,
        now: float,
    ) -> None:
        """Queues a choice's held text plus `text` as its next event (one per copy)."""
        if choice.held:
            text, choice.held = choice.held + text, ""
        choice.last_sent = now
        for index in self._indices(active, choice):
            self.events.append((active.rid, index, text, choice.tokens, finish, prompt_tokens))

    @staticmethod
    def _indices(active: _Active, choice: ChoiceState) -> range:
        if active.prep.replicate > 1:
            return range(active.prep.replicate)
        return range(choice.index, choice.index + 1)


class CBBackend(Backend):
    """Continuous batching: every running request advances one token per step."""

    name = "continuous_batching"

    def __init__(self, conn: Connection, ov: Any, genai: Any, cfg: WorkerConfig) -> None:
        super().__init__(conn, ov, genai, Path(cfg.model_dir))
        self.pipe = genai.ContinuousBatchingPipeline(
            str(cfg.model_dir), scheduler_config(genai, cfg), cfg.device, dict(cfg.ov_config)
        )
        self.preparer = Preparer(ov, genai, self.pipe.get_tokenizer(), self.model_dir)
        self.table = ByteTokenTable.build(self.preparer.tokenizer)
        self.active: dict[int, _Active] = {}
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

    def add(self, rid: int, request: GenerationRequest) -> None:
        self.pending.append((rid, request))

    def admit(self) -> None:
        """Adds waiting requests to the pipeline, until ADMIT_BUDGET_S has passed (at
        least one). `add_request` encodes the request's images before it returns
        (about a second per image for a 2B model on a CPU) and nothing steps
        meanwhile; so a burst of image requests is added one per step, each one
        streaming as soon as it is in, and running answers never wait for more than
        one add. Text-only requests are quick to add and go in together."""
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
            started = time.perf_counter()
            handle = self.pipe.add_request(rid, prep.prompt, prep.images, prep.videos, prep.config)
            self.add_seconds += 0.2 * (time.perf_counter() - started - self.add_seconds)
        except Exception as exc:
            self.fail(rid, exc)
            return
        self.active[rid] = _Active(rid, prep, handle, self.table)
        self.events.append((rid, 0, "", 0, None, prep.prompt_tokens))

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

    def stats(self) -> Stats:
        running, waiting, usage = self._stats
        waiting += len(self.pending)
        return (running, waiting, usage, self.step_seconds, self.overhead_seconds)

    def run(self) -> None:
        clock = time.perf_counter
        while not self.stopping:
            busy = bool(self.active or self.pending) or self.pipe.has_non_finished_requests()
            started = clock()
            self.drain(0 if busy else 0.2)
            if self.stopping:
                break
            self.admit()
            if self.active or self.pipe.has_non_finished_requests():
                before_step = clock()
                try:
                    self.pipe.step()
                except Exception:
                    logger.exception("pipeline step failed; restarting the engine")
                    for rid in list(self.active):
                        self.errors.append((rid, 500, "The engine failed.", "engine_failure"))
                    self.flush()
                    raise
                after_step = clock()
                self.step_seconds += after_step - before_step
                self.collect()
                self.overhead_seconds += (before_step - started) + (clock() - after_step)
            self.flush()

    def collect(self, every: bool = False) -> None:
        """Reads the new outputs and queues their events. A lazy request (see _Active)
        whose next piece is not due yet is skipped unless `every`: reading a step's
        outputs costs more than a fast model's step does per sequence, and the tokens
        wait in the pipeline's queue until the piece is due (or the request ends)."""
        metrics = self.pipe.get_metrics()
        self._stats = (
            int(metrics.scheduled_requests),
            max(0, int(metrics.requests) - int(metrics.scheduled_requests)),
            float(metrics.cache_usage),
        )
        work: list[tuple[_Active, ChoiceState, int]] = []
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

    def _read_outputs(self, active: _Active) -> list[tuple[_Active, ChoiceState, int]]:
        handle = active.handle
        touched: dict[int, ChoiceState] = {}
        read = finished = False
        while handle.can_read():
            read = True
            for key, output in handle.read().items():
                choice = active.choice_for(key)
                if choice.finish is not None:
                    continue
                ids = output.generated_ids
                choice.detok.add(ids)
                choice.tokens += len(ids)
                reason = self.reasons.get(output.finish_reason)
                if reason is not None:
                    choice.finish = reason
                    finished = True
                touched[choice.index] = choice
        if read and not finished:  # still running (a status change shows next step)
            return [(active, choice, active.prep.prompt_tokens) for choice in touched.values()]
        status = handle.get_status()
        if status == self.ignored_status:
            self.active.pop(active.rid, None)
            self.errors.append(
                (
                    active.rid,
                    400,
                    "The request does not fit in the engine's KV cache.",
                    "context_length_exceeded",
                )
            )
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

    @staticmethod
    def _exact_prompt_tokens(handle: Any, estimate: int) -> int:
        try:
            return int(handle.get_perf_metrics().get_num_input_tokens()) or estimate
        except Exception:
            return estimate


class VLMBackend(Backend):
    """VLMPipeline: one request at a time, for models continuous batching cannot run."""

    name = "vlm_pipeline"

    def __init__(self, conn: Connection, ov: Any, genai: Any, cfg: WorkerConfig) -> None:
        super().__init__(conn, ov, genai, Path(cfg.model_dir))
        self.pipe = genai.VLMPipeline(str(cfg.model_dir), cfg.device, **dict(cfg.ov_config))
        self.preparer = Preparer(ov, genai, self.pipe.get_tokenizer(), self.model_dir)
        self.table = ByteTokenTable.build(self.preparer.tokenizer)
        self.queue: deque[tuple[int, Prepared]] = deque()
        self.current: _Active | None = None
        self.cancelled: set[int] = set()

    def add(self, rid: int, request: GenerationRequest) -> None:
        try:
            prep = self.preparer.prepare(request)
        except Exception as exc:
            self.fail(rid, exc)
            return
        self.queue.append((rid, prep))
        self.events.append((rid, 0, "", 0, None, prep.prompt_tokens))

    def abort(self, rid: int) -> None:
        if self.current is not None and self.current.rid == rid:
            self.cancelled.add(rid)
        self.queue = deque(item for item in self.queue if item[0] != rid)

    def stats(self) -> Stats:
        running = 1 if self.current else 0
        return (running, len(self.queue), 0.0, self.step_seconds, self.overhead_seconds)

    def run(self) -> None:
        while not self.stopping:
            self.drain(0 if self.queue else 0.2)
            self.flush()
            if self.queue and not self.stopping:
                rid, prep = self.queue.popleft()
                self.generate(rid, prep)
                self.flush()

    def generate(self, rid: int, prep: Prepared) -> None:
        runs = 1 if prep.replicate > 1 else prep.params.n
        active = _Active(rid, prep, None, self.table)
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

    def _run_one(self, active: _Active, choice: ChoiceState, index: int) -> None:
        backend = self
        genai = self.genai
        config = active.prep.config
        if index:
            config.rng_seed = active.prep.params.seed + index
        config.num_return_sequences = 1

        class _Streamer(genai.StreamerBase):  # type: ignore[name-defined,misc]
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
        result = self.pipe.generate(
            active.prep.prompt,
            images=active.prep.images,
            videos=active.prep.videos,
            generation_config=config,
            streamer=_Streamer(),
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


# ------------------------------------------------------------------------- entry


def _warm_up(backend: Backend) -> None:
    """One short generation (with a small image) so the first request is not slow."""
    image = np.full((64, 64, 3), 127, dtype=np.uint8)
    request = GenerationRequest(
        request_id="warm-up",
        messages=[{"role": "user", "content": "<ov_genai_image_0>Hi"}],
        params=SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True),
        images=[image],
    )
    backend.add(0, request)
    backend.admit()
    if backend.errors:
        raise RuntimeError(f"warm-up failed: {backend.errors[0][2]}")
    backend.events.clear()
    if isinstance(backend, CBBackend):
        while backend.active or backend.pipe.has_non_finished_requests():
            backend.pipe.step()
            backend.collect()
    else:
        assert isinstance(backend, VLMBackend)
        rid, prep = backend.queue.popleft()
        backend.generate(rid, prep)
    if backend.errors:
        raise RuntimeError(f"warm-up failed: {backend.errors[0][2]}")
    backend.events.clear()


class _NoSend:
    """Connection stand-in while warming up: outputs are dropped, nothing is read."""

    def poll(self, timeout: float = 0) -> bool:
        return False

    def send(self, message: Any) -> None:
        return None


def load_backend(conn: Connection, cfg: WorkerConfig) -> Backend:
    import openvino as ov
    import openvino_genai as genai

    order = {
        "continuous_batching": [CBBackend],
        "vlm_pipeline": [VLMBackend],
        "auto": [CBBackend, VLMBackend],
    }[cfg.engine]
    last: Exception | None = None
    for cls in order:
        started = time.monotonic()
        try:
            backend = cls(_NoSend(), ov, genai, cfg)  # type: ignore[arg-type]
            _warm_up(backend)
        except Exception as exc:
            last = exc
            if cls is CBBackend and len(order) > 1:
                logger.warning(
                    "continuous batching cannot run %s (%s); falling back to VLMPipeline "
                    "(one request at a time)",
                    cfg.model_dir,
                    exc,
                )
            continue
        backend.conn = conn
        backend.stream_interval = cfg.stream_interval_s
        logger.info(
            "engine ready: %s on %s in %.1f s", backend.name, cfg.device, time.monotonic() - started
        )
        return backend
    raise RuntimeError(f"cannot load {cfg.model_dir}: {last}")


def main(conn: Connection, cfg: WorkerConfig) -> None:
    """Process entry point (multiprocessing target)."""
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s [engine] %(name)s: %(message)s",
    )
    try:
        backend = load_backend(conn, cfg)
    except Exception as exc:
        logger.error("%s", exc)
        try:
            conn.send(("fatal", str(exc)))
        finally:
            conn.close()
        return
    conn.send(
        (
            "ready",
            {
                "backend": backend.name,
                "max_context": backend.preparer.max_context,
                "model_type": backend.preparer.model_type,
            },
        )
    )
    try:
        backend.run()  # type: ignore[attr-defined]
    finally:
        conn.close()
