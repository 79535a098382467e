"""The pipe's framed reads: multiprocessing's framing decoded by the API process."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import struct
import subprocess
import sys
import time
import types
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import pytest

from utils.engine.messages import EngineStats, StepOutputs, TextEvent
from utils.engine.session import FrameDecoder, FrameError, Session


def test_frames_decode_like_multiprocessing_byte_by_byte() -> None:
    """The bytes a real Connection writes, fed one at a time and in odd chunks."""
    parent, child = multiprocessing.Pipe(duplex=True)
    messages = [
        StepOutputs([TextEvent(i, 0, "é" * i, i, None, 3)], [], EngineStats(1, 0, 0.5, 1, 2))
        for i in range(20)
    ]
    try:
        for message in messages:
            child.send(message)
        child.close()
        raw = b""
        while chunk := os.read(parent.fileno(), 65536):
            raw += chunk
    finally:
        parent.close()
    for step in (1, 7, len(raw)):
        decoder = FrameDecoder()
        frames: list[bytes] = []
        for start in range(0, len(raw), step):
            frames += decoder.feed(raw[start : start + step])
        assert [ForkingPickler.loads(f) for f in frames] == messages
        assert decoder.partial == 0
    # half a message stays buffered, and completes with the rest
    decoder = FrameDecoder()
    assert decoder.feed(raw[:10]) == [] and decoder.partial == 10


def test_frames_long_header_and_bad_length() -> None:
    payload = b"p" * 100
    decoder = FrameDecoder()
    long_frame = struct.pack("!i", -1) + struct.pack("!Q", len(payload)) + payload
    assert decoder.feed(long_frame[:6]) == []
    assert decoder.feed(long_frame[6:]) == [payload]
    with pytest.raises(FrameError):
        FrameDecoder().feed(struct.pack("!i", -5) + b"xx")


@pytest.mark.asyncio(loop_scope="session")
async def test_session_reads_half_a_message_without_waiting() -> None:
    """Half a message on the pipe: the read callback returns at once (the event loop
    goes on), and the message is handled when the rest arrives; EOF ends the session."""
    parent, child = multiprocessing.Pipe(duplex=True)
    steps: list[StepOutputs] = []
    exits: list[str] = []
    owner = types.SimpleNamespace(
        on_step=lambda session, outputs: steps.append(outputs),
        on_exit=lambda session, reason: (exits.append(reason), session.close()),
    )
    session = Session(owner, asyncio.get_running_loop(), process=None, conn=parent)
    session.start()
    message = StepOutputs(
        [TextEvent(1, 0, "x" * 100_000, 1, None, 3)], [], EngineStats(1, 0, 0, 0, 0)
    )
    data = bytes(ForkingPickler.dumps(message))
    frame = struct.pack("!i", len(data)) + data
    try:
        os.write(child.fileno(), frame[:5000])
        started = time.monotonic()
        for _ in range(10):
            await asyncio.sleep(0.02)  # the loop runs: the callback did not block
        assert time.monotonic() - started < 5 and not steps and not exits
        assert session.frames.partial == 5000
        os.write(child.fileno(), frame[5000:])
        for _ in range(500):
            if steps:
                break
            await asyncio.sleep(0.01)
        assert steps == [message] and session.frames.partial == 0
        child.close()
        for _ in range(500):
            if exits:
                break
            await asyncio.sleep(0.01)
        assert exits and not session.alive
    finally:
        session.close()
        child.close()


def test_an_engine_process_imports_only_what_its_entry_point_needs(tmp_path: Path) -> None:
    """A parent whose main module imports the web stack (as app.py does) starts an
    engine process: the engine holds none of it (multiprocessing's spawn would run
    the parent's main module again in the child, as __mp_main__)."""
    main = tmp_path / "main.py"
    main.write_text(
        "import json, fastapi, httpx, PIL.Image\n"
        "from utils.engine.process import EngineProcess\n"
        "from tests.fixtures.fake_engine import loaded_modules\n"
        "if __name__ == '__main__':\n"
        "    process, conn = EngineProcess.start(loaded_modules, None, 'vlm-test')\n"
        "    print(json.dumps(conn.recv()))\n"
        "    process.join(30)\n"
        "    print(process.exitcode)\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(main)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    modules_line, exit_line = done.stdout.splitlines()
    modules = set(json.loads(modules_line))
    assert "tests.fixtures.fake_engine" in modules  # found through the parent's sys.path
    assert not {name.split(".")[0] for name in modules} & {"fastapi", "httpx", "PIL", "uvicorn"}
    assert exit_line == "0"
