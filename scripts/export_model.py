"""Export the configured model to OpenVINO IR ahead of serving (the server does the same at start).

Reads the same VLM_* settings as the server; options override them:

    .venv/bin/python scripts/export_model.py
    .venv/bin/python scripts/export_model.py --model Qwen/Qwen2-VL-2B-Instruct --weight-format int8

Prints the exported directory on stdout. Exits 1 with a one-line reason when the model
cannot be exported.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.models.export import ModelExportError, ensure_model
from utils.settings import Settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Hugging Face id, local directory or embedded/... name")
    parser.add_argument("--cache-dir", type=Path, help="Directory for exported models")
    parser.add_argument("--weight-format", choices=["int4", "int8", "fp16"])
    parser.add_argument("--group-size", type=int, help="int4 group size (-1: per channel)")
    parser.add_argument("--ratio", type=float, help="Share of int4 layers (the rest int8)")
    parser.add_argument(
        "--sym", action=argparse.BooleanOptionalAction, default=None, help="Symmetric quantization"
    )
    parser.add_argument("--trust-remote-code", action="store_true", default=None)
    parser.add_argument("-q", "--quiet", action="store_true", help="Log warnings only")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {
        "model_name": args.model,
        "model_cache_dir": args.cache_dir,
        "compression_weight_format": args.weight_format,
        "compression_group_size": args.group_size,
        "compression_ratio": args.ratio,
        "compression_sym": args.sym,
        "trust_remote_code": args.trust_remote_code,
    }
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        path = ensure_model(settings)
    except ModelExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; the partial export will be redone next time", file=sys.stderr)
        return 130
    logging.getLogger("export_model").info(
        "model ready in %.1f s: %s", time.perf_counter() - started, path
    )
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
