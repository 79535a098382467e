"""Which directory an export lives in: the model's key (with a hash of the builders
for embedded models) and the weight format it was compressed to."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from utils.models import tiny_common
from utils.models.tiny import ModelKind, ModelSize

if TYPE_CHECKING:
    from utils.settings import Settings

WeightFormat = Literal["int4", "int8", "fp16"]

# Embedded model name -> (utils.models.tiny kind, size).
EMBEDDED_MODELS: dict[str, tuple[ModelKind, ModelSize]] = {
    "embedded/tiny-qwen2-vl": ("qwen2-vl", "tiny"),
    "embedded/tiny-llava": ("llava", "tiny"),
    "embedded/random-qwen2-vl-2b": ("qwen2-vl", "2b"),
    "embedded/tiny-qwen2.5-vl": ("qwen2.5-vl", "tiny"),
    "embedded/tiny-qwen3-vl": ("qwen3-vl", "tiny"),
    "embedded/tiny-gemma3": ("gemma3", "tiny"),
    "embedded/tiny-llava-next": ("llava-next", "tiny"),
    "embedded/tiny-llava-next-video": ("llava-next-video", "tiny"),
}


EMBEDDED_PREFIX = "embedded/"


# The tiny models' hidden size is 64: larger int4 groups would not divide it.
EMBEDDED_TINY_MAX_GROUP_SIZE = 16


# Everything that shapes an embedded model's files: the export cache key follows it.
_SOURCE_FILES = (
    "tiny.py",
    "tiny_common.py",
    "tiny_families.py",
    "tiny_templates.py",
    "naming.py",
    "export.py",
)


@dataclasses.dataclass(frozen=True)
class CompressionSpec:
    """How the language model's weights are stored."""

    weight_format: WeightFormat = "int4"
    group_size: int = 128
    ratio: float = 1.0
    sym: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> CompressionSpec:
        return cls(
            weight_format=settings.compression_weight_format,
            group_size=settings.compression_group_size,
            ratio=settings.compression_ratio,
            sym=settings.compression_sym,
        )

    @property
    def slug(self) -> str:
        sym = "sym" if self.sym else "asym"
        if self.weight_format == "int4":
            return f"int4-g{self.group_size}-r{self.ratio:g}-{sym}"
        if self.weight_format == "int8":
            return f"int8-{sym}"
        return self.weight_format

    def quantization_config(self) -> dict[str, Any] | None:
        """The weight-compression config `optimum-cli --weight-format` would build."""
        if self.weight_format == "fp16":
            return None
        int8 = self.weight_format == "int8"
        return {
            "bits": 8 if int8 else 4,
            "ratio": 1.0 if int8 else self.ratio,
            "sym": self.sym,
            "group_size": -1 if int8 else self.group_size,
            "all_layers": None,
            "dataset": None,
            "num_samples": None,
            "quant_method": "default",
            "sensitivity_metric": None,
            "scale_estimation": None,
            "gptq": None,
            "lora_correction": None,
            "dtype": self.weight_format,
            "backup_precision": None,
            "statistics_path": None,
            "group_size_fallback": None,
        }


def source_hash() -> str:
    """Hash of the code that builds embedded models; a change gives new export keys."""
    return tiny_common.source_hash(_SOURCE_FILES)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def model_key(model_name: str) -> str:
    """Directory-name-safe key of a model: embedded name, local directory or hub id."""
    if model_name.startswith(EMBEDDED_PREFIX):
        return f"{_slug(model_name.removeprefix(EMBEDDED_PREFIX))}-{source_hash()}"
    path = Path(model_name).expanduser()
    if path.is_dir():
        resolved = str(path.resolve())
        short = hashlib.sha256(resolved.encode()).hexdigest()[:8]
        return f"local-{_slug(path.resolve().name)}-{short}"
    return _slug(model_name.replace("/", "--"))


def effective_spec(model_name: str, spec: CompressionSpec) -> CompressionSpec:
    """Adjust compression settings the model cannot take (tiny embedded models)."""
    embedded = EMBEDDED_MODELS.get(model_name)
    if (
        embedded is not None
        and embedded[1] == "tiny"
        and spec.weight_format == "int4"
        and spec.group_size > EMBEDDED_TINY_MAX_GROUP_SIZE
    ):
        return dataclasses.replace(spec, group_size=EMBEDDED_TINY_MAX_GROUP_SIZE)
    return spec


def export_dir_for(model_name: str, spec: CompressionSpec, cache_dir: Path) -> Path:
    return Path(cache_dir) / f"{model_key(model_name)}--{effective_spec(model_name, spec).slug}"
