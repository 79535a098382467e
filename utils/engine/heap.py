"""Keeps the engine's heap from creeping up: fewer glibc arenas, a bounded oneDNN
kernel cache, and freed memory given back to the operating system when the engine
goes idle.

OpenVINO allocates and frees many small objects from its worker threads (executors
made for each new input shape, per-request buffers). glibc keeps what is freed in its
arenas, so the resident size of a long-running engine creeps up even when nothing is
held. `malloc_trim` returns the free pages. It walks the heap, so it runs when the
engine has become idle (at most every `idle_interval_s`), and between two steps of an
engine that is never idle (at most every `busy_interval_s`). On a C library without
`malloc_trim` (musl, macOS) this does nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time
from collections.abc import Callable

_M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h

# oneDNN keeps the kernels it made for each input shape in a cache of its own, 1024 by
# default, behind the CPU plugin's (VLM_CPU_RUNTIME_CACHE_CAPACITY). Continuous batching
# meets a new shape whenever the tokens of a step add up to a new count, so that cache
# fills over hours of traffic, growing the engine all the while. A quarter of it keeps
# the shapes a running engine meets again and again.
ONEDNN_PRIMITIVE_CACHE_CAPACITY = 256


def _libc_function(name: str) -> Callable[..., int] | None:
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    try:
        function: Callable[..., int] = getattr(ctypes.CDLL(path), name)
        return function
    except (OSError, AttributeError):
        return None


def _malloc_trim() -> Callable[[int], int] | None:
    return _libc_function("malloc_trim")


def limit_arenas() -> bool:
    """Caps glibc's malloc arenas at one per usable core, before the process starts its
    threads. glibc makes up to eight per core; each thread that allocates may get its
    own, and memory freed in one arena is not reused by the others, so a process whose
    threads come and go (OpenVINO's, the server's thread pool) holds more and more
    partly free arenas. False where the C library has no such setting."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(_M_ARENA_MAX, max(2, len(os.sched_getaffinity(0)))))


def bound_kernel_cache() -> None:
    """Caps oneDNN's kernel cache, unless ONEDNN_PRIMITIVE_CACHE_CAPACITY is already
    set; called before OpenVINO is loaded (oneDNN reads it when it makes the cache)."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_PRIMITIVE_CACHE_CAPACITY))


class HeapTrimmer:
    def __init__(self, idle_interval_s: float = 5.0, busy_interval_s: float = 60.0) -> None:
        self._trim = _malloc_trim()
        self.idle_interval_s = idle_interval_s
        self._busy_interval_s = busy_interval_s
        self._last = time.monotonic()
        self._worked = False
        self.trims = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def tick(self, busy: bool) -> None:
        """Called once per engine loop, after the step (if any)."""
        if busy:
            self._worked = True
        if not self._worked or self._trim is None:
            return
        now = time.monotonic()
        due = self._busy_interval_s if busy else self.idle_interval_s
        if now - self._last < due:
            return
        self._trim(0)
        self._last = now
        self._worked = busy
        self.trims += 1
