"""POST /v1/audio/transcriptions and /v1/audio/translations (OpenAI's multipart form).

The form is read here, every problem answered with a 400 naming its field; the file is
decoded in a worker thread (utils/media/audio.py) and transcribed in the speech engine
process (utils/engine/asr_client.py), so the event loop never waits on either.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.datastructures import FormData, UploadFile

from utils.api.disconnect import unless_disconnected
from utils.api.state import AppState, State
from utils.api.transcripts import RESPONSE_FORMATS, TIMED_FORMATS, render
from utils.engine.asr_client import AsrClient
from utils.engine.asr_messages import AsrTask
from utils.errors import OpenAIError, bad_request
from utils.media.audio import load_audio

router = APIRouter()

# Model names the speech endpoints take besides the served Whisper's own: clients and
# tools written for OpenAI send `whisper-1`.
ASR_MODEL_ALIASES = frozenset({"", "default", "whisper-1"})
# Room for the form's other fields and the multipart framing around the file.
_FORM_OVERHEAD_BYTES = 64 * 1024


def speech_engine(state: AppState, requested: str | None) -> AsrClient:
    """The speech engine for a request naming `requested`, or the error to answer."""
    name = state.settings.asr_model
    if not name:
        raise OpenAIError(
            404,
            "This server serves no speech model; set VLM_ASR_MODEL to a Whisper model to "
            "enable /v1/audio/transcriptions and /v1/audio/translations.",
            param="model",
            code="model_not_found",
        )
    if requested is not None and requested.strip() not in ASR_MODEL_ALIASES | {name}:
        raise OpenAIError(
            404,
            f"The model '{requested}' does not exist; the speech endpoints serve '{name}'.",
            param="model",
            code="model_not_found",
        )
    engine = state.asr
    if engine is None:
        failed = state.asr_loader is not None and state.asr_loader.done()
        raise OpenAIError(
            503,
            "The speech model failed to load; see the server log."
            if failed
            else "The speech model is loading; please retry shortly.",
            code="model_failed" if failed else "model_not_ready",
            headers=None if failed else {"Retry-After": "5"},
        )
    return engine


def _text(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(f"'{name}' must be a text field, not a file.", name)
    return value


def _temperature(form: FormData) -> float:
    raw = _text(form, "temperature")
    if raw is None or not raw.strip():
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise bad_request(f"'temperature' must be a number, not {raw!r}.", "temperature") from None
    if not 0.0 <= value <= 1.0:
        raise bad_request("'temperature' must be between 0 and 1.", "temperature")
    return value


def _granularities(form: FormData) -> list[str]:
    values = [
        v
        for key in ("timestamp_granularities[]", "timestamp_granularities")
        for v in form.getlist(key)
    ]
    for value in values:
        if value == "word":
            raise bad_request(
                "Word timestamps are not supported by this server's speech engine; use 'segment'.",
                "timestamp_granularities",
                "unsupported_value",
            )
        if value != "segment":
            raise bad_request(
                f"Unknown timestamp granularity {value!r}; use 'segment'.",
                "timestamp_granularities",
            )
    return [str(v) for v in values]


def _check_size(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + _FORM_OVERHEAD_BYTES:
        raise _too_large(limit)


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        413,
        f"The audio file is larger than {limit} bytes (setting max_media_bytes).",
        param="file",
        code="file_too_large",
    )


async def _read_form(request: Request) -> FormData:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise bad_request(
            "Send the audio as multipart/form-data with a 'file' field (as OpenAI's API takes it).",
            "file",
        )
    try:
        return await request.form(max_files=1, max_fields=64)
    except Exception as exc:  # malformed multipart, too many parts
        detail = getattr(exc, "detail", None) or str(exc)
        raise bad_request(f"Could not read the form: {detail}", "file") from None


async def _audio_request(request: Request, state: AppState, task: AsrTask) -> Response:
    settings = state.settings
    _check_size(request, settings.max_media_bytes)
    form = await _read_form(request)
    try:
        return await _transcribe(request, state, form, task)
    finally:
        await form.close()


async def _transcribe(request: Request, state: AppState, form: FormData, task: AsrTask) -> Response:
    settings = state.settings
    engine = speech_engine(state, _text(form, "model"))
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise bad_request("'file' is required: the audio file to transcribe.", "file")
    response_format = (_text(form, "response_format") or "json").strip()
    if response_format not in RESPONSE_FORMATS:
        raise bad_request(
            f"Unknown response_format {response_format!r}; use one of "
            f"{', '.join(RESPONSE_FORMATS)}.",
            "response_format",
        )
    if (_text(form, "stream") or "false").strip().lower() in ("true", "1"):
        raise bad_request(
            "Streamed transcriptions are not supported; leave 'stream' unset.", "stream"
        )
    temperature = _temperature(form)
    granularities = _granularities(form)
    language = _text(form, "language") if task == "transcribe" else None
    language = language.strip().lower() or None if language is not None else None
    prompt = _text(form, "prompt") or None
    if upload.size is not None and upload.size > settings.max_media_bytes:
        raise _too_large(settings.max_media_bytes)
    data = await upload.read(settings.max_media_bytes + 1)
    if len(data) > settings.max_media_bytes:
        raise _too_large(settings.max_media_bytes)
    audio = await load_audio(
        data,
        max_duration_s=settings.audio_max_duration_s,
        max_channels=settings.audio_max_channels,
    )
    timed = response_format in TIMED_FORMATS
    transcript = await unless_disconnected(
        request,
        engine.transcribe(
            audio,
            task=task,
            language=language,
            prompt=prompt,
            temperature=temperature,
            timestamps=timed,
        ),
    )
    segments = response_format != "verbose_json" or not granularities or "segment" in granularities
    return render(
        transcript, response_format, task=task, temperature=temperature, segments=segments
    )


_DESCRIPTION: dict[str, Any] = {"content": {"multipart/form-data": {}}}


@router.post("/v1/audio/transcriptions", openapi_extra={"requestBody": _DESCRIPTION})
async def create_transcription(request: Request, state: State) -> Response:
    return await _audio_request(request, state, "transcribe")


@router.post("/v1/audio/translations", openapi_extra={"requestBody": _DESCRIPTION})
async def create_translation(request: Request, state: State) -> Response:
    return await _audio_request(request, state, "translate")
