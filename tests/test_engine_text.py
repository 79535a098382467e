"""Incremental detokenization, stop strings and the stream interval, on the tiny models'
real tokenizers and pipelines."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openvino_genai
import pytest

from utils.engine import continuous
from utils.engine.detokenize import (
    REPLACEMENT_CHAR,
    ByteDetokenizer,
    ByteTokenTable,
    IncrementalDetokenizer,
    StopMatcher,
    decode_pending,
)
from utils.engine.messages import StepOutputs, TextEvent
from utils.engine.model_config import ModelConfig
from utils.engine.prompt import Preparer
from utils.engine.tags import image_tag, video_tag
from utils.engine.types import GenerationRequest, SamplingParams
from utils.engine.visual_tokens import MediaRefused, VisualTokenCounter

TEXT = "Привет, мир! 你好世界 — héllo 😀🎉 naïve café ñ 日本語のテキスト ok"


@pytest.fixture(scope="module", params=["qwen2-vl", "llava"])
def tokenizer(request: pytest.FixtureRequest) -> openvino_genai.Tokenizer:
    path = request.getfixturevalue("qwen2vl_ir" if request.param == "qwen2-vl" else "llava_ir")
    return openvino_genai.Tokenizer(str(path))


def _decode(tokenizer: openvino_genai.Tokenizer):
    return lambda batch: list(tokenizer.decode(batch))


def test_incremental_detokenizer_never_splits_characters(tokenizer) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False).input_ids.data[0].tolist()
    decode = _decode(tokenizer)
    # the tiny vocabulary splits these characters across tokens: the check is meaningful
    assert any(tokenizer.decode(ids[:i]).endswith(REPLACEMENT_CHAR) for i in range(1, len(ids)))
    streams = [IncrementalDetokenizer(), IncrementalDetokenizer()]
    deltas: list[list[str]] = [[], []]
    for step, token in enumerate(ids):
        streams[0].add([token])
        if step % 3 == 0:  # the second stream gets tokens in uneven batches
            streams[1].add(ids[len(streams[1].ids) : step + 1])
        last = step == len(ids) - 1
        if last:
            streams[1].add(ids[len(streams[1].ids) :])
        for i, delta in enumerate(decode_pending(decode, streams, [last, last])):
            deltas[i].append(delta)
    expected = tokenizer.decode(ids)
    for parts in deltas:
        assert "".join(parts) == expected
        assert not any(REPLACEMENT_CHAR in part for part in parts)
    assert sum(1 for part in deltas[0] if part) > 10  # it streams, not all at the end


def test_generated_ids_stream_like_a_full_decode(tokenizer) -> None:
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 1000, 300).tolist()  # random ids, like a random model's output
    stream = IncrementalDetokenizer()
    text = ""
    for i, token in enumerate(ids):
        stream.add([token])
        text += decode_pending(_decode(tokenizer), [stream], [i == len(ids) - 1])[0]
    assert text == tokenizer.decode(ids)


def test_byte_table_streams_like_the_tokenizer(tokenizer) -> None:
    table = ByteTokenTable.build(tokenizer)
    assert table is not None  # both tiny tokenizers are byte-level BPE
    ids = tokenizer.encode(TEXT, add_special_tokens=False).input_ids.data[0].tolist()
    eos = tokenizer.get_eos_token_id()
    ids = [*ids[:5], eos, *ids[5:]]  # special tokens are skipped, as in decode()
    stream = ByteDetokenizer(table)
    parts = []
    for token in ids:
        stream.add([token])
        parts.append(stream.take())
    parts.append(stream.take(final=True))
    assert "".join(parts) == tokenizer.decode(ids) == TEXT
    assert not any(REPLACEMENT_CHAR in part for part in parts)
    assert sum(1 for part in parts if part) > 10


def test_byte_table_refuses_a_tokenizer_that_is_not_concatenation(tokenizer) -> None:
    class Stripping:
        """A SentencePiece-like decoder: the leading space of a text is dropped."""

        def get_vocab(self):
            return tokenizer.get_vocab()

        def encode(self, *args, **kwargs):
            return tokenizer.encode(*args, **kwargs)

        def decode(self, batch):
            return [text.lstrip(" ") for text in tokenizer.decode(batch)]

    assert ByteTokenTable.build(Stripping()) is None


def test_stop_matcher_across_chunks() -> None:
    matcher = StopMatcher(["END", "\n\n"])
    out = []
    for chunk in ["Hello E", "N", "x and E", "ND tail"]:
        text, matched = matcher.feed(chunk)
        out.append(text)
        if matched:
            break
    assert "".join(out) == "Hello ENx and "
    assert matched
    # a held-back prefix that never completes is released
    matcher = StopMatcher(["END"])
    assert matcher.feed("abc EN") == ("abc ", False)
    assert matcher.flush() == "EN"
    # no stop strings: pass-through
    assert StopMatcher([]).feed("x") == ("x", False)
    assert StopMatcher(["\n\n"]).feed("a\n\nb") == ("a", True)


def test_visual_token_counts_qwen2vl(qwen2vl_ir: Path) -> None:
    counter = VisualTokenCounter.for_model(ModelConfig.read(qwen2vl_ir))
    assert counter.image((112, 112, 3)).tokens == 16
    assert counter.image((112, 112, 3)).text == "<|vision_start|><|vision_end|>"
    assert counter.image((10, 10, 3)).tokens == 4  # upscaled to the minimum (56x56)
    assert counter.image((4000, 4000, 3)).tokens <= 200704 // 28**2  # capped
    assert counter.image((70, 70, 3)).tokens == 9  # 70 / 28 = 2.5 rounds up, as in C++
    assert counter.video((4, 112, 112, 3)).tokens == 2 * 16
    with pytest.raises(MediaRefused):
        counter.image((4, 1000, 3))  # 250:1


@pytest.mark.parametrize("kind", ["qwen2-vl", "llava"])
def test_prompt_token_count_matches_the_pipeline(kind: str, request: pytest.FixtureRequest) -> None:
    """The up-front count (context check) equals what the pipeline measures."""
    import openvino

    path = request.getfixturevalue("qwen2vl_ir" if kind == "qwen2-vl" else "llava_ir")
    pipe = openvino_genai.ContinuousBatchingPipeline(
        str(path), openvino_genai.SchedulerConfig(), "CPU"
    )
    model = ModelConfig.read(path)
    preparer = Preparer(openvino, openvino_genai, pipe.get_tokenizer(), path, model)
    rng = np.random.default_rng(0)
    cases = [[(112, 112)], [(64, 160), (300, 90)], []]
    for n, shapes in enumerate(cases):
        images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
        tags = "".join(image_tag(i) for i in range(len(images)))
        videos = []
        if kind == "qwen2-vl" and n == 2:
            videos = [rng.integers(0, 256, (4, 84, 112, 3), dtype=np.uint8)]
            tags = video_tag(0)
        generation = GenerationRequest(
            request_id=str(n),
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": tags + f"What is in picture {n}?"},
            ],
            params=SamplingParams(max_new_tokens=1, temperature=0.0),
            images=images,
            videos=videos,
        )
        prep = preparer.prepare(generation)
        handle = pipe.add_request(n, prep.prompt, prep.images, prep.videos, prep.config)
        while pipe.has_non_finished_requests():
            pipe.step()
        measured = handle.get_perf_metrics().get_num_input_tokens()
        assert preparer.prompt_tokens(prep) == measured


class _Outbox:
    """Stands in for the engine's pipe to the API process: keeps what is sent."""

    def __init__(self) -> None:
        self.sent: list[StepOutputs] = []

    def poll(self, timeout: float = 0) -> bool:
        return False

    def recv(self) -> Any:
        raise EOFError

    def send(self, obj: Any) -> None:
        self.sent.append(obj)

    def events(self) -> list[TextEvent]:
        return [event for message in self.sent for event in message.events]


