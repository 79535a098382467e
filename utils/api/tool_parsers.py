"""Tool calls out of a model's text, in each family's own format.

`CallSplitter` reads a growing text and splits it into content and calls: text that
could still become a call's opening markup is held back, so markup never reaches
content, and a call that does not parse (bad JSON, an unknown function, a call cut off
by the token limit) comes back as content, never as an error. The whole text and the
same text in pieces split the same way, so a streamed answer is the non-streamed one.

OpenVINO GenAI's own parsers (`GenerationConfig.parsers`) are not used: GenAI 2026.4
has tool parsers for Llama 3's JSON and pythonic formats only, none for the Hermes
format of the Qwen families, and they parse the finished text of `generate()`, while
this server streams text from its own detokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as text


def _call(name: object, arguments: object, names: Collection[str]) -> ParsedCall | None:
    """A call to one of `names` whose arguments are a JSON object (or its text)."""
    if not isinstance(name, str) or name not in names:
        return None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(name, json.dumps(arguments, ensure_ascii=False))


@dataclass(frozen=True, slots=True)
class CallFormat:
    """Calls written as `start` + a JSON object + `end`."""

    start: str
    end: str

    def parse(self, body: str, names: Collection[str]) -> ParsedCall | None:
        try:
            data = json.loads(body)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        arguments = data.get("arguments", data.get("parameters"))
        return _call(data.get("name"), arguments, names)


# Hermes-style calls, which the Qwen-VL chat templates ask for:
# <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>
HERMES = CallFormat("<tool_call>", "</tool_call>")

# The call format of each model type whose chat template renders tools.
CALL_FORMATS: dict[str, CallFormat] = {
    "qwen2_vl": HERMES,
    "qwen2_5_vl": HERMES,
    "qwen3_vl": HERMES,
}


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


class CallSplitter:
    """Content and calls of one choice's text, as it grows (see the module's docs).

    Whitespace next to a call (the newlines between calls, before the first and after
    the last) is not content; other whitespace is held until more text shows which
    it is (a call that does not parse gives it back).
    """

    __slots__ = ("_buffer", "_format", "_inside", "_names", "_space", "calls")

    def __init__(self, fmt: CallFormat, names: Collection[str]) -> None:
        self._format = fmt
        self._names = names
        self._buffer = ""
        self._inside = False  # after a call's opening markup
        self._space = ""  # whitespace held back
        self.calls = 0

    def feed(self, text: str) -> list[str | ParsedCall]:
        out: list[str | ParsedCall] = []
        self._buffer += text
        start, end = self._format.start, self._format.end
        while True:
            if not self._inside:
                at = self._buffer.find(start)
                if at < 0:
                    keep = len(self._buffer) - _partial_suffix(self._buffer, start)
                    self._content(out, self._buffer[:keep])
                    self._buffer = self._buffer[keep:]
                    return out
                self._content(out, self._buffer[:at])
                self._buffer = self._buffer[at + len(start) :]
                self._inside = True
                continue
            at = self._buffer.find(end)
            if at < 0:
                return out
            body, self._buffer = self._buffer[:at], self._buffer[at + len(end) :]
            self._inside = False
            call = self._format.parse(body, self._names)
            if call is None:
                self._content(out, start + body + end)
            else:
                self._space = ""
                self.calls += 1
                out.append(call)

    def finish(self) -> list[str | ParsedCall]:
        """The rest, as content: an unfinished call included, markup and all."""
        rest = self._format.start + self._buffer if self._inside else self._buffer
        self._buffer, self._inside = "", False
        out: list[str | ParsedCall] = []
        self._content(out, rest, final=True)
        return out

    def _content(
        self,
        out: list[str | ParsedCall],
        text: str,
        *,
        final: bool = False,
    ) -> None:
        text, self._space = self._space + text, ""
        if final and self.calls:
            text = text.rstrip()
        elif not final:
            kept = text.rstrip()
            text, self._space = kept, text[len(kept) :]
        if text:
            out.append(text)


def parse_call_list(text: str, names: Collection[str]) -> list[ParsedCall] | None:
    """The calls of `tool_choice: required` output, a JSON array of `{"name",
    "arguments"}` objects; None when it is not one (cut off by the token limit)."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, list) or not data:
        return None
    calls = []
    for item in data:
        call = (
            _call(item.get("name"), item.get("arguments"), names)
            if isinstance(item, dict)
            else None
        )
        if call is None:
            return None
        calls.append(call)
    return calls
