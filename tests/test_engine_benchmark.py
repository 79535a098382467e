"""scripts/benchmark.py against the live server and the raw pipelines (tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

from scripts.benchmark import main as benchmark


def test_benchmark_server_mode(live_server, tmp_path: Path) -> None:
    base_url = live_server()
    out = tmp_path / "server.json"
    args = ["--url", base_url, "-c", "2", "-n", "4", "--max-tokens", "8", "--image-size", "64"]
    assert benchmark([*args, "--health", "--save", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["errors"] == 0
    assert result["output_tokens"] == 4 * 8  # min_tokens + ignore_eos fix the length
    assert result["health_probes"] > 0
    assert result["ttft_ms_p50"] > 0


def test_benchmark_raw_modes(qwen2vl_ir: Path, tmp_path: Path) -> None:
    for concurrency in ("1", "2"):
        out = tmp_path / f"raw{concurrency}.json"
        args = ["--raw", str(qwen2vl_ir), "-c", concurrency, "-n", "3", "--max-tokens", "6"]
        assert benchmark([*args, "--image-size", "64", "--save", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["output_tokens"] == 3 * 6
        assert result["errors"] == 0
