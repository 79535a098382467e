"""Decoding of images (pillow) and videos (decord) into uint8 RGB arrays.

The `decode_*` functions are blocking and CPU-bound; the `load_*` coroutines
run them in worker threads so the event loop keeps serving (except images small
enough to decode in less time than the hand-over to a thread takes). Images come out
HWC, videos FHWC, each downscaled to fit a pixel budget. Sizes are checked on
the header before a full decode (decompression-bomb guard). Decoded images can be
kept in a `DecodedImageCache` (utils/media/cache.py).
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from utils.errors import OpenAIError
from utils.media.cache import DecodedImageCache

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_ASPECT_RATIO",
    "MediaDecodeError",
    "decode_image",
    "decode_video",
    "fit_size",
    "load_image",
    "load_video",
    "sample_indices",
    "stack_frames",
]


# Vision encoders such as Qwen2-VL's refuse more elongated images.
MAX_ASPECT_RATIO = 200
# Images of at most this many pixels are decoded on the event loop (at most about
# 0.6 ms for a PNG of noise), which beats a round trip through a worker thread
# when the CPU is busy.
INLINE_DECODE_PIXELS = 224 * 224


class MediaDecodeError(ValueError):
    """The bytes are not an image or video this server can decode."""


# decord keeps tens of kilobytes of memory for every input it fails to open, so bytes
# that start like no video container are refused before it sees them (a stream of
# garbage "videos" would otherwise grow the server without bound).
_MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot", b"styp"}
_VIDEO_MAGIC = (
    b"\x1a\x45\xdf\xa3",  # Matroska, WebM
    b"FLV",
    b"OggS",
    b"\x00\x00\x01\xba",  # MPEG program stream
    b"\x00\x00\x01\xb3",  # MPEG video
    b"\x30\x26\xb2\x75\x8e\x66\xcf\x11",  # ASF, WMV
)
_TS_PACKET = 188


def looks_like_video(data: bytes) -> bool:
    """Whether `data` starts like a video container ffmpeg reads (MP4, MOV, 3GP,
    Matroska, WebM, AVI, FLV, Ogg, MPEG-PS/TS, ASF)."""
    head = data[:16]
    return (
        head[4:8] in _MP4_BOXES
        or head.startswith(_VIDEO_MAGIC)
        or (head.startswith(b"RIFF") and head[8:12] == b"AVI ")
        or (
            len(data) > 2 * _TS_PACKET
            and data[0] == data[_TS_PACKET] == data[2 * _TS_PACKET] == 0x47
        )
    )


def fit_size(width: int, height: int, max_pixels: int, *, even: bool = False) -> tuple[int, int]:
    """Largest size with the same aspect ratio and at most `max_pixels` pixels
    (the original size when it already fits)."""
    if width * height <= max_pixels:
        if even and (width % 2 or height % 2) and width > 1 and height > 1:
            return width - width % 2, height - height % 2
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    while w * h > max_pixels:  # rounding guard
        if w >= h and w > 1:
            w -= 1
        else:
            h -= 1
    if even:
        w, h = max(2, w - w % 2), max(2, h - h % 2)
    # Rounding must not push an elongated image past the aspect-ratio limit.
    w, h = min(w, MAX_ASPECT_RATIO * h), min(h, MAX_ASPECT_RATIO * w)
    return w, h


def _check_aspect(kind: str, width: int, height: int) -> None:
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise OpenAIError(
            400,
            f"The {kind} is {width}x{height}: its aspect ratio is more extreme than "
            f"{MAX_ASPECT_RATIO}:1.",
            code="invalid_media",
        )


def _too_large(kind: str, width: int, height: int, limit: int) -> OpenAIError:
    size = f"{width}x{height} = {width * height} pixels" if width else "too many pixels"
    return OpenAIError(
        413,
        f"The {kind} is {size}, more than max_decoded_pixels={limit}.",
        code="media_too_large",
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping.
        array = np.asarray(image, dtype=np.float64)
        top = float(array.max()) or 1.0
        return Image.fromarray((array * (255.0 / top)).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, *, max_pixels: int, max_decoded_pixels: int) -> np.ndarray:
    """Image bytes (png, jpeg, webp, gif: first frame, bmp, ...) -> uint8 RGB HWC.

    Raises MediaDecodeError for bytes that are not a readable image, and
    OpenAIError 413 when the header announces more than `max_decoded_pixels`.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise _too_large("image", 0, 0, max_decoded_pixels) from None
    except Exception:
        raise MediaDecodeError("not a supported image format") from None
    with image:
        width, height = image.size
        if width * height > max_decoded_pixels:
            raise _too_large("image", width, height, max_decoded_pixels)
        _check_aspect("image", width, height)
        try:
            target = fit_size(width, height, max_pixels)
            if image.format == "JPEG" and target != (width, height):
                image.draft("RGB", target)  # decode at a reduced scale directly
            image.load()
            rgb = _to_rgb(ImageOps.exif_transpose(image) or image)
            target = fit_size(rgb.width, rgb.height, max_pixels)
            if rgb.size != target:
                rgb = rgb.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
            return np.asarray(rgb, dtype=np.uint8)
        except OpenAIError:
            raise
        except Image.DecompressionBombError:
            raise _too_large("image", width, height, max_decoded_pixels) from None
        except Exception as exc:
            raise MediaDecodeError(str(exc)) from None


