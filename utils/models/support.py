"""Which models the server can run, told from a model directory's config.json before
anything is exported or loaded.

- OpenVINO GenAI 2026.4 runs a fixed list of vision-language model types; others
  (for example idefics3 or mistral3, which optimum-intel exports) fail only when the
  pipeline loads. They are refused here, in one line.
- A config.json with `auto_map` needs the model's own Python code to export; that
  runs only with `VLM_TRUST_REMOTE_CODE=true`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from utils.models.hub import ModelExportError

# The model types OpenVINO GenAI 2026.4.1 knows (visual_language/vlm_config.cpp).
ENGINE_MODEL_TYPES = frozenset(
    {
        "minicpmv",
        "minicpmo",
        "llava",
        "llava-qwen2",
        "llava_next",
        "llava_next_video",
        "internvl_chat",
        "phi3_v",
        "phi4mm",
        "qwen2_vl",
        "qwen2_5_vl",
        "qwen3_vl",
        "qwen3_5",
        "qwen3_5_moe",
        "gemma3",
        "gemma3n",
        "gemma4",
        "gemma4_unified",
        "videochat_flash_qwen",
        "qwen3_omni",
        "qwen3_omni_moe",
        "muse_glimmer",
    }
)

# Types a user may well try, with what happens to them on this stack.
UNSUPPORTED_MODEL_TYPES = {
    "qwen3_vl_moe": "optimum-intel cannot export it and OpenVINO GenAI cannot run it",
    "idefics3": "OpenVINO GenAI cannot run it (optimum-intel exports it)",
    "smolvlm": "OpenVINO GenAI cannot run it",
    "mistral3": "OpenVINO GenAI cannot run it (optimum-intel exports it)",
}


def read_config(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def unsupported_reason(model_type: str) -> str | None:
    """Why `model_type` cannot be served, or None when OpenVINO GenAI runs it."""
    if model_type in UNSUPPORTED_MODEL_TYPES:
        return UNSUPPORTED_MODEL_TYPES[model_type]
    if model_type not in ENGINE_MODEL_TYPES:
        return "OpenVINO GenAI has no vision-language pipeline for it"
    return None


def check_model_dir(directory: Path, model_name: str, *, trust_remote_code: bool) -> None:
    """Raises ModelExportError (one line) when the model in `directory` cannot be served."""
    check_config(read_config(directory), model_name, trust_remote_code=trust_remote_code)


def check_config(config: dict[str, Any], model_name: str, *, trust_remote_code: bool) -> None:
    """The same check on a config.json's content (a local file, or the Hub's copy)."""
    model_type = config.get("model_type")
    if isinstance(model_type, str) and (reason := unsupported_reason(model_type)):
        raise ModelExportError(
            f"Model '{model_name}' has model_type '{model_type}', which this server cannot "
            f"serve: {reason}. Supported types: {', '.join(sorted(ENGINE_MODEL_TYPES))}."
        )
    if config.get("auto_map") and not trust_remote_code:
        raise ModelExportError(
            f"Model '{model_name}' ships its own Python code (config.json has auto_map); "
            "set VLM_TRUST_REMOTE_CODE=true to allow running it for the export."
        )
