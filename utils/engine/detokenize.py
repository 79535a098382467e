"""Token ids to text, incrementally, and stop strings.

Text never ends inside a multi-byte character, and a stop string (and anything after
it) is never sent."""

from __future__ import annotations

import codecs
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    The offsets scheme of text-generation servers: the new text is the difference
    between decoding a short window of already emitted tokens and the same window
    extended by the new tokens, so tokenizers whose decoding depends on neighbours
    (leading spaces, byte fallback) come out right. A delta that ends in U+FFFD (a
    multi-byte character cut in the middle) is held back until the rest of its bytes
    arrive. The decoded window text is kept, so a step usually needs one decode per
    sequence; the window restarts every `WINDOW` tokens (one extra decode then).
    Decoding is done by the caller, batched across sequences: `windows()` lists the
    token windows to decode, `advance()` takes their texts.
    """

    WINDOW = 16
    CONTEXT = 4

    __slots__ = ("ids", "prefix_offset", "prefix_text", "read_offset")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.prefix_text: str | None = ""

    def add(self, ids: Sequence[int]) -> None:
        self.ids.extend(ids)

    def windows(self) -> list[list[int]]:
        full = self.ids[self.prefix_offset :]
        if self.prefix_text is None:
            return [self.ids[self.prefix_offset : self.read_offset], full]
        return [full]

    def advance(self, texts: Sequence[str], *, final: bool = False) -> str:
        if self.prefix_text is None:
            self.prefix_text = texts[0]
        prefix_text, full_text = self.prefix_text, texts[-1]
        if not final and (
            len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR)
        ):
            return ""
        delta = full_text[len(prefix_text) :]
        self.read_offset = len(self.ids)
        if self.read_offset - self.prefix_offset > self.WINDOW:
            self.prefix_offset = self.read_offset - self.CONTEXT
            self.prefix_text = None
        else:
            self.prefix_text = full_text
        return delta


def decode_pending(
    decode: Callable[[list[list[int]]], list[str]],
    streams: Sequence[IncrementalDetokenizer],
    final: Sequence[bool],
) -> list[str]:
    """One batched `decode` call for every stream; returns each stream's new text."""
    batch: list[list[int]] = []
    spans: list[tuple[int, int]] = []
    for stream in streams:
        windows = stream.windows()
        spans.append((len(batch), len(batch) + len(windows)))
        batch.extend(windows)
    texts = decode(batch) if batch else []
    return [
        stream.advance(texts[lo:hi], final=final[i])
        for i, (stream, (lo, hi)) in enumerate(zip(streams, spans, strict=True))
    ]


class ByteTokenTable:
    """The bytes of every token, for tokenizers whose decoding is plain concatenation.

    Byte-level BPE tokenizers (Qwen, Llama 3, GPT-style) decode a token sequence by
    joining the tokens' bytes; the table makes that a Python join plus an incremental
    UTF-8 decoder instead of one tokenizer-model call per step. `build()` checks the
    equivalence against the tokenizer on every token and on random sequences, and
    returns None (use the tokenizer) for anything else, such as SentencePiece.
    """

    __slots__ = ("table",)

    def __init__(self, table: list[bytes]) -> None:
        self.table = table

    @classmethod
    def build(cls, tokenizer: Any, samples: int = 200) -> ByteTokenTable | None:
        try:
            vocab = tokenizer.get_vocab()
        except Exception:
            return None
        if not vocab:
            return None
        size = max(vocab.values()) + 1
        table = [b""] * size
        for key, index in vocab.items():
            table[index] = key if isinstance(key, bytes) else str(key).encode()
        chunk = 8192
        for start in range(0, size, chunk):
            ids = range(start, min(start + chunk, size))
            for index, text in zip(ids, tokenizer.decode([[i] for i in ids]), strict=True):
                if text == table[index].decode("utf-8", "replace"):
                    continue
                if text == "":  # a special token: skipped when decoding
                    table[index] = b""
                    continue
                return None
        # Sequences of whole characters: decoding must be plain concatenation. (Bytes
        # that are not UTF-8 become U+FFFD in both, though not always as many of them.)
        whole = [i for i, b in enumerate(table) if b and _is_utf8(b)]
        if not whole:
            return None
        rng = np.random.default_rng(0)
        sequences = [
            [whole[j] for j in rng.integers(0, len(whole), int(rng.integers(2, 24)))]
            for _ in range(samples)
        ]
        probe = "Hello, wörld! Привет 你好 😀 ok\n  x"
        sequences.append(
            tokenizer.encode(probe, add_special_tokens=False).input_ids.data[0].tolist()
        )
        for sequence, text in zip(sequences, tokenizer.decode(sequences), strict=True):
            if text != b"".join(table[i] for i in sequence).decode("utf-8", "replace"):
                return None
        return cls(table)

    def join(self, ids: Sequence[int]) -> bytes:
        table, size = self.table, len(self.table)
        return b"".join(table[i] if 0 <= i < size else b"" for i in ids)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class ByteDetokenizer:
    """Text of a token stream from a `ByteTokenTable`; an incremental UTF-8 decoder
    holds back the bytes of a character that is not complete yet."""

    __slots__ = ("_decoder", "_table", "_text")

    def __init__(self, table: ByteTokenTable) -> None:
        self._table = table
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._text = ""

    def add(self, ids: Sequence[int]) -> None:
        self._text += self._decoder.decode(self._table.join(ids))

    def take(self, final: bool = False) -> str:
        text = self._text
        if final:
            text += self._decoder.decode(b"", final=True)
        self._text = ""
        return text


class StopMatcher:
    """Cuts text at the first stop string; holds back a tail that may start one."""

    __slots__ = ("_buffer", "_stops")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._buffer = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to send, whether a stop string matched)."""
        if not self._stops:
            return text, False
        buffer = self._buffer + text
        cut = -1
        for stop in self._stops:
            at = buffer.find(stop)
            if at >= 0 and (cut < 0 or at < cut):
                cut = at
        if cut >= 0:
            self._buffer = ""
            return buffer[:cut], True
        hold = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buffer)), hold, -1):
                if buffer.endswith(stop[:k]):
                    hold = k
                    break
        self._buffer = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        text, self._buffer = self._buffer, ""
        return text
