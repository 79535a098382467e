#!/usr/bin/env python
"""Benchmark an OpenAI-compatible chat endpoint, or the raw OpenVINO pipeline.

Server mode drives `/v1/chat/completions` with N concurrent streaming clients for a
fixed number of requests, each with a locally generated image (as a data URL) and a
fixed output length (`max_completion_tokens` plus the `min_tokens` / `ignore_eos`
extension fields), and prints TTFT, inter-token latency, per-request and aggregate
output tokens/s, prompt tokens and errors. `--health` also probes `/health` while
streams run. `--photo 1280x720` sends photo-shaped JPEGs instead of square PNGs;
`--detail` and `--pruning` set the image's `detail` and the request's `pruning_ratio`.

Raw mode (`--raw MODEL_DIR`) runs the same inputs through OpenVINO GenAI in this
process: `VLMPipeline` for one stream, `ContinuousBatchingPipeline` for several; with
`--save` and `--baseline` the two runs give the server's overhead as a ratio. The
raw pipeline is given every image at its full resolution, as a server that passes
images through would (`--pruning` reaches its GenerationConfig too).
`--paired` (with `--url` and `--raw`) alternates rounds of both on the same inputs
and reports the median of the per-round ratios, which a drifting machine moves far
less than two separate runs.

    python scripts/benchmark.py --url http://127.0.0.1:8000 -c 4 -n 8 --save server.json
    python scripts/benchmark.py --raw models/my-model -c 4 -n 8 --save raw.json
    python scripts/benchmark.py --url http://127.0.0.1:8000 -c 4 -n 8 --baseline raw.json
    python scripts/benchmark.py --url http://127.0.0.1:8000 --raw models/my-model \
        --paired --rounds 8 -c 1 -n 1
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

DEFAULT_PROMPT = "Describe this image in detail."


@dataclass
class Sample:
    start: float
    first: float | None = None  # first output text
    end: float | None = None
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None


def make_image(size: int, seed: int = 0, height: int | None = None) -> np.ndarray:
    """A smooth random-looking RGB picture (compresses like a photo, not like noise),
    `size` wide and `height` (default: `size`) high."""
    rng = np.random.default_rng(seed)
    height = size if height is None else height
    y, x = np.mgrid[0:height, 0:size].astype(np.float32) / max(size, height, 1)
    channels = [
        np.sin(x * rng.uniform(2, 9) + y * rng.uniform(2, 9) + rng.uniform(0, 6)) for _ in range(3)
    ]
    image = (np.stack(channels, axis=-1) * 0.5 + 0.5) * 255
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _encode(image: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def make_images(args: argparse.Namespace) -> list[np.ndarray]:
    """The benchmark's distinct images (`--images` of `--image-size`, or photo-shaped
    JPEGs of `--photo`, as decoded from the JPEG); none for size 0."""
    if args.photo:
        from PIL import Image

        width, height = args.photo
        photos = [_encode(make_image(width, i, height), "JPEG") for i in range(args.images)]
        return [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in photos]
    if args.image_size <= 0:
        return []
    return [make_image(args.image_size, seed=i) for i in range(args.images)]


def image_data_url(image: np.ndarray, fmt: str = "PNG") -> str:
    data = base64.b64encode(_encode(image, fmt)).decode()
    return f"data:image/{fmt.lower()};base64,{data}"


def photo_size(value: str) -> tuple[int, int]:
    width, _, height = value.lower().partition("x")
    try:
        return int(width), int(height)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {value!r}") from None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarize(samples: list[Sample], wall: float, label: str) -> dict[str, Any]:
    # (sample, first token, end) of the requests that finished
    done = [
        (s, s.first, s.end)
        for s in samples
        if s.error is None and s.first is not None and s.end is not None
    ]
    ok = [s for s, _, _ in done]
    ttft = [(first - s.start) * 1000 for s, first, _ in done]
    itl: list[float] = []
    per_request: list[float] = []
    decode_rate: list[float] = []
    for s, first, end in done:
        times = s.token_times
        itl += [(b - a) * 1000 for a, b in itertools.pairwise(times)]
        per_request.append(s.tokens / (end - s.start))
        if s.tokens > 1 and end > first:
            decode_rate.append((s.tokens - 1) / (end - first))
    total_tokens = sum(s.tokens for s in ok)
    return {
        "label": label,
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "error_examples": sorted({s.error for s in samples if s.error})[:3],
        "wall_s": wall,
        "output_tokens": total_tokens,
        "prompt_tokens_p50": percentile([float(s.prompt_tokens) for s in ok], 50),
        "ttft_ms_p50": percentile(ttft, 50),
        "ttft_ms_p95": percentile(ttft, 95),
        "itl_ms_mean": statistics.fmean(itl) if itl else float("nan"),
        "itl_ms_p50": percentile(itl, 50),
        "itl_ms_p95": percentile(itl, 95),
        "request_tok_s_mean": statistics.fmean(per_request) if per_request else float("nan"),
        "decode_tok_s_mean": statistics.fmean(decode_rate) if decode_rate else float("nan"),
        "aggregate_tok_s": total_tokens / wall if wall > 0 else float("nan"),
    }


def print_summary(result: dict[str, Any]) -> None:
    print(f"== {result['label']}")
    print(
        f"requests {result['requests']}  errors {result['errors']}  "
        f"wall {result['wall_s']:.2f} s  output tokens {result['output_tokens']}  "
        f"prompt tokens p50 {result.get('prompt_tokens_p50', float('nan')):.0f}"
    )
    for example in result.get("error_examples") or []:
        print(f"  error: {example}")
    print(f"TTFT ms          p50 {result['ttft_ms_p50']:9.1f}   p95 {result['ttft_ms_p95']:9.1f}")
    print(
        f"inter-token ms   mean {result['itl_ms_mean']:8.1f}   p50 {result['itl_ms_p50']:9.1f}"
        f"   p95 {result['itl_ms_p95']:9.1f}"
    )
    print(
        f"tokens/s         per request {result['request_tok_s_mean']:.2f} "
        f"(decode {result['decode_tok_s_mean']:.2f})   aggregate {result['aggregate_tok_s']:.2f}"
    )
    if "health_ms_p99" in result:
        print(
            f"/health ms       p50 {result['health_ms_p50']:.1f}"
            f"   p99 {result['health_ms_p99']:.1f}"
            f"   max {result['health_ms_max']:.1f}   ({result['health_probes']} probes)"
        )


# ------------------------------------------------------------------- server mode


class _Unanswered(Exception):
    """The server closed the connection without answering."""


class _SSEClient:
    """A minimal HTTP/1.1 client for streaming responses, cheap enough per chunk that
    the benchmark does not steal much CPU from the server on the same machine. Like
    the `openai` client, it keeps connections open and reuses them."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parsed = urlsplit(url)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.ssl = parsed.scheme == "https"
        self.path = parsed.path or "/"
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def stream(self, body: dict[str, Any]) -> Sample:
        sample = Sample(start=time.perf_counter())
        connection = None
        try:
            while self.idle:  # the server may have closed it meanwhile: then a new one
                connection = self.idle.pop()
                try:
                    reuse = await self._exchange(sample, *connection, body)
                    break
                except _Unanswered:
                    connection[1].close()
                    connection = None
            if connection is None:
                connection = await asyncio.open_connection(self.host, self.port, ssl=self.ssl)
                reuse = await self._exchange(sample, *connection, body)
            if reuse:
                self.idle.append(connection)
                connection = None
        except Exception as exc:
            sample.error = f"{type(exc).__name__}: {exc}"
        finally:
            if connection is not None:
                connection[1].close()
        if sample.end is None:
            sample.end = time.perf_counter()
        if sample.error is None and not sample.tokens:
            sample.tokens = len(sample.token_times)
        return sample

    async def _exchange(
        self,
        sample: Sample,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        body: dict[str, Any],
    ) -> bool:
        """Sends one request and reads its whole response; True if the connection can
        be used again."""
        payload = json.dumps(body).encode()
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            f"Accept: text/event-stream\r\n{self.headers}\r\n"
        )
        try:
            writer.write(head.encode() + payload)
            await writer.drain()
            line = await reader.readline()
        except ConnectionError:
            line = b""
        if not line:
            raise _Unanswered
        status = int(line.split()[1])
        chunked, length, reuse = False, None, True
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.lower(), value.strip().lower()
            if name == "transfer-encoding" and "chunked" in value:
                chunked = True
            elif name == "content-length":
                length = int(value)
            elif name == "connection" and value == "close":
                reuse = False
        if status != 200:
            data = await (reader.readexactly(length) if length is not None else reader.read())
            sample.error = f"HTTP {status}: {data[:200].decode(errors='replace')}"
            return reuse and length is not None
        if not chunked:  # a stream without chunks ends when the connection does
            data = await reader.read()
            for event in data.split(b"\n\n"):
                self._event(sample, event)
            return False
        buffer, done = b"", False
        while size := int((await reader.readline()).split(b";")[0], 16):
            buffer += (await reader.readexactly(size + 2))[:-2]
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if not done and self._event(sample, event):
                    sample.end = time.perf_counter()
                    done = True
        await reader.readexactly(2)  # the blank line after the last chunk
        return reuse

    @staticmethod
    def _event(sample: Sample, event: bytes) -> bool:
        """Records one SSE event; True at the end of the stream."""
        if not event.startswith(b"data: "):
            return False
        data = event[6:]
        if data == b"[DONE]":
            if not sample.tokens:
                sample.tokens = len(sample.token_times)
            return True
        if b'"content":"' in data and b'"content":""' not in data:
            now = time.perf_counter()
            if sample.first is None:
                sample.first = now
            sample.token_times.append(now)
        elif b'"usage":{' in data or b'"error"' in data:
            chunk = json.loads(data)
            if chunk.get("error"):
                sample.error = str(chunk["error"].get("message"))[:200]
                return True
            sample.tokens = int(chunk["usage"]["completion_tokens"])
            sample.prompt_tokens = int(chunk["usage"].get("prompt_tokens", 0))
        return False


