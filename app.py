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

from utils.chat import router as chat_router
from utils.devices import DeviceError, check_device
from utils.devices import router as devices_router
from utils.engine import EngineClient
from utils.errors import install_error_handlers
from utils.export import ModelExportError, ensure_model, preflight
from utils.fetch import MediaFetcher
from utils.media import DecodedImageCache
from utils.observability import install_observability
from utils.security import install_log_filter, install_security
from utils.settings import Settings, SettingsLoadError, load_settings

logger = logging.getLogger("vlm")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.fetcher = MediaFetcher(settings)
        app.state.image_cache = (
            DecodedImageCache(settings.image_cache_mb * 2**20) if settings.image_cache_mb else None
        )
        app.state.engine = None

        async def load() -> None:
            # Export and warm-up can take minutes on a real model: run them in
            # the background so /health answers and readiness says "loading".
            try:
                model_dir = await asyncio.to_thread(ensure_model, settings)
                engine = EngineClient(settings, model_dir)
                await engine.start()
            except Exception:
                logger.exception("the model could not be loaded; /ready stays 503")
                raise
            app.state.engine = engine

        loader = asyncio.create_task(load())
        app.state.loader = loader
        try:
            yield
        finally:
            loader.cancel()
            with contextlib.suppress(BaseException):
                await loader
            if app.state.engine is not None:
                await app.state.engine.stop()
            await app.state.fetcher.aclose()

    app = FastAPI(title="OpenVINO VLM server", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    install_error_handlers(app)
    install_security(app, settings)
    install_observability(app)  # after security: counts its 401/413 answers too
    app.include_router(devices_router)
    app.include_router(chat_router)
    return app


def main() -> None:
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
