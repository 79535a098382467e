#!/usr/bin/env python
"""Soak test: mixed requests against a server on this machine.

Good and bad requests, streamed or not, some abandoned mid-way (client
disconnects), from several concurrent clients, bounded in count and in time.
It reports the status codes, every server error (5xx or a broken connection
the client did not cause) and the resident memory of the server process and
its engine worker over the run, in rounds: memory must stop growing.

    scripts/soak.py                          # starts a server with the tiny model
    scripts/soak.py --url http://127.0.0.1:8000 [--api-key KEY]
    scripts/soak.py --duration 1800 --warm-up 600   # timed mode

Only loopback URLs are accepted. Exit status 0 when there was no server error,
the server still answers, no request is left running, and resident memory
of the server and of its engine process each grew by less than --max-growth-mb
over the second half of the run.

Timed mode (`--duration`) sends requests for that many seconds, samples the
resident memory and open file descriptors of the server and of its engine process
(pids from /status) every `--sample-every` seconds, and at the end prints the
slope of each after `--warm-up` seconds, the requests by kind, the server errors
on valid requests and whether every hostile request (the `bad-*` kinds) got a
4xx. It passes when there was no server error on a valid request, every hostile
request got a 4xx, each process's memory grew by less than `--max-growth-pct`
after the warm-up and its descriptors by less than `--max-fd-growth`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


# --- payloads -------------------------------------------------------------------


def _png(width: int, height: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _png_bomb(side: int = 30_000) -> str:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * (side + 1) * 32, 9)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _mp4(frames: int = 12, width: int = 64, height: int = 48) -> str:
    """A small h264 video (a bar moving over noise) as a data URL, written with PyAV."""
    import av

    rng = np.random.default_rng(5)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as output:
        stream = output.add_stream("h264", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for k in range(frames):
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            pixels[:, (k * 4) % width : (k * 4) % width + 4] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                output.mux(packet)
        for packet in stream.encode():
            output.mux(packet)
    return "data:video/mp4;base64," + base64.b64encode(buffer.getvalue()).decode()


def _user(*parts: dict, text: str = "Describe this.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


@dataclass
class Outcome:
    kind: str
    status: int | str  # HTTP status, "disconnect" (ours), or an error name
    seconds: float


@dataclass
class Stats:
    outcomes: list[Outcome] = field(default_factory=list)

    def add(self, kind: str, status: int | str, started: float) -> None:
        self.outcomes.append(Outcome(kind, status, time.monotonic() - started))

    @property
    def server_errors(self) -> list[Outcome]:
        return [
            o
            for o in self.outcomes
            if (isinstance(o.status, int) and o.status >= 500)
            or (isinstance(o.status, str) and o.status != "disconnect")
        ]


class Scenario:
    """One kind of request; `run` returns the HTTP status (or "disconnect")."""

    def __init__(self, name: str, weight: int, run: Callable[[httpx.AsyncClient], Awaitable]):
        self.name, self.weight, self.run = name, weight, run


async def run_scenario(scenario: Scenario, client: httpx.AsyncClient, stats: Stats) -> None:
    """Runs one request of `scenario` and records its outcome (an exception's name when
    it raised: a malformed answer counts as a server error)."""
    started = time.monotonic()
    try:
        status: int | str = await scenario.run(client)
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    except Exception as exc:
        status = f"{type(exc).__name__}: {exc}"[:120]
    stats.add(scenario.name, status, started)


def scenarios(max_tokens: int, max_context: int) -> list[Scenario]:
    small = [_png(48, 40, k) for k in range(6)]
    medium = _png(320, 240, 99)
    bomb = _png_bomb()
    try:
        video = _mp4()
    except ImportError:  # PyAV is a test dependency
        video = None

    def chat(messages: list[dict], **extra: object) -> dict:
        return {
            "messages": messages,
            "max_completion_tokens": max_tokens,
            "temperature": 0.7,
            **extra,
        }

    async def post(client: httpx.AsyncClient, body: object) -> int | str:
        response = await client.post("/v1/chat/completions", json=body)
        if 400 <= response.status_code < 500 and "message" not in response.json().get("error", {}):
            return "error-body-not-openai-shaped"
        return response.status_code

    def own_client(client: httpx.AsyncClient) -> httpx.AsyncClient:
        """A client of its own for a request given up mid-way: a cancelled request can
        leave its connection counted as busy in the shared pool, which a long run would
        then exhaust (the client, not the server, would stall)."""
        return httpx.AsyncClient(
            base_url=client.base_url, headers=client.headers, timeout=client.timeout
        )

    async def stream(
        client: httpx.AsyncClient, body: dict, *, leave_after: int | None
    ) -> int | str:
        if leave_after is not None:
            async with own_client(client) as own:
                return await _stream(own, body, leave_after=leave_after)
        return await _stream(client, body, leave_after=None)

    async def _stream(
        client: httpx.AsyncClient, body: dict, *, leave_after: int | None
    ) -> int | str:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return response.status_code
            chunks = 0
            done = False
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    chunks += 1
                    done = line == "data: [DONE]"
                    if leave_after is not None and chunks >= leave_after:
                        return "disconnect"  # leaving the block closes the connection
            if not done:
                return "stream-without-done"
            return 200

    async def abandon(client: httpx.AsyncClient, body: dict) -> int | str:
        async with own_client(client) as own:
            try:
                return await asyncio.wait_for(post(own, body), random.uniform(0.01, 0.3))
            except asyncio.TimeoutError:
                return "disconnect"

    async def raw(client: httpx.AsyncClient, content: bytes) -> int:
        response = await client.post(
            "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"}
        )
        return response.status_code

    async def get(client: httpx.AsyncClient, path: str) -> int:
        return (await client.get(path)).status_code

    img = lambda: _image(random.choice(small))  # noqa: E731
    videos = []
    if video is not None:
        clip = {"type": "video_url", "video_url": {"url": video}}
        videos = [
            Scenario("video-url", 3, lambda c: post(c, chat(_user(clip)))),
            Scenario(
                "video-url-stream",
                2,
                lambda c: stream(c, chat(_user(clip, img()), stream=True), leave_after=None),
            ),
            Scenario(
                "bad-video",
                1,
                lambda c: post(
                    c,
                    chat(
                        _user(
                            {
                                "type": "video_url",
                                "video_url": {"url": "data:video/mp4;base64,AAAA" + "A" * 400},
                            }
                        )
                    ),
                ),
            ),
        ]
    return [
        *videos,
        Scenario("text", 8, lambda c: post(c, chat([{"role": "user", "content": "Hello!"}]))),
        Scenario("image", 10, lambda c: post(c, chat(_user(img())))),
        Scenario("image-medium", 3, lambda c: post(c, chat(_user(_image(medium))))),
        Scenario("multi-image", 4, lambda c: post(c, chat(_user(img(), img(), img())))),
        Scenario(
            "video-frames",
            3,
            lambda c: post(c, chat(_user({"type": "video", "video": random.sample(small, 4)}))),
        ),
        Scenario(
            "conversation",
            3,
            lambda c: post(
                c,
                chat(
                    [
                        *_user(img(), text="What is here?"),
                        {"role": "assistant", "content": "A pattern."},
                        {"role": "user", "content": "And the colours?"},
                    ]
                ),
            ),
        ),
        Scenario(
            "stream",
            10,
            lambda c: stream(
                c,
                chat(_user(img()), stream=True, stream_options={"include_usage": True}),
                leave_after=None,
            ),
        ),
        Scenario(
            "stream-disconnect",
            8,
            lambda c: stream(c, chat(_user(img()), stream=True), leave_after=random.randint(1, 3)),
        ),
        Scenario("abandoned", 6, lambda c: abandon(c, chat(_user(img())))),
        Scenario("n=2", 2, lambda c: post(c, chat(_user(img()), n=2))),
        Scenario("bad-json", 3, lambda c: raw(c, b'{"messages": [')),
        Scenario("bad-empty", 2, lambda c: post(c, chat([]))),
        Scenario("bad-model", 2, lambda c: post(c, {**chat(_user(img())), "model": "nope"})),
        Scenario(
            "bad-role", 2, lambda c: post(c, {"messages": [{"role": "wizard", "content": "x"}]})
        ),
        Scenario(
            "bad-base64",
            3,
            lambda c: post(c, chat(_user(_image("data:image/png;base64,!!notbase64!!")))),
        ),
        Scenario(
            "bad-not-an-image",
            2,
            lambda c: post(
                c,
                chat(
                    _user(_image("data:image/png;base64," + base64.b64encode(b"x" * 99).decode()))
                ),
            ),
        ),
        Scenario(
            "bad-ssrf",
            3,
            lambda c: post(
                c,
                chat(
                    _user(
                        _image(
                            random.choice(
                                [
                                    "http://127.0.0.1:1/a.png",
                                    "http://169.254.169.254/latest/meta-data/",
                                    "http://10.0.0.1/a.png",
                                    "http://[::ffff:127.0.0.1]/a.png",
                                    "file:///etc/passwd",
                                ]
                            )
                        )
                    )
                ),
            ),
        ),
        Scenario("bad-bomb", 2, lambda c: post(c, chat(_user(_image(bomb))))),
        Scenario("bad-too-long", 2, lambda c: post(c, chat(_user(text=" 7" * (max_context + 16))))),
        Scenario("bad-params", 2, lambda c: post(c, chat(_user(img()), temperature="hot"))),
        Scenario("health", 3, lambda c: get(c, "/health")),
        Scenario("metrics", 1, lambda c: get(c, "/metrics")),
        Scenario("models", 1, lambda c: get(c, "/v1/models")),
    ]


# --- memory -------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    return out


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory field of /proc/<pid>/status in MB: VmRSS, or RssAnon (the heap and
    other private memory, without mapped files such as the model and libraries)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def memory(pid: int) -> tuple[float, float]:
    """RSS in MB of the server process and of its child processes (the engine)."""
    return _rss_mb(pid), sum(_rss_mb(c) for c in _children(pid))


# --- server -------------------------------------------------------------------------


def start_server() -> tuple[subprocess.Popen, str, Path]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "VLM_HOST": "127.0.0.1",
        "VLM_PORT": str(port),
        "VLM_LOG_LEVEL": "warning",
    }
    env.setdefault("VLM_MODEL_NAME", "embedded/tiny-qwen2-vl")
    env.setdefault("VLM_MODEL_CACHE_DIR", str(ROOT / ".cache" / "test-models"))
    env.setdefault("VLM_COMPRESSION_GROUP_SIZE", "16")
    log = Path(tempfile.mkstemp(prefix="soak-server-", suffix=".log")[1])
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py")],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return process, f"http://127.0.0.1:{port}", log


async def wait_ready(
    client: httpx.AsyncClient, timeout_s: float, process: subprocess.Popen | None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit("soak: the server exited while starting")
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get("/ready")).status_code == 200:
                return
        await asyncio.sleep(0.5)
    raise SystemExit(f"soak: the server was not ready after {timeout_s:.0f} s")


# --- run ------------------------------------------------------------------------------


async def run_round(
    client: httpx.AsyncClient,
    plan: list[Scenario],
    concurrency: int,
    deadline: float,
    stats: Stats,
) -> None:
    queue: asyncio.Queue[Scenario] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)

    async def worker() -> None:
        while not queue.empty() and time.monotonic() < deadline:
            await run_scenario(queue.get_nowait(), client, stats)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (t, value) points (0 for fewer than two)."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (v - mv) for t, v in points) / var if var else 0.0


@dataclass
class Sample:
    t: float
    server_rss: float
    engine_rss: float
    engine_anon: float
    server_fds: int
    engine_fds: int
    engine_pid: int | None


async def sample(client: httpx.AsyncClient, pid: int, started: float) -> Sample:
    engine_pid = None
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        engine_pid = (await client.get("/status")).json()["engine_pid"]
    return Sample(
        time.monotonic() - started,
        _rss_mb(pid),
        _rss_mb(engine_pid) if engine_pid else 0.0,
        _rss_mb(engine_pid, "RssAnon") if engine_pid else 0.0,
        _fds(pid),
        _fds(engine_pid) if engine_pid else 0,
        engine_pid,
    )


async def run_timed(
    client: httpx.AsyncClient,
    kinds: list[Scenario],
    concurrency: int,
    duration: float,
    every: float,
    pid: int,
    stats: Stats,
) -> list[Sample]:
    """Sends random requests from `concurrency` clients for `duration` seconds and
    samples memory and descriptors every `every` seconds."""
    started = time.monotonic()
    deadline = started + duration
    weights = [k.weight for k in kinds]
    samples = [await sample(client, pid, started)]
    print("  elapsed_s  requests  server_rss_mb  engine_rss_mb  server_fds  engine_fds  5xx")

    def show(s: Sample) -> None:
        print(
            f"  {s.t:>9.0f}  {len(stats.outcomes):>8}  {s.server_rss:>13.1f}  "
            f"{s.engine_rss:>13.1f}  {s.server_fds:>10}  {s.engine_fds:>10}  "
            f"{len(stats.server_errors):>3}",
            flush=True,
        )

    show(samples[0])

    async def worker() -> None:
        while time.monotonic() < deadline:
            await run_scenario(random.choices(kinds, weights=weights)[0], client, stats)

    async def sampler() -> None:
        while time.monotonic() < deadline:
            await asyncio.sleep(min(every, max(0.0, deadline - time.monotonic())))
            samples.append(await sample(client, pid, started))
            show(samples[-1])

    await asyncio.gather(sampler(), *(worker() for _ in range(concurrency)))
    return samples


def report_timed(samples: list[Sample], warm_up: float) -> dict[str, tuple[float, float]]:
    """Prints the slope of each series after the warm-up; returns {name: (growth, base)}
    with the growth over that window from the fitted line."""
    window = [s for s in samples if s.t >= warm_up] or samples[-2:]
    span = window[-1].t - window[0].t if len(window) > 1 else 0.0
    print(f"  after the warm-up ({warm_up:.0f} s): {len(window)} samples over {span / 60:.1f} min")
    out: dict[str, tuple[float, float]] = {}
    for name, unit, get in (
        ("server RSS", "MB", lambda s: s.server_rss),
        ("engine RSS", "MB", lambda s: s.engine_rss),
        ("engine anon", "MB", lambda s: s.engine_anon),
        ("server fds", "", lambda s: float(s.server_fds)),
        ("engine fds", "", lambda s: float(s.engine_fds)),
    ):
        values = [get(s) for s in window]
        per_s = slope([(s.t, get(s)) for s in window])
        growth = per_s * span
        base = values[0] if values else 0.0
        pct = 100 * growth / base if base else 0.0
        out[name] = (growth, base)
        print(
            f"    {name:<10}  first {values[0]:>8.1f}{unit}  last {values[-1]:>8.1f}{unit}  "
            f"min {min(values):>8.1f}  max {max(values):>8.1f}  slope {per_s * 60:+.3f}{unit}/min"
            f"  fitted growth {growth:+.1f}{unit} ({pct:+.2f}%)"
        )
    pids = {s.engine_pid for s in samples if s.engine_pid}
    print(f"    engine pids seen: {len(pids)}")
    return out


async def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="base URL of a running server (loopback only)")
    parser.add_argument("--api-key", default=os.environ.get("VLM_API_KEY"))
    parser.add_argument("--requests", type=int, default=400, help="total requests (default 400)")
    parser.add_argument("--rounds", type=int, default=4, help="memory is sampled after each round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8, help="output tokens per request")
    parser.add_argument("--time-limit", type=float, default=900, help="seconds for the whole run")
    parser.add_argument(
        "--max-growth-mb",
        type=float,
        default=16.0,
        help="allowed RSS growth of each process over the second half of the run",
    )
    parser.add_argument(
        "--duration", type=float, help="timed mode: send requests for this many seconds"
    )
    parser.add_argument(
        "--warm-up", type=float, default=600, help="timed mode: seconds before slopes count"
    )
    parser.add_argument(
        "--sample-every", type=float, default=10, help="timed mode: seconds between samples"
    )
    parser.add_argument(
        "--max-growth-pct",
        type=float,
        default=5.0,
        help="timed mode: allowed RSS growth of each process after the warm-up, in percent",
    )
    parser.add_argument(
        "--max-fd-growth",
        type=float,
        default=2.0,
        help="timed mode: allowed growth of open descriptors after the warm-up (fitted)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", help="comma-separated request kinds to send (default: all)")
    args = parser.parse_args()
    random.seed(args.seed)

    process = log = None
    if args.url:
        base = args.url.rstrip("/")
        if urlsplit(base).hostname not in {h.strip("[]") for h in LOOPBACK}:
            raise SystemExit("soak: only loopback servers (127.0.0.1, ::1, localhost)")
    else:
        process, base, log = start_server()
        print(f"soak: started server pid {process.pid} on {base} (log: {log})")

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency * 2)
    timeout = httpx.Timeout(120.0, connect=10.0)
    try:
        async with httpx.AsyncClient(
            base_url=base, headers=headers, limits=limits, timeout=timeout
        ) as client:
            await wait_ready(client, 900, process)
            status = (await client.get("/status")).json()
            pid = int(status["pid"])
            max_context = int(status.get("max_context") or 4096)
            print(f"soak: server pid {pid}, model {status['model']}, context {max_context} tokens")

            kinds = scenarios(args.max_tokens, max_context)
            if args.only:
                wanted = set(args.only.split(","))
                unknown = wanted - {k.name for k in kinds}
                if unknown:
                    raise SystemExit(f"soak: unknown kinds {sorted(unknown)}")
                kinds = [k for k in kinds if k.name in wanted]
            weights = [s.weight for s in kinds]
            plan = random.choices(kinds, weights=weights, k=args.requests)
            # Every kind at least once.
            plan[: len(kinds)] = kinds
            random.shuffle(plan)

            stats = Stats()
            started = time.monotonic()
            samples: list[tuple[int, float, float]] = []
            timed: list[Sample] = []
            if args.duration:
                print(
                    f"soak: timed, {args.duration:.0f} s, {args.concurrency} clients, "
                    f"{len(kinds)} kinds of request"
                )
                timed = await run_timed(
                    client, kinds, args.concurrency, args.duration, args.sample_every, pid, stats
                )
            else:
                deadline = started + args.time_limit
                samples = [(0, *memory(pid))]
                print(
                    f"soak: {args.requests} requests, {args.rounds} rounds, "
                    f"{args.concurrency} clients"
                )
                print("  round  requests  elapsed_s  server_rss_mb  engine_rss_mb  5xx")
                print(
                    f"  {0:>5}  {0:>8}  {0.0:>9.1f}  {samples[0][1]:>13.1f}  {samples[0][2]:>13.1f}"
                )
                per_round = -(-len(plan) // args.rounds)
                for r in range(args.rounds):
                    await run_round(
                        client,
                        plan[r * per_round : (r + 1) * per_round],
                        args.concurrency,
                        deadline,
                        stats,
                    )
                    await asyncio.sleep(1.0)  # let abandoned requests be reaped
                    samples.append((len(stats.outcomes), *memory(pid)))
                    print(
                        f"  {r + 1:>5}  {len(stats.outcomes):>8}"
                        f"  {time.monotonic() - started:>9.1f}"
                        f"  {samples[-1][1]:>13.1f}  {samples[-1][2]:>13.1f}"
                        f"  {len(stats.server_errors):>3}"
                    )
                    if time.monotonic() >= deadline:
                        print("soak: time limit reached")
                        break

            # Every disconnected request must have been removed from the engine.
            settled = False
            for _ in range(60):
                queue = (await client.get("/queue")).json()
                if queue["running"] == 0 and queue["queue_depth"] == 0:
                    settled = True
                    break
                await asyncio.sleep(0.5)
            alive = (await client.get("/health")).status_code == 200
            ready = (await client.get("/ready")).status_code == 200
            metrics = (await client.get("/metrics")).text
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()

    elapsed = time.monotonic() - started
    codes = Counter(str(o.status) for o in stats.outcomes)
    by_kind: dict[str, Counter] = {}
    for o in stats.outcomes:
        by_kind.setdefault(o.kind, Counter())[str(o.status)] += 1
    print(f"\nsoak: {len(stats.outcomes)} requests in {elapsed:.1f} s")
    print("  status counts: " + ", ".join(f"{k}: {v}" for k, v in sorted(codes.items())))
    for kind, counter in sorted(by_kind.items()):
        print(f"    {kind:<18} " + ", ".join(f"{k}: {v}" for k, v in sorted(counter.items())))
    errors = stats.server_errors
    print(f"  server errors (5xx or broken connections): {len(errors)}")
    for o in errors[:20]:
        print(f"    {o.kind}: {o.status}")
    valid_errors = [o for o in errors if not o.kind.startswith("bad-")]
    hostile = [o for o in stats.outcomes if o.kind.startswith("bad-")]
    not_4xx = [o for o in hostile if not (isinstance(o.status, int) and 400 <= o.status < 500)]
    print(f"  server errors on valid requests: {len(valid_errors)}")
    print(f"  hostile requests: {len(hostile)}, every one answered 4xx: {not not_4xx}")
    for o in not_4xx[:20]:
        print(f"    {o.kind}: {o.status}")
    grew: list[str] = []
    if timed:
        growth = report_timed(timed, args.warm_up)
        for name in ("server RSS", "engine RSS"):
            mb, base = growth[name]
            if base and 100 * mb / base > args.max_growth_pct:
                grew.append(name)
        for name in ("server fds", "engine fds"):
            if growth[name][0] > args.max_fd_growth:
                grew.append(name)
    else:
        # Memory must have levelled off: compare the middle of the run with its end,
        # for each process (the first rounds fill caches and pools and are excused).
        middle = samples[len(samples) // 2]
        change = {"server": samples[-1][1] - middle[1], "engine": samples[-1][2] - middle[2]}
        print(
            f"  RSS MB   start  after round 1  middle (after {middle[0]} requests)  end  "
            f"growth in the second half"
        )
        for k, name in ((1, "server"), (2, "engine")):
            after_first = samples[1][k] if len(samples) > 1 else samples[-1][k]
            print(
                f"  {name:<7} {samples[0][k]:>6.1f}  {after_first:>13.1f}  {middle[k]:>33.1f}  "
                f"{samples[-1][k]:>5.1f}  {change[name]:+.1f}"
            )
        grew = [f"{name} memory" for name, mb in change.items() if mb > args.max_growth_mb]
    for line in metrics.splitlines():
        if line.startswith(
            (
                "vlm_generations_served_total",
                "vlm_completion_tokens_total",
                "vlm_engine_restarts_total",
                "vlm_engine_stalls_total",
            )
        ):
            print(f"  {line}")
    print(f"  requests settled: {settled}, alive: {alive}, ready: {ready}")
    if log is not None:
        text = log.read_text(errors="replace")
        tracebacks = text.count("Traceback")
        print(f"  server log: {log} ({tracebacks} tracebacks)")
    problems = [
        *(["server errors"] if errors else []),
        *(["requests left running"] if not settled else []),
        *(["server not answering"] if not (alive and ready) else []),
        *(["hostile requests not answered 4xx"] if not_4xx else []),
        *[f"{name} still growing" for name in grew],
    ]
    ok = not problems
    print("soak: PASS" if ok else "soak: FAIL (" + ", ".join(problems) + ")")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