async def _probe_health(client: Any, url: str, stop: asyncio.Event, out: list[float]) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        try:
            await client.get(url)
            out.append((time.perf_counter() - started) * 1000)
        except Exception:
            out.append(float("inf"))
        await asyncio.sleep(0.02)


class ServerRunner:
    """Streams the benchmark's requests to a server, `concurrency` at a time."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.base = args.url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        fmt = "JPEG" if args.photo else "PNG"
        self.urls = [image_data_url(image, fmt) for image in make_images(args)]
        self.sse = _SSEClient(f"{self.base}/v1/chat/completions", self.headers)
        self.model = args.model
        self.label = f"server {self.base} c={args.concurrency}"
        self.inputs_used = 0

    def next_input(self) -> int:
        """Index of the next request's image: rounds go on where the last one ended."""
        self.inputs_used += 1
        return self.inputs_used - 1

    async def open(self, client: Any) -> None:
        if self.model is None:
            listing = (await client.get(f"{self.base}/v1/models", headers=self.headers)).json()
            self.model = listing["data"][0]["id"]
        for _ in range(self.args.warmup):
            await self.sse.stream(self.body(self.next_input()))

    def body(self, i: int) -> dict[str, Any]:
        args = self.args
        content: list[dict[str, Any]] = []
        if self.urls:
            image: dict[str, Any] = {"url": self.urls[i % len(self.urls)]}
            if args.detail:
                image["detail"] = args.detail
            content.append({"type": "image_url", "image_url": image})
        content.append({"type": "text", "text": args.prompt})
        extra = {} if args.pruning is None else {"pruning_ratio": args.pruning}
        return {
            **extra,
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "max_completion_tokens": args.max_tokens,
            "min_tokens": args.max_tokens,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async def run(self, count: int) -> tuple[list[Sample], float]:
        pending = iter(range(count))
        samples: list[Sample] = []

        async def worker() -> None:
            for _ in pending:
                samples.append(await self.sse.stream(self.body(self.next_input())))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(self.args.concurrency)))
        return samples, time.perf_counter() - started


