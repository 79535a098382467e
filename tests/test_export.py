"""The export step: real optimum-intel exports of the tiny models, read back with OpenVINO."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import openvino as ov
import pytest

from tests.fixtures.models import REPO, TEST_SPEC
from utils.models import asr_export, export, manifest
from utils.models.export import CompressionSpec, ensure_model_dir, export_dir_for
from utils.models.hub import ModelExportError
from utils.models.manifest import MANIFEST_NAME, check_export
from utils.models.tiny import build_tiny_model

INT8 = CompressionSpec(weight_format="int8")


def linear_weight_types(model_xml: Path) -> dict[str, str]:
    """Element type of the stored weight of every linear layer (MatMul) of an IR model.

    A compressed weight is a small subgraph (Constant -> Convert -> Subtract -> Multiply);
    its largest constant holds the weight values themselves.
    """
    model = ov.Core().read_model(model_xml)
    result = {}
    for op in model.get_ops():
        if op.get_type_name() != "MatMul" or "aten::linear" not in op.get_friendly_name():
            continue
        constants, stack, seen = [], [op.input_value(1).get_node()], set()
        while stack:
            node = stack.pop()
            if node.get_friendly_name() in seen:
                continue
            seen.add(node.get_friendly_name())
            if node.get_type_name() == "Constant":
                constants.append(node)
            else:
                stack.extend(value.get_node() for value in node.input_values())
        weight = max(constants, key=lambda node: math.prod(node.get_output_shape(0)))
        result[op.get_friendly_name()] = weight.get_element_type().get_type_name()
    return result


def decoder_layer_types(model_dir: Path) -> dict[str, str]:
    types = linear_weight_types(model_dir / "openvino_language_model.xml")
    return {name: kind for name, kind in types.items() if ".layers." in name}


@pytest.fixture(scope="module")
def int8_export(qwen2vl_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2-VL exported from its local directory with int8 weights."""
    cache = tmp_path_factory.mktemp("int8-cache")
    return ensure_model_dir(str(qwen2vl_hf), INT8, cache)


def test_int4_export_has_4bit_language_model_weights(qwen2vl_ir: Path) -> None:
    types = decoder_layer_types(qwen2vl_ir)
    # 2 decoder layers x (q, k, v, o, gate, up, down)
    assert len(types) == 14
    assert set(types.values()) <= {"u4", "i4"}, types
    manifest = json.loads((qwen2vl_ir / MANIFEST_NAME).read_text())
    assert manifest["compression"] == {
        "weight_format": "int4",
        "group_size": 16,
        "ratio": 1.0,
        "sym": False,
    }


def test_int4_export_of_llava(llava_ir: Path) -> None:
    types = decoder_layer_types(llava_ir)
    assert len(types) == 14
    assert set(types.values()) <= {"u4", "i4"}, types


def test_export_contains_every_pipeline_part(qwen2vl_ir: Path) -> None:
    for name in (
        "openvino_language_model.xml",
        "openvino_text_embeddings_model.xml",
        "openvino_vision_embeddings_model.xml",
        "openvino_vision_embeddings_merger_model.xml",
        "openvino_tokenizer.xml",
        "openvino_detokenizer.xml",
        "config.json",
        "preprocessor_config.json",
    ):
        assert (qwen2vl_ir / name).is_file(), name
    assert check_export(qwen2vl_ir) is None


def test_int8_export_has_8bit_weights(int8_export: Path) -> None:
    types = linear_weight_types(int8_export / "openvino_language_model.xml")
    assert len([name for name in types if ".layers." in name]) == 14
    assert set(types.values()) <= {"u8", "i8"}, types
    assert int8_export.name.endswith("--int8-asym")
    assert int8_export.name.startswith("local-")


def test_complete_export_is_reused_without_exporting(
    qwen2vl_ir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object, **kwargs: object) -> Path:
        raise AssertionError("a complete export was exported again")

    monkeypatch.setattr(export, "export_model", fail)
    manifest = qwen2vl_ir / MANIFEST_NAME
    mtime = manifest.stat().st_mtime_ns
    again = ensure_model_dir("embedded/tiny-qwen2-vl", TEST_SPEC, qwen2vl_ir.parent)
    assert again == qwen2vl_ir
    assert manifest.stat().st_mtime_ns == mtime


