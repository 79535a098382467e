"""Visual tokens an image or video adds to the prompt, per model family.

The server counts them before the engine runs, for the context-length check, and
refuses here (MediaRefused) the images and videos the engine would fail on. Each rule
is a port of what OpenVINO GenAI 2026.4 does for that family, and reads the same files
(config.json, preprocessor_config.json, video_preprocessor_config.json of the export):

- qwen2_vl, qwen2_5_vl: the image is resized to multiples of patch * merge (28) within
  the pixel bounds, one token per merged patch; a video uses every frame, two frames a
  token group. Aspect ratios of 200 and more are refused.
- qwen3_vl: the same with 32-pixel steps. A video is written as one "<T seconds>"
  timestamp plus a token group per two frames; the server passes the frames it decoded
  (VideoMetadata.frames_indices and fps), so the engine samples none away. A video of
  one frame is refused.
- gemma3: a fixed `mm_tokens_per_image` per image, whatever its size (no pan-and-scan).
- llava: (image_size / patch)^2 per image.
- llava_next, llava_next_video: the base crop plus the unpadded "anyres" grid with one
  newline per row; extreme aspect ratios that leave nothing after unpadding are
  refused. llava_next_video: (side / spatial_pool_stride)^2 per video frame.

Other model types get an estimate; the exact count still reaches the client from the
pipeline when the request finishes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from utils.engine.model_config import ModelConfig

logger = logging.getLogger(__name__)

QWEN_TYPES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl"})
LLAVA_NEXT_TYPES = frozenset({"llava_next", "llava_next_video"})
QWEN3_DEFAULT_VIDEO_FPS = 24.0  # what the engine assumes for a video without a frame rate
_QWEN_WRAP = "<|vision_start|><|vision_end|>"


class MediaRefused(ValueError):
    """The engine would fail on this image or video; the message says why."""


def cpp_round(value: float) -> int:
    """C++ std::round (halves away from zero), as the engine rounds; Python's round()
    rounds halves to even (a 70 px side over 28 gives 2 instead of 3)."""
    return math.floor(value + 0.5)


def smart_resize(height: int, width: int, factor: int, min_px: int, max_px: int) -> tuple[int, int]:
    """The engine's Qwen-VL resize: both sides multiples of `factor`, area within bounds.

    Raises MediaRefused where the engine fails "Absolute aspect ratio must be smaller
    than 200" (its test is integer division: max // min > 200)."""
    if max(height, width) // max(1, min(height, width)) > 200:
        raise MediaRefused(
            f"The {width}x{height} image's aspect ratio is too extreme for this model "
            "(it must be under 200:1)."
        )
    h = cpp_round(height / factor) * factor
    w = cpp_round(width / factor) * factor
    if h * w > max_px:
        beta = math.sqrt(height * width / max_px)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
    elif h * w < min_px:
        beta = math.sqrt(min_px / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


@dataclass(frozen=True)
class Visual:
    """What one image or video adds to the prompt."""

    text: str  # written in place of its tag, counted with the prompt's text
    tokens: int  # visual tokens besides `text`
    separate_text: str = ""  # text the engine tokenizes on its own (Qwen3-VL timestamps)


def _pixel_bounds(conf: dict[str, Any]) -> tuple[int, int]:
    size = conf.get("size") or {}
    lo = conf.get("min_pixels") or size.get("shortest_edge") or 56 * 56
    hi = conf.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280
    return int(lo), int(hi)


@dataclass(frozen=True)
class VisualTokenCounter:
    """Visual tokens an image or video adds to the prompt, per model family."""

    model_type: str
    config: dict[str, Any] = field(default_factory=dict)
    preprocessor: dict[str, Any] = field(default_factory=dict)
    video_preprocessor: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_model(cls, model: ModelConfig) -> VisualTokenCounter:
        return cls(model.model_type, model.config, model.preprocessor, model.video_preprocessor)

    # ------------------------------------------------------------------ images
    def image(self, shape: Sequence[int]) -> Visual:
        height, width = int(shape[-3]), int(shape[-2])
        kind = self.model_type
        if kind in QWEN_TYPES:
            return Visual(_QWEN_WRAP, self._qwen_grid(height, width, self.preprocessor))
        if kind == "gemma3":
            tokens = int(self.config.get("mm_tokens_per_image") or 256)
            return Visual("\n\n<start_of_image><end_of_image>\n\n", tokens)
        if kind in LLAVA_NEXT_TYPES:
            return Visual("<image>\n", self._llava_next(height, width) - 1)
        if kind.startswith("llava"):
            return Visual("<image>\n", self._base_features() - 1)
        return Visual("", self._base_features())  # an estimate

    def _qwen_factor(self, conf: dict[str, Any]) -> tuple[int, int]:
        vision = self.config.get("vision_config") or {}
        patch = int(conf.get("patch_size") or vision.get("patch_size") or 14)
        merge = int(conf.get("merge_size") or vision.get("spatial_merge_size") or 2)
        return patch * merge, merge

    def _qwen_grid(self, height: int, width: int, conf: dict[str, Any]) -> int:
        factor, _ = self._qwen_factor(conf)
        h, w = smart_resize(height, width, factor, *_pixel_bounds(conf))
        return (h // factor) * (w // factor)

    def _side(self) -> int:
        vision = self.config.get("vision_config") or {}
        return int(vision.get("image_size") or 336) // int(vision.get("patch_size") or 14)

    def _base_features(self) -> int:
        full = self.config.get("vision_feature_select_strategy") == "full"
        return self._side() ** 2 + (1 if full else 0)

    def _llava_next(self, height: int, width: int) -> int:
        """The engine's LLaVA-NeXT packing: base crop + unpadded grid + a newline per row."""
        vision = self.config.get("vision_config") or {}
        patch = int(vision.get("patch_size") or 14)
        pre = self.preprocessor
        crop = pre.get("crop_size") or {}
        side = int(crop.get("height") or vision.get("image_size") or 336) // patch
        shortest = int((pre.get("size") or {}).get("shortest_edge") or side * patch)
        pinpoints = pre.get("image_grid_pinpoints") or self.config.get("image_grid_pinpoints")
        grid_w, grid_h = _best_resolution(width, height, pinpoints or [[side * patch] * 2])
        cur_h, cur_w = side * (grid_h // shortest), side * (grid_w // shortest)
        if width / height > cur_w / cur_h:
            padding = (cur_h - int(height * (cur_w / width))) // 2
            if cur_h <= 2 * padding:
                raise self._too_elongated(width, height)
            cur_h -= 2 * padding
        else:
            padding = (cur_w - int(width * (cur_h / height))) // 2
            if cur_w <= 2 * padding:
                raise self._too_elongated(width, height)
            cur_w -= 2 * padding
        return self._base_features() + cur_h * cur_w + cur_h

    def _too_elongated(self, width: int, height: int) -> MediaRefused:
        return MediaRefused(
            f"The {width}x{height} image is too elongated for this model's image grid; "
            "crop or pad it closer to square."
        )

    # ------------------------------------------------------------------ videos
    def video(self, shape: Sequence[int], fps: float = 0.0) -> Visual:
        """`fps`: the frame rate of the frames given (0 when unknown)."""
        frames, height, width = int(shape[0]), int(shape[1]), int(shape[2])
        kind, vpre = self.model_type, self.video_preprocessor
        if kind == "qwen3_vl":
            return self._qwen3_video(frames, height, width, fps)
        if kind in QWEN_TYPES:
            temporal = int(vpre.get("temporal_patch_size") or 2)
            groups = math.ceil(frames / temporal)
            return Visual(_QWEN_WRAP, groups * self._qwen_grid(height, width, vpre))
        if kind == "llava_next_video":
            stride = int(self.config.get("spatial_pool_stride") or 2)
            return Visual("<video>\n", frames * (self._side() // stride) ** 2 - 1)
        return Visual("", frames * self.image(shape[1:]).tokens)  # an estimate

    def _qwen3_video(self, frames: int, height: int, width: int, fps: float) -> Visual:
        """Every frame given is kept (the server passes VideoMetadata.frames_indices);
        each group of `merge` frames is "<T seconds><|vision_start|>" + pads +
        "<|vision_end|>", T being the group's mid time."""
        if frames < 2:
            raise MediaRefused(
                f"This model needs at least 2 frames in a video; the video has {frames}."
            )
        vpre = self.video_preprocessor
        _, merge = self._qwen_factor(vpre)
        picked = list(range(frames))
        if len(picked) % merge:
            picked += [picked[-1]] * (merge - len(picked) % merge)
        rate = fps or QWEN3_DEFAULT_VIDEO_FPS
        text = ""
        for i in range(0, len(picked), merge):
            seconds = (picked[i] + picked[i + merge - 1]) / 2 / rate
            text += f"<{seconds:.1f} seconds>{_QWEN_WRAP}"
        groups = len(picked) // merge
        return Visual("", groups * self._qwen_grid(height, width, vpre), text)


def _best_resolution(width: int, height: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """The engine's select_best_resolution; it reads each pinpoint as (width, height)."""
    best = (0, 0)
    best_eff, best_waste = 0, 1 << 62
    for grid_w, grid_h in pinpoints:
        scale = min(grid_w / width, grid_h / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = grid_w * grid_h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (grid_w, grid_h), eff, waste
    return best
