"""The answer to a chat request: one JSON body, or an OpenAI server-sent event stream,
byte for byte as OpenAI sends it, with usage counted once."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

from utils.api.choice_output import (
    Assembled,
    CallDelta,
    ChoiceReader,
    OutputShape,
    Piece,
    token_logprobs,
)
from utils.api.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    Delta,
    ResponseMessage,
    Usage,
)
from utils.api.tool_schema import ChoiceLogprobs, FunctionCallDelta, ToolCallDelta
from utils.api.usage import UsageCounter
from utils.engine.types import FinishReason, GenerationEvent, ModelInfo, TokenLogprob
from utils.errors import OpenAIError

logger = logging.getLogger(__name__)


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ResponseMeta(NamedTuple):
    """What every chunk or body of one completion repeats."""

    completion_id: str
    created: int
    model: str
    fingerprint: str
    n: int
    shape: OutputShape | None = None  # tool calls or log probabilities: not only text


def system_fingerprint(info: ModelInfo) -> str:
    digest = hashlib.sha256(f"{info.name}|{info.model_type}|{info.path}".encode()).hexdigest()
    return f"fp_{digest[:10]}"


async def aclose(iterator: AsyncIterator[Any]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


async def _read_all(
    events: AsyncIterator[GenerationEvent],
    first: GenerationEvent | None,
    take: Callable[[GenerationEvent], None],
) -> None:
    """Hands every event of a generation to `take`, then closes the stream."""
    try:
        if first is not None:
            take(first)
            async for event in events:
                take(event)
    finally:
        await aclose(events)


async def complete(
    events: AsyncIterator[GenerationEvent],
    first: GenerationEvent | None,
    meta: ResponseMeta,
) -> ChatCompletion:
    if meta.shape is not None:
        return await _complete_shaped(events, first, meta, meta.shape)
    n = meta.n
    texts: list[list[str]] = [[] for _ in range(n)]
    finish: list[FinishReason | None] = [None] * n
    totals = UsageCounter(n)

    def take(event: GenerationEvent) -> None:
        totals.add(event)
        if 0 <= event.index < n:
            texts[event.index].append(event.text)
            if event.finish_reason:
                finish[event.index] = event.finish_reason

    await _read_all(events, first, take)
    return ChatCompletion(
        id=meta.completion_id,
        created=meta.created,
        model=meta.model,
        system_fingerprint=meta.fingerprint,
        choices=[
            Choice(
                index=k,
                message=ResponseMessage(content="".join(texts[k])),
                finish_reason=finish[k] or "stop",
            )
            for k in range(n)
        ],
        usage=totals.usage(),
    )


async def _complete_shaped(
    events: AsyncIterator[GenerationEvent],
    first: GenerationEvent | None,
    meta: ResponseMeta,
    shape: OutputShape,
) -> ChatCompletion:
    """The body of an answer with tool calls or log probabilities."""
    n = meta.n
    readers = [ChoiceReader(shape) for _ in range(n)]
    parts = [Assembled(logprobs=[] if shape.logprobs else None) for _ in range(n)]
    finish: list[FinishReason | None] = [None] * n
    totals = UsageCounter(n)

    def take(event: GenerationEvent) -> None:
        totals.add(event)
        if 0 <= event.index < n and finish[event.index] is None:
            k = event.index
            parts[k].add(readers[k].feed(event.text))
            parts[k].add_logprobs(event.logprobs)
            if event.finish_reason:
                parts[k].add(readers[k].finish())
                finish[k] = event.finish_reason

    await _read_all(events, first, take)
    choices = []
    for k, (reader, part) in enumerate(zip(readers, parts, strict=True)):
        if finish[k] is None:
            part.add(reader.finish())
        content = "".join(part.content)
        message = ResponseMessage(
            content=content or (None if part.calls else ""), tool_calls=part.calls or None
        )
        reason = reader.finish_reason(finish[k] or "stop")
        choices.append(
            Choice(
                index=k,
                message=message,
                logprobs=part.choice_logprobs(),
                finish_reason=reason,
            )
        )
    return ChatCompletion(
        id=meta.completion_id,
        created=meta.created,
        model=meta.model,
        system_fingerprint=meta.fingerprint,
        choices=choices,
        usage=totals.usage(),
    )


def _sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


class ChunkWriter:
    """Renders the chunks of one stream; every chunk is `ChatCompletionChunk.to_json`'s.

    The role and usage chunks go through the model each time. The per-token content
    and finish chunks are rendered through it once per stream, with placeholders for
    the index and the text, so that each token only encodes its new text.
    """

    __slots__ = ("_base", "_content", "_finish")

    _INDEX = 987654321
    _TEXT = "\x00text\x00"  # a string no chunk holds: JSON escapes NUL

    def __init__(self, base: ChatCompletionChunk, include_usage: bool) -> None:
        self._base = base
        self._content = self._template(
            ChunkChoice(index=self._INDEX, delta=Delta(content=self._TEXT)),
            f'"content":{json.dumps(self._TEXT)}',
            include_usage,
        )
        self._finish = self._template(
            ChunkChoice(index=self._INDEX, delta=Delta(), finish_reason="stop"),
            '"finish_reason":"stop"',
            include_usage,
        )

    def _template(
        self, choice: ChunkChoice, value: str, include_usage: bool
    ) -> tuple[str, str, str]:
        """The chunk's SSE text cut where the index and `value` go."""
        text = self.model([choice], None, include_usage).decode()
        head, sep, rest = text.partition(f'"index":{self._INDEX}')
        middle, sep2, tail = rest.partition(value)
        assert sep and sep2, text
        key = value.partition(":")[0]
        return head + '"index":', middle + key + ":", tail

    def model(self, choices: list[ChunkChoice], usage: Usage | None, include_usage: bool) -> bytes:
        body = self._base.model_copy(update={"choices": choices, "usage": usage})
        return _sse(body.to_json(with_usage_field=include_usage))

    def content(self, index: int, text: str) -> str:
        head, middle, tail = self._content
        return f"{head}{index}{middle}{json.dumps(text, ensure_ascii=False)}{tail}"

    def finish(self, index: int, reason: str) -> str:
        head, middle, tail = self._finish
        return f"{head}{index}{middle}{json.dumps(reason)}{tail}"