async def run_server(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    runner = ServerRunner(args)
    limits = httpx.Limits(max_connections=args.concurrency + 4)
    timeout = httpx.Timeout(args.timeout, connect=10)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        await runner.open(client)
        stop = asyncio.Event()
        health: list[float] = []
        probe = None
        if args.health:
            probe = asyncio.create_task(
                _probe_health(client, f"{runner.base}/health", stop, health)
            )
        samples, wall = await runner.run(args.requests)
        stop.set()
        if probe is not None:
            await probe
    result = summarize(samples, wall, runner.label)
    if health:
        result.update(
            health_probes=len(health),
            health_ms_p50=percentile(health, 50),
            health_ms_p99=percentile(health, 99),
            health_ms_max=max(health),
        )
    return result


# ---------------------------------------------------------------------- raw mode


class RawRunner:
    """The same inputs through OpenVINO GenAI in this process: `VLMPipeline` (one
    request at a time) or `ContinuousBatchingPipeline` (`concurrency` at a time)."""

    def __init__(self, args: argparse.Namespace) -> None:
        import openvino as ov
        import openvino_genai as genai

        from utils.devices import engine_properties
        from utils.engine.continuous import scheduler_config
        from utils.engine.launch import worker_config
        from utils.engine.model_config import ModelConfig
        from utils.settings import Settings

        self.args, self.genai = args, genai
        settings = Settings()
        properties = engine_properties(settings)  # VLM_OV_CONFIG, as the server passes it
        model_dir = str(args.raw)
        self.tensors = [ov.Tensor(image) for image in make_images(args)]
        tag = "<ov_genai_image_0>" if self.tensors else ""
        self.use_vlm = args.raw_pipeline == "vlm" or (
            args.raw_pipeline == "auto" and args.concurrency == 1
        )
        if self.use_vlm:
            if args.concurrency != 1:
                raise SystemExit("VLMPipeline runs one request at a time: use -c 1")
            self.pipe = genai.VLMPipeline(model_dir, settings.device, **properties)
            self.label = "raw VLMPipeline c=1"
        else:
            scheduler = scheduler_config(
                genai, worker_config(settings, Path(model_dir), ModelConfig.read(model_dir))
            )
            self.pipe = genai.ContinuousBatchingPipeline(
                model_dir, scheduler, settings.device, properties
            )
            self.label = f"raw ContinuousBatchingPipeline c={args.concurrency}"
        self.tokenizer = self.pipe.get_tokenizer()
        self.prompt = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": tag + args.prompt}], add_generation_prompt=True
        )
        self.next_id = 0
        self.inputs_used = 0
        if args.warmup:
            self.run(args.warmup if self.use_vlm else min(args.warmup, args.concurrency))
        self.inputs_used = args.warmup  # measured requests start where the server's do

    def config(self) -> Any:
        cfg = self.genai.GenerationConfig()
        cfg.max_new_tokens = self.args.max_tokens
        cfg.min_new_tokens = self.args.max_tokens
        cfg.ignore_eos = True
        cfg.do_sample = False
        cfg.apply_chat_template = False
        if self.args.pruning:
            cfg.pruning_ratio = self.args.pruning
        return cfg

    def next_inputs(self) -> list[Any]:
        """The next request's image, in the order the server side uses them."""
        self.inputs_used += 1
        return [self.tensors[(self.inputs_used - 1) % len(self.tensors)]] if self.tensors else []

    def run(self, count: int) -> tuple[list[Sample], float]:
        started = time.perf_counter()
        samples = self._vlm(count) if self.use_vlm else self._cb(count)
        return samples, time.perf_counter() - started

    def record(self, sample: Sample, first_ids: list[int], ids: list[int], now: float) -> None:
        """Counts tokens that arrived at `now`. Until the tokens so far decode to text a
        client would be sent (a server shows nothing for a special token or the first
        bytes of a multi-byte character), `first_ids` collects them; TTFT on both
        sides is the time to the first visible text."""
        sample.token_times.append(now)
        sample.tokens += len(ids)
        if sample.first is None:
            first_ids.extend(ids)
            text = self.tokenizer.decode(first_ids)
            if text and not text.endswith("\ufffd"):
                sample.first = now

    def _vlm(self, count: int) -> list[Sample]:
        genai, runner = self.genai, self

        # token ids: no detokenization per token
        class Streamer(genai.StreamerBase):  # type: ignore[name-defined]
            def __init__(self, sample: Sample) -> None:
                super().__init__()
                self.sample = sample
                self.first_ids: list[int] = []

            def write(self, token: Any) -> Any:
                ids = [token] if isinstance(token, int) else list(token)
                runner.record(self.sample, self.first_ids, ids, time.perf_counter())
                return genai.StreamingStatus.RUNNING

            def end(self) -> None:
                return None

        samples = []
        for _ in range(count):
            sample = Sample(start=time.perf_counter())
            result = self.pipe.generate(
                self.prompt,
                images=self.next_inputs(),
                generation_config=self.config(),
                streamer=Streamer(sample),
            )
            sample.end = time.perf_counter()
            sample.prompt_tokens = int(result.perf_metrics.get_num_input_tokens())
            samples.append(sample)
        return samples

    def _cb(self, count: int) -> list[Sample]:
        """Keeps `concurrency` requests in flight until `count` are done."""
        genai, pipe = self.genai, self.pipe
        pending = list(range(count))
        running: dict[int, tuple[Any, Sample]] = {}
        first_ids: dict[int, list[int]] = {}  # tokens of requests that show no text yet
        done: list[Sample] = []
        while pending or running:
            submitted = time.perf_counter()  # requests that arrive together start together
            while pending and len(running) < self.args.concurrency:
                i = pending.pop(0)
                self.next_id += 1
                handle = pipe.add_request(
                    self.next_id, self.prompt, self.next_inputs(), [], self.config()
                )
                running[i] = (handle, Sample(start=submitted))
            pipe.step()
            now = time.perf_counter()
            for i, (handle, sample) in list(running.items()):
                while handle.can_read():
                    for output in handle.read().values():
                        if output.generated_ids:
                            ids = list(output.generated_ids)
                            self.record(sample, first_ids.setdefault(i, []), ids, now)
                if handle.get_status() != genai.GenerationStatus.RUNNING:
                    sample.end = now
                    sample.prompt_tokens = int(handle.get_perf_metrics().get_num_input_tokens())
                    done.append(sample)
                    del running[i]
        return done


