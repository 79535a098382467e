"""What the server needs from a model's directory: config.json and the preprocessor
configs, read once in the API process and handed to the engine process."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Model types whose OpenVINO GenAI pipeline takes `videos=` natively; the others
# (llava, llava_next, gemma3, ...) get a video's frames as separate images.
VIDEO_MODEL_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next_video"})
DEFAULT_MAX_CONTEXT = 32768


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    max_context: int
    config: dict[str, Any] = field(default_factory=dict)  # config.json
    preprocessor: dict[str, Any] = field(default_factory=dict)  # preprocessor_config.json
    video_preprocessor: dict[str, Any] = field(default_factory=dict)

    @property
    def supports_video(self) -> bool:
        return self.model_type in VIDEO_MODEL_TYPES

    @classmethod
    def from_dict(
        cls,
        config: dict[str, Any],
        preprocessor: dict[str, Any] | None = None,
        video_preprocessor: dict[str, Any] | None = None,
    ) -> ModelConfig:
        preprocessor = preprocessor or {}
        return cls(
            model_type=str(config.get("model_type", "unknown")),
            max_context=_max_context(config),
            config=config,
            preprocessor=preprocessor,
            video_preprocessor=video_preprocessor or preprocessor,
        )

    @classmethod
    def read(cls, model_dir: Path | str) -> ModelConfig:
        directory = Path(model_dir)
        return cls.from_dict(
            _read_json(directory / "config.json"),
            _read_json(directory / "preprocessor_config.json"),
            _read_json(directory / "video_preprocessor_config.json"),
        )


def _max_context(config: dict[str, Any]) -> int:
    for section in (config.get("text_config") or {}, config.get("llm_config") or {}, config):
        value = section.get("max_position_embeddings")
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_CONTEXT
