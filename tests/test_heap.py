"""The engine's heap trimmer: when it gives freed memory back, and that it really does."""

from __future__ import annotations

import ctypes
import os
import sys

import pytest

from utils.engine import heap
from utils.engine.heap import HeapTrimmer

pytestmark = pytest.mark.unit


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    clock = _Clock()
    monkeypatch.setattr(heap.time, "monotonic", clock)
    return clock


def _trimmer(monkeypatch: pytest.MonkeyPatch) -> tuple[HeapTrimmer, list[int]]:
    calls: list[int] = []
    trimmer = HeapTrimmer(idle_interval_s=5, busy_interval_s=60)
    monkeypatch.setattr(trimmer, "_trim", lambda pad: calls.append(pad) or 1)
    return trimmer, calls


def test_trims_once_when_idle_after_work(monkeypatch: pytest.MonkeyPatch, clock: _Clock) -> None:
    trimmer, calls = _trimmer(monkeypatch)
    clock.now += 10
    trimmer.tick(busy=False)
    assert calls == []  # nothing was done since start: nothing to give back
    trimmer.tick(busy=True)
    trimmer.tick(busy=False)
    assert calls == [0]
    trimmer.tick(busy=False)
    assert calls == [0]  # still idle, no new work: no second walk of the heap
    trimmer.tick(busy=True)
    clock.now += 1
    trimmer.tick(busy=False)
    assert calls == [0]  # idle again, but too soon after the last trim
    clock.now += 5
    trimmer.tick(busy=False)
    assert calls == [0, 0]


def test_a_never_idle_engine_is_trimmed_between_steps_now_and_then(
    monkeypatch: pytest.MonkeyPatch, clock: _Clock
) -> None:
    trimmer, calls = _trimmer(monkeypatch)
    for _ in range(100):  # 100 steps in 50 s
        clock.now += 0.5
        trimmer.tick(busy=True)
    assert calls == []
    for _ in range(40):  # 20 s more
        clock.now += 0.5
        trimmer.tick(busy=True)
    assert calls == [0]
    assert trimmer.trims == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_trimming_returns_freed_memory_to_the_system() -> None:
    """Many small blocks freed from a Python-visible heap stay resident until trimmed."""
    trimmer = HeapTrimmer(idle_interval_s=0)
    if not trimmer.available:
        pytest.skip("this C library has no malloc_trim")
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

    def resident_mb() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    # Below the mmap threshold, so the blocks come from the heap; the last one stays
    # allocated, so the freed ones sit below it and cannot shrink the heap by themselves.
    blocks = [libc.malloc(64 * 1024) for _ in range(2000)]
    for block in blocks:
        ctypes.memset(block, 1, 64 * 1024)
    keep = libc.malloc(64 * 1024)
    for block in blocks:
        libc.free(block)
    before = resident_mb()
    trimmer.tick(busy=True)
    trimmer.tick(busy=False)
    after = resident_mb()
    libc.free(keep)
    assert trimmer.trims == 1
    assert before - after > 60, (before, after)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_the_arena_cap_is_accepted_by_the_c_library() -> None:
    """mallopt answers 1 when it takes the setting and 0 when it refuses it."""
    assert heap.limit_arenas() is True


def test_the_kernel_cache_bound_leaves_a_value_the_user_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    heap.bound_kernel_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(
        heap.ONEDNN_PRIMITIVE_CACHE_CAPACITY
    )
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "1024")
    heap.bound_kernel_cache()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "1024"
