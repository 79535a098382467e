"""One incarnation of the engine process: the process, its pipe, and the thread that
writes what the event loop cannot write at once.

- requests and aborts are written from the event loop when the pipe takes them
  whole at once; large ones (images and videos over 1 MiB), and whatever a full pipe
  holds back, go through a writer thread that pickles and waits for the pipe off the
  event loop;
- the event loop reads the pipe itself (`add_reader`) and hands each message to the
  client.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import socket
import struct
import threading
from multiprocessing.reduction import ForkingPickler
from typing import Any, Protocol

from utils.engine.messages import (
    AddRequest,
    EngineFatal,
    EngineReady,
    FromEngine,
    StepOutputs,
    ToEngine,
)

# Messages up to this size are pickled and sent from the event loop (a request with
# a few images); larger ones are pickled and sent by the writer thread.
DIRECT_SEND_BYTES = 1 << 20


class SessionOwner(Protocol):
    """What a session reports to (the EngineClient)."""

    def on_step(self, session: Session, outputs: StepOutputs) -> None: ...

    def on_exit(self, session: Session, reason: str) -> None: ...


def _payload_bytes(message: ToEngine) -> int:
    """Bytes of the images and videos in a message (nothing else in one is large)."""
    if not isinstance(message, AddRequest):
        return 0
    request = message.request
    return sum(a.nbytes for a in request.images) + sum(a.nbytes for a in request.videos)


class Session:
    """One incarnation of the worker process, its pipe and the thread that writes to it."""

    def __init__(
        self,
        owner: SessionOwner,
        loop: asyncio.AbstractEventLoop,
        process: Any,
        conn: Any,
    ) -> None:
        self.owner = owner
        self.loop = loop
        self.process = process
        self.conn = conn
        # The same socket, for sends that must not block (the pipe is a socket pair).
        self.sock = socket.socket(fileno=os.dup(conn.fileno()))
        self.outbox: queue.SimpleQueue[ToEngine | bytes | None] = queue.SimpleQueue()
        self.queued = 0  # messages handed to the writer thread and not written yet
        self.lock = threading.Lock()
        self.alive = True
        self.exit_reason = "the engine process exited"
        self.ready: asyncio.Future[EngineReady] = loop.create_future()
        self.writer = threading.Thread(target=self._write, name="engine-writer", daemon=True)

    def start(self) -> None:
        self.loop.add_reader(self.conn.fileno(), self._read)
        # uvloop makes a polled descriptor non-blocking; the pipe's messages must be
        # read and written whole (a partial write would cut the stream).
        os.set_blocking(self.conn.fileno(), True)
        self.writer.start()

    def send(self, message: ToEngine) -> None:
        """Sends `message` from the event loop when the pipe takes all of it at once
        (the usual case: waking the writer thread would cost more than the write).
        Large messages, the rest of a partial write and every message behind them go
        through the writer thread, in order."""
        if not self.alive:
            return
        if _payload_bytes(message) > DIRECT_SEND_BYTES:
            item: ToEngine | bytes = message  # pickled by the writer thread
        else:
            data = ForkingPickler.dumps(message)
            item = struct.pack("!i", len(data)) + data  # multiprocessing's framing
        with self.lock:
            if not self.queued and isinstance(item, bytes):
                try:
                    sent = self.sock.send(item, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    return  # the worker is gone: the reader reports it
                if sent == len(item):
                    return
                item = item[sent:]
            self.queued += 1
        self.outbox.put(item)

    def _write(self) -> None:
        while True:
            item = self.outbox.get()
            if item is None:
                return
            try:
                if isinstance(item, bytes):
                    self.sock.sendall(item)
                else:
                    self.conn.send(item)
            except (OSError, ValueError, EOFError):
                return
            with self.lock:
                self.queued -= 1

    def _read(self) -> None:
        """Runs on the event loop whenever the pipe is readable. The worker writes each
        message in one go from its main thread, so `recv` never waits long on a
        message that is only partly written."""
        while self.alive and self.conn.poll():
            try:
                message: FromEngine = self.conn.recv()
            except (EOFError, OSError):
                self.owner.on_exit(self, self.exit_reason)
                return
            except Exception as exc:  # a message that does not unpickle
                self.owner.on_exit(self, f"bad message from the engine: {exc}")
                return
            if isinstance(message, StepOutputs):
                self.owner.on_step(self, message)
            elif isinstance(message, EngineReady):
                self.resolve(message, None)
            elif isinstance(message, EngineFatal):
                self.exit_reason = message.message
                self.resolve(None, self.exit_reason)

    def resolve(self, ready: EngineReady | None, error: str | None) -> None:
        """Settles `ready`: the engine's EngineReady, or the error it failed with."""
        if self.ready.done():
            return
        if ready is not None:
            self.ready.set_result(ready)
        else:
            self.ready.set_exception(RuntimeError(error or self.exit_reason))

    def close(self) -> None:
        """Stops reading and writing; on the event loop only."""
        if not self.alive:
            return
        self.alive = False
        self.loop.remove_reader(self.conn.fileno())
        self.outbox.put(None)
        with contextlib.suppress(OSError):
            self.conn.close()
        self.sock.close()
