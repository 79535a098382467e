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
# The family matrix (tests/test_families.py) is marked `families` as well:
# `-m "not families"` skips it, `--family NAME` (repeatable) runs only those families.
_LIVE = {"live_server", "ready_server", "family_server"}
_ENGINE = {
    "qwen2vl_ir",
    "qwen3vl_ir",
    "llava_ir",
    "qwen2vl_hf",
    "llava_hf",
    "int8_export",
    "family_engine",
    "family_ir",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--family",
        action="append",
        default=[],
        metavar="KIND",
        help="run the family matrix for this model family only (e.g. qwen3-vl); repeatable",
    )


def _family_of(item: pytest.Item) -> str | None:
    params = getattr(getattr(item, "callspec", None), "params", {})
    for name in ("family_engine", "family_server", "family_ir"):
        value = params.get(name)
        if isinstance(value, tuple):
            return str(value[0])
        if isinstance(value, str):
            return value
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = set(config.getoption("--family"))
    if wanted:
        from tests.families import FAMILY

        unknown = wanted - set(FAMILY)
        if unknown:
            raise pytest.UsageError(
                f"unknown --family {', '.join(sorted(unknown))}; one of {', '.join(FAMILY)}"
            )
        keep, drop = [], []
        for item in items:
            is_matrix = item.get_closest_marker("families") is not None
            (drop if is_matrix and _family_of(item) not in wanted else keep).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        marker = "live" if names & _LIVE else "engine" if names & _ENGINE else "unit"
        item.add_marker(marker)
