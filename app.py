"""OpenAI-compatible vision-language model server on OpenVINO.

`create_app(settings)` wires the pieces together; `python app.py` serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI

from utils.api.asr_metrics import install_asr_metrics
from utils.api.audio import router as audio_router
from utils.api.chat import router as chat_router
from utils.api.devices import router as devices_router
from utils.api.health import router as health_router
from utils.api.metrics import install_metrics
from utils.api.models import router as models_router
from utils.api.security import install_log_filter, install_security
from utils.api.state import AppState, app_state
from utils.devices import DeviceError, check_device
from utils.engine.asr_client import AsrClient
from utils.engine.client import EngineClient
from utils.engine.heap import limit_arenas
from utils.errors import install_error_handlers
from utils.media.cache import DecodedImageCache
from utils.media.fetch import MediaFetcher
from utils.models.asr_export import asr_preflight, ensure_asr_model
from utils.models.export import ModelExportError, ensure_model, preflight
from utils.settings import Settings, SettingsLoadError, load_settings

logger = logging.getLogger("vlm")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app_state(app)
    settings = state.settings
    state.fetcher = MediaFetcher(settings)
    if settings.image_cache_mb:
        state.image_cache = DecodedImageCache(settings.image_cache_mb * 2**20)

    async def load() -> None:
        # Export and warm-up can take minutes on a real model: run them in the
        # background so /health answers and readiness says "loading".
        try:
            model_dir = await asyncio.to_thread(ensure_model, settings)
            engine = EngineClient(settings, model_dir)
            await engine.start()
        except ModelExportError as exc:  # says what to change, in one line
            logger.error("the model could not be loaded; /ready stays 503: %s", exc)
            raise
        except Exception:
            logger.exception("the model could not be loaded; /ready stays 503")
            raise
        state.engine = engine

    async def load_speech() -> None:
        # The speech model gets an engine process of its own, loaded beside the chat model.
        try:
            model_dir = await asyncio.to_thread(ensure_asr_model, settings)
            if model_dir is None:
                return
            asr = AsrClient(settings, model_dir)
            await asr.start()
        except Exception as exc:
            logger.error("the speech model could not be loaded: %s", exc)
            raise
        state.asr = asr

    state.loader = asyncio.create_task(load())
    if settings.asr_model:
        state.asr_loader = asyncio.create_task(load_speech())
    try:
        yield
    finally:
        for loader in (state.loader, state.asr_loader):
            if loader is not None:
                loader.cancel()
                with contextlib.suppress(BaseException):
                    await loader
        if isinstance(state.engine, EngineClient):
            await state.engine.stop()
        if state.asr is not None:
            await state.asr.stop()
        await state.fetcher.aclose()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    app = FastAPI(title="OpenVINO VLM server", version="0.1.0", lifespan=lifespan)
    app.state.vlm = AppState(settings=settings)
    install_error_handlers(app)
    install_security(app, settings)
    install_metrics(app)  # after security: counts its 401/413 answers too
    install_asr_metrics(app)
    app.include_router(health_router)
    app.include_router(devices_router)
    app.include_router(models_router)
    app.include_router(chat_router)
    app.include_router(audio_router)
    return app


def main() -> None:
    limit_arenas()  # before any thread starts
    try:
        settings = load_settings()
    except SettingsLoadError as exc:
        sys.exit(f"error: {exc}")
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s",
    )
    install_log_filter()  # request ids in every line; payloads and keys scrubbed
    try:  # a device that is not there fails here, not minutes later in the engine
        check_device(settings)
    except DeviceError as exc:
        sys.exit(f"error: {exc}")
    try:  # a model that cannot be found or exported fails here, in one line
        preflight(settings)
        asr_preflight(settings)
    except ModelExportError as exc:
        sys.exit(f"error: {exc}")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