@pytest.fixture
def cb_backend(qwen2vl_ir: Path) -> Iterator[tuple[Any, _Outbox]]:
    """A continuous-batching engine writing to an _Outbox."""
    import openvino as ov
    import openvino_genai as genai

    from utils.engine.continuous import CBBackend
    from utils.engine.messages import WorkerConfig

    outbox = _Outbox()
    cfg = WorkerConfig(
        model_dir=str(qwen2vl_ir), model=ModelConfig.read(qwen2vl_ir), kv_cache_blocks=512
    )
    backend = CBBackend(outbox, ov, genai, cfg)
    yield backend, outbox
    for rid in list(backend.active):
        backend.abort(rid)
    while backend.pipe.has_non_finished_requests():
        backend.pipe.step()


def _steps(backend: Any, count: int) -> None:
    """What the engine's loop does after each step, without taking new requests."""
    for _ in range(count):
        backend.pipe.step()
        backend.collect()
        backend.flush()


def test_slow_adds_release_held_text(cb_backend: tuple[Any, _Outbox]) -> None:
    """Text held back by the stream interval goes out before a new request is added
    when adding takes longer than the interval (adding encodes the images), and stays
    held when adding is quick."""
    backend, outbox = cb_backend
    backend.stream_interval = 60.0  # every piece after the first is held back
    backend.add(1, _request(max_new_tokens=3000))
    backend.admit()
    _steps(backend, 6)

    def texts_of_first() -> list[str]:
        return [e.text for e in outbox.events() if e.rid == 1 and e.text]

    assert len(texts_of_first()) == 1  # the first piece at once, the rest held
    assert backend.active[1].handle.can_read()  # (in the pipeline's queue)
    backend.add(2, _request(max_new_tokens=4))  # quick to add: nothing released
    backend.admit()
    assert len(texts_of_first()) == 1
    backend.add_seconds = 120.0  # adding now takes longer than the interval
    backend.add(3, _request(max_new_tokens=4))
    backend.admit()
    assert len(texts_of_first()) == 2
    assert not backend.active[1].choices[0].held
    assert not backend.active[1].handle.can_read()


