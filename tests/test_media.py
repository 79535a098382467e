"""Image and video decoding (utils.media) on generated files."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.server import IMAGE_FORMATS, make_image, make_image_array, make_video
from utils.errors import OpenAIError
from utils.media import decode as media
from utils.media.cache import DecodedImageCache
from utils.media.decode import (
    MediaDecodeError,
    decode_image,
    decode_video,
    fit_size,
    load_image,
    load_video,
    sample_indices,
    stack_frames,
)

BIG = 10**9


@pytest.mark.parametrize("fmt", sorted(IMAGE_FORMATS))
def test_every_image_format_decodes_to_rgb_hwc(fmt: str) -> None:
    array = decode_image(make_image(fmt, 64, 48), max_pixels=BIG, max_decoded_pixels=BIG)
    assert array.shape == (48, 64, 3)
    assert array.dtype == np.uint8
    expected = make_image_array(64, 48)
    if fmt in ("png", "bmp"):  # lossless
        assert np.array_equal(array, expected)
    else:
        assert np.abs(array.astype(int) - expected).mean() < 40


def test_gif_gives_its_first_frame() -> None:
    array = decode_image(make_image("gif"), max_pixels=BIG, max_decoded_pixels=BIG)
    first = make_image_array(64, 48)
    assert (
        np.abs(array.astype(int) - first).mean() < np.abs(array.astype(int) - (255 - first)).mean()
    )


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "I;16", "1"])
def test_other_modes_become_rgb(mode: str) -> None:
    source = Image.fromarray(make_image_array(40, 30))
    image = (
        Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40))
        if mode == "I;16"
        else source.convert(mode)
    )
    buffer = io.BytesIO()
    image.save(buffer, "JPEG" if mode == "CMYK" else "PNG")
    array = decode_image(buffer.getvalue(), max_pixels=BIG, max_decoded_pixels=BIG)
    assert array.shape == (30, 40, 3)
    assert array.dtype == np.uint8


def test_transparent_pixels_become_white() -> None:
    rgba = np.zeros((10, 10, 4), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    array = decode_image(buffer.getvalue(), max_pixels=BIG, max_decoded_pixels=BIG)
    assert (array == 255).all()


def test_large_images_are_downscaled_keeping_aspect() -> None:
    for fmt in ("png", "jpeg"):
        array = decode_image(
            make_image(fmt, 800, 400), max_pixels=200 * 100, max_decoded_pixels=BIG
        )
        height, width, _ = array.shape
        assert width * height <= 200 * 100
        assert abs(width / height - 2.0) < 0.05
        assert width >= 195


def test_exif_orientation_is_applied() -> None:
    image = Image.fromarray(make_image_array(60, 20))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif)
    assert decode_image(buffer.getvalue(), max_pixels=BIG, max_decoded_pixels=BIG).shape == (
        60,
        20,
        3,
    )


def test_decompression_bomb_is_refused_from_the_header() -> None:
    buffer = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buffer, "PNG")  # 64 Mpx in a few kB
    assert len(buffer.getvalue()) < 100_000
    with pytest.raises(OpenAIError) as info:
        decode_image(buffer.getvalue(), max_pixels=BIG, max_decoded_pixels=40_000_000)
    assert info.value.status == 413
    assert "max_decoded_pixels=40000000" in info.value.message


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image at all", make_image("png")[:200], make_image("jpeg")[:-400]],
    ids=["empty", "text", "truncated-png", "truncated-jpeg"],
)
def test_undecodable_images_raise_decode_error(data: bytes) -> None:
    with pytest.raises(MediaDecodeError):
        decode_image(data, max_pixels=BIG, max_decoded_pixels=BIG)


def test_extreme_aspect_ratio_is_refused() -> None:
    with pytest.raises(OpenAIError) as info:
        decode_image(make_image("png", 1000, 2), max_pixels=BIG, max_decoded_pixels=BIG)
    assert info.value.status == 400
    assert "aspect ratio" in info.value.message


def test_fit_size() -> None:
    assert fit_size(100, 50, 10_000) == (100, 50)
    assert fit_size(1920, 1080, 360 * 420, even=True) == (518, 290)
    w, h = fit_size(1000, 10, 28 * 28)
    assert w * h <= 28 * 28 and w > h
    assert fit_size(3, 3, 1) == (1, 1)


def test_sample_indices() -> None:
    # 30 s at 30 fps sampled at 1 fps: 30 frames spread over the whole video
    indices = sample_indices(900, 30.0, 1.0, 64)
    assert len(indices) == 30 and indices[0] == 0 and indices[-1] == 899
    assert indices == sorted(set(indices))
    assert len(sample_indices(900, 30.0, 1.0, 8)) == 8  # capped
    assert sample_indices(5, 30.0, 1.0, 8) == [0]  # shorter than one sample period
    assert sample_indices(10, 10.0, 100.0, 32) == list(range(10))  # never more than exist
    assert sample_indices(0, 30.0, 1.0, 8) == []


@pytest.mark.parametrize("codec", ["h264", "mpeg4"])
def test_video_is_sampled_and_resized(codec: str) -> None:
    data = make_video(frames=30, width=128, height=96, fps=10, codec=codec)
    video = decode_video(data, fps=2.0, max_frames=32, max_pixels=64 * 48, max_decoded_pixels=BIG)
    assert video.dtype == np.uint8
    assert video.shape == (6, 48, 64, 3)  # 3 s at 2 fps, resized in the reader
    # the moving bar makes frames differ
    assert not np.array_equal(video[0], video[-1])


def test_video_frame_cap_and_native_size() -> None:
    data = make_video(frames=40, width=64, height=48, fps=10)
    video = decode_video(data, fps=10.0, max_frames=5, max_pixels=BIG, max_decoded_pixels=BIG)
    assert video.shape == (5, 48, 64, 3)


def test_video_errors() -> None:
    with pytest.raises(MediaDecodeError):
        decode_video(b"garbage" * 100, fps=1, max_frames=4, max_pixels=BIG, max_decoded_pixels=BIG)
    with pytest.raises(OpenAIError) as info:
        decode_video(make_video(), fps=1, max_frames=4, max_pixels=BIG, max_decoded_pixels=1000)
    assert info.value.status == 413


def test_stack_frames_resizes_to_the_first_frame() -> None:
    frames = [make_image_array(64, 48), make_image_array(32, 20), make_image_array(64, 48, 3)]
    video = stack_frames(frames)
    assert video.shape == (3, 48, 64, 3)
    assert np.array_equal(video[0], frames[0])


async def test_loaders_decode_off_the_event_loop_unless_the_image_is_small(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threaded: list[str] = []

    async def to_thread(func, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        threaded.append(func.__name__)
        return await original(func, *args, **kwargs)

    original = asyncio.to_thread
    monkeypatch.setattr(media.asyncio, "to_thread", to_thread)
    small = await load_image(make_image("webp"), max_pixels=BIG, max_decoded_pixels=BIG)
    assert small.shape == (48, 64, 3)
    assert threaded == []  # 64x48: decoded on the loop
    side = 225  # just over INLINE_DECODE_PIXELS
    large = await load_image(make_image("png", side, side), max_pixels=BIG, max_decoded_pixels=BIG)
    assert large.shape == (side, side, 3)
    with pytest.raises(MediaDecodeError):  # no header to size: the thread reports why
        await load_image(b"not an image", max_pixels=BIG, max_decoded_pixels=BIG)
    video = await load_video(
        make_video(), fps=1.0, max_frames=8, max_pixels=BIG, max_decoded_pixels=BIG
    )
    assert video.shape == (2, 48, 64, 3)
    assert threaded == ["_decode_cached", "_decode_cached", "decode_video"]


async def test_a_cached_image_is_decoded_once_per_pixel_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoded: list[int] = []

    def counting_decode(data: bytes, *, max_pixels: int, max_decoded_pixels: int) -> np.ndarray:
        decoded.append(max_pixels)
        return decode_image(data, max_pixels=max_pixels, max_decoded_pixels=max_decoded_pixels)

    monkeypatch.setattr(media, "decode_image", counting_decode)
    cache = DecodedImageCache(max_bytes=2**20)
    for width, height in ((64, 48), (300, 300)):  # decoded inline, in a thread
        data = make_image("png", width, height)
        first = await load_image(data, max_pixels=BIG, max_decoded_pixels=BIG, cache=cache)
        again = await load_image(data, max_pixels=BIG, max_decoded_pixels=BIG, cache=cache)
        assert again is first and not first.flags.writeable  # shared, so read-only
        smaller = await load_image(data, max_pixels=32 * 24, max_decoded_pixels=BIG, cache=cache)
        assert smaller.shape[1::-1] == fit_size(width, height, 32 * 24)
    assert decoded == [BIG, 32 * 24, BIG, 32 * 24]
    assert (cache.hits, cache.misses, len(cache)) == (2, 4, 4)
    with pytest.raises(MediaDecodeError):  # a failure is not remembered
        await load_image(b"not an image", max_pixels=BIG, max_decoded_pixels=BIG, cache=cache)
    assert len(cache) == 4


def test_the_image_cache_drops_the_least_recently_used_beyond_its_size() -> None:
    cache = DecodedImageCache(max_bytes=3 * 100)
    images = {name: np.full((10, 10, 1), i, dtype=np.uint8) for i, name in enumerate("abcd")}
    keys = {name: cache.key(name.encode(), 1) for name in images}
    for name in "abc":
        cache.put(keys[name], images[name])
    assert cache.get(keys["a"]) is images["a"]  # now b is the least recently used
    cache.put(keys["d"], images["d"])
    assert [cache.get(keys[name]) is not None for name in "abcd"] == [True, False, True, True]
    assert cache.bytes == 300
    cache.put(cache.key(b"huge", 1), np.zeros((20, 20, 1), dtype=np.uint8))  # over the limit
    assert len(cache) == 3 and cache.bytes == 300
    assert cache.key(b"a", 1) != cache.key(b"a", 2) != cache.key(b"b", 2)


def test_downscaling_keeps_within_the_aspect_ratio_limit() -> None:
    # 200:1 fits; the rounding of a downscale must not make it 202:1
    array = decode_image(
        make_image("png", 20000, 100), max_pixels=1024 * 1024, max_decoded_pixels=BIG
    )
    height, width, _ = array.shape
    assert width <= 200 * height


@pytest.mark.parametrize(
    ("container", "codec"),
    [("mp4", "h264"), ("matroska", "h264"), ("avi", "mpeg4"), ("mpegts", "mpeg4")],
)
def test_video_containers_pass_the_signature_check(container: str, codec: str) -> None:
    data = make_video(frames=12, container=container, codec=codec)
    assert media.looks_like_video(data)
    video = decode_video(data, fps=10.0, max_frames=4, max_pixels=BIG, max_decoded_pixels=BIG)
    assert video.shape[1:] == (48, 64, 3)


def test_bytes_that_are_no_container_never_reach_decord() -> None:
    """decord keeps memory for every input it fails to open: garbage is refused first."""
    for data in (b"\x00" * 400, b"this is not a video" * 50, b"RIFF....WAVEfmt " + b"x" * 99):
        assert not media.looks_like_video(data)
        with pytest.raises(MediaDecodeError, match="not a supported video format"):
            decode_video(data, fps=1, max_frames=4, max_pixels=BIG, max_decoded_pixels=BIG)
