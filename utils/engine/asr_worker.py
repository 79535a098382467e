"""The speech engine process: OpenVINO GenAI's WhisperPipeline, one transcription at a time.

`WhisperPipeline.generate` holds the Python GIL for the whole transcription, so it
runs in a process of its own (started by utils/engine/asr_client.py), apart from the
chat engine and the API's event loop. It answers each `Transcribe` with a
`Transcript` or a `TranscribeFailure`, in order.

Word timestamps are not offered: a pipeline built with `word_timestamps=True` crashes
the process (SIGSEGV) on the first request that also asks for segment timestamps.

`openvino_genai` is imported inside functions: importing this module loads nothing.
"""

from __future__ import annotations

import logging
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from utils.engine.asr_messages import (
    SAMPLE_RATE,
    AsrWorkerConfig,
    Segment,
    Transcribe,
    TranscribeFailure,
    Transcript,
)
from utils.engine.heap import HeapTrimmer, bound_kernel_cache, limit_arenas
from utils.engine.messages import EngineFatal, EngineReady, StopEngine

logger = logging.getLogger(__name__)

# The feature extractor needs more than half an FFT window (200 samples); shorter
# audio is padded with silence to this length.
MIN_SAMPLES = SAMPLE_RATE // 10


class WhisperEngine:
    def __init__(self, cfg: AsrWorkerConfig) -> None:
        import openvino_genai as genai

        self.pipe = genai.WhisperPipeline(cfg.model_dir, cfg.device, **cfg.ov_config)
        self.tokenizer = self.pipe.get_tokenizer()
        self.languages = {
            code.strip("<|>") for code in self.pipe.get_generation_config().lang_to_id
        }

    def transcribe(self, request: Transcribe) -> Transcript | TranscribeFailure:
        language = request.language
        if language is not None and language not in self.languages:
            return TranscribeFailure(
                request.rid,
                400,
                f"Unknown language '{language}': give an ISO-639-1 code the model knows, "
                f"one of {', '.join(sorted(self.languages))}.",
                "language",
                "invalid_language",
            )
        audio = request.audio
        duration = len(audio) / SAMPLE_RATE
        if len(audio) < MIN_SAMPLES:
            audio = np.pad(audio, (0, MIN_SAMPLES - len(audio)))
        options: dict[str, Any] = {"task": request.task, "return_timestamps": request.timestamps}
        if language is not None:
            options["language"] = language
        if request.prompt:
            options["initial_prompt"] = request.prompt
        if request.temperature > 0:
            options.update(do_sample=True, temperature=request.temperature)
        started = time.perf_counter()
        result = self.pipe.generate(audio, **options)
        seconds = time.perf_counter() - started
        segments = [
            Segment(
                # the model sees the audio padded to 30 s windows: nothing is past its end
                min(float(chunk.start_ts), duration),
                min(float(chunk.end_ts), duration),
                chunk.text,
                self._tokens(chunk.text),
            )
            for chunk in result.chunks or []
        ]
        return Transcript(
            request.rid,
            result.texts[0] if result.texts else "",
            result.language or (language or ""),
            duration,
            segments,
            seconds,
        )

    def _tokens(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).input_ids.data[0]
        return [int(t) for t in ids]

    def warm_up(self) -> None:
        self.pipe.generate(np.zeros(SAMPLE_RATE, np.float32), max_new_tokens=2)


def serve(conn: Connection, engine: WhisperEngine) -> None:
    heap = HeapTrimmer()
    while True:
        if not conn.poll(heap.idle_interval_s):
            heap.tick(busy=False)
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if isinstance(message, StopEngine):
            return
        if not isinstance(message, Transcribe):
            continue
        try:
            reply: Transcript | TranscribeFailure = engine.transcribe(message)
        except Exception as exc:  # the pipeline refused this audio; the engine goes on
            logger.warning("transcription %d failed: %s", message.rid, exc)
            # OpenVINO's messages end with the readable line, after the source location
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
            reply = TranscribeFailure(message.rid, 400, reason, "file", None)
        conn.send(reply)
        heap.tick(busy=True)


def main(conn: Connection, cfg: AsrWorkerConfig) -> None:
    """The engine process's entry point (utils/engine/process.py calls it)."""
    limit_arenas()  # before OpenVINO starts its threads
    bound_kernel_cache()
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s [asr] %(name)s: %(message)s",
    )
    started = time.monotonic()
    try:
        engine = WhisperEngine(cfg)
        engine.warm_up()
    except Exception as exc:
        logger.error("cannot load the speech model %s: %s", cfg.model_dir, exc)
        try:
            conn.send(EngineFatal(f"cannot load the speech model {cfg.model_dir}: {exc}"))
        finally:
            conn.close()
        return
    logger.info("speech engine ready on %s in %.1f s", cfg.device, time.monotonic() - started)
    conn.send(EngineReady("whisper_pipeline", 0, "whisper"))
    try:
        serve(conn, engine)
    finally:
        conn.close()
