"""Turn `VLM_ASR_MODEL` (a Whisper model) into an OpenVINO IR directory, once.

The same rules as the vision-language export (utils.models.export): reused when its
manifest matches the files, written to a temporary directory and renamed into place,
one export per key at a time (a file lock), temporary files on the cache's
filesystem, and a `ModelExportError` that says what to set. The conversion is
`optimum-cli export openvino --task automatic-speech-recognition-with-past`: a
stateful decoder, which OpenVINO GenAI's WhisperPipeline runs.

Models named `embedded/tiny-whisper` and `embedded/random-whisper-small` are
random-weight Whispers built offline by utils.models.tiny_whisper.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from utils.models.export import NameRules, _phase, _versions, check_name
from utils.models.hub import (
    NO_EXPORT_TOOLS,
    ModelExportError,
    cached_snapshot,
    download_model,
)
from utils.models.manifest import check_export, file_lock, publish
from utils.models.naming import EMBEDDED_PREFIX, model_key
from utils.models.scratch import temp_files_in
from utils.models.support import read_config
from utils.models.tiny_whisper import EMBEDDED_ASR_MODELS, build_tiny_whisper, builder_hash

if TYPE_CHECKING:
    from utils.settings import Settings

logger = logging.getLogger(__name__)

ASR_TASK = "automatic-speech-recognition-with-past"

# Files every usable Whisper export has (WhisperPipeline loads these).
ASR_REQUIRED_FILES = (
    "openvino_encoder_model.xml",
    "openvino_encoder_model.bin",
    "openvino_decoder_model.xml",
    "openvino_decoder_model.bin",
    "openvino_tokenizer.xml",
    "openvino_detokenizer.xml",
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
)


def _prebuilt(name: str) -> Path | None:
    """`name` itself when it is a directory that already holds a Whisper IR export."""
    directory = Path(name).expanduser()
    if all((directory / f).is_file() for f in ASR_REQUIRED_FILES):
        return directory
    return None


def asr_export_dir(name: str, weight_format: str, cache_dir: Path) -> Path:
    if name.startswith(EMBEDDED_PREFIX):
        key = f"{name.removeprefix(EMBEDDED_PREFIX)}-{builder_hash()}"
    else:
        key = model_key(name)
    return Path(cache_dir) / f"{key}--asr-{weight_format}"


def check_asr_config(directory: Path, name: str, *, trust_remote_code: bool) -> None:
    """Raises ModelExportError when `directory` holds no Whisper model the server runs."""
    config = read_config(directory)
    model_type = config.get("model_type")
    if model_type != "whisper":
        raise ModelExportError(
            f"VLM_ASR_MODEL '{name}' has model_type '{model_type}': it must be a Whisper "
            "model (model_type 'whisper'), which OpenVINO GenAI's WhisperPipeline runs."
        )
    if config.get("auto_map") and not trust_remote_code:
        raise ModelExportError(
            f"VLM_ASR_MODEL '{name}' ships its own Python code (config.json has auto_map); "
            "set VLM_TRUST_REMOTE_CODE=true to allow running it for the export."
        )


def check_asr_name(name: str, *, trust_remote_code: bool = False) -> None:
    check_name(
        name,
        NameRules(
            "VLM_ASR_MODEL",
            "speech model",
            "Hugging Face Whisper model",
            EMBEDDED_ASR_MODELS,
            check_asr_config,
        ),
        trust_remote_code=trust_remote_code,
    )


def asr_preflight(settings: Settings) -> None:
    """Fail at once when the speech model can certainly not be served (nothing loaded)."""
    name = settings.asr_model
    if not name or _prebuilt(name) is not None:
        return
    check_asr_name(name, trust_remote_code=settings.trust_remote_code)
    target = asr_export_dir(name, settings.asr_weight_format, Path(settings.model_cache_dir))
    if check_export(target, ASR_REQUIRED_FILES) is None:
        return
    if any(importlib.util.find_spec(m) is None for m in ("torch", "optimum", "huggingface_hub")):
        raise ModelExportError(
            f"Speech model '{name}' is not exported yet (no complete export at {target}) and "
            f"{NO_EXPORT_TOOLS}."
        )
    if not name.startswith(EMBEDDED_PREFIX) and not Path(name).expanduser().is_dir():
        snapshot = cached_snapshot(name, os.environ.get("HF_TOKEN"))
        if snapshot is not None:
            check_asr_config(snapshot, name, trust_remote_code=settings.trust_remote_code)


def _source(name: str, cache_dir: Path) -> Path:
    if name.startswith(EMBEDDED_PREFIX):
        source = cache_dir / "hf" / asr_export_dir(name, "hf", cache_dir).name
        with file_lock(cache_dir / "hf" / f".{source.name}.lock"):
            if not (source / "config.json").is_file():
                with _phase("build random-weight model", name), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    build_tiny_whisper(source, size=EMBEDDED_ASR_MODELS[name])
        return source
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    with _phase("download", name):
        return download_model(name, token=os.environ.get("HF_TOKEN"))


def _convert(source: Path, out_dir: Path, weight_format: str, trust_remote_code: bool) -> None:
    from optimum.exporters.openvino import main_export
    from optimum.intel.openvino.configuration import OVConfig

    if weight_format == "int8":
        ov_config = OVConfig(quantization_config={"bits": 8, "sym": False, "group_size": -1})
    else:
        ov_config = OVConfig(dtype="fp16")
    main_export(
        model_name_or_path=str(source),
        output=out_dir,
        task=ASR_TASK,
        trust_remote_code=trust_remote_code,
        ov_config=ov_config,
        stateful=True,
        convert_tokenizer=True,
        library_name="transformers",
    )


def export_asr_model(
    source: Path, out_dir: Path, weight_format: str, *, name: str, trust_remote_code: bool
) -> Path:
    """Exports the Whisper model in `source` to `out_dir` (atomic; replaces `out_dir`)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            with (
                _phase(f"convert ({weight_format})", name),
                warnings.catch_warnings(),
                temp_files_in(tmp.with_name(f"{tmp.name}-scratch")),
            ):
                warnings.simplefilter("ignore")
                _convert(source, tmp, weight_format, trust_remote_code)
        except ImportError as exc:
            raise ModelExportError(f"Cannot export speech model '{name}': {exc}.") from exc
        except Exception as exc:
            raise ModelExportError(
                f"Exporting speech model '{name}' to OpenVINO failed: "
                f"{exc.__class__.__name__}: {exc}"
            ) from exc
        missing = [f for f in ASR_REQUIRED_FILES if not (tmp / f).is_file()]
        if missing:
            raise ModelExportError(
                f"Exporting speech model '{name}' produced no {', '.join(missing)}: is it a "
                f"Whisper model that optimum-intel can export (task {ASR_TASK})?"
            )
        info = {
            "model": name,
            "task": ASR_TASK,
            "weight_format": weight_format,
            "source": str(source),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": _versions(),
        }
        publish(tmp, out_dir, info)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_asr_dir(
    name: str, weight_format: str, cache_dir: Path, *, trust_remote_code: bool = False
) -> Path:
    """The exported IR directory of the Whisper model `name`, exported first if needed."""
    if (prebuilt := _prebuilt(name)) is not None:
        logger.info("serving the Whisper IR in %s as it is", prebuilt)
        return prebuilt
    check_asr_name(name, trust_remote_code=trust_remote_code)
    cache_dir = Path(cache_dir)
    target = asr_export_dir(name, weight_format, cache_dir)
    if check_export(target, ASR_REQUIRED_FILES) is None:
        return target
    with file_lock(cache_dir / f".{target.name}.lock"):
        problem = check_export(target, ASR_REQUIRED_FILES)
        if problem is None:  # another process finished it while we waited
            return target
        if problem != "missing":
            logger.warning("export at %s is incomplete (%s): exporting again", target, problem)
        for stale in cache_dir.glob(f".tmp-{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        source = _source(name, cache_dir)
        check_asr_config(source, name, trust_remote_code=trust_remote_code)
        export_asr_model(
            source, target, weight_format, name=name, trust_remote_code=trust_remote_code
        )
    return target


def ensure_asr_model(settings: Settings) -> Path | None:
    """The IR directory of `VLM_ASR_MODEL`, or None when no speech model is configured."""
    if not settings.asr_model:
        return None
    return ensure_asr_dir(
        settings.asr_model,
        settings.asr_weight_format,
        Path(settings.model_cache_dir),
        trust_remote_code=settings.trust_remote_code,
    )
