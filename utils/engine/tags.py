"""The media tags of OpenVINO GenAI prompts, in one place.

A chat message's text carries `<ov_genai_image_N>` and `<ov_genai_video_N>` where
images[N] and videos[N] of the request belong; the pipeline replaces each tag with
that medium's visual tokens. Clients may not write these tags themselves.
"""

from __future__ import annotations

import re

TAG_RE = re.compile(r"<ov_genai_(image|video)_(\d+)>")


def image_tag(index: int) -> str:
    return f"<ov_genai_image_{index}>"


def video_tag(index: int) -> str:
    return f"<ov_genai_video_{index}>"


def has_tag(text: str) -> bool:
    return TAG_RE.search(text) is not None


def tag_refs(text: str) -> list[tuple[str, int]]:
    """(kind, index) of every tag in `text`, kind being "image" or "video"."""
    return [(kind, int(index)) for kind, index in TAG_RE.findall(text)]
