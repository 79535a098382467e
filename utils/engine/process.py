"""An engine's process: a Python program of its own, `python -m utils.engine.process`,
given one end of a socket pair (a `multiprocessing` Connection on both sides).

multiprocessing's "spawn" would do the same, but its child first runs the parent's
main module again (app.py, as `__mp_main__`): every engine would import the web
framework, the HTTP client and the image libraries, and hold them for its whole life,
though it never uses them. This program imports only what the engine's entry point
does.

The parent sends two messages before anything else: its `sys.path` (so the child
finds what the parent finds, test stand-ins too), then the entry point and its
configuration; the child calls `entry(conn, config)`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

# The directory holding the `utils` package, from which the child imports this module.
_ROOT = str(Path(__file__).resolve().parents[2])


class EngineProcess:
    """A started engine program, with the part of multiprocessing.Process's interface
    the supervisor and its session use."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid = popen.pid

    @classmethod
    def start(
        cls, entry: Callable[[Any, Any], None], config: Any, name: str, niceness: int = 0
    ) -> tuple[EngineProcess, Connection]:
        """Starts the program and hands it `entry` and `config`; returns it with the
        parent's end of the pipe (blocking: call it in a thread). `niceness` is added
        to the program's nice value before it starts any thread."""
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, env.get("PYTHONPATH")]))
        try:
            popen = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno()), name, str(niceness)],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=env,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        conn = Connection(ours.detach())
        # A program that died at once leaves these unread; the session then sees the
        # closed pipe and the exit.
        with contextlib.suppress(OSError):
            conn.send(list(sys.path))
            conn.send((entry, config))
        return cls(popen), conn

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout)

    # Popen sends no signal to a process it has already reaped.
    def terminate(self) -> None:
        self._popen.terminate()

    def kill(self) -> None:
        self._popen.kill()


def _main() -> None:
    # Linux keeps a nice value per thread and a new thread inherits its creator's, so
    # this comes first: every thread OpenVINO or a library starts later has it too.
    if niceness := int(sys.argv[3]):
        os.nice(niceness)
    conn = Connection(int(sys.argv[1]))
    parent_path = conn.recv()
    sys.path[:0] = [entry for entry in parent_path if entry not in sys.path]
    entry, config = conn.recv()
    entry(conn, config)


if __name__ == "__main__":
    _main()
