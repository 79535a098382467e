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


def test_benchmark_paired_mode(live_server, qwen2vl_ir: Path, tmp_path: Path) -> None:
    base_url = live_server()
    out = tmp_path / "paired.json"
    args = ["--url", base_url, "--raw", str(qwen2vl_ir), "--paired", "--rounds", "3"]
    args += ["-c", "2", "-n", "2", "--max-tokens", "5", "--image-size", "64"]
    assert benchmark([*args, "--save", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["rounds"]) == 3
    assert result["output_tokens"] == 3 * 2 * 5  # the server side, every round
    assert result["raw"]["output_tokens"] == 3 * 2 * 5
    assert result["errors"] == result["raw"]["errors"] == 0
    for round_ in result["rounds"]:
        ratio = round_["server"]["aggregate_tok_s"] / round_["raw"]["aggregate_tok_s"]
        assert abs(round_["ratios"]["aggregate_tok_s"] - ratio) < 1e-9
    ratios = sorted(r["ratios"]["aggregate_tok_s"] for r in result["rounds"])
    assert result["median_ratios"]["aggregate_tok_s"] == ratios[1]
