"""OpenAI-compatible vision-language model server on OpenVINO.

`create_app(settings)` wires the pieces together; `python app.py` serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI

from utils.errors import install_error_handlers
from utils.settings import Settings

logger = logging.getLogger("vlm")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from utils.engine import EngineClient
        from utils.export import ensure_model
        from utils.fetch import MediaFetcher

        app.state.fetcher = MediaFetcher(settings)
        app.state.engine = None

        async def load() -> None:
            # Export and warm-up can take minutes on a real model: run them in
            # the background so /health answers and readiness says "loading".
            model_dir = await asyncio.to_thread(ensure_model, settings)
            engine = EngineClient(settings, model_dir)
            await engine.start()
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
    return app


def main() -> None:
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
