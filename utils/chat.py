"""POST /v1/chat/completions and GET /v1/models.

The route validates the request (utils.protocol), fetches and decodes its media
concurrently off the event loop (utils.fetch, utils.media), turns it into a
`GenerationRequest` (utils.generation) and answers with one JSON body or an
OpenAI-style server-sent event stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from utils.errors import OpenAIError, bad_request
from utils.generation import Engine, GenerationEvent, GenerationRequest, ModelInfo, SamplingParams
from utils.media import (
    DecodedImageCache,
    MediaDecodeError,
    load_image,
    load_video,
    stack_frames,
)
from utils.observability import track_generation
from utils.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChunkChoice,
    Delta,
    ImageURLPart,
    ResponseMessage,
    TextPart,
    Usage,
    VideoPart,
    VideoURLPart,
    parse_request,
)
from utils.settings import Settings

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL_ALIASES",
    "MIN_VIDEO_PIXELS",
    "build_generation_request",
    "resolve_model",
    "router",
    "to_sampling_params",
]

router = APIRouter()

# A request may omit `model` or name one of these: it gets the served model.
DEFAULT_MODEL_ALIASES = frozenset({"", "default"})
# Smallest per-frame pixel budget a request may ask for (one 28x28 patch group).
MIN_VIDEO_PIXELS = 28 * 28
_STARTED = int(time.time())
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

T = TypeVar("T")


# --- request fields -> engine parameters -------------------------------------


def to_sampling_params(req: ChatCompletionRequest, settings: Settings) -> SamplingParams:
    """Every request field that steers generation becomes an engine parameter here."""
    max_new_tokens = req.max_new_tokens or settings.default_max_tokens
    if req.min_tokens > max_new_tokens:
        raise bad_request(
            f"min_tokens ({req.min_tokens}) is larger than the output token limit "
            f"({max_new_tokens}).",
            param="min_tokens",
        )
    seed = settings.seed if req.seed is None else req.seed
    top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=top_k,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        seed=seed % 2**64,  # OpenAI seeds are signed 64-bit, the engine's are unsigned
        stop=tuple(req.stop_list),
        n=req.n,
        min_new_tokens=req.min_tokens,
        ignore_eos=req.ignore_eos,
        json_schema=req.json_schema_text,
    )


# --- model names -------------------------------------------------------------


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


# --- media -------------------------------------------------------------------


@dataclass(slots=True)
class _Decoded:
    """Decoded media of one content part: an image (HWC) or a video (FHWC)."""

    image: np.ndarray | None = None
    video: np.ndarray | None = None


def _is_media(part: Any) -> bool:
    return isinstance(part, ImageURLPart | VideoURLPart | VideoPart)


def _is_video(part: Any) -> bool:
    return isinstance(part, VideoURLPart | VideoPart)


_RESERVED_TAG = re.compile(r"<ov_genai_(?:image|video)_\d+>")


def _check_text(text: str, param: str) -> None:
    if _RESERVED_TAG.search(text):
        raise bad_request(
            f"{param} contains a reserved media tag (<ov_genai_image_N> or "
            "<ov_genai_video_N>); send images and videos as content parts.",
            param=param,
        )


def _check_content(messages: Sequence[ChatMessage], settings: Settings) -> None:
    """Reserved tags in text, media only from users, and the media budgets."""
    images = videos = 0
    for i, message in enumerate(messages):
        if isinstance(message.content, str):
            _check_text(message.content, f"messages[{i}].content")
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            if isinstance(part, TextPart):
                _check_text(part.text, f"messages[{i}].content[{j}].text")
            if not _is_media(part):
                continue
            if message.role != "user":
                raise bad_request(
                    f"Images and videos are only accepted in user messages "
                    f"(messages[{i}] is a {message.role} message).",
                    param=f"messages[{i}].content[{j}]",
                )
            if _is_video(part):
                videos += 1
            else:
                images += 1
            frames = part.video if isinstance(part, VideoPart) else None
            if isinstance(frames, list) and len(frames) > settings.max_video_frames:
                raise bad_request(
                    f"The video at messages[{i}].content[{j}] has {len(frames)} "
                    f"frames, more than max_video_frames={settings.max_video_frames}.",
                    param=f"messages[{i}].content[{j}].video",
                    code="too_many_frames",
                )
    if images > settings.max_images_per_request:
        raise bad_request(
            f"The request has {images} images, more than "
            f"max_images_per_request={settings.max_images_per_request}.",
            param="messages",
            code="too_many_images",
        )
    if videos > settings.max_videos_per_request:
        raise bad_request(
            f"The request has {videos} videos, more than "
            f"max_videos_per_request={settings.max_videos_per_request}.",
            param="messages",
            code="too_many_videos",
        )


def _video_max_pixels(requested: int | None, settings: Settings) -> int:
    if requested is None:
        return settings.video_max_pixels
    return max(MIN_VIDEO_PIXELS, min(requested, settings.video_max_pixels))


async def _gather_or_cancel(coros: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Run concurrently; on the first failure cancel the rest and re-raise it."""
    if len(coros) == 1:  # nothing to run alongside: no task to wait for its turn
        return [await coros[0]]
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _MediaLoader:
    """Fetches and decodes the media parts of one request."""

    def __init__(
        self, settings: Settings, fetcher: Any, image_cache: DecodedImageCache | None
    ) -> None:
        self.settings = settings
        self.fetcher = fetcher
        self.image_cache = image_cache
        new_budget = getattr(fetcher, "new_budget", None)
        self.budget = new_budget() if new_budget is not None else None

    async def _fetch(self, url: str, kind: str, where: str) -> bytes:
        kwargs: dict[str, Any] = {"kind": kind}
        if self.budget is not None:
            kwargs["budget"] = self.budget
        try:
            return await self.fetcher.fetch(url, **kwargs)
        except OpenAIError as exc:
            exc.param = exc.param or where
            raise

    async def _decode(self, kind: str, where: str, run: Awaitable[np.ndarray]) -> np.ndarray:
        try:
            return await run
        except MediaDecodeError as exc:
            raise bad_request(
                f"Could not decode {kind} at {where}: {exc}.",
                param=where,
                code="invalid_media",
            ) from None
        except OpenAIError as exc:
            exc.param = exc.param or where
            raise

    async def image(self, url: str, where: str, *, max_pixels: int | None = None) -> np.ndarray:
        data = await self._fetch(url, "image", where)
        return await self._decode(
            "image",
            where,
            load_image(
                data,
                max_pixels=max_pixels or self.settings.image_max_pixels,
                max_decoded_pixels=self.settings.max_decoded_pixels,
                cache=self.image_cache,
            ),
        )

    async def video_file(
        self, url: str, where: str, *, max_pixels: int | None, fps: float | None
    ) -> np.ndarray:
        data = await self._fetch(url, "video", where)
        return await self._decode(
            "video",
            where,
            load_video(
                data,
                fps=fps or self.settings.video_fps,
                max_frames=self.settings.max_video_frames,
                max_pixels=_video_max_pixels(max_pixels, self.settings),
                max_decoded_pixels=self.settings.max_decoded_pixels,
            ),
        )

    async def video_frames(
        self, urls: Sequence[str], where: str, *, max_pixels: int | None
    ) -> np.ndarray:
        budget = _video_max_pixels(max_pixels, self.settings)
        frames = await _gather_or_cancel(
            [
                self.image(url, f"{where}.video[{k}]", max_pixels=budget)
                for k, url in enumerate(urls)
            ]
        )
        return await asyncio.to_thread(stack_frames, frames)

    async def part(self, part: Any, where: str) -> _Decoded:
        if isinstance(part, ImageURLPart):
            return _Decoded(image=await self.image(part.image_url.url, where))
        if isinstance(part, VideoURLPart):
            video = await self.video_file(
                part.video_url.url,
                where,
                max_pixels=part.effective_max_pixels,
                fps=part.effective_fps,
            )
            return _Decoded(video=video)
        assert isinstance(part, VideoPart)
        if isinstance(part.video, str):
            video = await self.video_file(
                part.video, where, max_pixels=part.max_pixels, fps=part.fps
            )
        else:
            video = await self.video_frames(part.video, where, max_pixels=part.max_pixels)
        return _Decoded(video=video)


