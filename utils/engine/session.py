"""One incarnation of the engine process: the process, its pipe, and the thread that
writes what the event loop cannot write at once.

- requests and aborts are written from the event loop when the pipe takes them
  whole at once; large ones (images and videos over 1 MiB), and whatever a full pipe
  holds back, go through a writer thread that pickles and waits for the pipe off the
  event loop;
- the event loop reads the pipe itself (`add_reader`), without ever waiting: it takes
  what the socket holds (`MSG_DONTWAIT`), decodes multiprocessing's framing into
  messages, and keeps a message cut short (a worker stopped half-way through writing
  it) until the rest arrives. The worker side is a plain `Connection`.

A session settles its start-up from `EngineReady` / `EngineFatal` and hands every other
message to its owner, the process's supervisor (utils/engine/supervisor.py), which
passes on the chat engine's `StepOutputs` (utils/engine/client.py) or the speech
engine's transcripts (utils/engine/asr_client.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import socket
import struct
import threading
import time
from multiprocessing.reduction import ForkingPickler
from typing import Any, Protocol, TypeVar

from utils.engine.messages import (
    AddRequest,
    EngineFatal,
    EngineReady,
)
from utils.engine.process import EngineProcess

# Messages up to this size are pickled and sent from the event loop (a request with
# a few images); larger ones are pickled and sent by the writer thread.
DIRECT_SEND_BYTES = 1 << 20

# What one read callback takes from the socket at most before the event loop runs
# something else (the rest is read on the next callback).
READ_CHUNK_BYTES = 1 << 18
READS_PER_CALLBACK = 16
# multiprocessing's framing: a 4-byte big-endian signed length, then the pickle; a
# length of -1 means an 8-byte unsigned length follows (messages over 2 GiB).
_HEADER = struct.Struct("!i")
_LONG_HEADER = struct.Struct("!Q")


class FrameError(ValueError):
    """Bytes on the pipe that are not multiprocessing's framing."""


class FrameDecoder:
    """Splits the byte stream of a `multiprocessing` Connection into its messages'
    pickles; bytes of a message not complete yet stay in the buffer."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self.buffer
        buffer += data
        frames: list[bytes] = []
        start = 0
        while len(buffer) - start >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer, start)
            header = _HEADER.size
            if size == -1:
                if len(buffer) - start < header + _LONG_HEADER.size:
                    break
                (size,) = _LONG_HEADER.unpack_from(buffer, start + header)
                header += _LONG_HEADER.size
            elif size < 0:
                raise FrameError(f"bad message length {size}")
            end = start + header + size
            if len(buffer) < end:
                break
            frames.append(bytes(buffer[start + header : end]))
            start = end
        if start:
            del buffer[:start]
        return frames

    @property
    def partial(self) -> int:
        """Bytes of a message not complete yet."""
        return len(self.buffer)


OutputT = TypeVar("OutputT", contravariant=True)


class SessionOwner(Protocol[OutputT]):
    """What a session reports to (the EngineSupervisor of its process)."""

    def on_step(self, session: Session, outputs: OutputT) -> None: ...

    def on_exit(self, session: Session, reason: str) -> None: ...


def _payload_bytes(message: object) -> int:
    """Bytes of the images, videos or audio in a message (nothing else in one is large)."""
    if isinstance(message, AddRequest):
        request = message.request
        return sum(a.nbytes for a in request.images) + sum(a.nbytes for a in request.videos)
    return int(getattr(message, "payload_bytes", 0))


class Session:
    """One incarnation of the worker process, its pipe and the thread that writes to it."""

    def __init__(
        self,
        owner: SessionOwner[Any],
        loop: asyncio.AbstractEventLoop,
        process: EngineProcess,
        conn: Any,
    ) -> None:
        self.owner = owner
        self.loop = loop
        self.process = process
        self.conn = conn
        # The same socket (the pipe is a socket pair), for the event loop's reads and
        # sends, which pass MSG_DONTWAIT and so never wait whatever the descriptor's
        # mode; the writer thread's sendall needs it blocking (see start).
        self.sock = socket.socket(fileno=os.dup(conn.fileno()))
        self.frames = FrameDecoder()
        self.last_message = time.monotonic()  # when a whole message last arrived
        self.outbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.queued = 0  # messages handed to the writer thread and not written yet
        self.lock = threading.Lock()
        self.alive = True
        self.exit_reason = "the engine process exited"
        self.ready: asyncio.Future[EngineReady] = loop.create_future()
        self.writer = threading.Thread(target=self._write, name="engine-writer", daemon=True)

    def start(self) -> None:
        self.loop.add_reader(self.conn.fileno(), self._read)
        # uvloop makes a polled descriptor non-blocking; the writer thread's sends must
        # be written whole (a partial write would cut the stream), so the descriptor is
        # made blocking again. The event loop's reads and sends pass MSG_DONTWAIT.
        os.set_blocking(self.conn.fileno(), True)
        self.writer.start()

    def send(self, message: object) -> None:
        """Sends `message` from the event loop when the pipe takes all of it at once
        (the usual case: waking the writer thread would cost more than the write).
        Large messages, the rest of a partial write and every message behind them go
        through the writer thread, in order."""
        if not self.alive:
            return
        if _payload_bytes(message) > DIRECT_SEND_BYTES:
            item: object = message  # pickled by the writer thread
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
        """Runs on the event loop whenever the pipe is readable, and never waits: it
        takes what the socket holds and handles every message that is complete. A
        message the worker stopped writing half-way stays in the buffer (the
        engine watchdog in utils/engine/client.py deals with such a worker)."""
        for _ in range(READS_PER_CALLBACK):
            if not self.alive:
                return
            try:
                data = self.sock.recv(READ_CHUNK_BYTES, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.owner.on_exit(self, self.exit_reason)
                return
            if not data:  # the worker closed its end (or died)
                self.owner.on_exit(self, self.exit_reason)
                return
            try:
                frames = self.frames.feed(data)
            except FrameError as exc:
                self.owner.on_exit(self, f"bad message from the engine: {exc}")
                return
            for frame in frames:
                if not self.alive:
                    return
                try:
                    message: object = ForkingPickler.loads(frame)
                except Exception as exc:  # a message that does not unpickle
                    self.owner.on_exit(self, f"bad message from the engine: {exc}")
                    return
                self._handle(message)
            if len(data) < READ_CHUNK_BYTES:
                return  # the socket is (most likely) empty: no need to ask again

    def _handle(self, message: object) -> None:
        self.last_message = time.monotonic()
        if isinstance(message, EngineReady):
            self.resolve(message, None)
        elif isinstance(message, EngineFatal):
            self.exit_reason = message.message
            self.resolve(None, self.exit_reason)
        else:  # the engine's output: StepOutputs, or a speech engine's transcript
            self.owner.on_step(self, message)

    def resolve(self, ready: EngineReady | None, error: str | None) -> None:
        """Settles `ready`: the engine's EngineReady, or the error it failed with."""
        if self.ready.done():
            return
        if ready is not None:
            self.ready.set_result(ready)
        else:
            self.ready.set_exception(RuntimeError(error or self.exit_reason))

    def reap(self, timeout_s: float) -> None:
        """Waits for the process to end, then terminates and at last kills it (blocking:
        call it in a thread)."""
        process = self.process
        process.join(timeout_s)
        if process.is_alive():
            process.terminate()
            process.join(5)
        if process.is_alive():
            process.kill()
            process.join(5)

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