_DONE = b"data: [DONE]\n\n"


class ShapedChunks:
    """The chunks of an answer with tool calls or log probabilities: content and call
    deltas as OpenAI streams them, each chunk with the log probabilities of the tokens
    read since the previous one."""

    def __init__(
        self, writer: ChunkWriter, shape: OutputShape, n: int, include_usage: bool
    ) -> None:
        self._writer = writer
        self._include_usage = include_usage
        self._logprobs = shape.logprobs
        self._readers = [ChoiceReader(shape) for _ in range(n)]
        self._pending: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self._done = [False] * n

    def render(self, event: GenerationEvent) -> str:
        k = event.index
        if not 0 <= k < len(self._readers) or self._done[k]:
            return ""
        reader = self._readers[k]
        if event.logprobs:
            self._pending[k] += event.logprobs
        pieces = reader.feed(event.text)
        if event.finish_reason:
            pieces += reader.finish()
        out = b"".join(self._chunk(k, self._delta(piece)) for piece in pieces)
        if event.finish_reason:
            self._done[k] = True
            reason = reader.finish_reason(event.finish_reason)
            out += self._chunk(k, Delta(), reason)
        return out.decode()

    @staticmethod
    def _delta(piece: Piece) -> Delta:
        if isinstance(piece, str):
            return Delta(content=piece)
        assert isinstance(piece, CallDelta)
        call = ToolCallDelta(
            index=piece.index,
            id=piece.id,
            type="function" if piece.id is not None else None,
            function=FunctionCallDelta(name=piece.name, arguments=piece.arguments),
        )
        return Delta(tool_calls=[call])

    def _chunk(self, k: int, delta: Delta, finish: str | None = None) -> bytes:
        logprobs = None
        if self._logprobs and self._pending[k]:
            logprobs = ChoiceLogprobs(content=token_logprobs(self._pending[k]))
            self._pending[k] = []
        choice = ChunkChoice(
            index=k,
            delta=delta,
            logprobs=logprobs,
            finish_reason=finish,
        )
        return self._writer.model([choice], None, self._include_usage)


async def stream(
    events: AsyncIterator[GenerationEvent],
    first: GenerationEvent | None,
    meta: ResponseMeta,
    *,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """The SSE body. Chunks that are ready together go out as one write (the
    role chunks with the first text, the last text with the finish, usage and
    [DONE] chunks); the bytes on the wire are the same as one write per chunk."""
    n = meta.n
    totals = UsageCounter(n)
    writer = ChunkWriter(
        ChatCompletionChunk(
            id=meta.completion_id,
            created=meta.created,
            model=meta.model,
            system_fingerprint=meta.fingerprint,
            choices=[],
            usage=None,
        ),
        include_usage,
    )
    unfinished = n
    shaped = None if meta.shape is None else ShapedChunks(writer, meta.shape, n, include_usage)

    def render(event: GenerationEvent) -> str:
        nonlocal unfinished
        totals.add(event)
        if shaped is not None:
            out = shaped.render(event)
        else:
            out = writer.content(event.index, event.text) if event.text else ""
            if event.finish_reason:
                out += writer.finish(event.index, event.finish_reason)
        if event.finish_reason:
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
        logger.info(
            "[%s] stream ended with error %s: %s", meta.completion_id, exc.status, exc.message
        )
        held += _sse(json.dumps(exc.body()))
    except Exception:
        logger.exception("[%s] stream failed", meta.completion_id)
        error = OpenAIError(500, "The server had an error while processing your request.")
        held += _sse(json.dumps(error.body()))
    finally:
        await aclose(events)
    yield held + final
