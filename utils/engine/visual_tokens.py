"""Visual tokens an image or video adds to the prompt, per model family.

The server counts them before the engine runs, for the context-length check; the
pipeline reports the exact prompt length when a request finishes."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from utils.engine.model_config import ModelConfig

logger = logging.getLogger(__name__)


def smart_resize(height: int, width: int, factor: int, min_px: int, max_px: int) -> tuple[int, int]:
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
    def for_model(cls, model: ModelConfig) -> VisualTokenCounter:
        model_type, config = model.model_type, model.config
        kwargs: dict[str, Any] = {"model_type": model_type}
        pre, vpre = model.preprocessor, model.video_preprocessor
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
            h, w = smart_resize(height, width, factor, self.min_pixels, self.max_pixels)
            return (h // factor) * (w // factor) + 2
        return self.llava_tokens

    def video(self, shape: Sequence[int]) -> int:
        frames, height, width = int(shape[0]), int(shape[1]), int(shape[2])
        if self.model_type.startswith("qwen"):
            factor = self.patch * self.merge
            h, w = smart_resize(height, width, factor, self.video_min_pixels, self.video_max_pixels)
            groups = math.ceil(frames / self.temporal)
            return groups * (h // factor) * (w // factor) + 2
        return self.llava_tokens * frames
