"""Turn `VLM_MODEL_NAME` into an OpenVINO IR directory, once.

`ensure_model(settings)` returns the exported model directory under
`settings.model_cache_dir`, keyed by model and weight format (with the compression
settings). The export runs the same code path as
`optimum-cli export openvino --task image-text-to-text --weight-format ...`: convert
the PyTorch model (and its tokenizer, through openvino_tokenizers), then compress
the weights with NNCF.

- Reuse: a finished export carries a manifest (file names and sizes) written last;
  when it matches the files on disk the directory is reused without importing torch.
- Atomic: an export is written to a temporary directory and renamed into place, so
  an interrupted export never looks complete; an incomplete or damaged one is
  removed and redone.
- One filesystem: every temporary file of an export is made beside it in the cache
  directory and removed afterwards, so no rename crosses a mount (a Docker volume).
- One at a time: a file lock per export key keeps concurrent processes from
  exporting the same model twice.
- Clear failures: `ModelExportError` says which model failed and what to set.

Models named `embedded/...` are random-weight models built offline by
`utils.models.tiny` and exported the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from utils.settings import Settings

from utils.models.hub import (
    NO_EXPORT_TOOLS,
    ModelExportError,
    cached_snapshot,
    download_model,
    hub_error,
)
from utils.models.manifest import (
    REQUIRED_FILES,
    check_export,
    file_lock,
    prebuilt_ir,
    publish,
)
from utils.models.naming import (
    EMBEDDED_MODELS,
    EMBEDDED_PREFIX,
    CompressionSpec,
    effective_spec,
    export_dir_for,
    looks_like_path,
    model_key,
)
from utils.models.scratch import temp_files_in
from utils.models.support import check_config, check_model_dir

logger = logging.getLogger(__name__)


TASK = "image-text-to-text"


@contextlib.contextmanager
def _phase(name: str, model: str) -> Iterator[None]:
    logger.info("[%s] %s: started", model, name)
    started = time.perf_counter()
    try:
        yield
    except BaseException:
        logger.info("[%s] %s: failed after %.1f s", model, name, time.perf_counter() - started)
        raise
    logger.info("[%s] %s: done in %.1f s", model, name, time.perf_counter() - started)


def preflight(settings: Settings) -> None:
    """Fail at once, with a `ModelExportError`, when the model can certainly not be served.

    Checks the name, then (unless a complete export exists) that the export tools are
    installed and that a Hub model is cached locally or known to the Hub. Cheap: no
    model is loaded and at most one small Hub request is made.
    """
    import importlib.util

    name = settings.model_name
    if (prebuilt := prebuilt_ir(name)) is not None:
        check_model_dir(prebuilt, name, trust_remote_code=True)
        return
    check_model_name(name, trust_remote_code=settings.trust_remote_code)
    spec = effective_spec(name, CompressionSpec.from_settings(settings))
    target = export_dir_for(name, spec, Path(settings.model_cache_dir))
    if check_export(target) is None:
        check_model_dir(target, name, trust_remote_code=True)  # the export runs no code
        return
    if any(importlib.util.find_spec(m) is None for m in ("torch", "optimum", "huggingface_hub")):
        raise ModelExportError(
            f"Model '{name}' is not exported yet (no complete export at {target}) and "
            f"{NO_EXPORT_TOOLS}."
        )
    if name.startswith(EMBEDDED_PREFIX) or Path(name).expanduser().is_dir():
        return
    token = os.environ.get("HF_TOKEN")
    if (snapshot := cached_snapshot(name, token)) is not None:
        check_model_dir(snapshot, name, trust_remote_code=settings.trust_remote_code)
        return
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(name, token=token, timeout=15)
    except (OSError, ValueError) as exc:
        raise hub_error(name, exc) from exc
    check_config(info.config or {}, name, trust_remote_code=settings.trust_remote_code)


def _convert(source: Path, out_dir: Path, spec: CompressionSpec, trust_remote_code: bool) -> None:
    from optimum.exporters.openvino import main_export
    from optimum.intel.openvino.configuration import OVConfig

    config = spec.quantization_config()
    ov_config = OVConfig(dtype="fp16") if config is None else OVConfig(quantization_config=config)
    main_export(
        model_name_or_path=str(source),
        output=out_dir,
        task=TASK,
        trust_remote_code=trust_remote_code,
        ov_config=ov_config,
        stateful=True,
        convert_tokenizer=True,
        library_name="transformers",
    )


def _compress(source: Path, out_dir: Path, spec: CompressionSpec, trust_remote_code: bool) -> None:
    from optimum.exporters.openvino.__main__ import _main_quantize

    _main_quantize(
        model_name_or_path=str(source),
        task=TASK,
        library_name="transformers",
        quantization_config=spec.quantization_config(),
        output=out_dir,
        cache_dir=None,
        trust_remote_code=trust_remote_code,
    )


def _convert_and_compress(
    source: Path, out_dir: Path, spec: CompressionSpec, name: str, trust_remote_code: bool
) -> None:
    try:
        with _phase("convert", name):
            _convert(source, out_dir, spec, trust_remote_code)
        if spec.quantization_config() is not None:
            with _phase(f"compress ({spec.slug})", name):
                _compress(source, out_dir, spec, trust_remote_code)
    except ModelExportError:
        raise
    except ImportError as exc:
        raise ModelExportError(
            f"Cannot export model '{name}': {exc}. Install the export tools with "
            "`scripts/install.sh` (the export group)."
        ) from exc
    except Exception as exc:
        raise ModelExportError(
            f"Exporting model '{name}' to OpenVINO failed: {exc.__class__.__name__}: {exc}"
        ) from exc


def export_model(
    source: Path,
    out_dir: Path,
    spec: CompressionSpec,
    *,
    model_name: str | None = None,
    trust_remote_code: bool = False,
    extra_manifest: dict[str, Any] | None = None,
) -> Path:
    """Export the Hugging Face model in `source` to OpenVINO IR at `out_dir`.

    Written to a temporary sibling directory, finished with a manifest and renamed
    into place; an existing `out_dir` is replaced. Returns `out_dir`.
    """
    name = model_name or str(source)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    scratch = tmp.with_name(f"{tmp.name}-scratch")  # beside tmp: same filesystem
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # The tracer and the libraries warn a lot about their own internals, which a
        # user cannot act on (and a warnings-as-errors run would abort the trace).
        with warnings.catch_warnings(), temp_files_in(scratch):
            warnings.simplefilter("ignore")
            _convert_and_compress(source, tmp, spec, name, trust_remote_code)
        with _phase("save", name):
            missing = [f for f in REQUIRED_FILES if not (tmp / f).is_file()]
            if missing:
                raise ModelExportError(
                    f"Exporting model '{name}' produced no {', '.join(missing)}: is it a "
                    "vision-language model that optimum-intel can export "
                    f"(task {TASK})?"
                )
            info = {
                "model": name,
                "compression": dataclasses.asdict(spec),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "versions": _versions(),
                **(extra_manifest or {}),
            }
            publish(tmp, out_dir, info)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for package in ("openvino", "openvino-tokenizers", "optimum-intel", "nncf", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions


def _embedded_source(model_name: str, cache_dir: Path) -> Path:
    from utils.models.tiny import build_tiny_model

    kind, size = EMBEDDED_MODELS[model_name]
    source = cache_dir / "hf" / model_key(model_name)
    with file_lock(cache_dir / "hf" / f".{source.name}.lock"):
        if (source / "config.json").is_file():
            return source
        with _phase("build random-weight model", model_name):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    build_tiny_model(kind, source, size=size)
            except ImportError as exc:
                raise ModelExportError(
                    f"Cannot build model '{model_name}': {exc}. Install the export tools "
                    "with `scripts/install.sh` (the export group)."
                ) from exc
    return source


def embedded_source(model_name: str, cache_dir: Path) -> Path:
    """The Hugging Face directory of an embedded model, built once under `cache_dir/hf`."""
    check_model_name(model_name)
    return _embedded_source(model_name, Path(cache_dir))


def resolve_source(model_name: str, cache_dir: Path, *, token: str | None = None) -> Path:
    """A local Hugging Face directory for `model_name` (building or downloading it)."""
    if model_name.startswith(EMBEDDED_PREFIX):
        return embedded_source(model_name, cache_dir)
    path = Path(model_name).expanduser()
    if path.is_dir():
        return path
    with _phase("download", model_name):
        return download_model(model_name, token=token)


def check_model_name(model_name: str, *, trust_remote_code: bool = False) -> None:
    """Fail early on a name that can be neither a local model directory nor a Hub id,
    and on a local directory whose model the server cannot run (utils.models.support)."""
    check_name(
        model_name,
        NameRules(
            "VLM_MODEL_NAME", "model", "Hugging Face model", EMBEDDED_MODELS, check_model_dir
        ),
        trust_remote_code=trust_remote_code,
    )


class NameRules(NamedTuple):
    """What a model setting may name, for check_name."""

    setting: str  # e.g. VLM_MODEL_NAME
    kind: str  # "model", "speech model"
    hub_kind: str  # "Hugging Face model", "Hugging Face Whisper model"
    embedded: Collection[str]
    check_dir: Callable[..., None]  # (directory, name, *, trust_remote_code)


def check_name(name: str, rules: NameRules, *, trust_remote_code: bool = False) -> None:
    """Raises ModelExportError for an unknown embedded name, a local directory that does
    not exist or has no config.json, or one whose model `rules.check_dir` refuses."""
    if name.startswith(EMBEDDED_PREFIX):
        if name not in rules.embedded:
            raise ModelExportError(
                f"Unknown embedded {rules.kind} '{name}'; choose one of "
                f"{', '.join(sorted(rules.embedded))}."
            )
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelExportError(
                f"Model directory '{name}' has no config.json: point {rules.setting} at a "
                f"{rules.hub_kind} directory."
            )
        rules.check_dir(path, name, trust_remote_code=trust_remote_code)
    elif looks_like_path(name):
        raise ModelExportError(
            f"Model directory '{name}' does not exist. Set {rules.setting} to an existing "
            f"local directory or a {rules.hub_kind} id."
        )


def ensure_model_dir(
    model_name: str,
    spec: CompressionSpec,
    cache_dir: Path,
    *,
    trust_remote_code: bool = False,
) -> Path:
    """Exported IR directory of `model_name`, exporting it first when needed."""
    cache_dir = Path(cache_dir)
    if (prebuilt := prebuilt_ir(model_name)) is not None:
        logger.info("serving the OpenVINO IR in %s as it is", prebuilt)
        return prebuilt
    check_model_name(model_name, trust_remote_code=trust_remote_code)
    spec = effective_spec(model_name, spec)
    target = export_dir_for(model_name, spec, cache_dir)
    started = time.perf_counter()
    if check_export(target) is None:
        logger.info("using exported model %s (%.3f s)", target, time.perf_counter() - started)
        return target
    with file_lock(cache_dir / f".{target.name}.lock"):
        problem = check_export(target)
        if problem is None:  # another process finished it while we waited
            return target
        if problem != "missing":
            logger.warning("export at %s is incomplete (%s): exporting again", target, problem)
        for stale in cache_dir.glob(f".tmp-{target.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("exporting %s (%s) to %s", model_name, spec.slug, target)
        source = resolve_source(model_name, cache_dir, token=os.environ.get("HF_TOKEN"))
        check_model_dir(source, model_name, trust_remote_code=trust_remote_code)
        export_model(
            source,
            target,
            spec,
            model_name=model_name,
            trust_remote_code=trust_remote_code,
            extra_manifest={"source": str(source)},
        )
    logger.info("[%s] exported to %s in %.1f s", model_name, target, time.perf_counter() - started)
    return target


def ensure_model(settings: Settings) -> Path:
    """The OpenVINO IR directory for `settings.model_name`, exported once and then reused."""
    return ensure_model_dir(
        settings.model_name,
        CompressionSpec.from_settings(settings),
        Path(settings.model_cache_dir),
        trust_remote_code=settings.trust_remote_code,
    )