async def build_generation_request(
    req: ChatCompletionRequest,
    params: SamplingParams,
    *,
    settings: Settings,
    fetcher: Any,
    info: ModelInfo,
    request_id: str,
    image_cache: DecodedImageCache | None = None,
) -> GenerationRequest:
    """The whole conversation with `<ov_genai_image_N>`/`<ov_genai_video_N>` tags
    where its media were, and the decoded media in the same order."""
    _check_content(req.messages, settings)
    loader = _MediaLoader(settings, fetcher, image_cache)
    jobs: list[Coroutine[Any, Any, _Decoded]] = []
    for i, message in enumerate(req.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if _is_media(part):
                    jobs.append(loader.part(part, f"messages[{i}].content[{j}]"))
    decoded = iter(await _gather_or_cancel(jobs))

    images: list[np.ndarray] = []
    videos: list[np.ndarray] = []
    messages: list[dict[str, str]] = []
    for message in req.messages:
        role = "system" if message.role == "developer" else message.role
        if message.content is None or isinstance(message.content, str):
            messages.append({"role": role, "content": message.content or ""})
            continue
        pieces: list[str] = []
        previous_text = False
        for part in message.content:
            if isinstance(part, TextPart):
                pieces.append(("\n" if previous_text else "") + part.text)
                previous_text = True
                continue
            previous_text = False
            media = next(decoded)
            if media.image is not None:
                pieces.append(f"<ov_genai_image_{len(images)}>")
                images.append(media.image)
            elif info.supports_video:
                assert media.video is not None
                pieces.append(f"<ov_genai_video_{len(videos)}>")
                videos.append(media.video)
            else:  # no native video: the sampled frames go in as images
                assert media.video is not None
                for frame in media.video:
                    pieces.append(f"<ov_genai_image_{len(images)}>")
                    images.append(np.ascontiguousarray(frame))
        messages.append({"role": role, "content": "".join(pieces)})
    return GenerationRequest(
        request_id=request_id, messages=messages, params=params, images=images, videos=videos
    )


# --- responses ---------------------------------------------------------------


def _fingerprint(info: ModelInfo) -> str:
    digest = hashlib.sha256(f"{info.name}|{info.model_type}|{info.path}".encode()).hexdigest()
    return f"fp_{digest[:10]}"


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it when the client goes away first. `work` runs in
    this task: handing it to a task of its own would make it wait for its turn on a
    busy event loop."""
    task = asyncio.current_task()
    assert task is not None
    watching, gone = True, False

    def on_disconnect(watcher: asyncio.Future[None]) -> None:
        nonlocal gone
        if watching and not watcher.cancelled() and watcher.exception() is None:
            gone = True
            task.cancel()

    watcher = asyncio.ensure_future(_wait_disconnect(request))
    watcher.add_done_callback(on_disconnect)
    try:
        return await work
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            raise OpenAIError(
                499, "The client closed the connection.", code="client_disconnected"
            ) from None
        raise
    finally:
        watching = False
        watcher.cancel()


@dataclass(slots=True)
class _Totals:
    n: int
    prompt_tokens: int = 0
    completion: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.completion = [0] * self.n

    def add(self, event: GenerationEvent) -> None:
        self.prompt_tokens = max(self.prompt_tokens, event.prompt_tokens)
        if 0 <= event.index < self.n:
            self.completion[event.index] = max(
                self.completion[event.index], event.completion_tokens
            )

    def usage(self) -> Usage:
        completion = sum(self.completion)
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )


async def _complete(
    events: AsyncIterator[GenerationEvent],
    first: GenerationEvent | None,
    *,
    completion_id: str,
    created: int,
    model: str,
    fingerprint: str,
    n: int,
) -> ChatCompletion:
    texts: list[list[str]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    totals = _Totals(n)

    def take(event: GenerationEvent) -> None:
        totals.add(event)
        if 0 <= event.index < n:
            texts[event.index].append(event.text)
            if event.finish_reason:
                finish[event.index] = event.finish_reason

    try:
        if first is not None:
            take(first)
            async for event in events:
                take(event)
    finally:
        await _aclose(events)
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=model,
        system_fingerprint=fingerprint,
        choices=[
            Choice(
                index=k,
                message=ResponseMessage(content="".join(texts[k])),
                finish_reason=finish[k] or "stop",  # type: ignore[arg-type]
            )
            for k in range(n)
        ],
        usage=totals.usage(),
    )


def _sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


class _ChunkWriter:
    """Renders the chunks of one stream as `ChatCompletionChunk.to_json` would.

    The role and usage chunks go through the model; the per-token content and
    finish chunks are spliced into a JSON template of the stream's fixed fields,
    with only the new text encoded each time.
    """

    __slots__ = ("_base", "_head", "_tail")

    def __init__(self, base: ChatCompletionChunk, include_usage: bool) -> None:
        self._base = base
        template = base.to_json(with_usage_field=include_usage)
        head, sep, tail = template.partition('"choices":[]')
        assert sep, template
        self._head = "data: " + head + '"choices":[{"index":'
        self._tail = "]" + tail + "\n\n"

    def model(self, choices: list[ChunkChoice], usage: Usage | None, include_usage: bool) -> bytes:
        body = self._base.model_copy(update={"choices": choices, "usage": usage})
        return _sse(body.to_json(with_usage_field=include_usage))

    def content(self, index: int, text: str) -> str:
        return (
            f'{self._head}{index},"delta":{{"content":'
            f'{json.dumps(text, ensure_ascii=False)}}},"logprobs":null,'
            f'"finish_reason":null}}{self._tail}'
        )

    def finish(self, index: int, reason: str) -> str:
        return (
            f'{self._head}{index},"delta":{{}},"logprobs":null,'
            f'"finish_reason":{json.dumps(reason)}}}{self._tail}'
        )


_DONE = b"data: [DONE]\n\n"


async def _stream(
    events: AsyncIterator[GenerationEvent],
    first: GenerationEvent | None,
    *,
    completion_id: str,
    created: int,
    model: str,
    fingerprint: str,
    n: int,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """The SSE body. Chunks that are ready together go out as one write (the
    role chunks with the first text, the last text with the finish, usage and
    [DONE] chunks); the bytes on the wire are the same as one write per chunk."""
    totals = _Totals(n)
    writer = _ChunkWriter(
        ChatCompletionChunk(
            id=completion_id,
            created=created,
            model=model,
            system_fingerprint=fingerprint,
            choices=[],
            usage=None,
        ),
        include_usage,
    )
    unfinished = n

    def render(event: GenerationEvent) -> str:
        nonlocal unfinished
        totals.add(event)
        out = ""
        if event.text:
            out = writer.content(event.index, event.text)
        if event.finish_reason:
            out += writer.finish(event.index, event.finish_reason)
            unfinished -= 1
        return out

    held = b""  # rendered, not yet sent: the last chunks, sent with what follows
    final = _DONE
    try:
        head = b"".join(
            writer.model(
                [ChunkChoice(index=k, delta=Delta(role="assistant", content=""))],
                None,
                include_usage,
            )
            for k in range(n)
        )
        if first is not None:
            head += render(first).encode()
        if unfinished > 0 or first is None:
            yield head
        else:
            held = head
        if first is not None:
            async for event in events:
                data = render(event)
                if unfinished > 0:
                    if data:
                        yield data.encode()
                else:
                    held += data.encode()
        if include_usage:
            held += writer.model([], totals.usage(), include_usage)
    except OpenAIError as exc:
        logger.info("[%s] stream ended with error %s: %s", completion_id, exc.status, exc.message)
        held += _sse(json.dumps(exc.body()))
    except Exception:
        logger.exception("[%s] stream failed", completion_id)
        error = OpenAIError(500, "The server had an error while processing your request.")
        held += _sse(json.dumps(error.body()))
    finally:
        await _aclose(events)
    yield held + final


# --- routes ------------------------------------------------------------------


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


def _ready_engine(request: Request) -> Engine:
    engine: Engine | None = getattr(request.app.state, "engine", None)
    if engine is None or not engine.ready:
        raise OpenAIError(
            503,
            "The model is loading; retry shortly.",
            code="model_not_ready",
            headers={"Retry-After": "5"},
        )
    return engine


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    settings: Settings = request.app.state.settings
    return {"object": "list", "data": [_model_card(settings.public_model_name)]}


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    settings: Settings = request.app.state.settings
    engine = getattr(request.app.state, "engine", None)
    return _model_card(resolve_model(model_id or None, settings, engine))


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
async def create_chat_completion(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    req = parse_request(await _json_body(request))
    unsupported = req.unsupported_param()
    if unsupported is not None:
        param, reason = unsupported
        raise bad_request(
            f"'{param}' is not supported by this server: {reason}.",
            param=param,
            code="unsupported_parameter",
        )
    model = resolve_model(req.model, settings, getattr(request.app.state, "engine", None))
    params = to_sampling_params(req, settings)
    engine = _ready_engine(request)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    fingerprint = _fingerprint(engine.info)

    async def start() -> tuple[AsyncIterator[GenerationEvent], GenerationEvent | None]:
        generation = await build_generation_request(
            req,
            params,
            settings=settings,
            fetcher=request.app.state.fetcher,
            info=engine.info,
            request_id=completion_id,
            image_cache=request.app.state.image_cache,
        )
        events = aiter(track_generation(request, engine.generate(generation), generation))
        try:
            # The first event comes after admission: a full queue or a prompt
            # too long for the context still gets its own HTTP status.
            return events, await anext(events, None)
        except BaseException:
            await _aclose(events)
            raise

    events, first = await _unless_disconnected(request, start())
    common = {
        "completion_id": completion_id,
        "created": created,
        "model": model,
        "fingerprint": fingerprint,
        "n": req.n,
    }
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(
            _stream(events, first, include_usage=include_usage, **common),
            media_type="text/event-stream",
            headers=_SSE_HEADERS,
        )
    completion = await _unless_disconnected(request, _complete(events, first, **common))
    return JSONResponse(completion.model_dump(mode="json"))
