"""The contract between the HTTP layer and the inference engine.

Plain dataclasses, separate from the wire schema (utils/api/protocol.py) and free
of OpenVINO types, so they pickle cheaply across the engine process boundary.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from utils.engine.model_config import ModelConfig

FinishReason = Literal["stop", "length"]

# One generated token's log probability: (text, log probability, bytes)
TokenLogprob = tuple[str, float, bytes]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 42
    stop: tuple[str, ...] = ()
    n: int = 1
    min_new_tokens: int = 0
    ignore_eos: bool = False
    json_schema: str | None = None  # structured output, a JSON schema as text
    logprobs: bool = False  # report each generated token's log probability
    pruning_ratio: int = 0  # percent of visual tokens the engine prunes


@dataclass(slots=True)
class GenerationRequest:
    request_id: str
    # Chat turns; each content is text in which `<ov_genai_image_N>` and
    # `<ov_genai_video_N>` tags mark where images[N] and videos[N] belong.
    # Assistant turns may carry `tool_calls`, tool turns their `tool_call_id`.
    messages: list[dict[str, Any]]
    params: SamplingParams
    images: list[np.ndarray] = field(default_factory=list)  # uint8 RGB, HWC
    videos: list[np.ndarray] = field(default_factory=list)  # uint8 RGB, FHWC
    video_fps: list[float] = field(default_factory=list)  # frame rate of videos[N], 0: unknown
    tools: list[dict[str, Any]] | None = None  # for the chat template's `tools`


@dataclass(slots=True)
class GenerationEvent:
    """New output of one choice: text since the previous event of that choice."""

    index: int
    text: str
    completion_tokens: int  # tokens generated so far for this choice
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0  # prompt length with visual tokens, once known
    visual_tokens: int = 0  # of prompt_tokens, those of images and videos, once known
    logprobs: list[TokenLogprob] | None = None  # of this event's tokens, when asked for


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str  # the name clients use
    model_type: str  # Hugging Face model_type, e.g. qwen2_vl
    path: str
    supports_video: bool
    max_context: int  # tokens
    # config.json and the preprocessor configs, for the vision budgets
    model: ModelConfig | None = field(default=None, compare=False, repr=False)


class Engine(Protocol):
    """What the HTTP layer needs from an engine."""

    @property
    def info(self) -> ModelInfo: ...

    @property
    def ready(self) -> bool: ...

    @property
    def failed(self) -> bool:
        """True when the engine stopped restarting (it failed too many times in a row)."""
        ...

    @property
    def problem(self) -> str | None:
        """Why the engine is not ready (a crash, a stall, a failed restart), if known."""
        ...

    @property
    def pid(self) -> int | None:
        """The engine process's id, when it runs in a process of its own."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Stream events for every choice until each has a finish_reason.

        Raises OpenAIError: 400 when the prompt with its visual tokens does not
        fit the context, 429 when the queue is full, 503 while not ready, 504
        on timeout, 500 when the engine fails. Closing the iterator early
        cancels the request.
        """
        ...

    def stats(self) -> dict[str, float]: ...