def test_outputs_are_read_when_a_piece_is_due_or_the_request_ends(
    cb_backend: tuple[Any, _Outbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between two pieces of a stream its tokens wait in the pipeline's queue; a request
    that ends is read at once, and one with stop strings every step."""
    backend, outbox = cb_backend
    # all three go in together, however slow adding is on a busy machine
    monkeypatch.setattr(continuous, "ADMIT_BUDGET_S", 60.0)
    backend.stream_interval = 60.0
    backend.add(1, _request(max_new_tokens=3000))
    backend.add(2, _request(max_new_tokens=3000, stop=("never said",)))
    backend.add(3, _request(max_new_tokens=4))
    backend.admit()
    _steps(backend, 8)
    events = [e for e in outbox.events() if e.text or e.finish_reason]

    def of(rid: int) -> list[TextEvent]:
        return [e for e in events if e.rid == rid]

    assert len(of(1)) == len(of(2)) == 1  # the first piece at once, the rest held...
    assert backend.active[1].handle.can_read()  # ...in the pipeline's queue
    assert not backend.active[2].handle.can_read()  # read every step, held here
    assert backend.active[2].choices[0].held
    assert (of(3)[-1].completion_tokens, of(3)[-1].finish_reason) == (4, "length")
    backend.stream_interval = 0.0
    _steps(backend, 1)
    first = [e for e in outbox.events() if e.rid == 1 and e.text]
    assert len(first) == 2 and first[-1].completion_tokens == 9  # queued tokens, one piece
    assert not backend.active[1].handle.can_read()


def test_admission_adds_one_slow_request_per_step(
    cb_backend: tuple[Any, _Outbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between two steps the engine adds waiting requests only for ADMIT_BUDGET_S (at
    least one), so a burst of image requests starts one by one; a waiting request
    can be aborted before it is added and counts as waiting in the stats."""
    backend, _ = cb_backend
    monkeypatch.setattr(continuous, "ADMIT_BUDGET_S", 0.0)  # every add is "slow"
    for rid in (1, 2, 3):
        backend.add(rid, _request(max_new_tokens=4))
    assert backend.stats().waiting == 3 and not backend.active
    backend.admit()
    assert list(backend.active) == [1]
    assert [rid for rid, _ in backend.pending] == [2, 3]
    backend.abort(2)  # leaves before it was ever added
    backend.pipe.step()
    backend.collect()
    assert any(e.rid == 1 and e.completion_tokens for e in backend.events)  # 1 streams
    backend.admit()
    assert list(backend.active) == [1, 3] and not backend.pending

    monkeypatch.setattr(continuous, "ADMIT_BUDGET_S", 60.0)
    for rid in (4, 5, 6):
        backend.add(rid, _request(max_new_tokens=4))
    backend.admit()  # within the budget: all together
    assert list(backend.active) == [1, 3, 4, 5, 6] and not backend.pending
    while backend.active:
        backend.pipe.step()
        backend.collect()
    finals = {e.rid for e in backend.events if e.finish_reason is not None}
    assert finals == {1, 3, 4, 5, 6}


def _request(max_new_tokens: int, stop: tuple[str, ...] = ()) -> GenerationRequest:
    image = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    params = SamplingParams(
        max_new_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, stop=stop
    )
    return GenerationRequest(
        request_id="test",
        messages=[{"role": "user", "content": image_tag(0) + "Describe the picture."}],
        params=params,
        images=[image],
    )
