"""The application's state: one typed object per app, made by `create_app`, filled in
by the lifespan, and reached by routes through the `State` dependency."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, FastAPI, Request

from utils.settings import Settings

if TYPE_CHECKING:
    from utils.api.devices import DeviceService
    from utils.api.metrics import Metrics
    from utils.engine.asr_client import AsrClient
    from utils.engine.types import Engine
    from utils.media.cache import DecodedImageCache
    from utils.media.fetch import MediaFetcher


@dataclass(eq=False)
class AppState:
    settings: Settings
    metrics: Metrics | None = None
    devices: DeviceService | None = None  # made on first use (it opens an OpenVINO Core)
    fetcher: MediaFetcher | None = None  # the lifespan's
    image_cache: DecodedImageCache | None = None
    engine: Engine | None = None  # set once the model is loaded
    loader: asyncio.Task[None] | None = None  # exports and loads the model
    asr: AsrClient | None = None  # the speech engine, once VLM_ASR_MODEL is loaded
    asr_loader: asyncio.Task[None] | None = None

    @property
    def phase(self) -> str:
        """`ready`, `restarting`, `loading` or `failed` (the model could not be loaded, or
        the engine failed every restart)."""
        if self.engine is not None:
            if self.engine.ready:
                return "ready"
            return "failed" if self.engine.failed else "restarting"
        loader = self.loader
        if loader is not None and loader.done() and not loader.cancelled() and loader.exception():
            return "failed"
        return "loading"


def app_state(app: FastAPI) -> AppState:
    state: AppState = app.state.vlm
    return state


def get_state(request: Request) -> AppState:
    return app_state(request.app)


State = Annotated[AppState, Depends(get_state)]
