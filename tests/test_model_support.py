"""Model directories the server cannot run are refused before any export, in one
line: model types OpenVINO GenAI has no pipeline for, and remote code without
VLM_TRUST_REMOTE_CODE (which, when set, reaches the exporter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.models import REPO
from utils.models import export
from utils.models.hub import ModelExportError
from utils.models.manifest import REQUIRED_FILES
from utils.settings import Settings


def model_dir(root: Path, **config: Any) -> Path:
    directory = root / "model"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("model_type", ["qwen3_vl_moe", "idefics3", "smolvlm", "mistral3"])
def test_types_the_engine_cannot_run_are_refused(tmp_path: Path, model_type: str) -> None:
    directory = model_dir(tmp_path, model_type=model_type)
    with pytest.raises(ModelExportError) as info:
        export.check_model_name(str(directory))
    message = str(info.value)
    assert f"model_type '{model_type}'" in message and "\n" not in message
    assert "qwen2_5_vl" in message  # names what is supported


def test_an_openvino_ir_of_an_unsupported_type_is_refused_at_preflight(tmp_path: Path) -> None:
    directory = model_dir(tmp_path, model_type="idefics3")
    for name in REQUIRED_FILES:
        if not (directory / name).exists():
            (directory / name).write_text("")
    with pytest.raises(ModelExportError, match="idefics3"):
        export.preflight(Settings(model_name=str(directory), model_cache_dir=tmp_path / "c"))


def test_a_hub_model_of_an_unsupported_type_is_refused_at_preflight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Hub's copy of config.json is enough: nothing is downloaded."""
    import huggingface_hub

    hub_config: dict[str, Any] = {"model_type": "idefics3"}

    class Info:
        config = hub_config

    monkeypatch.setattr(export, "cached_snapshot", lambda name, token: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, name, **kw: Info())
    settings = Settings(model_name="someone/idefics3-model", model_cache_dir=tmp_path)
    with pytest.raises(ModelExportError, match="model_type 'idefics3'"):
        export.preflight(settings)
    hub_config.update(model_type="internvl_chat", auto_map={"AutoModel": "x.Y"})
    with pytest.raises(ModelExportError, match="VLM_TRUST_REMOTE_CODE"):
        export.preflight(settings)
    export.preflight(settings.model_copy(update={"trust_remote_code": True}))


def test_remote_code_needs_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    auto_map = {"AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"}
    directory = model_dir(tmp_path, model_type="internvl_chat", auto_map=auto_map)
    with pytest.raises(ModelExportError, match="VLM_TRUST_REMOTE_CODE=true"):
        export.check_model_name(str(directory))
    with pytest.raises(ModelExportError, match="VLM_TRUST_REMOTE_CODE"):
        export.ensure_model_dir(str(directory), export.CompressionSpec(), tmp_path / "cache")

    seen: list[bool] = []

    def fake_export(source: Path, out_dir: Path, spec: Any, **kwargs: Any) -> Path:
        seen.append(kwargs["trust_remote_code"])
        return out_dir

    monkeypatch.setattr(export, "export_model", fake_export)
    export.ensure_model_dir(
        str(directory), export.CompressionSpec(), tmp_path / "cache", trust_remote_code=True
    )
    assert seen == [True]


def test_the_server_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    directory = model_dir(tmp_path, model_type="mistral3")
    env = {
        **os.environ,
        "VLM_MODEL_NAME": str(directory),
        "VLM_MODEL_CACHE_DIR": str(tmp_path / "cache"),
        "VLM_PORT": "1",  # never reached: the check comes before the server binds
    }
    done = subprocess.run(
        [sys.executable, str(REPO / "app.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: Model ")
    assert "mistral3" in lines[0]
