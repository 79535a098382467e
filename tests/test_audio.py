"""The speech endpoints with the official `openai` client against the real server: the
tiny Whisper exported through optimum-intel and run by WhisperPipeline in its own
engine process, beside the tiny Qwen2-VL."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from tests.fixtures.audio import (
    ENCODED,
    TINY_WHISPER,
    asr_server,
    encode,
    noise,
    silence,
    tiny_whisper_ir,
    tone,
    wav,
)
from tests.fixtures.server import LiveServers
from utils.api.state import app_state
from utils.media.audio import decode_audio

SRT_BLOCK = re.compile(r"^\d+\n\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}\n", re.M)
VTT_CUE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}\n", re.M)


@pytest.fixture(scope="module")
def base_url(live_server: LiveServers) -> str:
    return asr_server(live_server)


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as client:
        yield client


TONE = wav(tone(2.0))


def transcribe(client: openai.OpenAI, data: bytes = TONE, **kwargs: Any) -> Any:
    return client.audio.transcriptions.create(
        model=TINY_WHISPER, file=("speech.wav", data, "audio/wav"), **kwargs
    )


def raw_transcript(audio: np.ndarray, **options: Any) -> str:
    """What WhisperPipeline itself writes for `audio` (the tests' f32 precision)."""
    import openvino_genai as genai

    pipe = genai.WhisperPipeline(str(tiny_whisper_ir()), "CPU", INFERENCE_PRECISION_HINT="f32")
    return str(pipe.generate(audio, **options).texts[0])


def test_json_is_the_pipelines_transcript(client: openai.OpenAI) -> None:
    result = transcribe(client)
    expected = raw_transcript(decode_audio(TONE, max_duration_s=60, max_channels=2))
    assert result.text == expected.strip()
    assert result.text  # the tiny model writes text tokens only, up to its length limit


def test_text_format(client: openai.OpenAI) -> None:
    text = transcribe(client, response_format="text")
    assert isinstance(text, str)
    assert text.strip() == transcribe(client).text


def test_srt_format(client: openai.OpenAI) -> None:
    srt = transcribe(client, response_format="srt")
    assert isinstance(srt, str)
    blocks = SRT_BLOCK.findall(srt)
    assert blocks and srt.startswith("1\n00:00:0")
    assert len(blocks) == srt.count(" --> ")


def test_vtt_format(client: openai.OpenAI) -> None:
    vtt = transcribe(client, response_format="vtt")
    assert isinstance(vtt, str)
    assert vtt.startswith("WEBVTT\n\n")
    assert VTT_CUE.findall(vtt)


def test_verbose_json_has_timed_segments(client: openai.OpenAI) -> None:
    data = wav(tone(3.5, freq=300.0))
    result = transcribe(
        client, data, response_format="verbose_json", timestamp_granularities=["segment"]
    )
    assert result.duration == pytest.approx(3.5, abs=0.01)
    assert result.language  # detected
    assert result.segments
    for segment in result.segments:
        assert 0.0 <= segment.start <= segment.end <= 3.5 + 1e-6
        assert segment.text.strip()
    assert "".join(s.text for s in result.segments).strip() == result.text.strip()
    assert result.usage.seconds == 4  # rounded up, as OpenAI bills


def test_language_and_prompt_reach_the_pipeline(client: openai.OpenAI) -> None:
    audio = decode_audio(TONE, max_duration_s=60, max_channels=2)
    result = transcribe(client, language="fr", prompt="red green")
    assert result.text == raw_transcript(audio, language="fr", initial_prompt="red green").strip()
    verbose = transcribe(client, language="FR", response_format="verbose_json")
    assert verbose.language == "fr"
    timed = raw_transcript(audio, language="fr", return_timestamps=True)
    assert verbose.text == timed.strip()


def test_translation(client: openai.OpenAI) -> None:
    audio = decode_audio(TONE, max_duration_s=60, max_channels=2)
    result = client.audio.translations.create(
        model=TINY_WHISPER, file=("speech.wav", TONE, "audio/wav")
    )
    assert result.text == raw_transcript(audio, task="translate").strip()
    verbose = client.audio.translations.create(
        model="whisper-1", file=("speech.wav", TONE, "audio/wav"), response_format="verbose_json"
    )
    assert verbose.task == "translate"  # type: ignore[attr-defined]


def test_sampling_with_temperature(client: openai.OpenAI) -> None:
    result = transcribe(client, wav(noise(1.0)), temperature=0.8)
    assert isinstance(result.text, str)


@pytest.mark.parametrize("container", sorted(ENCODED))
def test_encoded_files_are_decoded_and_resampled(client: openai.OpenAI, container: str) -> None:
    data = encode(tone(2.0, rate=48_000, channels=2), container)
    result = transcribe(client, data, response_format="verbose_json")
    # encoders add a few ms of padding (priming samples, the last frame)
    assert result.duration == pytest.approx(2.0, abs=0.15)


def test_silence_and_a_very_short_file(client: openai.OpenAI) -> None:
    assert isinstance(transcribe(client, wav(silence(1.0))).text, str)
    short = transcribe(client, wav(silence(0.005)), response_format="verbose_json")
    assert short.duration == pytest.approx(0.005, abs=0.001)


def test_models_and_metrics(client: openai.OpenAI, base_url: str) -> None:
    transcribe(client)
    names = {model.id for model in client.models.list()}
    assert {TINY_WHISPER, "embedded/tiny-qwen2-vl"} <= names
    metrics = httpx.get(f"{base_url}/metrics").text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("vlm_asr_")
    }
    assert values["vlm_asr_ready"] == 1.0
    assert values["vlm_asr_audio_seconds_total"] >= 2.0
    assert values["vlm_asr_transcriptions_total"] >= 1
    assert values["vlm_asr_real_time_factor"] > 0


