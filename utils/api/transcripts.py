"""A transcript in each of OpenAI's `response_format`s: json, text, srt, vtt, verbose_json."""

from __future__ import annotations

import math
from typing import Any, Literal

from fastapi.responses import JSONResponse, PlainTextResponse, Response

from utils.engine.asr_messages import AsrTask, Segment, Transcript

ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
RESPONSE_FORMATS: tuple[ResponseFormat, ...] = ("json", "text", "srt", "vtt", "verbose_json")
# The formats that carry segment timestamps.
TIMED_FORMATS = frozenset({"srt", "vtt", "verbose_json"})


def segments_of(transcript: Transcript) -> list[Segment]:
    """The transcript's timed segments; one for the whole audio when the model wrote
    text without timestamps."""
    segments = [s for s in transcript.segments if s.text.strip()]
    if segments or not transcript.text.strip():
        return segments
    return [Segment(0.0, transcript.duration_s, transcript.text, [])]


def _clock(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def srt(transcript: Transcript) -> str:
    blocks = [
        f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(segments_of(transcript), start=1)
    ]
    return "\n".join(blocks)


def vtt(transcript: Transcript) -> str:
    blocks = [
        f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n"
        for s in segments_of(transcript)
    ]
    return "WEBVTT\n\n" + "\n".join(blocks)


def _usage(transcript: Transcript) -> dict[str, Any]:
    return {"type": "duration", "seconds": math.ceil(transcript.duration_s)}


def verbose_json(
    transcript: Transcript, task: AsrTask, temperature: float, segments: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": task,
        "language": transcript.language,
        "duration": round(transcript.duration_s, 3),
        "text": transcript.text.strip(),
    }
    if segments:
        body["segments"] = [
            {
                "id": i,
                "seek": 0,
                "start": round(s.start, 3),
                "end": round(s.end, 3),
                "text": s.text,
                "tokens": s.tokens,
                "temperature": temperature,
            }
            for i, s in enumerate(segments_of(transcript))
        ]
    body["usage"] = _usage(transcript)
    return body


def render(
    transcript: Transcript,
    response_format: ResponseFormat,
    *,
    task: AsrTask,
    temperature: float,
    segments: bool,
) -> Response:
    if response_format == "text":
        return PlainTextResponse(transcript.text.strip() + "\n")
    if response_format == "srt":
        return PlainTextResponse(srt(transcript), media_type="application/x-subrip")
    if response_format == "vtt":
        return PlainTextResponse(vtt(transcript), media_type="text/vtt")
    if response_format == "verbose_json":
        return JSONResponse(verbose_json(transcript, task, temperature, segments))
    return JSONResponse({"text": transcript.text.strip(), "usage": _usage(transcript)})
