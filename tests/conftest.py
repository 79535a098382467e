"""Shared fixtures: tiny exported models (tests/fixtures/models.py) and a live
server on loopback (tests/fixtures/server.py).

The tiny models make a token in about a millisecond, so the default stream interval
would group their tokens; the tests look at token-by-token streaming, and the
interval has tests of its own that set it explicitly.

On CPUs with native bf16 (AVX512-BF16, AMX) OpenVINO computes in bf16 by default,
and a random-weight model's greedy answer then depends on how many sequences share a
step; tests compare batched answers with single ones, so they compute in f32."""

import os

os.environ.setdefault("VLM_STREAM_INTERVAL_MS", "0")
os.environ.setdefault("VLM_OV_CONFIG", '{"INFERENCE_PRECISION_HINT": "f32"}')

pytest_plugins = ["tests.fixtures.models", "tests.fixtures.server"]