def test_a_directory_of_openvino_ir_is_served_as_it_is(
    qwen2vl_ir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object, **kwargs: object) -> Path:
        raise AssertionError("a directory of IR was exported again")

    monkeypatch.setattr(export, "export_model", fail)
    # An export made elsewhere (optimum-cli) has the IR files but not our manifest.
    elsewhere = tmp_path / "optimum-cli-export"
    shutil.copytree(qwen2vl_ir, elsewhere)
    (elsewhere / MANIFEST_NAME).unlink()
    assert ensure_model_dir(str(elsewhere), TEST_SPEC, tmp_path / "cache") == elsewhere
    assert not (tmp_path / "cache").exists()


def test_reuse_needs_neither_torch_nor_optimum(qwen2vl_ir: Path, tmp_path: Path) -> None:
    """A slim serving install (no export tools) can still start from an existing export."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from utils.models.export import ensure_model\n"
        "from utils.settings import Settings\n"
        "s = Settings(model_name='embedded/tiny-qwen2-vl', compression_group_size=16,"
        f" model_cache_dir=Path({str(qwen2vl_ir.parent)!r}))\n"
        "print(ensure_model(s))\n"
        "loaded = {'torch', 'optimum', 'transformers', 'nncf'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,  # not the checkout: a developer's .env is not read
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(qwen2vl_ir)


def test_damaged_export_is_detected_and_redone(int8_export: Path, tmp_path: Path) -> None:
    model_name = json.loads((int8_export / MANIFEST_NAME).read_text())["model"]
    target = tmp_path / int8_export.name
    shutil.copytree(int8_export, target)
    assert ensure_model_dir(model_name, INT8, tmp_path) == target  # the copy is complete

    (target / "openvino_language_model.bin").unlink()
    assert check_export(target) == "openvino_language_model.bin missing"
    assert ensure_model_dir(model_name, INT8, tmp_path) == target
    assert check_export(target) is None
    assert (target / "openvino_language_model.bin").stat().st_size > 0
    assert not list(tmp_path.glob(".tmp-*"))


def test_incomplete_exports_are_not_taken_as_complete(int8_export: Path, tmp_path: Path) -> None:
    target = tmp_path / "copy"
    shutil.copytree(int8_export, target)
    assert check_export(target) is None

    manifest = target / MANIFEST_NAME
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    assert "manifest" in check_export(target)

    manifest.unlink()  # an interrupted export never wrote its manifest
    assert "no manifest" in check_export(target)

    manifest.write_text(text)
    with (target / "openvino_tokenizer.bin").open("ab") as handle:
        handle.write(b"\0")
    assert "openvino_tokenizer.bin has" in check_export(target)


def test_concurrent_callers_export_once(
    qwen2vl_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_export(source: Path, out_dir: Path, spec: CompressionSpec, **kwargs: object) -> Path:
        calls.append(out_dir)
        time.sleep(0.3)
        out_dir.mkdir()
        for name in manifest.REQUIRED_FILES:
            (out_dir / name).write_text("x")
        manifest.write_manifest(out_dir, {"model": "fake"})
        return out_dir

    monkeypatch.setattr(export, "export_model", fake_export)
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(ensure_model_dir(str(qwen2vl_hf), INT8, tmp_path))
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(calls) == 1
    assert results == [calls[0]] * 3


def test_the_chat_and_speech_exports_of_one_process_run_one_after_the_other(
    qwen2vl_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server exports both models from two threads at start-up; two conversions at
    once race in transformers' lazy imports, so the second waits for the first."""
    whisper = tmp_path / "whisper"
    whisper.mkdir()
    (whisper / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    spans: dict[str, tuple[float, float]] = {}

    def fake(kind: str, required: tuple[str, ...]) -> object:
        def export_(source: Path, out_dir: Path, *args: object, **kwargs: object) -> Path:
            started = time.monotonic()
            time.sleep(0.5)
            out_dir.mkdir()
            for name in required:
                (out_dir / name).write_text("x")
            manifest.write_manifest(out_dir, {"model": kind})
            spans[kind] = (started, time.monotonic())
            return out_dir

        return export_

    monkeypatch.setattr(export, "export_model", fake("chat", manifest.REQUIRED_FILES))
    monkeypatch.setattr(
        asr_export, "export_asr_model", fake("speech", asr_export.ASR_REQUIRED_FILES)
    )
    threads = [
        threading.Thread(target=lambda: ensure_model_dir(str(qwen2vl_hf), INT8, tmp_path)),
        threading.Thread(target=lambda: asr_export.ensure_asr_dir(str(whisper), "fp16", tmp_path)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert set(spans) == {"chat", "speech"}
    (_, first_end), (second_start, _) = sorted(spans.values())
    assert first_end <= second_start


def test_failed_export_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    source = tmp_path / "not-a-vlm"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    cache = tmp_path / "cache"
    with pytest.raises(ModelExportError, match="not-a-vlm"):
        ensure_model_dir(str(source), INT8, cache)
    assert not export_dir_for(str(source), INT8, cache).exists()
    assert not list(cache.glob(".tmp-*"))


def test_unknown_model_without_network_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(ModelExportError) as caught:
        ensure_model_dir("nobody-here/no-such-vlm", INT8, tmp_path)
    message = str(caught.value)
    assert "nobody-here/no-such-vlm" in message
    assert "VLM_MODEL_NAME" in message
    assert "HF_TOKEN" in message


def test_missing_local_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelExportError, match="does not exist"):
        ensure_model_dir(str(tmp_path / "nowhere"), INT8, tmp_path)


def _unknown_model_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a process asked for a model that is on no hub it can reach."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "VLM_MODEL_NAME": "nobody-here/no-such-vlm",
        "VLM_MODEL_CACHE_DIR": str(tmp_path / "models"),
    }


def test_export_script_fails_with_one_readable_message(tmp_path: Path) -> None:
    env = _unknown_model_env(tmp_path)
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "export_model.py"), "--quiet"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "nobody-here/no-such-vlm" in errors[0]
    assert "VLM_MODEL_NAME" in errors[0]
    assert done.stdout == ""


