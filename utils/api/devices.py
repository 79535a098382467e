"""GET /device, GET /device/{name} and POST /device?device=NAME.

Every Core call blocks (the first one loads device plugins), so the routes run
them in a thread. One Core is created lazily and reused; tests substitute a
Core by setting the app state's `devices` to `DeviceService(core_factory)`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import threading
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from utils.api.state import AppState, State
from utils.devices import CoreLike, DeviceError, default_core, match_device, resolve_device
from utils.errors import OpenAIError

logger = logging.getLogger(__name__)

# Properties whose values describe the device rather than tune it.
_MEMORY_PROPERTIES = ("GPU_DEVICE_TOTAL_MEM_SIZE", "NPU_DEVICE_TOTAL_MEM_SIZE")


def to_json(value: Any) -> Any:
    """OpenVINO property values as JSON-safe values."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(to_json(k)): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [to_json(v) for v in value]
        return sorted(items, key=str) if isinstance(value, (set, frozenset)) else items
    if hasattr(value, "get_type_name"):  # openvino.Type, e.g. f32
        return value.get_type_name()
    name = getattr(value, "name", None)
    if isinstance(name, str) and hasattr(value, "__int__"):  # pybind11 enums
        return name if name.isidentifier() else int(value)
    return str(value)


class DeviceService:
    """Device queries on one lazily created Core, run off the event loop."""

    def __init__(self, core_factory: Callable[[], CoreLike] = default_core) -> None:
        self._factory = core_factory
        self._core: CoreLike | None = None
        self._lock = threading.Lock()

    def core(self) -> CoreLike:
        with self._lock:
            if self._core is None:
                self._core = self._factory()
            return self._core

    # Blocking helpers (call them in a thread).

    def available(self) -> list[str]:
        return list(self.core().available_devices)

    def properties(self, name: str) -> dict[str, Any]:
        """Every readable property of a device, as JSON-safe values."""
        core = self.core()
        supported = core.get_property(name, "SUPPORTED_PROPERTIES")
        out: dict[str, Any] = {}
        for prop in supported:
            if prop == "SUPPORTED_PROPERTIES":
                continue
            mode = supported.get(prop) if isinstance(supported, dict) else None
            if mode is not None and str(mode).upper() == "WO":
                continue
            try:
                out[str(prop)] = to_json(core.get_property(name, prop))
            except Exception as exc:  # some properties cannot be read outside a model
                logger.debug("%s: cannot read %s: %s", name, prop, exc)
        return out

    def summary(self, name: str, properties: dict[str, Any] | None = None) -> dict[str, Any]:
        props = properties if properties is not None else self.properties(name)
        device_type = props.get("DEVICE_TYPE")
        memory = {key: props[key] for key in _MEMORY_PROPERTIES if key in props}
        return {
            "name": name,
            "full_name": props.get("FULL_DEVICE_NAME", name),
            "type": device_type.lower() if isinstance(device_type, str) else device_type,
            "architecture": props.get("DEVICE_ARCHITECTURE"),
            "capabilities": props.get("OPTIMIZATION_CAPABILITIES", []),
            "memory_bytes": next(iter(memory.values()), None),
        }

    def list_devices(self) -> list[dict[str, Any]]:
        return [self.summary(name) for name in self.available()]

    def describe(self, name: str) -> dict[str, Any]:
        """Summary plus every readable property of one device."""
        available = self.available()
        found = match_device(name.strip().upper(), available)
        if found is None:
            raise OpenAIError(
                404,
                f"Device {name!r} not found. Available devices: {', '.join(available) or 'none'}.",
                param="device",
                code="device_not_found",
            )
        props = self.properties(found)
        return {**self.summary(found, props), "properties": props}

    def targets(self, device: str) -> list[str]:
        """Devices VLM_DEVICE resolves to here ([] when it does not resolve)."""
        try:
            return resolve_device(device, self.available())
        except DeviceError:
            return []


def _service(state: State) -> DeviceService:
    if state.devices is None:
        state.devices = DeviceService()
    return state.devices


Devices = Annotated[DeviceService, Depends(_service)]

router = APIRouter(tags=["devices"])


def _model_status(state: AppState, targets: list[str]) -> dict[str, Any]:
    settings, engine = state.settings, state.engine
    return {
        "name": settings.public_model_name,
        "device": settings.device,
        "devices": targets,
        "loaded": engine is not None and bool(engine.ready),
    }


async def _describe(state: AppState, devices: DeviceService, name: str) -> dict[str, Any]:
    def work() -> tuple[dict[str, Any], list[str]]:
        return devices.describe(name), devices.targets(state.settings.device)

    described, targets = await asyncio.to_thread(work)
    return {
        "object": "device",
        **described,
        "active": described["name"] in targets,
        "model": _model_status(state, targets),
    }


@router.get("/device")
async def list_devices(state: State, devices: Devices) -> dict[str, Any]:
    """The OpenVINO devices on this machine and the one the model runs on."""

    def work() -> tuple[list[dict[str, Any]], list[str]]:
        return devices.list_devices(), devices.targets(state.settings.device)

    listed, targets = await asyncio.to_thread(work)
    data = [{"object": "device", **d, "active": d["name"] in targets} for d in listed]
    return {"object": "list", "data": data, "model": _model_status(state, targets)}


@router.get("/device/{name}")
async def get_device(name: str, state: State, devices: Devices) -> dict[str, Any]:
    """One device: summary, every readable property, and whether the model runs on it."""
    return await _describe(state, devices, name)


@router.post("/device")
async def post_device(
    state: State,
    devices: Devices,
    device: Annotated[str, Query(min_length=1, description="Device name, e.g. CPU or GPU.0")],
) -> dict[str, Any]:
    """Same as GET /device/{name}, with the name in the `device` query parameter."""
    return await _describe(state, devices, device)
