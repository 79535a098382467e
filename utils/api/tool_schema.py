"""Wire schema of tool calling and log probabilities, mirroring OpenAI's: the tools a
request offers, the calls in a conversation's history and in an answer, and the
`logprobs` of a choice."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from utils.api.json_schema import check_json_schema

__all__ = [
    "ChoiceLogprobs",
    "FunctionCall",
    "FunctionCallDelta",
    "FunctionDefinition",
    "NamedToolChoice",
    "TokenLogprob",
    "ToolCall",
    "ToolCallDelta",
    "ToolDefinition",
]

# OpenAI's rule for function names
FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class FunctionDefinition(_Model):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _valid_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            check_json_schema(value)
        return value

    @property
    def parameters_schema(self) -> dict[str, Any]:
        """The arguments' JSON schema; a function without one takes any object."""
        return self.parameters if self.parameters is not None else {"type": "object"}


class ToolDefinition(_Model):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class _FunctionName(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"] = "function"
    function: _FunctionName


class FunctionCall(_Model):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(_Model):
    """A call in an assistant message: in the history a client sends, and in answers."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(_Model):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(_Model):
    """A piece of a streamed call: index, id, type and name first, then arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class TokenLogprob(_Model):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[Any] = Field(default_factory=list)


class ChoiceLogprobs(_Model):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None
