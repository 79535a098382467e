"""Shared fixtures: tiny exported models (tests/fixtures/models.py) and a live
server on loopback (tests/fixtures/server.py).

The tiny models make a token in about a millisecond, so the default stream interval
would group their tokens; the tests look at token-by-token streaming, and the
interval has tests of its own that set it explicitly."""

import os

os.environ.setdefault("VLM_STREAM_INTERVAL_MS", "0")

pytest_plugins = ["tests.fixtures.models", "tests.fixtures.server"]
