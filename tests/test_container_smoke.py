"""The container smoke test's own pieces: its media decode and its settings."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import decord
from PIL import Image

from scripts import smoke_client

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "scripts" / "container_smoke.sh"


def test_png_is_an_rgb_image() -> None:
    image = Image.open(io.BytesIO(smoke_client.png(224, 160)))
    assert (image.size, image.mode) == ((224, 160), "RGB")


def test_avi_decodes_as_a_video() -> None:
    video = decord.VideoReader(io.BytesIO(smoke_client.avi(frames=8, fps=4)))
    assert len(video) == 8
    assert video.get_avg_fps() == 4
    assert video[0].shape == (64, 64, 3)


def test_smoke_script_parses_and_takes_its_settings() -> None:
    assert subprocess.run(["bash", "-n", str(SMOKE)]).returncode == 0
    text = SMOKE.read_text()
    for setting in ("VLM_SMOKE_ENGINE", "VLM_SMOKE_BASE_IMAGE", "VLM_SMOKE_BUILD"):
        assert setting in text
