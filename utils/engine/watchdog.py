"""The engine watchdog's rule: when is an engine process with work pending stalled?

A step's output message proves progress, but one step can legitimately take tens of
seconds (a large image's prefill on a slow CPU), and `add_request` and `step` hold the
worker's GIL, so no heartbeat from inside the worker could prove it is alive. Its CPU
time can: the kernel counts it for every thread of the process (`/proc/<pid>/stat`,
utime + stime). An engine is stalled when it has work and, for the stall timeout,
has sent no message and used (almost) no CPU time: stopped (SIGSTOP), deadlocked, or
blocked half-way through writing a message.
"""

from __future__ import annotations

import os

CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# CPU time below this share of one core between two samples is not taken as work
# (a few scheduler ticks of idle housekeeping threads).
MIN_CPU_SHARE = 0.02


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process `pid`, all its threads included; None when it
    cannot be read (the process is gone, or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces; utime and
    # stime are fields 14 and 15, i.e. the 12th and 13th after the closing one.
    fields = data[data.rindex(b")") + 2 :].split()
    try:
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (IndexError, ValueError):
        return None


class StallDetector:
    """Fed with samples (time, whether work is pending, when the last message came,
    the process's CPU time); says how long the engine has been stalled, if it is."""

    def __init__(self, timeout_s: float, min_cpu_share: float = MIN_CPU_SHARE) -> None:
        self.timeout_s = timeout_s
        self.min_cpu_share = min_cpu_share
        self.active_at: float | None = None  # when the engine last showed progress
        self.sampled_at = 0.0
        self.cpu: float | None = None

    def sample(self, now: float, busy: bool, last_message: float, cpu: float | None) -> float:
        """Seconds without progress while busy (0 while idle or progressing)."""
        previous_at, previous_cpu = self.sampled_at, self.cpu
        self.sampled_at, self.cpu = now, cpu
        if not busy or self.active_at is None:
            self.active_at = now  # waiting for work is not a stall
            return 0.0
        self.active_at = max(self.active_at, last_message)
        if (
            cpu is not None
            and previous_cpu is not None
            and cpu - previous_cpu >= self.min_cpu_share * (now - previous_at)
        ):
            self.active_at = now
        return now - self.active_at

    def stalled(self, now: float, busy: bool, last_message: float, cpu: float | None) -> bool:
        return self.timeout_s > 0 and self.sample(now, busy, last_message, cpu) >= self.timeout_s
