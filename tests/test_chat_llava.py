"""A model without native video (tiny LLaVA): videos reach it as their frames."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fixtures.server import LiveServers, MediaServer

MODEL = "embedded/tiny-llava"


@pytest.fixture(scope="module")
def http(live_server: LiveServers) -> Iterator[httpx.Client]:
    base_url = live_server(model_name=MODEL, media_allow_private_networks=True)
    with httpx.Client(base_url=base_url, timeout=120) as client:
        yield client


def prompt_tokens(http: httpx.Client, content: list[dict[str, Any]]) -> int:
    response = http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2},
    )
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens"]


def test_video_becomes_frames_as_images(http: httpx.Client, media_server: MediaServer) -> None:
    question = {"type": "text", "text": "What happens?"}
    frame = {"type": "image_url", "image_url": {"url": media_server.url("image.png")}}
    text_only = prompt_tokens(http, [question])
    one_image = prompt_tokens(http, [frame, question])
    two_images = prompt_tokens(http, [frame, frame, question])
    assert text_only < one_image < two_images
    # a 2 s video sampled at 1 fps: two frames, each as many tokens as an image
    video = {"type": "video_url", "video_url": {"url": media_server.url("video.mp4"), "fps": 1}}
    assert prompt_tokens(http, [video, question]) == two_images
    frames = {"type": "video", "video": [media_server.url(f"frame{k}.png") for k in range(3)]}
    assert prompt_tokens(http, [frames, question]) == prompt_tokens(
        http, [frame, frame, frame, question]
    )
