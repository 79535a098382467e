"""Token counts of one generation, taken from its events; the one place usage is
counted, for the response body and for the metrics alike."""

from __future__ import annotations

from utils.api.protocol import Usage
from utils.engine.types import GenerationEvent


class UsageCounter:
    """Prompt tokens (exact on each choice's final event), visual tokens, and the
    tokens generated for each of `n` choices."""

    __slots__ = ("completion", "prompt_tokens", "visual_tokens")

    def __init__(self, n: int) -> None:
        self.prompt_tokens = 0
        self.visual_tokens = 0
        self.completion = [0] * n

    def add(self, event: GenerationEvent) -> None:
        self.prompt_tokens = max(self.prompt_tokens, event.prompt_tokens)
        self.visual_tokens = max(self.visual_tokens, event.visual_tokens)
        if 0 <= event.index < len(self.completion):
            self.completion[event.index] = max(
                self.completion[event.index], event.completion_tokens
            )

    @property
    def completion_tokens(self) -> int:
        return sum(self.completion)

    def usage(self) -> Usage:
        completion = self.completion_tokens
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
        )
