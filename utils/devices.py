"""OpenVINO devices: names, the start-up checks of VLM_DEVICE and VLM_OV_CONFIG, and
the properties the engine is compiled with. The /device routes are
utils/api/devices.py's."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from utils.settings import Settings

logger = logging.getLogger(__name__)

VIRTUAL_DEVICES = ("AUTO", "HETERO", "MULTI", "BATCH")
_PHYSICAL = re.compile(r"^[A-Z][A-Z0-9_]*(\.[0-9]+)?$")


class CoreLike(Protocol):
    """The part of `openvino.Core` this module uses."""

    @property
    def available_devices(self) -> list[str]: ...

    def get_property(self, device_name: str, name: str) -> Any: ...


class DeviceError(ValueError):
    """A device or OpenVINO property setting that cannot work on this machine."""


def default_core() -> CoreLike:
    import openvino

    return openvino.Core()


# --- VLM_DEVICE --------------------------------------------------------------


class DeviceSpec(NamedTuple):
    """VLM_DEVICE taken apart: "AUTO:GPU,-CPU" -> ("AUTO", ["GPU"], ["CPU"])."""

    virtual: str | None  # AUTO, HETERO, MULTI, BATCH or None for one physical device
    include: list[str]
    exclude: list[str]  # AUTO only: "-NAME" removes a candidate


def parse_device(device: str) -> DeviceSpec:
    """Check the syntax of a device string: CPU, GPU, GPU.N, AUTO, AUTO:..., HETERO:...,
    MULTI:... (and BATCH:...). Raises DeviceError."""
    text = device.strip().upper()
    if not text:
        raise DeviceError("VLM_DEVICE is empty; use CPU, GPU, GPU.N, AUTO, HETERO:... or MULTI:...")
    head, sep, tail = text.partition(":")
    if head not in VIRTUAL_DEVICES:
        if sep or not _PHYSICAL.match(text):
            raise DeviceError(
                f"VLM_DEVICE={device!r} is not a device name; use CPU, GPU, GPU.N, AUTO, "
                "AUTO:GPU,CPU, HETERO:GPU,CPU or MULTI:GPU,CPU."
            )
        return DeviceSpec(None, [text], [])
    items = [item.strip() for item in tail.split(",")] if sep else []
    if head != "AUTO" and not items:
        raise DeviceError(f"VLM_DEVICE={device!r} needs a list of devices, e.g. {head}:GPU,CPU.")
    include = [item for item in items if not item.startswith("-")]
    exclude = [item[1:] for item in items if item.startswith("-")]
    if exclude and head != "AUTO":
        raise DeviceError(f"VLM_DEVICE={device!r}: only AUTO can exclude a device with '-'.")
    bad = [
        name or "(empty)"
        for name in include + exclude
        if not _PHYSICAL.match(name) or name.split(".")[0] in VIRTUAL_DEVICES
    ]
    if bad:
        raise DeviceError(f"VLM_DEVICE={device!r}: {', '.join(bad)} is not a device name.")
    return DeviceSpec(head, include, exclude)


def match_device(name: str, available: Iterable[str]) -> str | None:
    """The available device that `name` means ("GPU" is "GPU.0" when GPUs are numbered,
    and "GPU.0" is "GPU" when there is a single one), or None."""
    available = list(available)
    if name in available:
        return name
    base, _, index = name.partition(".")
    if not index:
        numbered = sorted(d for d in available if d.startswith(base + "."))
        return numbered[0] if numbered else None
    if index == "0" and base in available:
        return base
    return None


def resolve_device(device: str, available: list[str]) -> list[str]:
    """The available devices the model may run on with VLM_DEVICE=device.

    Raises DeviceError naming what is available when a named device is missing.
    """
    spec = parse_device(device)
    found = {name: match_device(name, available) for name in spec.include}
    missing = [name for name, match in found.items() if match is None]
    if missing:
        raise DeviceError(
            f"VLM_DEVICE={device!r}: {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not available on this machine. "
            f"Available devices: {', '.join(available) or 'none'}."
            + (_GPU_HINT if any(m.startswith("GPU") for m in missing) else "")
        )
    targets = [match for match in found.values() if match is not None]
    if spec.virtual == "AUTO" and not spec.include:
        excluded = {match_device(name, available) for name in spec.exclude}
        targets = [d for d in available if d not in excluded]
        if not targets:
            raise DeviceError(
                f"VLM_DEVICE={device!r} leaves no device to run on. "
                f"Available devices: {', '.join(available) or 'none'}."
            )
    return list(dict.fromkeys(targets))


_GPU_HINT = (
    " An Intel GPU shows up only with its user-space driver installed (intel-opencl-icd) "
    "and /dev/dri/renderD* readable by this user (render group); in Docker use "
    "compose.gpu.yaml."
)


# --- VLM_OV_CONFIG -----------------------------------------------------------

_PROPERTY_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.]*$")


def validate_ov_config(config: Any, *, where: str = "VLM_OV_CONFIG") -> dict[str, Any]:
    """Check that config maps OpenVINO property names to plain values.

    Values may be strings, numbers, booleans or (for per-device properties such
    as DEVICE_PROPERTIES) objects of the same kind.
    """
    if not isinstance(config, dict):
        raise DeviceError(
            f'{where} must be a JSON object such as {{"PERFORMANCE_HINT": "LATENCY"}}, '
            f"not {type(config).__name__}."
        )
    for key, value in config.items():
        if not isinstance(key, str) or not _PROPERTY_NAME.match(key):
            raise DeviceError(f"{where}: {key!r} is not an OpenVINO property name.")
        if isinstance(value, dict):
            validate_ov_config(value, where=f"{where}.{key}")
        elif value is None or not isinstance(value, (str, int, float, bool)):
            raise DeviceError(
                f"{where}.{key} must be a string, number, boolean or object, "
                f"not {_json_type(value)}."
            )
    return config


def _json_type(value: Any) -> str:
    return {list: "an array", type(None): "null"}.get(type(value), type(value).__name__)


def check_device(settings: Settings, core: CoreLike | None = None) -> list[str]:
    """Validate VLM_DEVICE against the machine and VLM_OV_CONFIG; return the
    devices the model may run on. Raises DeviceError with a readable message."""
    validate_ov_config(settings.ov_config)
    if uses_gpu(settings.device) and (problem := gpu_access_problem()) is not None:
        logger.warning("VLM_DEVICE=%s: %s", settings.device, problem)
    core = core or default_core()
    available = list(core.available_devices)
    devices = resolve_device(settings.device, available)
    _warn_unknown_properties(settings.ov_config, devices, core)
    return devices


def _warn_unknown_properties(config: dict[str, Any], devices: list[str], core: CoreLike) -> None:
    # OpenVINO GenAI accepts properties of its own (and CACHE_DIR is a Core
    # property), so an unknown name is worth a warning, not a refusal.
    known: set[str] = {"CACHE_DIR", "DEVICE_PROPERTIES"}
    for device in devices:
        try:
            known.update(core.get_property(device, "SUPPORTED_PROPERTIES"))
        except Exception:  # a plugin that cannot list them: nothing to compare with
            return
    for key in config:
        if key not in known:
            logger.warning(
                "VLM_OV_CONFIG: %s is not a property of %s; OpenVINO may reject it",
                key,
                ", ".join(devices),
            )


def _can_open(node: Path) -> bool:
    return os.access(node, os.R_OK | os.W_OK)


def gpu_access_problem(
    dri: Path = Path("/dev/dri"), can_open: Callable[[Path], bool] = _can_open
) -> str | None:
    """What keeps this process from an Intel GPU's render node, in one line, or None.

    OpenVINO only reports "GPU not available"; this names the missing piece: the
    device directory (not passed into the container), the render node, or the
    group that may open it.
    """
    if not dri.is_dir():
        return (
            f"{dri} does not exist: no GPU device is visible here (Docker: run with "
            "compose.gpu.yaml, which passes /dev/dri; host: the i915 or xe kernel driver)"
        )
    nodes = sorted(dri.glob("renderD*"))
    if not nodes:
        return f"{dri} has no renderD* node: the GPU's kernel driver (i915 or xe) is not loaded"
    if any(can_open(node) for node in nodes):
        return None
    node = nodes[0]
    gid = node.stat().st_gid
    return (
        f"{node} belongs to group {gid}, which this process (uid {os.getuid()}, groups "
        f"{','.join(map(str, os.getgroups()))}) is not in: Docker: set RENDER_GID={gid} "
        "in .env (setup.sh does); host: usermod -aG render $USER"
    )


def uses_gpu(device: str) -> bool:
    try:
        spec = parse_device(device)
    except DeviceError:
        return False
    return any(name.split(".")[0] == "GPU" for name in spec.include)


def compiled_cache_dir(settings: Settings) -> Path | None:
    """Where compiled models are cached: VLM_COMPILED_CACHE_DIR, else on GPU
    <model_cache_dir>/compiled (GPU kernels take long to compile; the cache
    makes the second start fast), else nowhere."""
    if settings.compiled_cache_dir is not None:
        return settings.compiled_cache_dir.expanduser().resolve()
    if uses_gpu(settings.device):
        return (settings.model_cache_dir.expanduser() / "compiled").resolve()
    return None


def engine_properties(settings: Settings) -> dict[str, Any]:
    """The OpenVINO properties the engine passes to its pipeline: VLM_OV_CONFIG, plus
    CACHE_DIR (see compiled_cache_dir) and, on the CPU, CPU_RUNTIME_CACHE_CAPACITY,
    unless VLM_OV_CONFIG sets its own."""
    properties = dict(validate_ov_config(settings.ov_config))
    if settings.device.upper() == "CPU":
        properties.setdefault("CPU_RUNTIME_CACHE_CAPACITY", settings.cpu_runtime_cache_capacity)
    cache_dir = compiled_cache_dir(settings)
    if cache_dir is not None and "CACHE_DIR" not in properties:
        cache_dir.mkdir(parents=True, exist_ok=True)
        properties["CACHE_DIR"] = str(cache_dir)
    return properties


# --- describing devices ------------------------------------------------------
