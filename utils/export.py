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
`utils.tiny_models` and exported the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from utils.settings import Settings

logger = logging.getLogger(__name__)

MANIFEST_NAME = "export_manifest.json"
MANIFEST_VERSION = 1
TASK = "image-text-to-text"
# Files every usable export has (the manifest lists every file with its size).
REQUIRED_FILES = (
    "openvino_language_model.xml",
    "openvino_language_model.bin",
    "openvino_tokenizer.xml",
    "openvino_detokenizer.xml",
    "config.json",
)

WeightFormat = Literal["int4", "int8", "fp16"]

EMBEDDED_PREFIX = "embedded/"
# Embedded model name -> (utils.tiny_models kind, size).
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "embedded/tiny-qwen2-vl": ("qwen2-vl", "tiny"),
    "embedded/tiny-llava": ("llava", "tiny"),
    "embedded/random-qwen2-vl-2b": ("qwen2-vl", "2b"),
}
# The tiny models' hidden size is 64: larger int4 groups would not divide it.
EMBEDDED_TINY_MAX_GROUP_SIZE = 16

_SOURCE_FILES = ("tiny_models.py", "export.py")


class ModelExportError(RuntimeError):
    """The model cannot be made available; the message says why and what to set."""


@dataclasses.dataclass(frozen=True)
class CompressionSpec:
    """How the language model's weights are stored."""

    weight_format: WeightFormat = "int4"
    group_size: int = 128
    ratio: float = 1.0
    sym: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> CompressionSpec:
        return cls(
            weight_format=settings.compression_weight_format,
            group_size=settings.compression_group_size,
            ratio=settings.compression_ratio,
            sym=settings.compression_sym,
        )

    @property
    def slug(self) -> str:
        sym = "sym" if self.sym else "asym"
        if self.weight_format == "int4":
            return f"int4-g{self.group_size}-r{self.ratio:g}-{sym}"
        if self.weight_format == "int8":
            return f"int8-{sym}"
        return self.weight_format

    def quantization_config(self) -> dict[str, Any] | None:
        """The weight-compression config `optimum-cli --weight-format` would build."""
        if self.weight_format == "fp16":
            return None
        int8 = self.weight_format == "int8"
        return {
            "bits": 8 if int8 else 4,
            "ratio": 1.0 if int8 else self.ratio,
            "sym": self.sym,
            "group_size": -1 if int8 else self.group_size,
            "all_layers": None,
            "dataset": None,
            "num_samples": None,
            "quant_method": "default",
            "sensitivity_metric": None,
            "scale_estimation": None,
            "gptq": None,
            "lora_correction": None,
            "dtype": self.weight_format,
            "backup_precision": None,
            "statistics_path": None,
            "group_size_fallback": None,
        }


def source_hash() -> str:
    """Hash of the code that builds embedded models; a change gives new export keys."""
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in _SOURCE_FILES:
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:12]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def model_key(model_name: str) -> str:
    """Directory-name-safe key of a model: embedded name, local directory or hub id."""
    if model_name.startswith(EMBEDDED_PREFIX):
        return f"{_slug(model_name.removeprefix(EMBEDDED_PREFIX))}-{source_hash()}"
    path = Path(model_name).expanduser()
    if path.is_dir():
        resolved = str(path.resolve())
        short = hashlib.sha256(resolved.encode()).hexdigest()[:8]
        return f"local-{_slug(path.resolve().name)}-{short}"
    return _slug(model_name.replace("/", "--"))


def effective_spec(model_name: str, spec: CompressionSpec) -> CompressionSpec:
    """Adjust compression settings the model cannot take (tiny embedded models)."""
    embedded = EMBEDDED_MODELS.get(model_name)
    if (
        embedded is not None
        and embedded[1] == "tiny"
        and spec.weight_format == "int4"
        and spec.group_size > EMBEDDED_TINY_MAX_GROUP_SIZE
    ):
        return dataclasses.replace(spec, group_size=EMBEDDED_TINY_MAX_GROUP_SIZE)
    return spec


def export_dir_for(model_name: str, spec: CompressionSpec, cache_dir: Path) -> Path:
    return Path(cache_dir) / f"{model_key(model_name)}--{effective_spec(model_name, spec).slug}"


# --------------------------------------------------------------------------- manifest


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


def check_export(directory: Path) -> str | None:
    """Why `directory` is not a complete export, or None when it is."""
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
    for name in REQUIRED_FILES:
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


# --------------------------------------------------------------------------- locking


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl) held for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process exporting %s", path.stem)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- temporary files

# tempfile's default directory is process-wide: one export at a time may move it.
_TEMP_DIR_LOCK = threading.Lock()


