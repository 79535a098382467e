"""Audio content parts in chat (`input_audio`, and the `audio_url` extension).

No model family this server runs takes audio input on its stack (OpenVINO GenAI
2026.4.1 with optimum-intel 2.2 and transformers 4.57; docs/models.md says why for
each family that hears), so an audio part is refused by name, before anything is
fetched or decoded, with the endpoint to use instead.
"""

from __future__ import annotations

from typing import Any

from utils.errors import OpenAIError

AUDIO_PART_TYPES = frozenset({"input_audio", "audio_url"})


def refuse_audio_parts(body: dict[str, Any]) -> None:
    """Raises a 400 naming the first audio part in `body`'s messages, if there is one."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") in AUDIO_PART_TYPES:
                raise OpenAIError(
                    400,
                    f"messages[{i}].content[{j}] is a {part['type']} part, but the served "
                    "model cannot hear: no model family this server runs takes audio input. "
                    "Transcribe the audio with POST /v1/audio/transcriptions and send the "
                    "text instead.",
                    param=f"messages[{i}].content[{j}]",
                    code="audio_not_supported",
                )
