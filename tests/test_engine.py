"""EngineClient on the tiny real models: batching, admission, cancellation, faults."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from utils.engine.client import EngineClient
from utils.engine.types import GenerationEvent, GenerationRequest, SamplingParams
from utils.errors import OpenAIError
from utils.settings import Settings

pytestmark = pytest.mark.asyncio(loop_scope="session")

RNG = np.random.default_rng(7)
IMAGES = [
    RNG.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(112, 112), (64, 160), (200, 90)]
]


def request(
    text: str = "Describe the picture.",
    images: list[np.ndarray] | None = None,
    videos: list[np.ndarray] | None = None,
    **params: object,
) -> GenerationRequest:
    images = [IMAGES[0]] if images is None else images
    videos = videos or []
    tags = "".join(f"<ov_genai_image_{i}>" for i in range(len(images)))
    tags += "".join(f"<ov_genai_video_{i}>" for i in range(len(videos)))
    defaults: dict[str, object] = {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}
    defaults.update(params)
    return GenerationRequest(
        request_id="test",
        messages=[{"role": "user", "content": tags + text}],
        params=SamplingParams(**defaults),  # type: ignore[arg-type]
        images=images,
        videos=videos,
    )


class Result:
    def __init__(self) -> None:
        self.texts: dict[int, str] = {}
        self.finish: dict[int, str | None] = {}
        self.tokens: dict[int, int] = {}
        self.prompt_tokens: list[int] = []
        self.events: list[GenerationEvent] = []


async def collect(stream: AsyncIterator[GenerationEvent]) -> Result:
    result = Result()
    async for event in stream:
        result.events.append(event)
        result.texts[event.index] = result.texts.get(event.index, "") + event.text
        result.tokens[event.index] = event.completion_tokens
        result.finish[event.index] = event.finish_reason
        result.prompt_tokens.append(event.prompt_tokens)
    return result


async def wait_for(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Polls a condition on the engine's state (bounded, so a bug fails instead of hanging)."""
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


@pytest.fixture(scope="module")
async def engine(qwen2vl_ir: Path) -> AsyncIterator[EngineClient]:
    settings = Settings(model_name="tiny", max_queue=8, max_num_seqs=8, kv_cache_size_gb=1)
    client = EngineClient(settings, qwen2vl_ir)
    await client.start()
    yield client
    await client.stop()


async def test_info_and_ready(engine: EngineClient) -> None:
    assert engine.ready
    assert engine.backend == "continuous_batching"
    assert engine.info.model_type == "qwen2_vl"
    assert engine.info.supports_video
    assert engine.info.max_context == 32768
    stats = engine.stats()
    for key in ("queue_depth", "running", "kv_cache_usage", "restarts", "generations_served"):
        assert key in stats


async def test_concurrent_outputs_match_alone(engine: EngineClient) -> None:
    requests = [
        request(f"Question number {i}?", images=[IMAGES[i % 3]], max_new_tokens=12 + i)
        for i in range(8)
    ]
    together = await asyncio.gather(*(collect(engine.generate(r)) for r in requests))
    alone = [await collect(engine.generate(r)) for r in requests]
    for i, (a, b) in enumerate(zip(together, alone, strict=True)):
        assert a.texts == b.texts
        assert a.tokens == {0: 12 + i}
        assert a.finish == {0: "length"}
    # independent: different inputs gave different outputs
    assert len({r.texts[0] for r in together}) > 1


async def test_first_event_is_acceptance_and_prompt_tokens_are_exact(engine: EngineClient) -> None:
    result = await collect(engine.generate(request(images=IMAGES[:2], max_new_tokens=4)))
    first, last = result.events[0], result.events[-1]
    assert (first.index, first.text, first.completion_tokens, first.finish_reason) == (
        0,
        "",
        0,
        None,
    )
    assert last.prompt_tokens > 2 * 18
    # a stop string ends a request before the pipeline reports its count: same number
    text = result.texts[0]
    stop = next(text[i : i + 2] for i in range(1, len(text) - 2) if text[i : i + 2].strip())
    cut = await collect(engine.generate(request(images=IMAGES[:2], max_new_tokens=4, stop=(stop,))))
    assert cut.finish == {0: "stop"}
    assert cut.events[-1].prompt_tokens == last.prompt_tokens


