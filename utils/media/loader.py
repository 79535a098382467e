"""The media of one request, fetched and decoded concurrently, off the event loop.

Fetching is utils/media/fetch.py's (one guarded client, byte budgets per request);
decoding is utils/media/decode.py's. Each failure becomes an OpenAIError naming the
content part it came from.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from utils.api.protocol import ImageURLPart, MediaPart, VideoPart, VideoURLPart
from utils.errors import OpenAIError, bad_request
from utils.media.budget import ImageBudgets
from utils.media.cache import DecodedImageCache
from utils.media.decode import MediaDecodeError, load_image, load_video, stack_frames
from utils.media.fetch import MediaFetcher, MediaKind
from utils.settings import Settings

T = TypeVar("T")

# Smallest per-frame pixel budget a request may ask for (one 28x28 patch group).
MIN_VIDEO_PIXELS = 28 * 28


@dataclass(slots=True)
class DecodedPart:
    """Decoded media of one content part: an image (HWC) or a video (FHWC)."""

    image: np.ndarray | None = None
    video: np.ndarray | None = None
    fps: float = 0.0  # the video's frame rate after sampling (0: unknown, a frame list)


def _video_max_pixels(requested: int | None, settings: Settings) -> int:
    if requested is None:
        return settings.video_max_pixels
    return max(MIN_VIDEO_PIXELS, min(requested, settings.video_max_pixels))


async def gather_or_cancel(coros: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Run concurrently; on the first failure cancel the rest and re-raise it."""
    if len(coros) == 1:  # nothing to run alongside: no task to wait for its turn
        return [await coros[0]]
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class MediaLoader:
    """Fetches and decodes the media parts of one request."""

    def __init__(
        self,
        settings: Settings,
        fetcher: MediaFetcher,
        image_cache: DecodedImageCache | None,
        budgets: ImageBudgets | None = None,
    ) -> None:
        self.settings = settings
        self.budgets = budgets or ImageBudgets.for_model(None, settings)
        self.fetcher = fetcher
        self.image_cache = image_cache
        self.budget = fetcher.new_budget()  # the byte cap of the request's media

    async def _fetch(self, url: str, kind: MediaKind, where: str) -> bytes:
        try:
            return await self.fetcher.fetch(url, kind=kind, budget=self.budget)
        except OpenAIError as exc:
            exc.param = exc.param or where
            raise

    async def _decode(self, kind: str, where: str, run: Awaitable[np.ndarray]) -> np.ndarray:
        try:
            return await run
        except MediaDecodeError as exc:
            raise bad_request(
                f"Could not decode {kind} at {where}: {exc}.",
                param=where,
                code="invalid_media",
            ) from None
        except OpenAIError as exc:
            exc.param = exc.param or where
            raise

    async def image(self, url: str, where: str, *, max_pixels: int | None = None) -> np.ndarray:
        data = await self._fetch(url, "image", where)
        return await self._decode(
            "image",
            where,
            load_image(
                data,
                max_pixels=max_pixels or self.settings.image_max_pixels,
                max_decoded_pixels=self.settings.max_decoded_pixels,
                cache=self.image_cache,
            ),
        )

    async def video_file(
        self, url: str, where: str, *, max_pixels: int | None, fps: float | None
    ) -> np.ndarray:
        data = await self._fetch(url, "video", where)
        return await self._decode(
            "video",
            where,
            load_video(
                data,
                fps=fps or self.settings.video_fps,
                max_frames=self.settings.max_video_frames,
                max_pixels=_video_max_pixels(max_pixels, self.settings),
                max_decoded_pixels=self.settings.max_decoded_pixels,
            ),
        )

    async def video_frames(
        self, urls: Sequence[str], where: str, *, max_pixels: int | None
    ) -> np.ndarray:
        budget = _video_max_pixels(max_pixels, self.settings)
        frames = await gather_or_cancel(
            [
                self.image(url, f"{where}.video[{k}]", max_pixels=budget)
                for k, url in enumerate(urls)
            ]
        )
        return await asyncio.to_thread(stack_frames, frames)

    async def part(self, part: MediaPart, where: str) -> DecodedPart:
        if isinstance(part, ImageURLPart):
            budget = self.budgets.pixels(part.image_url.detail, part.effective_max_pixels)
            return DecodedPart(image=await self.image(part.image_url.url, where, max_pixels=budget))
        if isinstance(part, VideoURLPart):
            fps = part.effective_fps or self.settings.video_fps
            video = await self.video_file(
                part.video_url.url, where, max_pixels=part.effective_max_pixels, fps=fps
            )
            return DecodedPart(video=video, fps=fps)
        assert isinstance(part, VideoPart)
        if isinstance(part.video, str):
            fps = part.fps or self.settings.video_fps
            video = await self.video_file(part.video, where, max_pixels=part.max_pixels, fps=fps)
            return DecodedPart(video=video, fps=fps)
        video = await self.video_frames(part.video, where, max_pixels=part.max_pixels)
        return DecodedPart(video=video, fps=part.fps or 0.0)
