"""A chat request turned into what the engine takes: sampling parameters, and the
conversation with media tags where its images and videos were (utils/engine/tags.py).

The request has passed utils/api/validation.py by the time it gets here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Coroutine
from typing import Any

import numpy as np

from utils.api.protocol import ChatCompletionRequest, ChatMessage, TextPart, is_media
from utils.api.tools import history_tool_calls, tool_plan
from utils.engine.tags import image_tag, video_tag
from utils.engine.types import Engine, GenerationRequest, ModelInfo, SamplingParams
from utils.engine.visual_tokens import VisualTokenCounter
from utils.media.budget import ImageBudgets, check_visual_tokens, pruning_ratio, visual_tokens
from utils.media.cache import DecodedImageCache
from utils.media.loader import DecodedPart, MediaLoader, gather_or_cancel
from utils.settings import Settings


def to_sampling_params(req: ChatCompletionRequest, settings: Settings) -> SamplingParams:
    """Every request field that steers generation becomes an engine parameter here."""
    max_new_tokens = req.max_new_tokens or settings.default_max_tokens
    seed = settings.seed if req.seed is None else req.seed
    top_k = req.top_k if req.top_k is not None and req.top_k > 0 else 0
    plan = tool_plan(req)
    constraint = plan.constraint if plan is not None else None
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
        json_schema=constraint or req.json_schema_text,
        logprobs=bool(req.logprobs),
    )


def with_pruning(
    params: SamplingParams, req: ChatCompletionRequest, engine: Engine, settings: Settings
) -> SamplingParams:
    """`params` with the pruning ratio the request runs with; a 400 naming
    `pruning_ratio` where the model or engine cannot prune."""
    backend = str(getattr(engine, "backend", ""))
    ratio = pruning_ratio(req.pruning_ratio, engine.info.model_type, backend, settings)
    return dataclasses.replace(params, pruning_ratio=ratio)


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
    budgets = ImageBudgets.for_model(info.model, settings)
    loader = MediaLoader(settings, fetcher, image_cache, budgets)
    jobs: list[Coroutine[Any, Any, DecodedPart]] = []
    for i, message in enumerate(req.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if is_media(part):
                    jobs.append(loader.part(part, f"messages[{i}].content[{j}]"))
    decoded = iter(await gather_or_cancel(jobs))

    images: list[np.ndarray] = []
    videos: list[np.ndarray] = []
    video_fps: list[float] = []
    messages: list[dict[str, Any]] = []
    for message in req.messages:
        role = "system" if message.role == "developer" else message.role
        if message.content is None or isinstance(message.content, str):
            messages.append(_turn(message, role, message.content or ""))
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
                pieces.append(image_tag(len(images)))
                images.append(media.image)
            elif info.supports_video:
                assert media.video is not None
                pieces.append(video_tag(len(videos)))
                videos.append(media.video)
                video_fps.append(media.fps)
            else:  # no native video: the sampled frames go in as images
                assert media.video is not None
                for frame in media.video:
                    pieces.append(image_tag(len(images)))
                    images.append(np.ascontiguousarray(frame))
        messages.append(_turn(message, role, "".join(pieces)))
    if info.model is not None and (images or videos):
        counter = VisualTokenCounter.for_model(info.model)
        check_visual_tokens(visual_tokens(counter, images, videos, video_fps), settings)
    plan = tool_plan(req)
    return GenerationRequest(
        request_id=request_id,
        messages=messages,
        params=params,
        images=images,
        videos=videos,
        video_fps=video_fps,
        tools=plan.tools if plan is not None else None,
    )


def _turn(message: ChatMessage, role: str, content: str) -> dict[str, Any]:
    """One message for the chat template; tool calls and results keep their ids."""
    turn: dict[str, Any] = {"role": role, "content": content}
    if message.tool_calls:
        turn["tool_calls"] = history_tool_calls(message.tool_calls)
    if message.tool_call_id is not None:
        turn["tool_call_id"] = message.tool_call_id
    return turn
