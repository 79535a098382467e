"""Where a model comes from: a local directory, the Hugging Face cache, or a download;
and the one-line errors when it can be had from none of them."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)


class ModelExportError(RuntimeError):
    """The model cannot be made available; the message says why and what to set."""


def _no_source_error(model_name: str, reason: str) -> ModelExportError:
    return ModelExportError(
        f"Cannot get model '{model_name}': {reason}. There is no local copy to export. "
        "Set VLM_MODEL_NAME to a local directory holding the Hugging Face model "
        "(config.json, weights, tokenizer and processor files), or allow network access "
        "to huggingface.co (and set HF_TOKEN for gated or private models). "
        "VLM_MODEL_NAME=embedded/tiny-qwen2-vl serves a built-in random-weight model."
    )


NO_EXPORT_TOOLS = (
    "the export tools (optimum-intel, torch) are not installed: install them with "
    "`scripts/install.sh` (its default groups include `export`), or copy an existing "
    "export into VLM_MODEL_CACHE_DIR"
)


_IGNORED_HUB_FILES = [
    "*.pt",
    "*.pth",
    "*.gguf",
    "*.onnx",
    "*.msgpack",
    "*.h5",
    "*.ot",
    "original/*",
]


def hub_error(model_name: str, exc: BaseException) -> ModelExportError:
    """A readable error for a failed Hugging Face Hub lookup or download."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return _no_source_error(model_name, "the repository is gated (set HF_TOKEN)")
    if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError)):
        return _no_source_error(model_name, "no such repository on huggingface.co (or private)")
    if isinstance(exc, HFValidationError):
        return ModelExportError(
            f"Cannot get model '{model_name}': it is neither an existing local directory nor "
            "a valid Hugging Face model id. Set VLM_MODEL_NAME to a local directory or a "
            "Hub id such as Qwen/Qwen2-VL-2B-Instruct."
        )
    if isinstance(exc, LocalEntryNotFoundError):
        return _no_source_error(model_name, "the Hugging Face Hub cannot be reached")
    return _no_source_error(
        model_name, f"the Hugging Face Hub cannot be reached ({exc.__class__.__name__})"
    )


def cached_snapshot(model_name: str, token: str | None) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                model_name,
                token=token,
                ignore_patterns=_IGNORED_HUB_FILES,
                local_files_only=True,
            )
        )
    except (OSError, ValueError):  # LocalEntryNotFoundError, HFValidationError
        return None


def download_model(model_name: str, *, token: str | None = None) -> Path:
    """Local snapshot of a Hugging Face Hub model (the HF cache is used when offline)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # slim install
        raise ModelExportError(f"Cannot export model '{model_name}': {NO_EXPORT_TOOLS}.") from exc

    try:
        return Path(snapshot_download(model_name, token=token, ignore_patterns=_IGNORED_HUB_FILES))
    except (OSError, ValueError) as exc:  # hub errors are OSErrors or ValueErrors
        cached = cached_snapshot(model_name, token)
        if cached is not None:
            logger.warning("[%s] download failed (%s): using the cached copy", model_name, exc)
            return cached
        raise hub_error(model_name, exc) from exc