def run_raw(args: argparse.Namespace) -> dict[str, Any]:
    runner = RawRunner(args)
    samples, wall = runner.run(args.requests)
    return summarize(samples, wall, runner.label)


# ------------------------------------------------------------------- paired mode

PAIRED_KEYS = (
    ("aggregate_tok_s", "higher"),
    ("request_tok_s_mean", "higher"),
    ("decode_tok_s_mean", "higher"),
    ("ttft_ms_p50", "lower"),
)


def server_modes(args: argparse.Namespace) -> dict[str, argparse.Namespace]:
    """The server sides of a paired run: one per `--modes` entry (`DETAIL[:PRUNING]`,
    e.g. `low,auto,high,high:50`), else the one of `--detail`/`--pruning`."""
    if not args.modes:
        return {"server": args}
    modes: dict[str, argparse.Namespace] = {}
    for mode in args.modes.split(","):
        detail, _, pruning = mode.strip().partition(":")
        if detail not in ("low", "high", "auto"):
            raise SystemExit(f"--modes: {mode!r} is not DETAIL[:PRUNING]")
        # one server process: the first mode's warm-up warms it for all of them
        warmup = 0 if modes else args.warmup
        modes[mode.strip()] = argparse.Namespace(
            **{
                **vars(args),
                "detail": detail,
                "pruning": int(pruning) if pruning else None,
                "warmup": warmup,
            }
        )
    return modes