async def test_multi_turn_images_and_video(engine: EngineClient) -> None:
    video = RNG.integers(0, 256, (4, 84, 112, 3), dtype=np.uint8)
    req = GenerationRequest(
        request_id="turns",
        messages=[
            {"role": "user", "content": "<ov_genai_image_0>What is this?"},
            {"role": "assistant", "content": "A picture."},
            {"role": "user", "content": "<ov_genai_image_1>And this, in <ov_genai_video_0>?"},
        ],
        params=SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True),
        images=IMAGES[:2],
        videos=[video],
    )
    result = await collect(engine.generate(req))
    assert result.finish == {0: "length"}
    assert result.tokens == {0: 5}
    assert result.prompt_tokens[-1] > 2 * 18 + 2 * 16


async def test_stop_string_cuts_output(engine: EngineClient) -> None:
    full = (await collect(engine.generate(request(max_new_tokens=40)))).texts[0]
    stop = next(full[i : i + 2] for i in range(5, len(full) - 2) if full[i : i + 2].strip())
    cut = full[: full.index(stop)]
    result = await collect(engine.generate(request(max_new_tokens=40, stop=("zzzz-never", stop))))
    assert result.texts[0] == cut
    assert result.finish[0] == "stop"
    assert all(stop not in e.text for e in result.events)


async def test_n2_sampling_and_seed(engine: EngineClient) -> None:
    params = {"temperature": 1.0, "n": 2, "seed": 11, "max_new_tokens": 10}
    first = await collect(engine.generate(request(**params)))
    again = await collect(engine.generate(request(**params)))
    assert set(first.texts) == {0, 1}
    assert first.finish == {0: "length", 1: "length"}
    assert first.texts == again.texts  # same seed, same output
    assert first.texts[0] != first.texts[1]
    greedy = await collect(engine.generate(request(n=2, max_new_tokens=10)))
    assert greedy.texts[0] == greedy.texts[1]
    assert greedy.finish == {0: "length", 1: "length"}


