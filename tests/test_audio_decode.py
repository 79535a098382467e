"""Audio decoding (PyAV) and transcript rendering, without a model or a server."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fixtures.audio import ENCODED, encode, noise, tone, wav
from utils.api.transcripts import srt, verbose_json, vtt
from utils.engine.asr_messages import Segment, Transcript
from utils.errors import OpenAIError
from utils.media.audio import audio_container, decode_audio

LIMITS = {"max_duration_s": 60.0, "max_channels": 8}


def test_wav_is_resampled_to_16k_mono() -> None:
    samples = decode_audio(wav(tone(1.5, rate=44_100, channels=2), rate=44_100), **LIMITS)
    assert samples.dtype == np.float32
    assert samples.ndim == 1
    assert abs(samples.size - 24_000) <= 16  # 1.5 s at 16 kHz
    # ffmpeg mixes identical channels down at -3 dB each: power, not amplitude, is kept
    assert np.abs(samples).max() == pytest.approx(0.5 * np.sqrt(2), abs=0.01)
    mono = decode_audio(wav(tone(1.5, rate=44_100), rate=44_100), **LIMITS)
    assert np.abs(mono).max() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("container", sorted(ENCODED))
def test_every_encoded_container_decodes(container: str) -> None:
    data = encode(tone(1.0, rate=48_000), container)
    assert audio_container(data) is not None
    samples = decode_audio(data, **LIMITS)
    assert abs(samples.size / 16_000 - 1.0) < 0.15


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, this is text",
        b"#EXTM3U\n#EXTINF:10,\nhttp://127.0.0.1:1/secret.mp3\n",  # a playlist is never opened
        b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00" + b"\x00" * 64,  # a broken header
        b"ID3\x04\x00\x00\x00\x00\x00\x00" + b"\x00" * 100,  # a tag and no frames
    ],
)
def test_undecodable_bytes_are_a_400(data: bytes) -> None:
    with pytest.raises(OpenAIError) as caught:
        decode_audio(data, **LIMITS)
    assert caught.value.status == 400
    assert caught.value.param == "file"


def test_too_many_channels_is_a_400() -> None:
    with pytest.raises(OpenAIError) as caught:
        decode_audio(wav(tone(0.2, channels=3)), max_duration_s=60, max_channels=2)
    assert caught.value.status == 400
    assert "3 channels" in caught.value.message


@pytest.mark.parametrize("container", ["wav", "mp3", "ogg"])
def test_too_long_is_a_413(container: str) -> None:
    samples = noise(4.0)
    data = wav(samples) if container == "wav" else encode(samples, container, rate=16_000)
    with pytest.raises(OpenAIError) as caught:
        decode_audio(data, max_duration_s=3.0, max_channels=2, param="messages[0].content[1]")
    assert caught.value.status == 413
    assert caught.value.param == "messages[0].content[1]"
    assert len(decode_audio(data, max_duration_s=5.0, max_channels=2)) > 3 * 16_000


def _transcript(segments: list[Segment], text: str = " a b") -> Transcript:
    return Transcript(1, text, "en", 3725.5, segments, 0.1)


def test_subtitles_number_and_time_their_cues() -> None:
    transcript = _transcript([Segment(0.0, 1.5, " a", [1]), Segment(3661.25, 3725.5, " b", [2])])
    assert srt(transcript) == (
        "1\n00:00:00,000 --> 00:00:01,500\na\n\n2\n01:01:01,250 --> 01:02:05,500\nb\n"
    )
    assert vtt(transcript) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\na\n\n01:01:01.250 --> 01:02:05.500\nb\n"
    )


def test_text_without_timestamps_is_one_segment() -> None:
    body = verbose_json(_transcript([]), "transcribe", 0.0, segments=True)
    assert body["segments"] == [
        {
            "id": 0,
            "seek": 0,
            "start": 0.0,
            "end": 3725.5,
            "text": " a b",
            "tokens": [],
            "temperature": 0.0,
        }
    ]
    assert body["usage"] == {"type": "duration", "seconds": 3726}
    assert srt(_transcript([], text="")) == ""