async def run_paired(args: argparse.Namespace) -> dict[str, Any]:
    """Rounds of the server and the raw pipeline, back to back on the same inputs.

    On a machine whose speed drifts (shared hosts, turbo, noisy neighbours), two
    separate runs minutes apart differ by more than the overhead being measured.
    Here each round runs both sides within seconds of each other, in alternating
    order (server first in even rounds, raw first in odd ones), and the ratio is
    taken per round; the median of those ratios is the result. With `--modes`, each
    round runs the server once per mode and the raw pipeline once (without pruning,
    given the full-resolution image), and every mode gets its ratios to that run.
    """
    import httpx

    servers = {name: ServerRunner(mode) for name, mode in server_modes(args).items()}
    raw_args = argparse.Namespace(**{**vars(args), "pruning": None}) if args.modes else args
    raw = await asyncio.to_thread(RawRunner, raw_args)
    rounds: list[dict[str, Any]] = []
    everything: dict[str, list[Sample]] = {name: [] for name in [*servers, "raw"]}
    walls = dict.fromkeys(everything, 0.0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout, connect=10)) as client:
        for server in servers.values():
            await server.open(client)
        for number in range(args.rounds):
            results: dict[str, dict[str, Any]] = {}
            order = [*servers, "raw"] if number % 2 == 0 else ["raw", *servers]
            for side in order:
                if side == "raw":
                    samples, wall = await asyncio.to_thread(raw.run, args.requests)
                else:
                    samples, wall = await servers[side].run(args.requests)
                everything[side] += samples
                walls[side] += wall
                results[side] = summarize(samples, wall, side)
            ratios = {
                name: {key: _ratio(results[name], results["raw"], key) for key, _ in PAIRED_KEYS}
                for name in servers
            }
            rounds.append({**results, "ratios": ratios})
            for name in servers:
                print(
                    f"round {number + 1}/{args.rounds} {name}: "
                    + "   ".join(
                        f"{key} {results[name][key]:.2f} / {results['raw'][key]:.2f} "
                        f"= {ratios[name][key]:.3f}"
                        for key, _ in PAIRED_KEYS
                    ),
                    flush=True,
                )
    first = next(iter(servers))
    result = summarize(everything[first], walls[first], servers[first].label)
    result["raw"] = summarize(everything["raw"], walls["raw"], raw.label)
    result["modes"] = {name: summarize(everything[name], walls[name], name) for name in servers}
    result["rounds"] = rounds
    result["median_ratios"] = {
        name: {
            key: statistics.median(r["ratios"][name][key] for r in rounds) for key, _ in PAIRED_KEYS
        }
        for name in servers
    }
    if not args.modes:  # one server: the ratios as before
        result["median_ratios"] = result["median_ratios"]["server"]
        for r in rounds:
            r["ratios"] = r["ratios"]["server"]
    return result