async def test_structured_output(engine: EngineClient) -> None:
    schema = json.dumps(
        {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    )
    result = await collect(
        engine.generate(request(json_schema=schema, max_new_tokens=12, ignore_eos=False))
    )
    assert result.texts[0].lstrip().startswith("{")


async def test_context_length_exceeded(engine: EngineClient) -> None:
    with pytest.raises(OpenAIError) as info:
        await collect(engine.generate(request("hello " * 40000)))
    assert info.value.status == 400
    assert info.value.code == "context_length_exceeded"
    # a bad request fails alone
    assert (await collect(engine.generate(request(max_new_tokens=3)))).tokens == {0: 3}


async def test_missing_image_is_400(engine: EngineClient) -> None:
    req = request(images=[IMAGES[0]])
    req.messages[0]["content"] += "<ov_genai_image_1>"
    with pytest.raises(OpenAIError) as info:
        await collect(engine.generate(req))
    assert info.value.status == 400


async def test_queue_full_429_and_cancel_frees_slots(engine: EngineClient) -> None:
    streams = [engine.generate(request(max_new_tokens=30000)) for _ in range(8)]
    for stream in streams:
        await stream.__anext__()  # accepted
    with pytest.raises(OpenAIError) as info:
        await engine.generate(request()).__anext__()
    assert info.value.status == 429
    assert info.value.headers and "Retry-After" in info.value.headers
    for stream in streams:
        await stream.aclose()
    assert engine.stats()["in_flight"] == 0
    await wait_for(lambda: engine.stats()["running"] == 0)
    # the slots are free again: a full queue's worth of requests is served
    results = await asyncio.gather(
        *(collect(engine.generate(request(max_new_tokens=4))) for _ in range(8))
    )
    assert all(r.finish == {0: "length"} for r in results)


@pytest.fixture
async def fragile(qwen2vl_ir: Path) -> AsyncIterator[EngineClient]:
    settings = Settings(model_name="tiny", max_queue=4, request_timeout_s=3.0)
    client = EngineClient(settings, qwen2vl_ir)
    await client.start()
    yield client
    await client.stop()


async def test_timeout_is_504(fragile: EngineClient) -> None:
    with pytest.raises(OpenAIError) as info:
        await collect(fragile.generate(request(max_new_tokens=30000)))
    assert info.value.status == 504
    await wait_for(lambda: fragile.stats()["running"] == 0)


async def test_killed_worker_fails_streams_and_recovers(fragile: EngineClient) -> None:
    streams = [fragile.generate(request(max_new_tokens=30000)) for _ in range(3)]
    for stream in streams:
        await stream.__anext__()
    pid = fragile.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    async def drain(stream: AsyncIterator[GenerationEvent]) -> OpenAIError | None:
        try:
            async for _ in stream:
                pass
        except OpenAIError as exc:
            return exc
        return None

    # generous bound: a hang would fail here instead of blocking the suite
    errors = await asyncio.wait_for(asyncio.gather(*(drain(s) for s in streams)), 60)
    assert all(e is not None and e.status == 500 for e in errors)
    assert not fragile.ready
    with pytest.raises(OpenAIError) as info:
        await fragile.generate(request()).__anext__()
    assert info.value.status == 503
    await wait_for(lambda: fragile.ready)
    assert fragile.pid != pid
    assert fragile.stats()["restarts"] == 1
    result = await collect(fragile.generate(request(max_new_tokens=5)))
    assert result.tokens == {0: 5}


async def test_llava_continuous_batching(llava_ir: Path) -> None:
    client = EngineClient(Settings(model_name="tiny-llava"), llava_ir)
    await client.start()
    try:
        assert client.backend == "continuous_batching"
        assert not client.info.supports_video
        requests = [request(f"Picture {i}", images=[IMAGES[i]]) for i in range(3)]
        together = await asyncio.gather(*(collect(client.generate(r)) for r in requests))
        alone = [await collect(client.generate(r)) for r in requests]
        assert [r.texts for r in together] == [r.texts for r in alone]
        for result in together:
            assert result.prompt_tokens[-1] > 16
        with pytest.raises(OpenAIError) as info:
            video = np.zeros((2, 56, 56, 3), dtype=np.uint8)
            await collect(client.generate(request(images=[], videos=[video])))
        assert info.value.status == 400
    finally:
        await client.stop()


async def test_auto_falls_back_to_vlm_pipeline(qwen2vl_ir: Path, engine: EngineClient) -> None:
    """A KV cache of one block cannot hold even the warm-up request, so continuous
    batching cannot run the model: `auto` serves it through VLMPipeline, while a
    forced continuous_batching engine fails to start."""
    forced = EngineClient(
        Settings(model_name="tiny", engine="continuous_batching", kv_cache_blocks=1), qwen2vl_ir
    )
    with pytest.raises(RuntimeError):
        await forced.start()
    assert not forced.ready
    client = EngineClient(Settings(model_name="tiny", kv_cache_blocks=1), qwen2vl_ir)
    await client.start()
    try:
        assert client.ready and client.backend == "vlm_pipeline"
        req = request("Fallback", max_new_tokens=8)
        served = await collect(client.generate(req))
        assert served.tokens == {0: 8} and served.finish == {0: "length"}
        assert served.texts == (await collect(engine.generate(req))).texts
    finally:
        await client.stop()


async def test_vlm_pipeline_engine(qwen2vl_ir: Path) -> None:
    settings = Settings(model_name="tiny", engine="vlm_pipeline")
    client = EngineClient(settings, qwen2vl_ir)
    await client.start()
    try:
        assert client.backend == "vlm_pipeline"
        requests = [request(f"Item {i}", images=[IMAGES[i]], max_new_tokens=8) for i in range(3)]
        together = await asyncio.gather(*(collect(client.generate(r)) for r in requests))
        alone = [await collect(client.generate(r)) for r in requests]
        assert [r.texts for r in together] == [r.texts for r in alone]
        assert all(r.tokens == {0: 8} and r.finish == {0: "length"} for r in together)
        # stop strings and cancellation work here too
        full = alone[0].texts[0]
        stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if full[i : i + 2].strip())
        cut = await collect(client.generate(request("Item 0", max_new_tokens=8, stop=(stop,))))
        assert cut.texts[0] == full[: full.index(stop)]
        assert cut.finish[0] == "stop"
        stream = client.generate(request(max_new_tokens=30000))
        await stream.__anext__()
        await stream.aclose()
        result = await collect(client.generate(request(max_new_tokens=3)))
        assert result.tokens == {0: 3}
    finally:
        await client.stop()


