"""The engine process: loads a backend, warms it up and runs its loop.

`ContinuousBatchingPipeline.add_request` and `.step` hold the Python GIL for their
whole duration, so the pipeline lives in this process and the API process talks to it
over a `multiprocessing` pipe (utils/engine/client.py) with the messages of
utils/engine/messages.py.

`openvino` and `openvino_genai` are imported inside functions: importing this module
loads nothing."""

from __future__ import annotations

import logging
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from utils.engine.backend import Backend
from utils.engine.continuous import CBBackend
from utils.engine.heap import bound_kernel_cache, limit_arenas
from utils.engine.messages import EngineFatal, EngineReady, WorkerConfig
from utils.engine.tags import image_tag
from utils.engine.types import GenerationRequest, SamplingParams
from utils.engine.vlm import VLMBackend

logger = logging.getLogger(__name__)


def _warm_up(backend: Backend) -> None:
    """One short generation (with a small image) so the first request is not slow."""
    image = np.full((64, 64, 3), 127, dtype=np.uint8)
    request = GenerationRequest(
        request_id="warm-up",
        messages=[{"role": "user", "content": image_tag(0) + "Hi"}],
        params=SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True),
        images=[image],
    )
    backend.add(0, request)
    backend.admit()
    if backend.errors:
        raise RuntimeError(f"warm-up failed: {backend.errors[0].message}")
    backend.events.clear()
    if isinstance(backend, CBBackend):
        while backend.active or backend.pipe.has_non_finished_requests():
            backend.pipe.step()
            backend.collect()
    else:
        assert isinstance(backend, VLMBackend)
        rid, prep = backend.queue.popleft()
        backend.generate(rid, prep)
    if backend.errors:
        raise RuntimeError(f"warm-up failed: {backend.errors[0].message}")
    backend.events.clear()


class _NoSend:
    """Connection stand-in while warming up: outputs are dropped, nothing is read."""

    def poll(self, timeout: float = 0) -> bool:
        return False

    def recv(self) -> Any:
        raise EOFError

    def send(self, obj: Any) -> None:
        return None


def load_backend(conn: Connection, cfg: WorkerConfig) -> Backend:
    import openvino as ov
    import openvino_genai as genai

    orders: dict[str, list[type[Backend]]] = {
        "continuous_batching": [CBBackend],
        "vlm_pipeline": [VLMBackend],
        "auto": [CBBackend, VLMBackend],
    }
    order = orders[cfg.engine]
    last: Exception | None = None
    for cls in order:
        started = time.monotonic()
        try:
            backend = cls(_NoSend(), ov, genai, cfg)
            _warm_up(backend)
        except Exception as exc:
            last = exc
            if cls is CBBackend and len(order) > 1:
                logger.warning(
                    "continuous batching cannot run %s (%s); falling back to VLMPipeline "
                    "(one request at a time)",
                    cfg.model_dir,
                    exc,
                )
            continue
        backend.conn = conn
        backend.stream_interval = cfg.stream_interval_s
        logger.info(
            "engine ready: %s on %s in %.1f s", backend.name, cfg.device, time.monotonic() - started
        )
        return backend
    raise RuntimeError(f"cannot load {cfg.model_dir}: {last}")


def main(conn: Connection, cfg: WorkerConfig) -> None:
    """The engine process's entry point (utils/engine/process.py calls it)."""
    limit_arenas()  # before OpenVINO starts its threads
    bound_kernel_cache()
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format="%(asctime)s %(levelname)s [engine] %(name)s: %(message)s",
    )
    try:
        backend = load_backend(conn, cfg)
    except Exception as exc:
        logger.error("%s", exc)
        try:
            conn.send(EngineFatal(str(exc)))
        finally:
            conn.close()
        return
    conn.send(EngineReady(backend.name, backend.preparer.max_context, backend.preparer.model_type))
    try:
        backend.run()
    finally:
        conn.close()