def _ratio(ours: dict[str, Any], theirs: dict[str, Any], key: str) -> float:
    a, b = ours.get(key), theirs.get(key)
    return a / b if a and b else float("nan")


def print_paired(result: dict[str, Any]) -> None:
    print_summary(result["raw"])
    several = "server" not in result["modes"]  # --modes: a summary and ratios per mode
    for name, summary in result["modes"].items():
        if several:
            print_summary(summary)
        medians = result["median_ratios"][name] if several else result["median_ratios"]
        print(f"== {name} / raw, median of {len(result['rounds'])} paired rounds")
        for key, better in PAIRED_KEYS:
            values = sorted(
                (r["ratios"][name] if several else r["ratios"])[key] for r in result["rounds"]
            )
            print(
                f"{key:20s} {medians[key]:6.3f}  "
                f"(rounds {values[0]:.3f} to {values[-1]:.3f}; {better} is better)"
            )


# --------------------------------------------------------------------------- cli


def compare(result: dict[str, Any], baseline: dict[str, Any]) -> None:
    print(f"== vs {baseline['label']}")
    for key, better in (
        ("aggregate_tok_s", "higher"),
        ("request_tok_s_mean", "higher"),
        ("decode_tok_s_mean", "higher"),
        ("ttft_ms_p50", "lower"),
        ("ttft_ms_p95", "lower"),
    ):
        ours, theirs = result.get(key), baseline.get(key)
        if ours and theirs:
            print(
                f"{key:20s} {ours:10.2f} vs {theirs:10.2f}  "
                f"ratio {ours / theirs:6.3f} ({better} is better)"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--raw", type=Path, help="run the raw OpenVINO pipeline on this IR dir")
    parser.add_argument(
        "--raw-pipeline",
        choices=["auto", "vlm", "cb"],
        default="auto",
        help="raw mode: VLMPipeline (vlm) or ContinuousBatchingPipeline (cb); "
        "auto: vlm for -c 1, cb otherwise",
    )
    parser.add_argument("--model", help="model name to request (default: first of /v1/models)")
    parser.add_argument("--api-key")
    parser.add_argument("-c", "--concurrency", type=int, default=1)
    parser.add_argument("-n", "--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--image-size", type=int, default=112, help="square image side; 0: none")
    parser.add_argument("--images", type=int, default=1, help="distinct images cycled over")
    parser.add_argument(
        "--photo",
        type=photo_size,
        metavar="WxH",
        help="photo-shaped JPEG inputs of this size (e.g. 1280x720, 1920x1080, 1080x1920) "
        "instead of --image-size squares",
    )
    parser.add_argument(
        "--detail", choices=["low", "high", "auto"], help="server mode: the images' detail"
    )
    parser.add_argument(
        "--pruning",
        type=int,
        metavar="PERCENT",
        help="pruning_ratio: percent of visual tokens to prune (server and raw VLMPipeline)",
    )
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--warmup", type=int, default=1, help="requests before measuring")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--health", action="store_true", help="probe /health while streaming")
    parser.add_argument(
        "--paired",
        action="store_true",
        help="with --raw: alternate rounds of the server at --url and the raw pipeline "
        "and report the median of the per-round ratios",
    )
    parser.add_argument("--rounds", type=int, default=5, help="paired mode: rounds")
    parser.add_argument(
        "--modes",
        help="paired mode: server modes run every round against one raw run, as "
        "DETAIL[:PRUNING] separated by commas, e.g. low,auto,high,high:50",
    )
    parser.add_argument("--save", type=Path, help="write the result as JSON")
    parser.add_argument("--baseline", type=Path, help="a saved result to compare against")
    args = parser.parse_args(argv)

    if args.paired and not args.raw:
        parser.error("--paired needs --raw MODEL_DIR (and --url)")
    if args.paired:
        result = asyncio.run(run_paired(args))
    else:
        result = run_raw(args) if args.raw else asyncio.run(run_server(args))
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    print_summary(result)
    if args.paired:
        print_paired(result)
        result["errors"] += result["raw"]["errors"]
    if args.baseline:
        compare(result, json.loads(args.baseline.read_text()))
    if args.save:
        args.save.write_text(json.dumps(result, indent=2, default=str))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
