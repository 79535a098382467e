"""The messages on the pipe between the API process and the speech engine process.

- API -> engine: `Transcribe`, and `StopEngine` (utils/engine/messages.py).
- engine -> API: `EngineReady` / `EngineFatal` once (utils/engine/messages.py), then one
  `Transcript` or `TranscribeFailure` per `Transcribe`, in the order they came.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np

AsrTask = Literal["transcribe", "translate"]

# WhisperPipeline takes 16 kHz mono samples in [-1, 1].
SAMPLE_RATE = 16_000


@dataclass
class AsrWorkerConfig:
    """What the speech engine process is started with."""

    model_dir: str
    device: str = "CPU"
    ov_config: dict[str, Any] = field(default_factory=dict)
    log_level: str = "info"


class Transcribe(NamedTuple):
    rid: int
    audio: np.ndarray  # float32, mono, SAMPLE_RATE
    task: AsrTask = "transcribe"
    language: str | None = None  # "en"; None: detected
    prompt: str | None = None
    temperature: float = 0.0
    timestamps: bool = False  # segment timestamps

    @property
    def payload_bytes(self) -> int:
        return int(self.audio.nbytes)


class Segment(NamedTuple):
    start: float
    end: float
    text: str
    tokens: list[int]


class Transcript(NamedTuple):
    rid: int
    text: str
    language: str  # the code, e.g. "en"
    duration_s: float  # of the audio
    segments: list[Segment]  # with timestamps only
    seconds: float  # time the pipeline took


class TranscribeFailure(NamedTuple):
    rid: int
    status: int
    message: str
    param: str | None
    code: str | None


AsrOutput = Transcript | TranscribeFailure