def thread_nice_values(pid: int) -> dict[str, int]:
    """The nice value of every thread of process `pid`, by thread id and name (Linux
    keeps one per thread, and getpriority takes a thread id)."""
    return {
        f"{task.name} {(task / 'comm').read_text().strip()}": os.getpriority(
            os.PRIO_PROCESS, int(task.name)
        )
        for task in Path(f"/proc/{pid}/task").iterdir()
    }


def test_the_speech_engine_runs_below_the_chat_engines_priority(
    client: openai.OpenAI, base_url: str, live_server: LiveServers
) -> None:
    """Every thread of the speech engine, OpenVINO's too, runs VLM_ASR_NICENESS (10 by
    default) below the chat engine, so chat streams keep the cores while both run."""
    transcribe(client)  # OpenVINO's threads have started
    state = app_state(live_server.app(base_url))
    assert state.asr is not None and state.asr.pid is not None
    assert state.engine is not None and state.engine.pid is not None
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert set(thread_nice_values(state.engine.pid).values()) == {own}
    speech_threads = thread_nice_values(state.asr.pid)
    assert set(speech_threads.values()) == {min(own + 10, 19)}, speech_threads
    assert len(speech_threads) > 1


# --- refusals ----------------------------------------------------------------------


def post(base_url: str, data: bytes | None = None, **fields: Any) -> httpx.Response:
    files = {"file": ("speech.wav", data, "audio/wav")} if data is not None else None
    form = {"model": TINY_WHISPER, **fields}
    return httpx.post(f"{base_url}/v1/audio/transcriptions", data=form, files=files, timeout=60)


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


@pytest.mark.parametrize(
    ("data", "fields", "param"),
    [
        (b"this is not audio at all" * 20, {}, "file"),
        (b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 4, {}, "file"),
        (None, {}, "file"),
        (TONE, {"response_format": "docx"}, "response_format"),
        (TONE, {"temperature": "2"}, "temperature"),
        (TONE, {"temperature": "warm"}, "temperature"),
        (TONE, {"timestamp_granularities[]": "word"}, "timestamp_granularities"),
        (TONE, {"language": "xx"}, "language"),
        (TONE, {"stream": "true"}, "stream"),
        (wav(tone(0.5, channels=12)), {}, "file"),
    ],
)
def test_bad_input_is_a_400(
    base_url: str, data: bytes | None, fields: dict[str, str], param: str
) -> None:
    response = post(base_url, data, **fields)
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param


def test_not_a_form_and_unknown_model(base_url: str) -> None:
    response = httpx.post(f"{base_url}/v1/audio/transcriptions", json={"file": "x"})
    assert response.status_code == 400
    assert error_of(response)["param"] == "file"
    response = post(base_url, TONE, model="whisper-large-v9")
    assert response.status_code == 404
    assert error_of(response)["param"] == "model"


