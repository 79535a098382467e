"""Requests of the container smoke test (scripts/container_smoke.sh), standard library only.

    python3 scripts/smoke_client.py ready URL      exit 0 when URL/ready answers 200
    python3 scripts/smoke_client.py check URL      chat with a base64 image and a base64
                                                   video, /device and /metrics

Media are made here: a PNG and an uncompressed AVI, both base64 data URLs.
"""

from __future__ import annotations

import base64
import json
import struct
import sys
import urllib.error
import urllib.request
import zlib
from typing import Any

# Straight to the server: a proxy from the environment must not see loopback calls.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def request(
    url: str, body: dict[str, Any] | None = None, timeout: float = 300
) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(req, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def png(width: int = 224, height: int = 160) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data)
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    rows = b"".join(
        b"\0" + b"".join(bytes((x * 2 % 256, y * 4 % 256, 128)) for x in range(width))
        for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def avi(width: int = 64, height: int = 64, frames: int = 8, fps: int = 4) -> bytes:
    """An uncompressed (24-bit DIB) AVI: frames of changing colour."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return tag + struct.pack("<I", len(data)) + data + (b"\0" if len(data) % 2 else b"")

    def riff_list(kind: bytes, body: bytes) -> bytes:
        return b"LIST" + struct.pack("<I", len(body) + 4) + kind + body

    size = width * height * 3
    avih = struct.pack(
        "<14I", 1_000_000 // fps, size * fps, 0, 0x10, frames, 0, 1, size, width, height, 0, 0, 0, 0
    )
    strh = struct.pack(
        "<4s4sIHHIIIIIIIIhhhh",
        *(b"vids", b"DIB ", 0, 0, 0, 0, 1, fps, 0, frames, size, 0xFFFFFFFF, 0, 0, 0),
        *(width, height),
    )
    strf = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, size, 0, 0, 0, 0)
    stream = riff_list(b"strl", chunk(b"strh", strh) + chunk(b"strf", strf))
    header = riff_list(b"hdrl", chunk(b"avih", avih) + stream)
    pixels = (bytes(((i * 30) % 256, 90, 200)) * (width * height) for i in range(frames))
    movie = riff_list(b"movi", b"".join(chunk(b"00db", frame) for frame in pixels))
    body = b"AVI " + header + movie
    return b"RIFF" + struct.pack("<I", len(body)) + body


def data_url(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode()}"


def served_model(base: str) -> str:
    status, raw = request(f"{base}/v1/models")
    if status != 200:
        raise SystemExit(f"/v1/models: HTTP {status}: {raw[:300]!r}")
    return json.loads(raw)["data"][0]["id"]


def chat(base: str, media: dict[str, Any] | None, name: str) -> dict[str, Any]:
    content = [*([media] if media else []), {"type": "text", "text": "Describe."}]
    body = {
        "model": served_model(base),
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
    }
    status, raw = request(f"{base}/v1/chat/completions", body)
    if status != 200:
        raise SystemExit(f"chat with {name}: HTTP {status}: {raw[:300]!r}")
    answer = json.loads(raw)
    usage = answer["usage"]
    print(f"chat with {name}: 200, {usage['prompt_tokens']} prompt tokens")
    return answer


def check(base: str) -> None:
    text_only = chat(base, None, "text only")["usage"]["prompt_tokens"]
    image_url = data_url("image/png", png())
    image = chat(base, {"type": "image_url", "image_url": {"url": image_url}}, "a base64 image")
    video_url = data_url("video/x-msvideo", avi())
    video = chat(base, {"type": "video_url", "video_url": {"url": video_url}}, "a base64 video")
    for name, answer in (("image", image), ("video", video)):
        if answer["usage"]["prompt_tokens"] <= text_only:
            raise SystemExit(f"the {name} added no prompt tokens")
    status, raw = request(f"{base}/device")
    if status != 200 or "CPU" not in raw.decode():
        raise SystemExit(f"/device: HTTP {status}: {raw[:300]!r}")
    print(f"/device: {status}")
    status, raw = request(f"{base}/metrics")
    if status != 200 or b"# TYPE" not in raw:
        raise SystemExit(f"/metrics: HTTP {status}: {raw[:300]!r}")
    print(f"/metrics: {status}, {raw.count(b'# TYPE')} metric families")


def main(argv: list[str]) -> int:
    command, base = argv[1], argv[2].rstrip("/")
    if command == "ready":
        try:
            return 0 if request(f"{base}/ready", timeout=5)[0] == 200 else 1
        except OSError:
            return 1
    check(base)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
