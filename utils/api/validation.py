"""Every check of a chat request, in one place; each problem becomes a 400 naming the
field (`param`).

`parse_request` validates the body against the wire schema (utils/api/protocol.py);
`check_request` then checks what the schema alone cannot: fields this server cannot
honour, roles, reserved tags, media placement and counts, and token limits.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from utils.api.audio_parts import refuse_audio_parts
from utils.api.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    TextPart,
    VideoPart,
    VideoURLPart,
    is_media,
)
from utils.api.tool_schema import NamedToolChoice
from utils.engine.tags import has_tag
from utils.errors import OpenAIError, bad_request, loc_to_param
from utils.settings import Settings

logger = logging.getLogger(__name__)

_KNOWN_FIELDS = frozenset(
    field.alias or name for name, field in ChatCompletionRequest.model_fields.items()
)


def check_request(req: ChatCompletionRequest, settings: Settings) -> None:
    """What the schema cannot express; raises a 400 `OpenAIError` for the first problem."""
    unsupported = req.unsupported_param()
    if unsupported is not None:
        param, reason = unsupported
        raise bad_request(
            f"'{param}' is not supported by this server: {reason}.",
            param=param,
            code="unsupported_parameter",
        )
    _check_tools(req)
    _check_messages(req.messages, settings)
    max_new_tokens = req.max_new_tokens or settings.default_max_tokens
    if req.min_tokens > max_new_tokens:
        raise bad_request(
            f"min_tokens ({req.min_tokens}) is larger than the output token limit "
            f"({max_new_tokens}).",
            param="min_tokens",
        )


def _depth(error: dict[str, Any]) -> int:
    return len(error.get("loc", ()))


def parse_request(body: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body against the schema; every problem becomes a 400
    naming the field. Fields the schema does not know are ignored (clients send vendor
    extensions) and named in a debug log line, so a typo can be found."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    refuse_audio_parts(body)
    ignored = sorted(set(body) - _KNOWN_FIELDS)
    if ignored:
        logger.debug("ignored request fields: %s", ", ".join(map(str, ignored)))
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        errors: list[dict[str, Any]] = [
            dict(error) for error in exc.errors(include_url=False, include_input=False)
        ]
        # The deepest error is the most specific (for `content` the `str` branch
        # error is noise when a list was sent).
        first = max(errors, key=_depth) if errors else {}
        param = loc_to_param(tuple(first.get("loc", ()))) or None
        msg = str(first.get("msg", "invalid value"))
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if first.get("type") == "missing":
            message = f"Missing required parameter: '{param}'."
        elif param:
            message = f"Invalid value for '{param}': {msg}"
        else:
            message = f"Invalid request: {msg}"
        raise OpenAIError(400, message, param=param, code="invalid_value") from None


def _check_text(text: str, param: str) -> None:
    if has_tag(text):
        raise bad_request(
            f"{param} contains a reserved media tag (<ov_genai_image_N> or "
            "<ov_genai_video_N>); send images and videos as content parts.",
            param=param,
        )


def _check_messages(messages: Sequence[ChatMessage], settings: Settings) -> None:
    """Reserved tags in text, media only from users, and the media budgets."""
    images = videos = 0
    for i, message in enumerate(messages):
        _check_tool_turn(message, i)
        if isinstance(message.content, str):
            _check_text(message.content, f"messages[{i}].content")
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            if isinstance(part, TextPart):
                _check_text(part.text, f"messages[{i}].content[{j}].text")
            if not is_media(part):
                continue
            if message.role != "user":
                raise bad_request(
                    f"Images and videos are only accepted in user messages "
                    f"(messages[{i}] is a {message.role} message).",
                    param=f"messages[{i}].content[{j}]",
                )
            if isinstance(part, VideoURLPart | VideoPart):
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


def _check_tools(req: ChatCompletionRequest) -> None:
    """`tools`, `tool_choice` and `logprobs` against each other."""
    names = [tool.function.name for tool in req.tools or []]
    if len(set(names)) != len(names):
        raise bad_request("Function names in 'tools' must be unique.", param="tools")
    choice = req.tool_choice
    if choice not in (None, "none") and not names:
        raise bad_request(
            "'tool_choice' is only allowed when 'tools' are specified.", param="tool_choice"
        )
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise bad_request(
            f"tool_choice names the function '{choice.function.name}', which is not in 'tools'.",
            param="tool_choice.function.name",
        )
    forced = choice == "required" or isinstance(choice, NamedToolChoice)
    if forced and req.json_schema_text is not None:
        raise bad_request(
            "'response_format' cannot be combined with a tool_choice that forces a call "
            "(the call's arguments already follow the function's schema).",
            param="response_format",
        )
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request(
            "'logprobs' must be true when 'top_logprobs' is given.", param="top_logprobs"
        )


def _check_tool_turn(message: ChatMessage, i: int) -> None:
    """Tool results answer a call by id; calls come from the assistant."""
    if message.role == "function":
        raise bad_request(
            f"messages[{i}]: the legacy 'function' role is not supported; send tool "
            "results as 'tool' messages with their 'tool_call_id'.",
            param=f"messages[{i}].role",
            code="unsupported_parameter",
        )
    if message.role == "tool" and not message.tool_call_id:
        raise bad_request(
            f"messages[{i}]: a 'tool' message needs the 'tool_call_id' of the call it answers.",
            param=f"messages[{i}].tool_call_id",
        )
    if message.tool_calls and message.role != "assistant":
        raise bad_request(
            f"messages[{i}]: only assistant messages carry 'tool_calls'.",
            param=f"messages[{i}].tool_calls",
        )
