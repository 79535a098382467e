"""One choice's answer when it is more than text: tool calls parsed out of it, and the
log probabilities of its tokens.

`ChoiceReader` turns the engine's text events into pieces, each either content or a
piece of a call (`CallDelta`), in the order a stream sends them; a non-streamed answer
is the same pieces put together, so both carry the same calls.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from utils.api.protocol import ChatCompletionRequest
from utils.api.tool_parsers import (
    CALL_FORMATS,
    CallFormat,
    CallSplitter,
    ParsedCall,
    parse_call_list,
)
from utils.api.tool_schema import ChoiceLogprobs, FunctionCall, TokenLogprob, ToolCall
from utils.api.tools import ToolPlan, tool_plan
from utils.engine.types import TokenLogprob as EngineTokenLogprob


@dataclass(frozen=True, slots=True)
class OutputShape:
    """What a request's answers carry besides text."""

    plan: ToolPlan | None
    call_format: CallFormat | None  # how the model writes calls (tool_choice auto)
    names: frozenset[str]  # the functions offered
    logprobs: bool


def output_shape(req: ChatCompletionRequest, model_type: str) -> OutputShape | None:
    """None for a plain text answer (the fast path)."""
    plan = tool_plan(req)
    if plan is None and not req.logprobs:
        return None
    names = frozenset(tool.function.name for tool in req.tools or [])
    return OutputShape(plan, CALL_FORMATS.get(model_type), names, bool(req.logprobs))


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class CallDelta:
    """A piece of the call at `index`: its id and name first, then its arguments."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


Piece = str | CallDelta


def token_logprobs(items: list[EngineTokenLogprob]) -> list[TokenLogprob]:
    return [
        TokenLogprob(token=text, logprob=logprob, bytes=list(raw)) for text, logprob, raw in items
    ]


class ChoiceReader:
    """Pieces of one choice, from its text events (see the module's docs)."""

    def __init__(self, shape: OutputShape) -> None:
        plan = shape.plan
        self.mode = plan.mode if plan is not None else None
        self.function = plan.function if plan is not None else None
        self.names = shape.names
        self.splitter = (
            CallSplitter(shape.call_format, shape.names)
            if self.mode == "auto" and shape.call_format is not None
            else None
        )
        self.calls = 0
        self.text: list[str] = []  # tool_choice required: the whole answer, parsed at the end

    def feed(self, text: str) -> list[Piece]:
        if self.mode == "named":
            out: list[Piece] = []
            if not self.calls:
                out.append(self._start(self.function or ""))
            if text:
                out.append(CallDelta(0, text))
            return out
        if self.mode == "required":
            self.text.append(text)
            return []
        if self.splitter is not None:
            return self._pieces(self.splitter.feed(text))
        return [text] if text else []

    def finish(self) -> list[Piece]:
        if self.mode == "named":
            return self.feed("") if not self.calls else []
        if self.mode == "required":
            text = "".join(self.text)
            calls = parse_call_list(text, self.names)
            if calls is None:
                return [text] if text else []
            return self._pieces(list(calls))
        if self.splitter is not None:
            return self._pieces(self.splitter.finish())
        return []

    def finish_reason(self, reason: str) -> str:
        return "tool_calls" if self.calls and reason == "stop" else reason

    def _start(self, name: str) -> CallDelta:
        delta = CallDelta(self.calls, "", new_call_id(), name)
        self.calls += 1
        return delta

    def _pieces(self, items: Sequence[str | ParsedCall]) -> list[Piece]:
        out: list[Piece] = []
        for item in items:
            if isinstance(item, str):
                out.append(item)
            else:
                start = self._start(item.name)
                out += [start, CallDelta(start.index, item.arguments)]
        return out


@dataclass(slots=True)
class Assembled:
    """A whole choice put together from its pieces."""

    content: list[str] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None

    def add(self, pieces: list[Piece]) -> None:
        for piece in pieces:
            if isinstance(piece, str):
                self.content.append(piece)
            elif piece.id is not None:
                function = FunctionCall(name=piece.name or "", arguments=piece.arguments)
                self.calls.append(ToolCall(id=piece.id, function=function))
            else:
                call = self.calls[piece.index].function
                call.arguments += piece.arguments

    def add_logprobs(self, items: list[EngineTokenLogprob] | None) -> None:
        if items and self.logprobs is not None:
            self.logprobs += token_logprobs(items)

    def choice_logprobs(self) -> ChoiceLogprobs | None:
        return None if self.logprobs is None else ChoiceLogprobs(content=self.logprobs)