async def test_unloadable_model_fails_start(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_vl"}')
    client = EngineClient(Settings(model_name="broken"), tmp_path)
    with pytest.raises(RuntimeError):
        await client.start()
    assert not client.ready


async def test_stream_interval_groups_fast_tokens(qwen2vl_ir: Path, engine: EngineClient) -> None:
    settings = Settings(model_name="tiny", stream_interval_ms=60_000)
    client = EngineClient(settings, qwen2vl_ir)
    await client.start()
    try:
        req = request(max_new_tokens=24)
        grouped = await collect(client.generate(req))
        single = await collect(engine.generate(req))
        assert grouped.texts == single.texts
        assert grouped.tokens == single.tokens == {0: 24}
        # the first piece at once, the rest together with the finish
        assert len([e for e in grouped.events if e.text]) <= 2 < len(single.events)
    finally:
        await client.stop()


async def test_messages_reach_the_worker_whole_and_in_order_when_the_pipe_fills() -> None:
    """Small messages go straight from the event loop; a large one, and all behind a
    write the full pipe cut short, go through the writer thread, keeping the order."""
    import multiprocessing
    import types

    from utils.engine.messages import AbortRequest, AddRequest
    from utils.engine.session import DIRECT_SEND_BYTES, Session

    parent, child = multiprocessing.Pipe(duplex=True)
    owner = types.SimpleNamespace(on_step=None, on_exit=None)
    session = Session(owner, asyncio.get_running_loop(), process=None, conn=parent)
    session.writer.start()
    medium = np.full((DIRECT_SEND_BYTES // 3 - 64, 3), 1, dtype=np.uint8)
    large = np.full((DIRECT_SEND_BYTES, 3), 2, dtype=np.uint8)
    sizes = ["small", "medium", "medium", "medium", "large", "small", "medium", "small"] * 3
    sent = []
    try:
        for i, size in enumerate(sizes):
            images = {"small": [], "medium": [medium], "large": [large]}[size]
            session.send(AddRequest(i, request(images=images)))  # nobody reads: the pipe fills
            sent.append((i, size))
        assert session.queued > 0  # some had to wait for the writer thread
        received = []
        for _ in sizes:
            assert await asyncio.to_thread(child.poll, 10)
            message = child.recv()
            assert isinstance(message, AddRequest)
            i, got = message.rid, message.request
            size = "small"
            if got.images:
                size = "large" if got.images[0].shape == large.shape else "medium"
                assert np.array_equal(got.images[0], {"medium": medium, "large": large}[size])
            received.append((i, size))
        assert received == sent
        for _ in range(100):  # the writer thread catches up
            if not session.queued:
                break
            await asyncio.sleep(0.01)
        assert session.queued == 0
        session.send(AbortRequest(99))  # and the next small one is written directly
        assert child.recv() == AbortRequest(99)
    finally:
        session.alive = False
        session.outbox.put(None)
        parent.close()
        session.sock.close()
        child.close()


async def test_kv_cache_exhaustion_loses_no_request(qwen2vl_ir: Path) -> None:
    """Seven requests that fit the small KV cache one by one (not all together) and one
    that does not fit at all: the pipeline drops every running request when its cache
    runs out; the engine runs the dropped ones again, alone, without sending their
    tokens twice. Each answer is the one it gives alone, the misfit gets 400."""
    settings = Settings(
        model_name="tiny", engine="continuous_batching", kv_cache_blocks=16, max_num_seqs=8
    )
    client = EngineClient(settings, qwen2vl_ir)
    await client.start()
    try:
        requests = [
            request(f"Question {i}", images=[], max_new_tokens=1000 if i == 3 else 400)
            for i in range(8)
        ]

        async def run(req: GenerationRequest) -> Result | OpenAIError:
            try:
                return await collect(client.generate(req))
            except OpenAIError as exc:
                return exc

        together = await asyncio.wait_for(asyncio.gather(*(run(r) for r in requests)), 300)
        misfit = together[3]
        assert isinstance(misfit, OpenAIError)
        assert misfit.status == 400 and misfit.code == "context_length_exceeded"
        for i, req in enumerate(requests):
            if i == 3:
                continue
            got = together[i]
            assert isinstance(got, Result), got
            alone = await collect(client.generate(req))
            assert got.texts == alone.texts and got.tokens == {0: 400}
            assert got.finish == {0: "length"}
        assert client.ready and client.stats()["restarts"] == 0
        await wait_for(lambda: client.stats()["running"] == 0)
    finally:
        await client.stop()