def test_no_speech_model_is_a_404(live_server: LiveServers) -> None:
    base_url = live_server()
    response = post(base_url, TONE)
    assert response.status_code == 404
    assert "VLM_ASR_MODEL" in error_of(response)["message"]


def test_over_the_limits_is_a_413(live_server: LiveServers) -> None:
    base_url = asr_server(live_server, max_media_bytes=200_000, audio_max_duration_s=3.0)
    too_big = wav(noise(7.0))  # 224 kB
    response = post(base_url, too_big)
    assert response.status_code == 413
    assert error_of(response)["param"] == "file"
    too_long = encode(tone(5.0, rate=16_000), "mp3", rate=16_000)  # small, but 5 s
    assert len(too_long) < 200_000
    response = post(base_url, too_long)
    assert response.status_code == 413
    assert error_of(response)["code"] == "audio_too_long"
    assert post(base_url, wav(tone(2.0))).status_code == 200  # the server goes on


def _serves_again_after_a_restart(base_url: str, asr: Any, dead_pid: int) -> None:
    waited = threading.Event()
    for _ in range(1500):
        if asr.ready:
            break
        waited.wait(0.2)
    assert asr.pid != dead_pid
    assert post(base_url, TONE).status_code == 200
    assert asr.stats()["restarts"] == 1


def test_a_dead_speech_engine_fails_its_requests_and_restarts(live_server: LiveServers) -> None:
    base_url = asr_server(live_server, engine_max_restarts=3)
    asr = app_state(live_server.app(base_url)).asr
    assert asr is not None and asr.pid is not None
    pid = asr.pid
    os.kill(pid, signal.SIGSTOP)  # holds the request in the engine until it is killed
    results: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: results.append(post(base_url, TONE)))
    worker.start()
    try:
        while worker.is_alive() and not asr.stats()["in_flight"]:
            worker.join(0.01)
    finally:
        os.kill(pid, signal.SIGKILL)
    worker.join(60)
    assert results and results[0].status_code == 500
    assert error_of(results[0])["code"] == "engine_failure"
    _serves_again_after_a_restart(base_url, asr, pid)


def test_a_hung_speech_engine_is_found_stalled_and_restarted(live_server: LiveServers) -> None:
    """SIGSTOP the speech engine under a transcription: the watchdog answers it with a
    503 `engine_stalled` within the stall timeout plus a few seconds, kills the process
    and starts a new one, which serves."""
    base_url = asr_server(live_server, engine_stall_timeout_s=3.0)
    asr = app_state(live_server.app(base_url)).asr
    assert asr is not None and asr.pid is not None
    pid = asr.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        response = post(base_url, TONE)
        elapsed = time.monotonic() - started
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert response.status_code == 503, response.text
    assert error_of(response)["code"] == "engine_stalled"
    assert response.headers["retry-after"] == "5"
    assert elapsed < 3.0 + 10, elapsed
    assert asr.stats()["stalls"] == 1
    _serves_again_after_a_restart(base_url, asr, pid)
    assert re.search(
        r"^vlm_asr_engine_stalls_total 1\.0$", httpx.get(f"{base_url}/metrics").text, re.M
    )


# --- audio in chat -------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "part",
    [
        {
            "type": "input_audio",
            "input_audio": {"data": base64.b64encode(TONE).decode(), "format": "wav"},
        },
        {"type": "audio_url", "audio_url": {"url": "https://example.com/speech.mp3"}},
    ],
)
def test_a_model_that_cannot_hear_names_the_audio_part(
    client: openai.OpenAI, part: dict[str, Any], stream: bool
) -> None:
    messages: Any = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is said?"}, part]},
    ]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="embedded/tiny-qwen2-vl",
            messages=messages,
            max_completion_tokens=4,
            stream=stream,
        )
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == "messages[1].content[1]"
    assert error["code"] == "audio_not_supported"
    assert "/v1/audio/transcriptions" in error["message"]
    # the chat model still answers
    answer = client.chat.completions.create(
        model="embedded/tiny-qwen2-vl",
        messages=[*messages[:1], {"role": "user", "content": "Hi"}],
        max_completion_tokens=2,
    )
    assert answer.choices[0].message.content is not None