@contextlib.contextmanager
def temp_files_in(directory: Path) -> Iterator[None]:
    """Send the block's temporary files (Python's `tempfile` and, through TMPDIR, native
    code and child processes) to `directory`, which is created here and removed after.

    optimum-intel and NNCF write compressed models into `tempfile.TemporaryDirectory()`
    and rename them into the export; a rename cannot cross filesystems, so an export
    into a cache on another mount (a Docker volume, a second disk) fails with EXDEV
    unless its temporary files live on the cache's filesystem. Compiler caches that
    torch keeps under the temporary directory go away with it.
    """
    with _TEMP_DIR_LOCK:
        directory.mkdir(parents=True, exist_ok=True)
        saved_tempdir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
        tempfile.tempdir = os.environ["TMPDIR"] = str(directory)
        try:
            yield
        finally:
            tempfile.tempdir = saved_tempdir
            if saved_env is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = saved_env
            shutil.rmtree(directory, ignore_errors=True)


# --------------------------------------------------------------------------- phases


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


def _no_source_error(model_name: str, reason: str) -> ModelExportError:
    return ModelExportError(
        f"Cannot get model '{model_name}': {reason}. There is no local copy to export. "
        "Set VLM_MODEL_NAME to a local directory holding the Hugging Face model "
        "(config.json, weights, tokenizer and processor files), or allow network access "
        "to huggingface.co (and set HF_TOKEN for gated or private models). "
        "VLM_MODEL_NAME=embedded/tiny-qwen2-vl serves a built-in random-weight model."
    )


_NO_EXPORT_TOOLS = (
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


def _hub_error(model_name: str, exc: BaseException) -> ModelExportError:
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


def _cached_snapshot(model_name: str, token: str | None) -> Path | None:
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
        raise ModelExportError(f"Cannot export model '{model_name}': {_NO_EXPORT_TOOLS}.") from exc

    try:
        return Path(snapshot_download(model_name, token=token, ignore_patterns=_IGNORED_HUB_FILES))
    except (OSError, ValueError) as exc:  # hub errors are OSErrors or ValueErrors
        cached = _cached_snapshot(model_name, token)
        if cached is not None:
            logger.warning("[%s] download failed (%s): using the cached copy", model_name, exc)
            return cached
        raise _hub_error(model_name, exc) from exc


def preflight(settings: Settings) -> None:
    """Fail at once, with a `ModelExportError`, when the model can certainly not be served.

    Checks the name, then (unless a complete export exists) that the export tools are
    installed and that a Hub model is cached locally or known to the Hub. Cheap: no
    model is loaded and at most one small Hub request is made.
    """
    import importlib.util

    name = settings.model_name
    if prebuilt_ir(name) is not None:
        return
    check_model_name(name)
    spec = effective_spec(name, CompressionSpec.from_settings(settings))
    target = export_dir_for(name, spec, Path(settings.model_cache_dir))
    if check_export(target) is None:
        return
    if any(importlib.util.find_spec(m) is None for m in ("torch", "optimum", "huggingface_hub")):
        raise ModelExportError(
            f"Model '{name}' is not exported yet (no complete export at {target}) and "
            f"{_NO_EXPORT_TOOLS}."
        )
    if name.startswith(EMBEDDED_PREFIX) or Path(name).expanduser().is_dir():
        return
    token = os.environ.get("HF_TOKEN")
    if _cached_snapshot(name, token) is not None:
        return
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(name, token=token, timeout=15)
    except (OSError, ValueError) as exc:
        raise _hub_error(name, exc) from exc


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
            write_manifest(tmp, info)
            if out_dir.exists():
                shutil.rmtree(out_dir)
            tmp.rename(out_dir)
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
    from utils.tiny_models import build_tiny_model

    kind, size = EMBEDDED_MODELS[model_name]
    source = cache_dir / "hf" / model_key(model_name)
    with file_lock(cache_dir / "hf" / f".{source.name}.lock"):
        if (source / "config.json").is_file():
            return source
        with _phase("build random-weight model", model_name):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    build_tiny_model(kind, source, size=size)  # type: ignore[arg-type]
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


def check_model_name(model_name: str) -> None:
    """Fail early on a name that can be neither a local model directory nor a Hub id."""
    if model_name.startswith(EMBEDDED_PREFIX):
        if model_name not in EMBEDDED_MODELS:
            raise ModelExportError(
                f"Unknown embedded model '{model_name}'; choose one of "
                f"{', '.join(sorted(EMBEDDED_MODELS))}."
            )
        return
    path = Path(model_name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelExportError(
                f"Model directory '{model_name}' has no config.json: point VLM_MODEL_NAME at a "
                "Hugging Face model directory."
            )
    elif _looks_like_path(model_name):
        raise ModelExportError(
            f"Model directory '{model_name}' does not exist. Set VLM_MODEL_NAME to an existing "
            "local directory or a Hugging Face model id."
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
    check_model_name(model_name)
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
