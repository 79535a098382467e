"""Budgets a client cannot raise, end to end on the live server (tiny model).

Each over-budget request gets its own 4xx naming the limit, and the server
keeps serving: a normal request right after (and one running alongside)
succeeds.
"""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.fixtures.server import MediaServer, data_url, make_image

LIMITS = {
    "max_images_per_request": 2,
    "max_videos_per_request": 1,
    "max_video_frames": 4,
    "max_media_bytes": 200_000,
    "max_request_media_bytes": 300_000,
    "max_body_bytes": 1_000_000,
    "media_allow_private_networks": True,  # the media test server is on loopback
}


def _png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A tiny PNG whose header announces width x height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    rows = zlib.compress(b"\x00" * (width + 1) * 64, 9)  # the first rows only
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def _noise_png(side: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=0)
    return buffer.getvalue()


def _chat(*parts: dict[str, Any], text: str = "Describe.", **extra: Any) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}],
        "max_completion_tokens": 3,
        "temperature": 0,
        **extra,
    }


def _image(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def limited(live_server: Callable[..., str]) -> str:
    return live_server(**LIMITS)


async def _expect(
    client: httpx.AsyncClient, body: Any, status: int, *needles: str
) -> dict[str, Any]:
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for needle in needles:
        assert needle in error["message"], error["message"]
    return error


async def _still_serving(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/chat/completions", json=_chat(_image(data_url(make_image(), "image/png")))
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert (await client.get("/health")).status_code == 200


async def test_each_budget_gets_its_own_4xx(limited: str, media_server: MediaServer) -> None:
    small = data_url(make_image(), "image/png")
    big_url = media_server.add("big.png", _noise_png(300, 1), "image/png")  # ~270 kB
    halves = [media_server.add(f"half{k}.png", _noise_png(240, k), "image/png") for k in (2, 3)]
    bomb = data_url(_png_bomb(), "image/png")
    frame = data_url(make_image("png", 32, 32), "image/png")
    async with httpx.AsyncClient(base_url=limited, timeout=120) as client:
        status = (await client.get("/status")).json()
        max_context = status["max_context"]
        cases: list[tuple[Any, int, tuple[str, ...]]] = [
            (_chat(*[_image(small)] * 3), 400, ("max_images_per_request",)),
            (
                _chat(*[{"type": "video", "video": [frame, frame]}] * 2),
                400,
                ("max_videos_per_request",),
            ),
            (_chat({"type": "video", "video": [frame] * 5}), 400, ("max_video_frames",)),
            (_chat(_image(big_url)), 413, ("max_media_bytes",)),
            (_chat(*[_image(u) for u in halves]), 413, ("max_request_media_bytes",)),
            (_chat(_image(bomb)), 413, ("max_decoded_pixels",)),
            (_chat(text=" 7" * (max_context + 64)), 400, ()),
            (_chat(_image("http://169.254.169.254/latest/meta-data/")), 400, ("169.254.169.254",)),
        ]
        for body, expected, needles in cases:
            await _expect(client, body, expected, *needles)
            await _still_serving(client)

        # Over max_body_bytes: refused by size, never parsed.
        oversized = _chat(_image(data_url(b"\x00" * 900_000, "image/png")))
        response = await client.post("/v1/chat/completions", json=oversized)
        assert response.status_code == 413
        assert "max_body_bytes" in response.json()["error"]["message"]
        await _still_serving(client)


async def test_bad_requests_do_not_disturb_a_running_one(limited: str) -> None:
    bomb = data_url(_png_bomb(), "image/png")
    async with httpx.AsyncClient(base_url=limited, timeout=120) as client:
        good = _chat(_image(data_url(make_image(), "image/png")), max_completion_tokens=16)
        results = await asyncio.gather(
            client.post("/v1/chat/completions", json=good),
            *[client.post("/v1/chat/completions", json=_chat(_image(bomb))) for _ in range(4)],
            client.post("/v1/chat/completions", json=_chat(text=" 7" * 100_000)),
        )
    assert results[0].status_code == 200, results[0].text
    assert [r.status_code for r in results[1:5]] == [413] * 4
    assert results[5].status_code == 400
