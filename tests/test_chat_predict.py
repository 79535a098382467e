"""scripts/predict.py: one question without a server, on the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.fixtures.server import make_image, make_video, tiny_model_settings

REPO = Path(__file__).resolve().parents[1]


def run_predict(qwen2vl_ir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.update({f"VLM_{k.upper()}": str(v) for k, v in tiny_model_settings("qwen2-vl").items()})
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "predict.py"), "-q", *args],
        env=env,
        cwd=qwen2vl_ir.parent,  # not the checkout: a developer's .env is not read
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_predict_streams_an_answer(qwen2vl_ir: Path, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(make_image("png"))
    video = tmp_path / "v.mp4"
    video.write_bytes(make_video())
    result = run_predict(
        qwen2vl_ir,
        "--image",
        str(image),
        "--image",
        str(image),
        "--video",
        str(video),
        "--prompt",
        "What is shown?",
        "--max-tokens",
        "6",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert result.stdout.endswith("\n")


def test_predict_reports_bad_media(qwen2vl_ir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result = run_predict(qwen2vl_ir, "--image", str(bad), "--prompt", "?")
    assert result.returncode == 1
    assert "Could not decode image" in result.stderr
    missing = run_predict(qwen2vl_ir, "--image", str(tmp_path / "none.png"), "--prompt", "?")
    assert missing.returncode != 0 and "no such file" in missing.stderr
