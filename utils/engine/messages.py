"""The messages on the pipe between the API process and the engine process.

- API -> engine: `AddRequest`, `AbortRequest`, `StopEngine`.
- engine -> API: `EngineReady` once the model is loaded and warmed up, `EngineFatal`
  when loading failed, and after every scheduler step one `StepOutputs` that batches
  the outputs of all requests.

The first `TextEvent` of every request is an acceptance event (index 0, empty text,
no tokens) sent once the request is in the pipeline. Prompt lengths (with visual
tokens) are exact on the final events; the acceptance event carries one only when it
was counted up front (a prompt that may come near the context), else 0.

NamedTuples: they pickle about as small and fast as plain tuples, and neither side
unpacks by position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from utils.engine.model_config import ModelConfig
from utils.engine.types import FinishReason, GenerationRequest, TokenLogprob


@dataclass
class WorkerConfig:
    """What the engine process is started with."""

    model_dir: str
    model: ModelConfig
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


class AddRequest(NamedTuple):
    rid: int
    request: GenerationRequest


class AbortRequest(NamedTuple):
    rid: int


class StopEngine(NamedTuple):
    pass


class TextEvent(NamedTuple):
    """New text of one choice of one request (see utils.engine.types.GenerationEvent)."""

    rid: int
    choice: int  # the choice's index
    text: str
    completion_tokens: int
    finish_reason: FinishReason | None
    prompt_tokens: int
    visual_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None


class RequestFailure(NamedTuple):
    rid: int
    status: int
    message: str
    code: str | None
    param: str | None = None  # the request field at fault


class EngineStats(NamedTuple):
    running: int
    waiting: int
    kv_cache_usage: float
    pipeline_seconds: float  # time inside the pipeline
    overhead_seconds: float  # time the loop spends around it while busy


class StepOutputs(NamedTuple):
    events: list[TextEvent]
    errors: list[RequestFailure]
    stats: EngineStats


class EngineReady(NamedTuple):
    backend: str
    max_context: int
    model_type: str


class EngineFatal(NamedTuple):
    message: str


ToEngine = AddRequest | AbortRequest | StopEngine
FromEngine = StepOutputs | EngineReady | EngineFatal
