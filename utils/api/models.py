"""GET /v1/models and the served model's names."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter

from utils.api.state import State
from utils.engine.types import Engine
from utils.errors import OpenAIError
from utils.settings import Settings

router = APIRouter()

# A request may omit `model` or name one of these: it gets the served model.
DEFAULT_MODEL_ALIASES = frozenset({"", "default"})


_STARTED = int(time.time())


def _model_names(settings: Settings, engine: Engine | None) -> set[str]:
    names = {settings.public_model_name, settings.model_name}
    if engine is not None:
        names.add(engine.info.name)
    return names


def resolve_model(requested: str | None, settings: Settings, engine: Engine | None) -> str:
    """The served model's public name, or 404 `model_not_found`.

    An omitted `model` (or "default") means the one model this server serves.
    """
    if requested is None or requested.strip() in DEFAULT_MODEL_ALIASES:
        return settings.public_model_name
    if requested in _model_names(settings, engine):
        return settings.public_model_name
    raise OpenAIError(
        404,
        f"The model '{requested}' does not exist; this server serves "
        f"'{settings.public_model_name}'.",
        param="model",
        code="model_not_found",
    )


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": _STARTED, "owned_by": "openvino"}


@router.get("/v1/models")
async def list_models(state: State) -> dict[str, Any]:
    names = [state.settings.public_model_name]
    if state.settings.asr_model:  # the speech endpoints' Whisper model
        names.append(state.settings.asr_model)
    return {"object": "list", "data": [_model_card(name) for name in names]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, state: State) -> dict[str, Any]:
    return _model_card(resolve_model(model_id or None, state.settings, state.engine))
