"""POST /v1/chat/completions.

The route parses and validates the request (utils/api/validation.py), turns it into a
`GenerationRequest` with its media fetched and decoded (utils/api/requests.py,
utils/media/loader.py) and answers with one JSON body or an OpenAI-style server-sent
event stream (utils/api/responses.py).
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from utils.api.choice_output import output_shape
from utils.api.disconnect import unless_disconnected
from utils.api.metrics import track_generation
from utils.api.models import resolve_model
from utils.api.protocol import ChatCompletion, ChatCompletionRequest
from utils.api.requests import build_generation_request, to_sampling_params, with_pruning
from utils.api.responses import (
    SSE_HEADERS,
    ResponseMeta,
    aclose,
    complete,
    stream,
    system_fingerprint,
)
from utils.api.state import AppState, State
from utils.api.validation import check_request, parse_request
from utils.engine.types import Engine, GenerationEvent
from utils.errors import OpenAIError, bad_request

router = APIRouter()


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its `$defs` inlined (for OpenAPI)."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(copy.deepcopy(defs[ref.removeprefix("#/$defs/")]))
            return {k: walk(v) for k, v in node.items() if k != "discriminator"}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


_REQUEST_SCHEMA = _inline_refs(ChatCompletionRequest.model_json_schema(by_alias=True))


async def _json_body(request: Request) -> Any:
    try:
        raw = await request.body()
    except ClientDisconnect:  # gone before its body arrived: nobody reads the answer
        raise OpenAIError(499, "The client closed the request.", code="client_closed") from None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("The request body is not valid JSON.") from None


def _ready_engine(state: AppState) -> Engine:
    engine = state.engine
    if engine is None or not engine.ready:
        raise OpenAIError(
            503,
            "The model is loading; retry shortly.",
            code="model_not_ready",
            headers={"Retry-After": "5"},
        )
    return engine


@router.post(
    "/v1/chat/completions",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _REQUEST_SCHEMA}},
        }
    },
    responses={200: {"model": ChatCompletion}},
)
async def create_chat_completion(request: Request, state: State) -> Response:
    settings = state.settings
    req = parse_request(await _json_body(request))
    check_request(req, settings)
    model = resolve_model(req.model, settings, state.engine)
    params = to_sampling_params(req, settings)
    engine = _ready_engine(state)
    params = with_pruning(params, req, engine, settings)
    assert state.fetcher is not None  # made by the lifespan, before any request
    fetcher = state.fetcher
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    fingerprint = system_fingerprint(engine.info)

    async def start() -> tuple[AsyncIterator[GenerationEvent], GenerationEvent | None]:
        generation = await build_generation_request(
            req,
            params,
            settings=settings,
            fetcher=fetcher,
            info=engine.info,
            request_id=completion_id,
            image_cache=state.image_cache,
        )
        events = aiter(track_generation(state, request, engine.generate(generation), generation))
        try:
            # The first event comes after admission: a full queue or a prompt
            # too long for the context still gets its own HTTP status.
            return events, await anext(events, None)
        except BaseException:
            await aclose(events)
            raise

    events, first = await unless_disconnected(request, start())
    shape = output_shape(req, engine.info.model_type)
    meta = ResponseMeta(completion_id, created, model, fingerprint, req.n, shape)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            stream(events, first, meta, include_usage=include_usage),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )
    completion = await unless_disconnected(request, complete(events, first, meta))
    return JSONResponse(completion.model_dump(mode="json"))
