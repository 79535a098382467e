"""Ask the model one question about images or videos, without a server.

Uses the server's own code (export, media decoding, engine) in-process and
streams the answer to stdout. Reads the same VLM_* settings as the server;
options override them:

    .venv/bin/python scripts/predict.py --image photo.jpg --prompt "What is in the picture?"
    .venv/bin/python scripts/predict.py --image a.png --image https://example.com/b.jpg \\
        --prompt "Compare the two images."
    .venv/bin/python scripts/predict.py --video clip.mp4 --prompt "What happens?" --max-tokens 200

`--image` and `--video` take local paths or http(s)/data URLs and may be repeated.
Exits 1 with a one-line reason when the request cannot be served.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.errors import OpenAIError
from utils.media.fetch import MediaBudget, MediaFetcher, MediaKind
from utils.settings import Settings, SettingsLoadError, load_settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", action="append", default=[], help="Image path or URL")
    parser.add_argument("--video", action="append", default=[], help="Video path or URL")
    parser.add_argument("--prompt", required=True, help="The question")
    parser.add_argument("--system", help="Optional system prompt")
    parser.add_argument("--model", help="Hugging Face id, local directory or embedded/... name")
    parser.add_argument("--device", help="OpenVINO device (default: VLM_DEVICE or CPU)")
    parser.add_argument("--max-tokens", type=int, help="Output token limit")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="Sampling temperature (0: greedy)"
    )
    parser.add_argument("--seed", type=int, help="Sampling seed (default: VLM_SEED)")
    parser.add_argument("--fps", type=float, help="Video frames sampled per second")
    parser.add_argument("-q", "--quiet", action="store_true", help="Log errors only")
    return parser.parse_args(argv)


def _as_url(value: str) -> str:
    """Local paths become file:// URLs (read directly); URLs pass through."""
    if "://" in value or value.startswith("data:"):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise SystemExit(f"error: no such file: {value}")
    return path.resolve().as_uri()


class LocalFetcher(MediaFetcher):
    """The server's fetcher, plus the local files named on the command line."""

    async def fetch(
        self, url: str, *, kind: MediaKind = "image", budget: MediaBudget | None = None
    ) -> bytes:
        if url.startswith("file://"):
            return await asyncio.to_thread(Path(unquote(urlsplit(url).path)).read_bytes)
        return await super().fetch(url, kind=kind, budget=budget)


def build_body(args: argparse.Namespace) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    for image in args.image:
        content.append({"type": "image_url", "image_url": {"url": _as_url(image)}})
    for video in args.video:
        content.append({"type": "video_url", "video_url": {"url": _as_url(video), "fps": args.fps}})
    content.append({"type": "text", "text": args.prompt})
    messages: list[dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": content})
    body: dict[str, Any] = {"messages": messages, "temperature": args.temperature}
    if args.max_tokens is not None:
        body["max_completion_tokens"] = args.max_tokens
    if args.seed is not None:
        body["seed"] = args.seed
    return body


async def run(args: argparse.Namespace, settings: Settings) -> int:
    from utils.api.requests import build_generation_request, to_sampling_params
    from utils.api.validation import check_request, parse_request
    from utils.engine.client import EngineClient
    from utils.models.export import ensure_model

    request = parse_request(build_body(args))
    check_request(request, settings)
    params = to_sampling_params(request, settings)
    model_dir = await asyncio.to_thread(ensure_model, settings)
    engine = EngineClient(settings, model_dir)
    fetcher = LocalFetcher(settings)
    try:
        generation, _ = await asyncio.gather(
            build_generation_request(
                request,
                params,
                settings=settings,
                fetcher=fetcher,
                info=engine.info,
                request_id="predict",
            ),
            engine.start(),
        )
        finish = None
        async for event in engine.generate(generation):
            sys.stdout.write(event.text)
            sys.stdout.flush()
            finish = event.finish_reason or finish
        sys.stdout.write("\n")
        logging.getLogger("predict").info("finish_reason: %s", finish)
        return 0
    finally:
        await fetcher.aclose()
        await engine.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.ERROR if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    overrides: dict[str, Any] = {
        # The user's own machine: URLs to the local network are the user's choice.
        "media_allow_private_networks": True,
        "log_level": "error" if args.quiet else "info",
    }
    if args.model:
        overrides["model_name"] = args.model
    if args.device:
        overrides["device"] = args.device
    try:
        settings = load_settings(**overrides)
    except SettingsLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(run(args, settings))
    except OpenAIError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # export or engine start-up failures
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
