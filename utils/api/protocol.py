"""Wire schema of the chat completions API, mirroring OpenAI's.

Unknown fields are accepted and ignored on purpose (clients send vendor
extensions); fields the server cannot honour are named by
`ChatCompletionRequest.unsupported_param`, which utils/api/validation.py turns into a
400 naming the field.
"""

from __future__ import annotations

import json
import re
import time
from typing import Annotated, Any, Literal, TypeGuard

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from utils.api.json_schema import check_json_schema
from utils.api.tool_schema import (
    ChoiceLogprobs,
    NamedToolChoice,
    ToolCall,
    ToolCallDelta,
    ToolDefinition,
)

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatMessage",
    "ContentPart",
    "ImageURLPart",
    "TextPart",
    "Usage",
    "VideoPart",
    "VideoURLPart",
    "is_media",
    "parse_max_pixels",
]

_MAX_PIXELS_LIMIT = 1 << 40
_PRODUCT = re.compile(r"^\s*\d{1,9}(\s*[*xX]\s*\d{1,9})*\s*$")


def parse_max_pixels(value: Any) -> int | None:
    """`max_pixels` as an int: 153600, "153600" or a product such as "360*420".

    Parsed with a regular expression, never evaluated.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("max_pixels must be an integer or a product such as '360*420'")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        result = value
    elif isinstance(value, str) and _PRODUCT.match(value):
        result = 1
        for factor in re.split(r"[*xX]", value):
            result *= int(factor)
    else:
        raise ValueError("max_pixels must be an integer or a product such as '360*420'")
    if not 1 <= result <= _MAX_PIXELS_LIMIT:
        raise ValueError("max_pixels must be a positive number of pixels")
    return result


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


# --- content parts ----------------------------------------------------------


class TextPart(_Model):
    type: Literal["text"]
    text: str


def _url_object(value: Any) -> Any:
    """`{"url": value}` for a URL sent as a plain string, as some clients do."""
    return {"url": value} if isinstance(value, str) else value


class _PixelBudget(_Model):
    max_pixels: int | None = None

    @field_validator("max_pixels", mode="before")
    @classmethod
    def _max_pixels(cls, value: Any) -> int | None:
        return parse_max_pixels(value)


class ImageURL(_PixelBudget):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImageURLPart(_PixelBudget):
    """An image by URL; `max_pixels` (an extension) may sit here or in `image_url`."""

    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, value: Any) -> Any:
        return _url_object(value)

    @property
    def effective_max_pixels(self) -> int | None:
        return self.image_url.max_pixels or self.max_pixels


class _VideoOptions(_PixelBudget):
    fps: float | None = Field(None, gt=0, le=240)


class VideoURL(_VideoOptions):
    url: str = Field(min_length=1)


class VideoURLPart(_VideoOptions):
    """A video file by URL; `max_pixels` and `fps` may sit here or in `video_url`."""

    type: Literal["video_url"]
    video_url: VideoURL

    @field_validator("video_url", mode="before")
    @classmethod
    def _bare_url(cls, value: Any) -> Any:
        return _url_object(value)

    @property
    def effective_max_pixels(self) -> int | None:
        return self.video_url.max_pixels or self.max_pixels

    @property
    def effective_fps(self) -> float | None:
        return self.video_url.fps or self.fps


class VideoPart(_VideoOptions):
    """Qwen-style `video`: a list of frame URLs (one video), or one video URL."""

    type: Literal["video"]
    video: list[Annotated[str, Field(min_length=1)]] | str = Field(min_length=1)


MediaPart = ImageURLPart | VideoURLPart | VideoPart


def is_media(part: object) -> TypeGuard[MediaPart]:
    return isinstance(part, MediaPart)


ContentPart = Annotated[
    TextPart | ImageURLPart | VideoURLPart | VideoPart,
    Field(discriminator="type"),
]


class ChatMessage(_Model):
    # function messages parse, so that validation can refuse them by name
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # of an assistant message
    tool_call_id: str | None = None  # of a tool message: the call it answers

    @model_validator(mode="after")
    def _content_rules(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required for a {self.role} message")
        return self


# --- request ----------------------------------------------------------------


class StreamOptions(_Model):
    include_usage: bool = False


class JSONSchemaFormat(_Model):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            check_json_schema(value)
        return value


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is 'json_schema'")
        return self


_INT64 = 2**63


class ChatCompletionRequest(_Model):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    # Extensions (vLLM's names) for fixed-length outputs in tests and benchmarks.
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    # Extension: percent of visual tokens to prune (utils/media/budget.py).
    pruning_ratio: int | None = Field(None, ge=0, le=99)

    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    # Accepted so they can be refused with a clear message instead of ignored.
    functions: list[Any] | None = None
    function_call: Any = None
    logit_bias: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else value or []
        if len(items) > 16:
            raise ValueError("at most 16 stop sequences are allowed")
        if any(not item for item in items):
            raise ValueError("stop sequences must not be empty")
        return value

    def unsupported_param(self) -> tuple[str, str] | None:
        """(param, reason) of the first field this server cannot honour."""
        if self.functions:
            return "functions", "the legacy function calling is not supported; use 'tools'"
        if self.function_call not in (None, "none"):
            return "function_call", "the legacy function calling is not supported; use 'tools'"
        if self.top_logprobs:
            return (
                "top_logprobs",
                "the engine reports the log probability of the chosen token only, not of "
                "its alternatives; use top_logprobs 0 or leave it out",
            )
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        if self.audio is not None:
            return "audio", "audio output is not supported"
        if self.modalities is not None and any(m != "text" for m in self.modalities):
            return "modalities", "only the 'text' output modality is supported"
        if self.prediction is not None:
            return "prediction", "predicted outputs are not supported"
        if self.web_search_options is not None:
            return "web_search_options", "web search is not supported"
        if self.stream_options is not None and not self.stream:
            return "stream_options", "stream_options is only allowed when stream is true"
        return None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def json_schema_text(self) -> str | None:
        """The JSON schema that constrains the output, as text (None: free text)."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return json.dumps({"type": "object"})
        assert fmt.json_schema is not None
        schema = fmt.json_schema.schema_
        return json.dumps({"type": "object"} if schema is None else schema)


# --- responses --------------------------------------------------------------


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReasonName = Literal["stop", "length", "tool_calls"]


class ResponseMessage(_Model):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    # only when there are any, as OpenAI sends it
    tool_calls: list[ToolCall] | None = Field(None, exclude_if=lambda calls: calls is None)


class Choice(_Model):
    index: int
    message: ResponseMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReasonName | None


class ChatCompletion(_Model):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    choices: list[Choice]
    usage: Usage


class Delta(_Model):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(_Model):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReasonName | None = None


class ChatCompletionChunk(_Model):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None

    def to_json(self, *, with_usage_field: bool) -> str:
        """The chunk as OpenAI sends it: `delta` without null members, and a
        `usage` member only when the client asked for usage."""
        data = self.model_dump(mode="json")
        for choice, model in zip(data["choices"], self.choices, strict=True):
            choice["delta"] = model.delta.model_dump(mode="json", exclude_none=True)
        if not with_usage_field:
            data.pop("usage")
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))