def sample_indices(num_frames: int, avg_fps: float, fps: float, max_frames: int) -> list[int]:
    """Indices of the frames to keep: about `fps` frames per second of video,
    spread evenly over the whole video, at most `max_frames`."""
    if num_frames <= 0:
        return []
    if avg_fps > 0 and math.isfinite(avg_fps):
        wanted = round(num_frames / avg_fps * fps)
    else:
        wanted = num_frames
    count = max(1, min(wanted, max_frames, num_frames))
    if count == 1:
        return [0]
    return [int(i) for i in np.linspace(0, num_frames - 1, count).round().astype(int)]


def decode_video(
    data: bytes,
    *,
    fps: float,
    max_frames: int,
    max_pixels: int,
    max_decoded_pixels: int,
) -> np.ndarray:
    """Video bytes (mp4, webm, mkv, avi, ... what decord reads) -> uint8 RGB FHWC.

    Frames are sampled at `fps` (evenly over the video, at most `max_frames`)
    and resized by the reader so each fits `max_pixels`.
    """
    if not looks_like_video(data):
        raise MediaDecodeError("not a supported video format")
    from decord import VideoReader, cpu  # imported lazily: loads ffmpeg libraries

    try:
        probe = VideoReader(io.BytesIO(data), ctx=cpu(0), num_threads=1)
        num_frames = len(probe)
        avg_fps = float(probe.get_avg_fps())
        height, width = probe[0].shape[:2]
    except Exception as exc:
        raise MediaDecodeError(str(exc).splitlines()[-1][-300:]) from None
    if width * height > max_decoded_pixels:
        raise _too_large("video", width, height, max_decoded_pixels)
    _check_aspect("video", width, height)
    indices = sample_indices(num_frames, avg_fps, fps, max_frames)
    target_w, target_h = fit_size(width, height, max_pixels, even=True)
    try:
        if (target_w, target_h) == (width, height):
            reader = probe
        else:
            del probe
            reader = VideoReader(
                io.BytesIO(data), ctx=cpu(0), width=target_w, height=target_h, num_threads=1
            )
        frames = reader.get_batch(indices).asnumpy()
    except Exception as exc:
        raise MediaDecodeError(str(exc).splitlines()[-1][-300:]) from None
    return np.ascontiguousarray(frames, dtype=np.uint8)


def stack_frames(frames: Sequence[np.ndarray]) -> np.ndarray:
    """Decoded frames (HWC, any sizes) -> one FHWC video at the first frame's size."""
    height, width = frames[0].shape[:2]
    same: list[np.ndarray] = []
    for frame in frames:
        if frame.shape[:2] != (height, width):
            resized = Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC)
            frame = np.asarray(resized, dtype=np.uint8)
        same.append(frame)
    return np.stack(same)


# --- off the event loop ---------------------------------------------------------


def _decode_cached(
    data: bytes, *, max_pixels: int, max_decoded_pixels: int, cache: DecodedImageCache | None
) -> np.ndarray:
    if cache is None:
        return decode_image(data, max_pixels=max_pixels, max_decoded_pixels=max_decoded_pixels)
    key = cache.key(data, max_pixels)
    image = cache.get(key)
    if image is None:
        image = decode_image(data, max_pixels=max_pixels, max_decoded_pixels=max_decoded_pixels)
        cache.put(key, image)
    return image


async def load_image(
    data: bytes,
    *,
    max_pixels: int,
    max_decoded_pixels: int,
    cache: DecodedImageCache | None = None,
) -> np.ndarray:
    """`decode_image` through `cache` (when given): on the event loop for small images,
    in a worker thread for the others (hashing a large image takes time too)."""
    limits = {"max_pixels": max_pixels, "max_decoded_pixels": max_decoded_pixels}
    if _header_pixels(data) <= INLINE_DECODE_PIXELS:
        return _decode_cached(data, cache=cache, **limits)
    return await asyncio.to_thread(_decode_cached, data, cache=cache, **limits)


def _header_pixels(data: bytes) -> float:
    """Pixels the image header announces (reads the header only); infinite when the
    bytes do not open as an image, so that the full decode reports why."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:
        return math.inf
    return width * height


async def load_video(
    data: bytes,
    *,
    fps: float,
    max_frames: int,
    max_pixels: int,
    max_decoded_pixels: int,
) -> np.ndarray:
    return await asyncio.to_thread(
        decode_video,
        data,
        fps=fps,
        max_frames=max_frames,
        max_pixels=max_pixels,
        max_decoded_pixels=max_decoded_pixels,
    )
