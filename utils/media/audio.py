"""Decoding of audio (PyAV, ffmpeg's decoders) into 16 kHz mono float32 samples.

`decode_audio` is blocking and CPU-bound; `load_audio` runs it in a worker thread.

- Only containers recognised by their first bytes are opened, each with its own
  demuxer named explicitly (WAV, MP3, FLAC, Ogg/Opus/Vorbis, MP4/M4A, Matroska/WebM,
  AAC, AIFF): ffmpeg never guesses among its hundreds of demuxers, some of which (a
  playlist) would open further files or URLs.
- Limits: the number of channels, and the duration, checked on the container's
  header and again while decoding (a few kilobytes of compressed silence can stand for
  hours). Over the duration limit is a 413, anything undecodable a 400.
"""

from __future__ import annotations

import asyncio
import io
import logging

import numpy as np

from utils.engine.asr_messages import SAMPLE_RATE
from utils.errors import OpenAIError

logger = logging.getLogger(__name__)

# First bytes -> the ffmpeg demuxer that reads them.
_MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"styp"}


def audio_container(data: bytes) -> str | None:
    """The ffmpeg demuxer for `data`, told from its first bytes, or None."""
    head = data[:16]
    if head.startswith(b"RIFF") and head[8:12] == b"WAVE":
        return "wav"
    if head.startswith(b"fLaC"):
        return "flac"
    if head.startswith(b"OggS"):
        return "ogg"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head[4:8] in _MP4_BOXES:
        return "mov"
    if head.startswith(b"FORM") and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head.startswith(b"ID3"):
        return "mp3"
    if len(head) >= 2 and head[0] == 0xFF:
        if head[1] & 0xF6 == 0xF0:  # ADTS: sync word, layer 0
            return "aac"
        if head[1] & 0xE0 == 0xE0:  # MPEG audio frame sync
            return "mp3"
    return None


def _bad(message: str, param: str) -> OpenAIError:
    return OpenAIError(400, message, param=param, code="invalid_audio")


def _too_long(limit_s: float, param: str) -> OpenAIError:
    return OpenAIError(
        413,
        f"The audio is longer than {limit_s:g} s (setting audio_max_duration_s).",
        param=param,
        code="audio_too_long",
    )


def decode_audio(
    data: bytes, *, max_duration_s: float, max_channels: int, param: str = "file"
) -> np.ndarray:
    """The audio in `data` as float32 mono samples at 16 kHz, in [-1, 1].

    Raises OpenAIError: 400 (`param`) when it cannot be decoded or has too many
    channels, 413 when it is longer than `max_duration_s`.
    """
    import av

    container_format = audio_container(data)
    if container_format is None:
        raise _bad(
            "Could not decode audio: not a WAV, MP3, FLAC, Ogg, MP4/M4A, WebM, AAC or AIFF file.",
            param,
        )
    max_samples = int(max_duration_s * SAMPLE_RATE)
    try:
        with av.open(io.BytesIO(data), format=container_format) as container:
            if not container.streams.audio:
                raise _bad("Could not decode audio: the file has no audio stream.", param)
            stream = container.streams.audio[0]
            channels = stream.codec_context.channels
            if channels > max_channels:
                raise _bad(
                    f"The audio has {channels} channels; at most {max_channels} are accepted "
                    "(setting audio_max_channels).",
                    param,
                )
            if container.duration is not None and container.duration / 1e6 > max_duration_s:
                raise _too_long(max_duration_s, param)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            pieces: list[np.ndarray] = []
            total = 0
            for frame in container.decode(stream):
                if frame.layout.nb_channels > max_channels:  # a stream that changes mid-way
                    raise _bad(f"The audio has more than {max_channels} channels.", param)
                for out in resampler.resample(frame):
                    piece = out.to_ndarray().reshape(-1)
                    total += piece.size
                    if total > max_samples:
                        raise _too_long(max_duration_s, param)
                    pieces.append(piece)
            for out in resampler.resample(None):
                pieces.append(out.to_ndarray().reshape(-1))
    except OpenAIError:
        raise
    except (av.FFmpegError, ValueError, IndexError, OSError) as exc:
        raise _bad(f"Could not decode audio: {exc}", param) from None
    samples = np.concatenate(pieces).astype(np.float32, copy=False) if pieces else np.zeros(0)
    if samples.size > max_samples:
        raise _too_long(max_duration_s, param)
    if samples.size == 0:
        raise _bad("Could not decode audio: the audio stream holds no samples.", param)
    return np.clip(samples, -1.0, 1.0).astype(np.float32, copy=False)


async def load_audio(
    data: bytes, *, max_duration_s: float, max_channels: int, param: str = "file"
) -> np.ndarray:
    return await asyncio.to_thread(
        decode_audio, data, max_duration_s=max_duration_s, max_channels=max_channels, param=param
    )
