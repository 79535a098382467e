"""Shared fixtures: tiny exported models (tests/fixtures/models.py) and a live
server on loopback (tests/fixtures/server.py).

Tests never read the developer's settings: every VLM_* variable is dropped from the
environment before anything runs, and settings are built without the `.env` file
that `source setup.sh` writes (tests that check `.env` handling name a file
explicitly). Subprocesses inherit the cleaned environment and run outside the
checkout.

The tiny models make a token in about a millisecond, so the default stream interval
would group their tokens; the tests look at token-by-token streaming, and the
interval has tests of its own that set it explicitly.

On CPUs with native bf16 (AVX512-BF16, AMX) OpenVINO computes in bf16 by default,
and a random-weight model's greedy answer then depends on how many sequences share a
step; tests compare batched answers with single ones, so they compute in f32."""

import os

for _name in [name for name in os.environ if name.startswith("VLM_")]:
    del os.environ[_name]
os.environ["VLM_STREAM_INTERVAL_MS"] = "0"
os.environ["VLM_OV_CONFIG"] = '{"INFERENCE_PRECISION_HINT": "f32"}'

from utils.settings import Settings  # noqa: E402  (after the environment is clean)

Settings.model_config["env_file"] = None

import pytest  # noqa: E402

pytest_plugins = ["tests.fixtures.models", "tests.fixtures.server"]

# Each test gets one marker from the fixtures it uses, so a group runs alone:
# `scripts/test.sh -m unit` (seconds), `-m engine` (the OpenVINO pipelines on the
# tiny models), `-m live` (a real server on loopback).
_LIVE = {"live_server", "ready_server"}
_ENGINE = {"qwen2vl_ir", "llava_ir", "qwen2vl_hf", "llava_hf", "int8_export"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        marker = "live" if names & _LIVE else "engine" if names & _ENGINE else "unit"
        item.add_marker(marker)
