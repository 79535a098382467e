"""Build the embedded random-weight models and export them to OpenVINO IR.

    .venv/bin/python scripts/build_tiny_models.py                 # test models (.cache/test-models)
    .venv/bin/python scripts/build_tiny_models.py --hf-only OUT   # Hugging Face dirs only, into OUT
    .venv/bin/python scripts/build_tiny_models.py --kind qwen2-vl --size 2b --hf-only OUT

The exported test models are the ones tests/fixtures/models.py uses; building them
ahead of a test run moves that time out of the first test. Their answers are random text.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.models.export import ModelExportError
from utils.models.tiny import KINDS, build_tiny_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=KINDS, action="append", help="Model family (repeatable)")
    parser.add_argument("--size", choices=["tiny", "2b"], default="tiny")
    parser.add_argument(
        "--hf-only", type=Path, metavar="OUT", help="Write Hugging Face directories to OUT/<kind>"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    kinds = args.kind or list(KINDS)
    if args.size == "2b" and kinds != ["qwen2-vl"]:
        parser.error("--size 2b exists for --kind qwen2-vl only")
    if args.size == "2b" and args.hf_only is None:
        parser.error(
            "--size 2b needs --hf-only OUT (or serve VLM_MODEL_NAME=embedded/random-qwen2-vl-2b)"
        )

    for kind in kinds:
        started = time.perf_counter()
        if args.hf_only is not None:
            path = build_tiny_model(kind, args.hf_only / f"{kind}-{args.size}", size=args.size)
        else:
            from tests.fixtures.models import tiny_model_ir

            try:
                path = tiny_model_ir(kind)
            except ModelExportError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
        print(f"{kind}: {path} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
