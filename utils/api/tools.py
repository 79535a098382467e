"""Tool calling, request side: the tools and history the chat template gets, the
structured-output constraint for `tool_choice` `required` or a named function, and how
the answer is to be read (utils/api/tool_parsers.py).

`tool_choice` `auto` lets the model answer freely; its calls are parsed from the text
in the family's own format. `required` and a named function constrain the output with
the engine's JSON-schema grammar, as vLLM does: a named function's output is its
arguments object, and `required` is a JSON array of `{"name", "arguments"}` objects,
each matching one of the offered functions. Either way the calls are valid JSON that
matches the schema, whatever the model's weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from utils.api.protocol import ChatCompletionRequest
from utils.api.tool_schema import NamedToolChoice, ToolCall

ToolMode = Literal["auto", "required", "named"]


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How one request uses tools."""

    mode: ToolMode
    tools: list[dict[str, Any]]  # for the chat template, in OpenAI's shape
    function: str | None = None  # the named function
    constraint: str | None = None  # JSON schema text of the output (required, named)


def tool_plan(req: ChatCompletionRequest) -> ToolPlan | None:
    """None when no tools are in play: none offered, or `tool_choice` is `none` (then
    the template does not get them either, so the model is not invited to call)."""
    if not req.tools or req.tool_choice == "none":
        return None
    tools = [tool.model_dump(mode="json", exclude_none=True) for tool in req.tools]
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        function = next(t.function for t in req.tools if t.function.name == name)
        return ToolPlan("named", tools, name, json.dumps(function.parameters_schema))
    if choice == "required":
        options = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": tool.function.name},
                    "arguments": tool.function.parameters_schema,
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for tool in req.tools
        ]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": options}}
        if req.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return ToolPlan("required", tools, constraint=json.dumps(schema))
    return ToolPlan("auto", tools)


def history_tool_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """An assistant message's calls for the chat template. Arguments that are a JSON
    object go in as an object (as vLLM passes them): templates write them with
    `tojson`, and would otherwise quote the string once more."""
    out = []
    for call in calls:
        arguments: Any = call.function.arguments
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            arguments = parsed
        out.append(
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": arguments},
            }
        )
    return out
