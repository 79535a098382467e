#!/usr/bin/env python
"""Benchmark the speech endpoint against raw WhisperPipeline on the same audio.

Paired rounds alternate one transcription through the server (`POST
/v1/audio/transcriptions`, end to end: upload, decoding, the speech engine process)
with one through `openvino_genai.WhisperPipeline` in this process on the same samples,
and report the real-time factor of each (seconds of audio per second of wall time,
higher is faster), and the median and range of the per-round ratios server / raw. A
drifting, shared machine moves a paired ratio far less than two separate runs. The
server's own share is split out: the speech engine's pipeline seconds for each
request (from `/metrics`) against the raw run, and the rest of the wall time (upload,
decoding, the pipe) as overhead.

While the server transcribes, a thread probes `/health` every 20 ms (`--health`) and
its latencies are reported; with `--chat` each round also streams a chat completion
alone and again while a transcription runs, and reports the ratio of their
tokens/s.

    python scripts/benchmark_asr.py --url http://127.0.0.1:8000 \
        --raw models/my-whisper-export --seconds 20 --rounds 6 --health --chat
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import threading
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np

SAMPLE_RATE = 16_000


def make_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """Tones that glide, with noise: something like speech's spectrum, as float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = 180 + 60 * np.sin(2 * np.pi * 0.7 * t)
    voice = 0.3 * np.sin(2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE)
    return (voice + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def to_wav(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def probe_health(url: str, stop: threading.Event, out: list[float]) -> None:
    import httpx

    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            started = time.perf_counter()
            client.get(f"{url}/health").raise_for_status()
            out.append(time.perf_counter() - started)
            stop.wait(0.02)


def server_round(url: str, model: str, wav: bytes, health: list[float] | None) -> tuple[float, str]:
    import httpx

    stop = threading.Event()
    prober = None
    if health is not None:
        prober = threading.Thread(target=probe_health, args=(url, stop, health), daemon=True)
        prober.start()
    started = time.perf_counter()
    try:
        response = httpx.post(
            f"{url}/v1/audio/transcriptions",
            data={"model": model},
            files={"file": ("audio.wav", wav, "audio/wav")},
            timeout=600,
        )
        response.raise_for_status()
    finally:
        elapsed = time.perf_counter() - started
        stop.set()
        if prober is not None:
            prober.join()
    return elapsed, str(response.json()["text"])


def engine_seconds(url: str) -> float:
    """The speech engine's pipeline seconds so far (`vlm_asr_pipeline_seconds_total`)."""
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("vlm_asr_pipeline_seconds_total "):
            return float(line.split()[1])
    raise SystemExit(f"{url}/metrics has no vlm_asr_pipeline_seconds_total: no speech model?")


def chat_tokens_per_s(url: str, tokens: int) -> float:
    """Output tokens/s of one streamed chat completion with a fixed length."""
    import httpx

    body = {
        "messages": [{"role": "user", "content": "Say something."}],
        "max_completion_tokens": tokens,
        "min_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
    }
    first = last = None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and '"content"' in line:
                last = time.perf_counter()
                first = first or last
    if first is None or last is None or last == first:
        return float("nan")
    return (tokens - 1) / (last - first)


def chat_during_transcription(url: str, model: str, wav: bytes, tokens: int) -> float:
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(server_round(url, model, wav, None)))
    worker.start()
    time.sleep(0.5)  # the upload and decoding are done; the engine transcribes
    speed = chat_tokens_per_s(url, tokens)
    worker.join()
    return speed


def summary(values: list[float]) -> str:
    return (
        f"median {statistics.median(values):.3f}  "
        f"range {min(values):.3f} .. {max(values):.3f}  (n={len(values)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the server's base URL")
    parser.add_argument("--raw", required=True, type=Path, help="the same Whisper IR directory")
    parser.add_argument("--model", default="whisper-1", help="model name sent to the server")
    parser.add_argument("--device", default="CPU")
    parser.add_argument("--seconds", type=float, default=20.0, help="audio length")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--health", action="store_true", help="probe /health meanwhile")
    parser.add_argument("--chat", action="store_true", help="chat stream speed, paired")
    parser.add_argument("--chat-tokens", type=int, default=64)
    parser.add_argument("--save", type=Path, help="write the results as JSON")
    args = parser.parse_args()

    import openvino_genai as genai

    from utils.media.audio import decode_audio

    wav = to_wav(make_audio(args.seconds))
    # the raw pipeline gets exactly the samples the server decodes from the file
    audio = decode_audio(wav, max_duration_s=args.seconds + 1, max_channels=1)
    pipe = genai.WhisperPipeline(str(args.raw), args.device)
    pipe.generate(audio[:SAMPLE_RATE], max_new_tokens=2)  # warm-up, as the server does
    server_round(args.url, args.model, to_wav(audio[:SAMPLE_RATE]), None)

    server_rtf: list[float] = []
    raw_rtf: list[float] = []
    ratios: list[float] = []
    engine_ratios: list[float] = []
    overheads: list[float] = []
    chat_ratios: list[float] = []
    health: list[float] = []
    for i in range(args.rounds):
        # alternate which goes first, so that neither always gets the cooler machine
        order = ("server", "raw") if i % 2 == 0 else ("raw", "server")
        times: dict[str, float] = {}
        for side in order:
            if side == "server":
                before = engine_seconds(args.url)
                times[side], text = server_round(
                    args.url, args.model, wav, health if args.health else None
                )
                engine = engine_seconds(args.url) - before
            else:
                started = time.perf_counter()
                # the options the server's speech engine passes for a plain transcription
                raw_text = pipe.generate(audio, task="transcribe", return_timestamps=False).texts[0]
                times[side] = time.perf_counter() - started
        server_rtf.append(args.seconds / times["server"])
        raw_rtf.append(args.seconds / times["raw"])
        ratios.append(server_rtf[-1] / raw_rtf[-1])
        engine_ratios.append(times["raw"] / engine)
        overheads.append(times["server"] - engine)
        same = "same text" if text == raw_text.strip() else "TEXT DIFFERS"
        line = (
            f"round {i + 1}: server {times['server']:.2f} s (RTF {server_rtf[-1]:.2f}), "
            f"raw {times['raw']:.2f} s (RTF {raw_rtf[-1]:.2f}), ratio {ratios[-1]:.3f}; "
            f"engine {engine:.2f} s, overhead {overheads[-1] * 1000:.0f} ms; {same}"
        )
        if args.chat:
            alone = chat_tokens_per_s(args.url, args.chat_tokens)
            during = chat_during_transcription(args.url, args.model, wav, args.chat_tokens)
            chat_ratios.append(during / alone)
            line += f"; chat {alone:.1f} tok/s alone, {during:.1f} during"
        print(line, flush=True)

    print(f"\naudio {args.seconds:g} s, {args.rounds} paired rounds")
    print(f"server RTF  {summary(server_rtf)}")
    print(f"raw RTF     {summary(raw_rtf)}")
    print(f"ratio server/raw  {summary(ratios)}")
    print(f"ratio engine/raw  {summary(engine_ratios)}  (the pipeline in the engine process)")
    print(f"server overhead   {summary([o * 1000 for o in overheads])} ms (upload, decoding, pipe)")
    results: dict[str, Any] = {
        "seconds": args.seconds,
        "server_rtf": server_rtf,
        "raw_rtf": raw_rtf,
        "ratios": ratios,
        "engine_ratios": engine_ratios,
        "overhead_s": overheads,
    }
    if health:
        ms = [h * 1000 for h in health]
        print(
            f"/health during transcriptions: p50 {percentile(ms, 50):.1f} ms, "
            f"p99 {percentile(ms, 99):.1f} ms, max {max(ms):.1f} ms (n={len(ms)})"
        )
        results["health_ms"] = {"p50": percentile(ms, 50), "p99": percentile(ms, 99)}
    if chat_ratios:
        print(f"chat tokens/s during / alone  {summary(chat_ratios)}")
        results["chat_ratios"] = chat_ratios
    if args.save:
        args.save.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
