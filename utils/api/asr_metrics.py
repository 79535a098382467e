"""The speech engine's Prometheus metrics, read from `AsrClient.stats()` when scraped.

The real-time factor is seconds of audio transcribed per second of the pipeline's
time (2.0: twice as fast as the audio plays), over the engine's life.
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import FastAPI
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from utils.api.state import AppState, app_state

_COUNTERS = (
    ("transcriptions", "vlm_asr_transcriptions", "Transcriptions and translations finished."),
    ("failures", "vlm_asr_failures", "Transcriptions the speech engine refused."),
    ("audio_seconds", "vlm_asr_audio_seconds", "Seconds of audio transcribed."),
    (
        "pipeline_seconds",
        "vlm_asr_pipeline_seconds",
        "Seconds the speech engine spent in WhisperPipeline.",
    ),
    ("restarts", "vlm_asr_engine_restarts", "Times the speech engine process was restarted."),
    ("stalls", "vlm_asr_engine_stalls", "Times the speech engine was found stalled and killed."),
)


class _AsrCollector:
    def __init__(self, state: AppState) -> None:
        self._state = state

    def describe(self) -> list[Metric]:
        return []  # collected lazily

    def collect(self) -> Iterator[Metric]:
        if not self._state.settings.asr_model:
            return
        engine = self._state.asr
        stats = engine.stats() if engine is not None else {}
        ready = GaugeMetricFamily("vlm_asr_ready", "1 when the speech engine serves requests.")
        ready.add_metric([], float(stats.get("ready", 0.0)))
        yield ready
        in_flight = GaugeMetricFamily(
            "vlm_asr_in_flight", "Transcriptions waiting for or in the speech engine."
        )
        in_flight.add_metric([], float(stats.get("in_flight", 0.0)))
        yield in_flight
        for key, name, doc in _COUNTERS:
            counter = CounterMetricFamily(name, doc)
            counter.add_metric([], float(stats.get(key, 0.0)))
            yield counter
        rtf = GaugeMetricFamily(
            "vlm_asr_real_time_factor",
            "Seconds of audio transcribed per second of pipeline time (higher is faster).",
        )
        pipeline = stats.get("pipeline_seconds", 0.0)
        rtf.add_metric([], stats.get("audio_seconds", 0.0) / pipeline if pipeline else 0.0)
        yield rtf


def install_asr_metrics(app: FastAPI) -> None:
    """Adds the speech engine's metrics to the app's registry (after install_metrics)."""
    state = app_state(app)
    if state.metrics is not None:
        state.metrics.registry.register(_AsrCollector(state))
