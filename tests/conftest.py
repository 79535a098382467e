"""Shared fixtures: tiny exported models (tests/fixtures/models.py) and a live
server on loopback (tests/fixtures/server.py)."""

pytest_plugins = ["tests.fixtures.models", "tests.fixtures.server"]