def test_embedded_builds_are_deterministic(llava_hf: Path, tmp_path: Path) -> None:
    rebuilt = build_tiny_model("llava", tmp_path / "llava")

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(rebuilt / name) == digest(llava_hf / name), name


def test_default_settings_select_the_embedded_model_with_a_fitting_group_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from utils.settings import Settings

    for name in ("VLM_MODEL_NAME", "VLM_COMPRESSION_WEIGHT_FORMAT", "VLM_COMPRESSION_GROUP_SIZE"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings(_env_file=None)
    spec = export.effective_spec(settings.model_name, CompressionSpec.from_settings(settings))
    assert settings.model_name == "embedded/tiny-qwen2-vl"
    assert spec.weight_format == "int4"
    assert 64 % spec.group_size == 0


def test_server_refuses_to_start_on_a_model_it_cannot_get(tmp_path: Path) -> None:
    env = _unknown_model_env(tmp_path)
    env["VLM_PORT"] = "1"  # never reached: the check comes before the server binds
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
    assert done.stderr.startswith("error: Cannot get model 'nobody-here/no-such-vlm'")
    assert "VLM_MODEL_NAME" in done.stderr


def test_preflight_accepts_exported_and_embedded_models(qwen2vl_ir: Path, tmp_path: Path) -> None:
    from utils.settings import Settings

    export.preflight(
        Settings(
            model_name="embedded/tiny-qwen2-vl",
            model_cache_dir=qwen2vl_ir.parent,
            compression_group_size=16,
        )
    )
    export.preflight(Settings(model_name="embedded/tiny-llava", model_cache_dir=tmp_path))
    with pytest.raises(ModelExportError, match="embedded/tiny-qwen2-vl"):
        export.preflight(Settings(model_name="embedded/no-such-model", model_cache_dir=tmp_path))
