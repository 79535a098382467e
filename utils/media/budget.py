"""Vision budgets: how many pixels each image may keep, how many visual tokens a whole
request may have, and where visual-token pruning applies.

An image's budget comes from its `detail` (low, high, auto; absent is auto) or from the
request's own `max_pixels`, never above the server's cap (VLM_IMAGE_MAX_PIXELS). The
`low` and `auto` budgets are set in visual tokens and turned into pixels by each
family's arithmetic (the image is downscaled to fit before it reaches the engine):

- qwen2_vl, qwen2_5_vl, qwen3_vl: one token per merged patch, so a budget of T tokens
  is T x (patch x merge)^2 pixels (28^2 for Qwen2/2.5-VL, 32^2 for Qwen3-VL).
- llava_next, llava_next_video: the anyres grid has one token per patch, so T x patch^2
  pixels pick a smaller grid; the base tile's tokens come on top.
- llava, gemma3 and the others: every image costs the same tokens whatever its size, so
  `detail` changes nothing there; the cap and `max_pixels` still bound the pixels.

`high` is the model's own largest input (Qwen-VL's max_pixels, LLaVA-NeXT's largest
grid), up to the cap.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from utils.engine.model_config import ModelConfig
from utils.engine.visual_tokens import (
    LLAVA_NEXT_TYPES,
    QWEN_TYPES,
    MediaRefused,
    VisualTokenCounter,
)
from utils.errors import OpenAIError, bad_request
from utils.settings import Settings

logger = logging.getLogger(__name__)

# Smallest pixel budget a request may ask for (one 28x28 patch group).
MIN_PIXELS = 28 * 28
# `auto` on a CPU when VLM_IMAGE_DETAIL_AUTO_TOKENS is not set (docs/performance.md
# has the measurements); on other devices `auto` is `high`.
CPU_AUTO_TOKENS = 576
# Families whose visual tokens OpenVINO GenAI can prune (CDPruner), and the engine
# that applies it: ContinuousBatchingPipeline.add_request ignores pruning_ratio.
PRUNING_TYPES = QWEN_TYPES
PRUNING_BACKEND = "vlm_pipeline"


def pixels_per_token(model: ModelConfig) -> int:
    """Pixels one visual token stands for; 0 when the tokens do not depend on size."""
    vision = model.config.get("vision_config") or {}
    pre = model.preprocessor
    patch = int(pre.get("patch_size") or vision.get("patch_size") or 14)
    if model.model_type in QWEN_TYPES:
        merge = int(pre.get("merge_size") or vision.get("spatial_merge_size") or 2)
        return (patch * merge) ** 2
    if model.model_type in LLAVA_NEXT_TYPES:
        return patch**2
    return 0


def model_max_pixels(model: ModelConfig) -> int | None:
    """The largest image the model itself takes in, when it has one."""
    pre = model.preprocessor
    if model.model_type in QWEN_TYPES:
        size = pre.get("size") or {}
        value = pre.get("max_pixels") or size.get("longest_edge")
        return int(value) if value else None
    if model.model_type in LLAVA_NEXT_TYPES:
        pinpoints = pre.get("image_grid_pinpoints") or model.config.get("image_grid_pinpoints")
        if pinpoints:
            return max(int(w) * int(h) for w, h in pinpoints)
    return None


@dataclass(frozen=True)
class ImageBudgets:
    """Pixel budgets of one model's images, per `detail`."""

    cap: int  # the server's cap: no request gets more
    low: int
    auto: int
    high: int

    @classmethod
    def for_model(cls, model: ModelConfig | None, settings: Settings) -> ImageBudgets:
        cap = settings.image_max_pixels
        per_token = pixels_per_token(model) if model is not None else 0
        own = model_max_pixels(model) if model is not None else None
        high = min(cap, own) if own else cap

        def of_tokens(tokens: int) -> int:
            if not per_token:
                return high
            return max(MIN_PIXELS, min(high, tokens * per_token))

        auto_tokens = settings.image_detail_auto_tokens
        if auto_tokens is None and settings.device.startswith("CPU"):
            auto_tokens = CPU_AUTO_TOKENS
        auto = high if auto_tokens is None else of_tokens(auto_tokens)
        return cls(cap=cap, low=of_tokens(settings.image_detail_low_tokens), auto=auto, high=high)

    def pixels(self, detail: str | None, max_pixels: int | None) -> int:
        """The pixel budget of one image. A request's `max_pixels` takes the place of
        the `auto` budget, and of an explicit `detail` when smaller; never above the cap."""
        chosen = {"low": self.low, "high": self.high}.get(detail or "auto", self.auto)
        if max_pixels is not None:
            chosen = max_pixels if detail in (None, "auto") else min(chosen, max_pixels)
        return max(MIN_PIXELS, min(chosen, self.cap))


def visual_tokens(
    counter: VisualTokenCounter,
    images: Sequence[np.ndarray],
    videos: Sequence[np.ndarray],
    video_fps: Sequence[float],
) -> int:
    """Visual tokens of a request's decoded media; media the engine refuses count 0
    here (the engine answers them with their own 400)."""
    total = 0
    for image in images:
        with contextlib.suppress(MediaRefused):
            total += counter.image(image.shape).tokens
    for video, fps in zip(videos, video_fps, strict=False):
        with contextlib.suppress(MediaRefused):
            total += counter.video(video.shape, fps).tokens
    return total


def check_visual_tokens(tokens: int, settings: Settings) -> None:
    """A 400 saying what to lower when a request's media are over VLM_MAX_VISUAL_TOKENS."""
    limit = settings.max_visual_tokens
    if tokens > limit:
        raise bad_request(
            f"The request's images and videos make {tokens} visual tokens, more than "
            f"max_visual_tokens={limit}. Send fewer images or video frames, lower the "
            "videos' fps or max_pixels, or give images detail 'low' or a smaller "
            "max_pixels.",
            param="messages",
            code="too_many_visual_tokens",
        )


_logged_ignored_pruning: set[str] = set()


def pruning_ratio(requested: int | None, model_type: str, backend: str, settings: Settings) -> int:
    """The pruning ratio (percent of visual tokens dropped) a request runs with.

    A request that asks for pruning where it cannot apply gets a 400 naming
    `pruning_ratio`; the server-wide VLM_VISUAL_TOKEN_PRUNING_RATIO is then ignored,
    with one log line."""
    why = _pruning_unsupported(model_type, backend)
    if requested is not None:
        if requested and why:
            raise OpenAIError(
                400,
                f"'pruning_ratio' is not supported here: {why}.",
                param="pruning_ratio",
                code="unsupported_parameter",
            )
        return requested
    ratio = settings.visual_token_pruning_ratio
    if ratio and why:
        if why not in _logged_ignored_pruning:
            _logged_ignored_pruning.add(why)
            logger.warning("VLM_VISUAL_TOKEN_PRUNING_RATIO is ignored: %s", why)
        return 0
    return ratio


def _pruning_unsupported(model_type: str, backend: str) -> str | None:
    if model_type not in PRUNING_TYPES:
        return f"OpenVINO GenAI prunes visual tokens of Qwen-VL models only, not {model_type}"
    if backend != PRUNING_BACKEND:
        return (
            "OpenVINO GenAI's continuous batching pipeline does not apply pruning; "
            "serve with VLM_ENGINE=vlm_pipeline"
        )
    return None
