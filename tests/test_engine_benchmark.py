"""scripts/benchmark.py against the live server and the raw pipelines (tiny model)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from scripts.benchmark import Sample, _SSEClient
from scripts.benchmark import main as benchmark


def test_benchmark_server_mode(live_server, tmp_path: Path) -> None:
    base_url = live_server()
    out = tmp_path / "server.json"
    args = ["--url", base_url, "-c", "2", "-n", "4", "--max-tokens", "8", "--image-size", "64"]
    assert benchmark([*args, "--health", "--save", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["errors"] == 0
    assert result["output_tokens"] == 4 * 8  # min_tokens + ignore_eos fix the length
    assert result["health_probes"] > 0
    assert result["ttft_ms_p50"] > 0


def test_benchmark_raw_modes(qwen2vl_ir: Path, tmp_path: Path) -> None:
    for concurrency in ("1", "2"):
        out = tmp_path / f"raw{concurrency}.json"
        args = ["--raw", str(qwen2vl_ir), "-c", concurrency, "-n", "3", "--max-tokens", "6"]
        assert benchmark([*args, "--image-size", "64", "--save", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["output_tokens"] == 3 * 6
        assert result["errors"] == 0


@pytest.mark.parametrize("image_size", ["64", "0"])  # 0: text only
def test_benchmark_paired_mode(
    live_server, qwen2vl_ir: Path, tmp_path: Path, image_size: str
) -> None:
    base_url = live_server()
    out = tmp_path / "paired.json"
    args = ["--url", base_url, "--raw", str(qwen2vl_ir), "--paired", "--rounds", "3"]
    args += ["-c", "2", "-n", "2", "--max-tokens", "5", "--image-size", image_size]
    assert benchmark([*args, "--save", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["rounds"]) == 3
    assert result["output_tokens"] == 3 * 2 * 5  # the server side, every round
    assert result["raw"]["output_tokens"] == 3 * 2 * 5
    assert result["errors"] == result["raw"]["errors"] == 0
    for round_ in result["rounds"]:
        ratio = round_["server"]["aggregate_tok_s"] / round_["raw"]["aggregate_tok_s"]
        assert abs(round_["ratios"]["aggregate_tok_s"] - ratio) < 1e-9
    ratios = sorted(r["ratios"]["aggregate_tok_s"] for r in result["rounds"])
    assert result["median_ratios"]["aggregate_tok_s"] == ratios[1]


async def _sse_server(mode: str) -> tuple[asyncio.Server, list[int]]:
    """A server that answers every request with a two-event chunked SSE stream (a 404
    for a body that asks for one), counting the connections it accepted. After each
    answer it keeps the connection ("keep"), closes it as announced ("close") or
    closes it unannounced, as an idle connection times out ("drop")."""
    accepted: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        close = b"Connection: close\r\n" if mode == "close" else b""
        try:
            while request := await reader.readuntil(b"\r\n\r\n"):
                length = int(request.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                if b"404" in await reader.readexactly(length):
                    body = b'{"error": "nope"}'
                    head = b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n" % len(body)
                    writer.write(head + close + b"\r\n" + body)
                else:
                    events = [
                        b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n',
                        b'data: {"choices":[],"usage":{"completion_tokens":1}}\n\ndata: [DONE]\n\n',
                    ]
                    chunks = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)
                    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                    writer.write(head + close + b"\r\n" + chunks + b"0\r\n\r\n")
                await writer.drain()
                if mode != "keep":
                    break
        except asyncio.IncompleteReadError:  # the client closed the connection
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, accepted


@pytest.mark.parametrize("mode", ["keep", "close", "drop"])
def test_sse_client_reuses_connections_while_they_stay_open(mode: str) -> None:
    async def run() -> tuple[list[Sample], int]:
        server, accepted = await _sse_server(mode)
        port = server.sockets[0].getsockname()[1]
        client = _SSEClient(f"http://127.0.0.1:{port}/v1", {})
        async with server:
            samples = [await client.stream({"status": s}) for s in (200, 404, 200, 200)]
        return samples, len(accepted)

    samples, connections = asyncio.run(run())
    assert [s.error is None for s in samples] == [True, False, True, True]
    assert samples[1].error is not None and samples[1].error.startswith("HTTP 404")
    assert [s.tokens for s in (samples[0], samples[2], samples[3])] == [1, 1, 1]
    assert connections == (1 if mode == "keep" else 4)
