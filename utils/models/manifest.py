"""The record of a finished export: a manifest of its files and sizes, written last,
and a file lock so that two processes never export the same model at once."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


MANIFEST_NAME = "export_manifest.json"


MANIFEST_VERSION = 1


# Files every usable export has (the manifest lists every file with its size).
REQUIRED_FILES = (
    "openvino_language_model.xml",
    "openvino_language_model.bin",
    "openvino_tokenizer.xml",
    "openvino_detokenizer.xml",
    "config.json",
)


def _file_sizes(directory: Path) -> dict[str, int]:
    return {
        str(path.relative_to(directory)): path.stat().st_size
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


def write_manifest(directory: Path, info: dict[str, Any]) -> None:
    manifest = {"version": MANIFEST_VERSION, **info, "files": _file_sizes(directory)}
    tmp = directory / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    with tmp.open("rb") as handle:
        os.fsync(handle.fileno())
    tmp.rename(directory / MANIFEST_NAME)


def publish(tmp: Path, out_dir: Path, info: dict[str, Any]) -> None:
    """Writes the manifest into the finished export `tmp`, then moves it to `out_dir`
    (replacing an incomplete one), so `out_dir` is either whole or absent."""
    write_manifest(tmp, info)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def check_export(directory: Path, required: tuple[str, ...] = REQUIRED_FILES) -> str | None:
    """Why `directory` is not a complete export (with the `required` files), or None."""
    if not directory.is_dir():
        return "missing"
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
        files: dict[str, int] = manifest["files"]
        if manifest.get("version") != MANIFEST_VERSION or not isinstance(files, dict):
            return "manifest of another version"
    except FileNotFoundError:
        return "no manifest (interrupted export?)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest ({exc.__class__.__name__})"
    for name in required:
        if name not in files:
            return f"{name} not in manifest"
    for name, size in files.items():
        try:
            actual = (directory / name).stat().st_size
        except OSError:
            return f"{name} missing"
        if actual != size:
            return f"{name} has {actual} bytes, manifest says {size}"
    return None


def prebuilt_ir(model_name: str) -> Path | None:
    """`model_name` itself when it is a local directory that already holds OpenVINO IR
    (an earlier export, or one made with `optimum-cli export openvino`)."""
    directory = Path(model_name).expanduser()
    if not all((directory / name).is_file() for name in REQUIRED_FILES):
        return None
    if (directory / MANIFEST_NAME).exists() and check_export(directory) is not None:
        return None  # one of ours, damaged: treat it as a source, which fails clearly
    return directory


def read_manifest(directory: Path) -> dict[str, Any]:
    return json.loads((directory / MANIFEST_NAME).read_text())


# Exports in one process run one at a time, whatever their keys: the chat and speech
# models are exported by two threads at start-up, and transformers' lazy imports are
# not thread-safe (a name can be missing while another thread imports its module);
# two conversions at once would also need their peak memory together.
_EXPORTING = threading.RLock()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl) held for the duration of the block, and the
    process's export lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _EXPORTING, path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process exporting %s", path.stem)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
