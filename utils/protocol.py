"""Wire schema of the chat completions API, mirroring OpenAI's.

Unknown fields are accepted and ignored on purpose (clients send vendor
extensions); fields the server cannot honour are refused by
`ChatCompletionRequest.unsupported_param` with a 400 naming the field.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from utils.errors import OpenAIError, bad_request

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
    "check_json_schema",
    "parse_max_pixels",
    "parse_request",
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


class ImageURL(_Model):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ImageURLPart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, value: Any) -> Any:
        return _url_object(value)


class _VideoOptions(_Model):
    max_pixels: int | None = None
    fps: float | None = Field(None, gt=0, le=240)

    @field_validator("max_pixels", mode="before")
    @classmethod
    def _max_pixels(cls, value: Any) -> int | None:
        return parse_max_pixels(value)


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


ContentPart = Annotated[
    TextPart | ImageURLPart | VideoURLPart | VideoPart,
    Field(discriminator="type"),
]


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_rules(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required for a {self.role} message")
        return self


# --- request ----------------------------------------------------------------


class StreamOptions(_Model):
    include_usage: bool = False


_JSON_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_ONE = (
    "additionalProperties",
    "additionalItems",
    "not",
    "contains",
    "propertyNames",
    "if",
    "then",
    "else",
    "unevaluatedProperties",
    "unevaluatedItems",
)
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_COUNTS = (
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "minContains",
    "maxContains",
)
_BOUNDS = (
    ("minLength", "maxLength"),
    ("minItems", "maxItems"),
    ("minProperties", "maxProperties"),
    ("minimum", "maximum"),
)
_MAX_SCHEMA_NODES = 5000
_MAX_SCHEMA_DEPTH = 64


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_json_schema(schema: Any) -> None:
    """Refuse a JSON schema the structured-output grammar cannot be built from.

    A structural check (types, references, bounds, regular expressions), so a
    malformed schema is a 400 naming the spot instead of a failed generation.
    """
    nodes = 0

    def resolve(ref: str, where: str) -> None:
        if not ref.startswith("#"):
            raise ValueError(f"{where}: only local references ('#/...') are supported")
        node: Any = schema
        for token in ref[1:].split("/")[1:] if ref != "#" else []:
            token = token.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                raise ValueError(f"{where}: the reference '{ref}' does not resolve")
        if not isinstance(node, dict | bool):
            raise ValueError(f"{where}: the reference '{ref}' is not a schema")

    def walk(node: Any, where: str, depth: int) -> None:
        nonlocal nodes
        nodes += 1
        if nodes > _MAX_SCHEMA_NODES or depth > _MAX_SCHEMA_DEPTH:
            raise ValueError("the schema is too large or too deeply nested")
        if isinstance(node, bool):
            return
        if not isinstance(node, dict):
            raise ValueError(f"{where}: a schema must be an object or a boolean")
        kind = node.get("type")
        if kind is not None:
            kinds = kind if isinstance(kind, list) else [kind]
            if not kinds or any(not isinstance(k, str) or k not in _JSON_TYPES for k in kinds):
                raise ValueError(f"{where}.type: {kind!r} is not a JSON schema type")
        ref = node.get("$ref")
        if ref is not None:
            if not isinstance(ref, str):
                raise ValueError(f"{where}.$ref must be a string")
            resolve(ref, f"{where}.$ref")
        for key in _SCHEMA_MAPS:
            if key in node:
                children = node[key]
                if not isinstance(children, dict):
                    raise ValueError(f"{where}.{key} must be an object")
                for name, child in children.items():
                    if key == "patternProperties":
                        _check_regex(name, f"{where}.{key}")
                    walk(child, f"{where}.{key}.{name}", depth + 1)
        for key in _SCHEMA_ONE:
            if key in node:
                walk(node[key], f"{where}.{key}", depth + 1)
        if "items" in node:
            items = node["items"]
            for k, child in enumerate(items) if isinstance(items, list) else [(None, items)]:
                walk(child, f"{where}.items" + ("" if k is None else f"[{k}]"), depth + 1)
        for key in _SCHEMA_LISTS:
            if key in node:
                children = node[key]
                if not isinstance(children, list) or not children:
                    raise ValueError(f"{where}.{key} must be a non-empty list of schemas")
                for k, child in enumerate(children):
                    walk(child, f"{where}.{key}[{k}]", depth + 1)
        if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
            raise ValueError(f"{where}.enum must be a non-empty list")
        required = node.get("required")
        if required is not None and (
            not isinstance(required, list) or not all(isinstance(r, str) for r in required)
        ):
            raise ValueError(f"{where}.required must be a list of property names")
        for key in _COUNTS:
            value = node.get(key)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 0
            ):
                raise ValueError(f"{where}.{key} must be a non-negative integer")
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
            if key in node and not _is_number(node[key]):
                raise ValueError(f"{where}.{key} must be a number")
        if "multipleOf" in node and node["multipleOf"] <= 0:
            raise ValueError(f"{where}.multipleOf must be positive")
        for low, high in _BOUNDS:
            if _is_number(node.get(low)) and _is_number(node.get(high)) and node[low] > node[high]:
                raise ValueError(f"{where}: {low} is larger than {high}")
        if _empty_range(node):
            raise ValueError(f"{where}: no number fits the minimum and maximum")
        if "pattern" in node:
            _check_regex(node["pattern"], f"{where}.pattern")
        if "format" in node and not isinstance(node["format"], str):
            raise ValueError(f"{where}.format must be a string")

    walk(schema, "schema", 0)


def _empty_range(node: dict[str, Any]) -> bool:
    """Whether the numeric bounds of `node` admit no value."""
    bounds = {
        k: node.get(k) for k in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
    }
    if not any(_is_number(v) for v in bounds.values()):
        return False
    if node.get("type") == "integer":
        lows = [math.ceil(bounds["minimum"])] if _is_number(bounds["minimum"]) else []
        if _is_number(bounds["exclusiveMinimum"]):
            lows.append(math.floor(bounds["exclusiveMinimum"]) + 1)
        highs = [math.floor(bounds["maximum"])] if _is_number(bounds["maximum"]) else []
        if _is_number(bounds["exclusiveMaximum"]):
            highs.append(math.ceil(bounds["exclusiveMaximum"]) - 1)
        return bool(lows and highs) and max(lows) > min(highs)
    for low_key, low_open in (("minimum", False), ("exclusiveMinimum", True)):
        for high_key, high_open in (("maximum", False), ("exclusiveMaximum", True)):
            low, high = bounds[low_key], bounds[high_key]
            if (
                _is_number(low)
                and _is_number(high)
                and (low > high or (low == high and (low_open or high_open)))
            ):
                return True
    return False


def _check_regex(pattern: Any, where: str) -> None:
    if not isinstance(pattern, str):
        raise ValueError(f"{where} must be a string")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{where}: invalid regular expression ({exc})") from None
    if re.search(r"\(\?[=!]|\(\?<[=!]|\(\?P=|\\[1-9]|\\k<", pattern):
        raise ValueError(f"{where}: lookarounds and backreferences are not supported")


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

    # Accepted so they can be refused with a clear message instead of ignored.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    web_search_options: Any = None

    @field_validator("messages", mode="before")
    @classmethod
    def _refuse_tool_roles(cls, value: Any) -> Any:
        if isinstance(value, list):
            for i, message in enumerate(value):
                role = message.get("role") if isinstance(message, dict) else None
                if role in ("tool", "function"):
                    raise bad_request(
                        f"messages[{i}]: the '{role}' role is not supported "
                        "(this server does not support tool calling).",
                        param=f"messages[{i}].role",
                        code="unsupported_parameter",
                    )
        return value

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
        if self.tools:
            return "tools", "tool calling is not supported"
        if self.functions:
            return "functions", "function calling is not supported"
        if self.tool_choice not in (None, "none"):
            return "tool_choice", "tool calling is not supported"
        if self.function_call not in (None, "none"):
            return "function_call", "function calling is not supported"
        if self.logprobs:
            return "logprobs", "log probabilities are not supported"
        if self.top_logprobs:
            return "top_logprobs", "log probabilities are not supported"
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


_PART_TAGS = {"text", "image_url", "video_url", "video"}


def _loc_to_param(loc: tuple[Any, ...]) -> str:
    """('messages', 0, 'content', 'list[...]', 1, 'image_url', 'image_url', 'url')
    -> 'messages[0].content[1].image_url.url' (drops pydantic's union branch names)."""
    out = ""
    previous: Any = None
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif (
            "[" in item
            or item in ("str", "list", "int", "bool", "float", "function-before", "function-after")
            or item.startswith("function-")
            or (isinstance(previous, int) and item in _PART_TAGS)
        ):
            pass
        else:
            out += f".{item}" if out else item
        previous = item
    return out


def _depth(error: dict[str, Any]) -> int:
    return len(error.get("loc", ()))


def parse_request(body: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; every problem becomes a 400 naming the field."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        # The deepest error is the most specific (for `content` the `str` branch
        # error is noise when a list was sent).
        first = max(errors, key=_depth) if errors else {}
        param = _loc_to_param(tuple(first.get("loc", ()))) or None
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


# --- responses --------------------------------------------------------------


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(_Model):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class Choice(_Model):
    index: int
    message: ResponseMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


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


class ChunkChoice(_Model):
    index: int
    delta: Delta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


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
