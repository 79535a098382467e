"""A request the pipeline dropped when its KV cache ran out runs again: the tokens it
had already made must come again, and are not sent twice (utils/engine/continuous.py);
the engine's 503 reaches the client with Retry-After."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from utils.engine.backend import ChoiceState
from utils.engine.client import EngineClient, _Request
from utils.engine.continuous import CBBackend
from utils.engine.messages import EngineStats, RequestFailure, StepOutputs
from utils.errors import OpenAIError
from utils.settings import Settings


def _replaying(ids: list[int]) -> ChoiceState:
    choice = ChoiceState(0, ())
    choice.ids = list(ids)
    choice.replayed = 0
    return choice


def test_replay_skips_the_tokens_already_sent() -> None:
    choice = _replaying([1, 2, 3, 4])
    assert CBBackend._skip_replayed(choice, [1, 2], False) == []
    assert choice.replayed == 2
    assert CBBackend._skip_replayed(choice, [3, 4, 5, 6], False) == [5, 6]
    assert choice.replayed is None  # caught up: later tokens are new


def test_replay_that_differs_or_ends_sooner_fails() -> None:
    assert CBBackend._skip_replayed(_replaying([1, 2, 3]), [1, 9], False) is None
    assert CBBackend._skip_replayed(_replaying([1, 2, 3]), [1, 2], True) is None
    choice = _replaying([1, 2])
    assert CBBackend._skip_replayed(choice, [1, 2], True) == []  # same end: fine


@pytest.mark.asyncio(loop_scope="session")
async def test_engine_503_has_retry_after(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_vl"}')
    client = EngineClient(Settings(model_name="fake"), tmp_path)
    pending = _Request(1, 1)
    client._requests[1] = pending
    failure = RequestFailure(1, 503, "The KV cache filled up.", "kv_cache_full")
    client.on_outputs(StepOutputs([], [failure], EngineStats(0, 0, 0, 0, 0)))
    error = await asyncio.wait_for(pending.queue.get(), 1)
    assert isinstance(error, OpenAIError) and error.status == 503
    assert error.code == "kv_cache_full" and error.headers == {"Retry-After": "1"}
