"""/device routes, VLM_DEVICE / VLM_OV_CONFIG checks and engine properties.

CPU paths run on the real OpenVINO Core. No Intel GPU exists here, so GPU paths
use a substitute Core: the real one with two Intel GPUs added, reporting the
property types the GPU plugin reports.
"""

from __future__ import annotations

import enum
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import openvino
import pytest
from fastapi import FastAPI

from app import create_app
from utils.api.devices import DeviceService, to_json
from utils.api.state import app_state
from utils.devices import (
    DeviceError,
    check_device,
    engine_properties,
    parse_device,
    resolve_device,
)
from utils.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


class DeviceType(enum.Enum):  # stands in for openvino.properties.device.Type
    INTEGRATED = 0
    DISCRETE = 1


class UUID:  # the GPU plugin's DEVICE_UUID prints as hex
    def __str__(self) -> str:
        return "8680a056080000000300000000000000"


GPU_PROPERTIES: dict[str, dict[str, Any]] = {
    "GPU.0": {
        "FULL_DEVICE_NAME": "Intel(R) Graphics [0x7d55] (iGPU)",
        "DEVICE_TYPE": DeviceType.INTEGRATED,
        "DEVICE_ARCHITECTURE": "GPU: vendor=0x8086 arch=v12.71.4",
        "OPTIMIZATION_CAPABILITIES": ["FP32", "BIN", "FP16", "INT8", "EXPORT_IMPORT"],
        "GPU_DEVICE_TOTAL_MEM_SIZE": 30_923_776_000,
        "GPU_EXECUTION_UNITS_COUNT": 128,
        "DEVICE_GOPS": {openvino.Type.f16: 8601.6, openvino.Type.f32: 4300.8},
        "DEVICE_UUID": UUID(),
        "RANGE_FOR_STREAMS": (1, 2),
        "INFERENCE_PRECISION_HINT": openvino.Type.f16,
        "GPU_MEMORY_STATISTICS": {},
        "MODEL_PRIORITY": "MEDIUM",
        "CACHE_DIR": "",
    },
    "GPU.1": {
        "FULL_DEVICE_NAME": "Intel(R) Arc(TM) A770 Graphics (dGPU)",
        "DEVICE_TYPE": DeviceType.DISCRETE,
        "DEVICE_ARCHITECTURE": "GPU: vendor=0x8086 arch=v12.55.8",
        "OPTIMIZATION_CAPABILITIES": ["FP32", "BIN", "FP16", "INT8", "GPU_HW_MATMUL"],
        "GPU_DEVICE_TOTAL_MEM_SIZE": 16_225_243_136,
        "GPU_EXECUTION_UNITS_COUNT": 512,
        "DEVICE_GOPS": {openvino.Type.f16: float("inf")},
        "RANGE_FOR_STREAMS": (1, 2),
        "MODEL_PRIORITY": "MEDIUM",
    },
}


class CoreWithGPUs:
    """The real Core plus the GPUs in `gpus` (a property that cannot be read
    raises, as the real plugins do for some properties outside a model)."""

    def __init__(self, gpus: dict[str, dict[str, Any]] | None = None) -> None:
        self._core = openvino.Core()
        self._gpus = GPU_PROPERTIES if gpus is None else gpus

    @property
    def available_devices(self) -> list[str]:
        return [*self._core.available_devices, *self._gpus]

    def get_property(self, device_name: str, name: str) -> Any:
        if device_name not in self._gpus:
            return self._core.get_property(device_name, name)
        props = self._gpus[device_name]
        if name == "SUPPORTED_PROPERTIES":
            supported = dict.fromkeys(props, "RO")
            supported.update(SUPPORTED_PROPERTIES="RO", CACHE_DIR="RW", GPU_QUEUE_PRIORITY="RW")
            return {**supported, "WEIGHTS_PATH": "WO"}
        if name not in props:
            raise RuntimeError(f"Unsupported property {name} by GPU plugin")
        return props[name]


def single_gpu() -> CoreWithGPUs:
    return CoreWithGPUs({"GPU": GPU_PROPERTIES["GPU.1"]})


def client_for(app: FastAPI) -> httpx.AsyncClient:
    # The device routes need no engine: the app runs without its lifespan here.
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def cpu_client() -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(create_app(Settings(device="CPU"))) as client:
        yield client


@pytest.fixture
def gpu_client() -> Callable[..., httpx.AsyncClient]:
    def make(device: str = "GPU", core: Callable[[], Any] = CoreWithGPUs) -> httpx.AsyncClient:
        app = create_app(Settings(device=device))
        app_state(app).devices = DeviceService(core)
        return client_for(app)

    return make


def assert_openai_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"]


# --- the real CPU ------------------------------------------------------------


async def test_list_devices_on_real_cpu(cpu_client: httpx.AsyncClient) -> None:
    response = await cpu_client.get("/device")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    cpu = next(d for d in body["data"] if d["name"] == "CPU")
    assert cpu["full_name"] == openvino.Core().get_property("CPU", "FULL_DEVICE_NAME")
    assert cpu["type"] in ("integrated", "discrete")
    assert cpu["architecture"]
    assert "FP32" in cpu["capabilities"]
    assert cpu["active"] is True
    assert body["model"]["device"] == "CPU"
    assert body["model"]["devices"] == ["CPU"]
    assert body["model"]["loaded"] is False  # no engine in this app


@pytest.mark.parametrize("call", ["get", "post"])
async def test_describe_real_cpu(cpu_client: httpx.AsyncClient, call: str) -> None:
    if call == "get":
        response = await cpu_client.get("/device/cpu")
    else:
        response = await cpu_client.post("/device", params={"device": "CPU"})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "device"
    assert body["name"] == "CPU"
    assert body["active"] is True
    props = body["properties"]
    for name in ("FULL_DEVICE_NAME", "DEVICE_TYPE", "DEVICE_ARCHITECTURE", "RANGE_FOR_STREAMS"):
        assert name in props
    assert props["DEVICE_TYPE"] in ("INTEGRATED", "DISCRETE")
    assert isinstance(props["RANGE_FOR_STREAMS"], list)
    assert isinstance(props["INFERENCE_PRECISION_HINT"], str)  # an openvino.Type
    assert "SUPPORTED_PROPERTIES" not in props
    assert "WEIGHTS_PATH" not in props  # write-only
    # Everything the response holds went through JSON: no repr() of OpenVINO objects.
    assert not any("<" in str(value) for value in props.values())


async def test_unknown_device_is_404_in_openai_shape(cpu_client: httpx.AsyncClient) -> None:
    response = await cpu_client.get("/device/GPU")
    assert_openai_error(response, 404, "'GPU' not found", "Available devices: CPU")
    assert response.json()["error"]["param"] == "device"
    assert response.json()["error"]["code"] == "device_not_found"
    response = await cpu_client.post("/device", params={"device": "NPU"})
    assert_openai_error(response, 404, "'NPU' not found")


async def test_post_device_without_name_is_400(cpu_client: httpx.AsyncClient) -> None:
    assert_openai_error(await cpu_client.post("/device"), 400)


# --- GPUs through a substitute Core -----------------------------------------


async def test_list_with_gpus(gpu_client: Callable[..., httpx.AsyncClient]) -> None:
    async with gpu_client("GPU.1") as client:
        body = (await client.get("/device")).json()
    by_name = {d["name"]: d for d in body["data"]}
    assert list(by_name) == ["CPU", "GPU.0", "GPU.1"]
    arc = by_name["GPU.1"]
    assert arc["full_name"] == "Intel(R) Arc(TM) A770 Graphics (dGPU)"
    assert arc["type"] == "discrete"
    assert arc["memory_bytes"] == 16_225_243_136
    assert "GPU_HW_MATMUL" in arc["capabilities"]
    assert by_name["GPU.0"]["type"] == "integrated"
    assert [d["name"] for d in body["data"] if d["active"]] == ["GPU.1"]
    assert body["model"]["devices"] == ["GPU.1"]


async def test_describe_gpu_converts_every_property(
    gpu_client: Callable[..., httpx.AsyncClient],
) -> None:
    async with gpu_client("GPU") as client:  # GPU means GPU.0 when GPUs are numbered
        body = (await client.get("/device/GPU.0")).json()
        arc = (await client.post("/device", params={"device": "gpu.1"})).json()
    assert body["active"] is True and arc["active"] is False
    props = body["properties"]
    assert props["DEVICE_TYPE"] == "INTEGRATED"
    assert props["DEVICE_GOPS"] == {"f16": 8601.6, "f32": 4300.8}
    assert props["DEVICE_UUID"] == "8680a056080000000300000000000000"
    assert props["RANGE_FOR_STREAMS"] == [1, 2]
    assert props["INFERENCE_PRECISION_HINT"] == "f16"
    assert props["GPU_DEVICE_TOTAL_MEM_SIZE"] == body["memory_bytes"] == 30_923_776_000
    assert "GPU_QUEUE_PRIORITY" not in props  # supported but unreadable: left out
    assert "WEIGHTS_PATH" not in props
    assert arc["properties"]["DEVICE_GOPS"] == {"f16": "inf"}  # JSON has no infinity


async def test_gpu_alias_with_one_gpu(gpu_client: Callable[..., httpx.AsyncClient]) -> None:
    async with gpu_client("GPU.0", single_gpu) as client:
        listed = (await client.get("/device")).json()
        described = (await client.get("/device/GPU.0")).json()
    assert [d["name"] for d in listed["data"] if d["active"]] == ["GPU"]
    assert described["name"] == "GPU"
    assert described["active"] is True


async def test_auto_marks_every_candidate(gpu_client: Callable[..., httpx.AsyncClient]) -> None:
    async with gpu_client("AUTO:GPU.1,CPU") as client:
        body = (await client.get("/device")).json()
    assert {d["name"] for d in body["data"] if d["active"]} == {"GPU.1", "CPU"}


async def test_describe_reads_the_core_once(gpu_client: Callable[..., httpx.AsyncClient]) -> None:
    made: list[CoreWithGPUs] = []

    def factory() -> CoreWithGPUs:
        made.append(CoreWithGPUs())
        return made[-1]

    async with gpu_client("GPU", factory) as client:
        for _ in range(3):
            assert (await client.get("/device")).status_code == 200
    assert len(made) == 1


# --- VLM_DEVICE ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("CPU", ["CPU"]),
        ("GPU", ["GPU.0"]),
        ("GPU.1", ["GPU.1"]),
        ("AUTO", ["CPU", "GPU.0", "GPU.1"]),
        ("AUTO:GPU,CPU", ["GPU.0", "CPU"]),
        ("AUTO:-CPU", ["GPU.0", "GPU.1"]),
        ("HETERO:GPU.1,CPU", ["GPU.1", "CPU"]),
        ("MULTI:GPU.0,GPU.1", ["GPU.0", "GPU.1"]),
    ],
)
def test_check_device_accepts(device: str, expected: list[str]) -> None:
    assert check_device(Settings(device=device), CoreWithGPUs()) == expected


def test_settings_normalise_device_case() -> None:
    assert Settings(device=" hetero:gpu,cpu ").device == "HETERO:GPU,CPU"


@pytest.mark.parametrize(
    ("device", "words"),
    [
        ("GPU.2", ["GPU.2 is not available", "Available devices: CPU, GPU.0, GPU.1"]),
        ("HETERO:NPU,GPU.7", ["NPU, GPU.7 are not available"]),
        ("HETERO", ["needs a list of devices"]),
        ("MULTI:GPU,,CPU", ["(empty) is not a device name"]),
        ("HETERO:-GPU,CPU", ["only AUTO can exclude"]),
        ("GPU-1", ["is not a device name"]),
        ("FOO:CPU", ["is not a device name"]),
    ],
)
def test_check_device_refuses(device: str, words: list[str]) -> None:
    with pytest.raises(DeviceError) as info:
        check_device(Settings(device=device), CoreWithGPUs())
    for word in words:
        assert word in str(info.value)


def test_missing_gpu_on_real_core_explains_itself() -> None:
    with pytest.raises(DeviceError) as info:
        check_device(Settings(device="GPU"))
    message = str(info.value)
    assert "Available devices: " + ", ".join(openvino.Core().available_devices) in message
    assert "intel-opencl-icd" in message and "render" in message


def test_parse_device_keeps_exclusions() -> None:
    spec = parse_device("auto:gpu,-cpu")
    assert (spec.virtual, spec.include, spec.exclude) == ("AUTO", ["GPU"], ["CPU"])
    assert resolve_device("AUTO:GPU,-CPU", ["CPU", "GPU"]) == ["GPU"]


# --- VLM_OV_CONFIG and engine properties -----------------------------------


@pytest.fixture
def no_env_ov_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite sets VLM_OV_CONFIG (tests/conftest.py); Settings merges it into
    `ov_config`, and these tests look at `ov_config` alone."""
    monkeypatch.delenv("VLM_OV_CONFIG", raising=False)


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"PERFORMANCE_HINT": None}, ["PERFORMANCE_HINT must be", "not null"]),
        ({"NUM_STREAMS": [1, 2]}, ["NUM_STREAMS must be", "not an array"]),
        ({"bad key": 1}, ["'bad key' is not an OpenVINO property name"]),
        ({"DEVICE_PROPERTIES": {"GPU": {"X": None}}}, ["DEVICE_PROPERTIES.GPU.X"]),
    ],
)
def test_ov_config_values_are_checked(config: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(DeviceError) as info:
        check_device(Settings(ov_config=config), CoreWithGPUs())
    for word in words:
        assert word in str(info.value)


def test_unknown_ov_property_warns(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(device="GPU.1", ov_config={"GPU_QUEUE_PRIORITY": "HIGH", "NOT_A_PROP": 1})
    with caplog.at_level(logging.WARNING, logger="utils.devices"):
        check_device(settings, CoreWithGPUs())
    assert "NOT_A_PROP is not a property of GPU.1" in caplog.text
    assert "GPU_QUEUE_PRIORITY" not in caplog.text


@pytest.mark.usefixtures("no_env_ov_config")
def test_engine_properties_on_cpu_pass_ov_config_through(tmp_path: Path) -> None:
    settings = Settings(device="CPU", model_cache_dir=tmp_path, ov_config={"NUM_STREAMS": 1})
    assert engine_properties(settings) == {"NUM_STREAMS": 1, "CPU_RUNTIME_CACHE_CAPACITY": 100}


def test_the_cpu_runtime_cache_is_bounded_on_the_cpu_only(tmp_path: Path) -> None:
    """The setting reaches the CPU plugin, VLM_OV_CONFIG overrides it, and no other
    device is given a property it does not know."""
    small = Settings(device="CPU", model_cache_dir=tmp_path, cpu_runtime_cache_capacity=7)
    assert engine_properties(small)["CPU_RUNTIME_CACHE_CAPACITY"] == 7
    own = {"CPU_RUNTIME_CACHE_CAPACITY": "0"}
    overridden = Settings(device="CPU", model_cache_dir=tmp_path, ov_config=own)
    assert engine_properties(overridden)["CPU_RUNTIME_CACHE_CAPACITY"] == "0"
    for device in ("GPU", "AUTO", "HETERO:GPU,CPU"):
        gpu = Settings(device=device, model_cache_dir=tmp_path)
        assert "CPU_RUNTIME_CACHE_CAPACITY" not in engine_properties(gpu)


@pytest.mark.usefixtures("no_env_ov_config")
def test_engine_properties_on_gpu_add_a_compiled_cache(tmp_path: Path) -> None:
    settings = Settings(device="GPU.1", model_cache_dir=tmp_path, ov_config={"NUM_STREAMS": 1})
    properties = engine_properties(settings)
    assert properties == {"NUM_STREAMS": 1, "CACHE_DIR": str(tmp_path.resolve() / "compiled")}
    assert (tmp_path / "compiled").is_dir()
    hetero = Settings(device="HETERO:GPU,CPU", model_cache_dir=tmp_path)
    assert "CACHE_DIR" in engine_properties(hetero)


def test_engine_properties_cache_dir_choices(tmp_path: Path) -> None:
    explicit = tmp_path / "blobs"
    on_cpu = Settings(device="CPU", compiled_cache_dir=explicit)
    assert engine_properties(on_cpu)["CACHE_DIR"] == str(explicit.resolve())
    mine = Settings(device="GPU", model_cache_dir=tmp_path, ov_config={"CACHE_DIR": "/x"})
    assert engine_properties(mine)["CACHE_DIR"] == "/x"


def test_to_json_handles_openvino_values() -> None:
    core = openvino.Core()
    hint = core.get_property("CPU", "PERFORMANCE_HINT")  # a pybind11 enum
    assert to_json(hint) == hint.name
    assert to_json({openvino.Type.f32: {1, 3, 2}}) == {"f32": [1, 2, 3]}
    assert to_json(float("nan")) == "nan"
    assert to_json(b"\x01\xff") == "01ff"


# --- start-up through `python app.py` ------------------------------------------


def run_app(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("VLM_")}
    environ.update({"VLM_MODEL_CACHE_DIR": str(tmp_path / "models"), "VLM_PORT": "1", **env})
    # Run from an empty directory so no .env of a developer's setup applies.
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py")],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_startup_with_unavailable_device_fails_readably(tmp_path: Path) -> None:
    result = run_app(tmp_path, VLM_DEVICE="GPU")
    assert result.returncode != 0
    available = ", ".join(openvino.Core().available_devices)
    expected = (
        f"VLM_DEVICE='GPU': GPU is not available on this machine. Available devices: {available}."
    )
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "models").exists()  # failed before exporting anything


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"VLM_OV_CONFIG": "{PERFORMANCE_HINT: LATENCY}"}, ["VLM_OV_CONFIG is not valid JSON"]),
        ({"VLM_OV_CONFIG": "[1, 2]"}, ["VLM_OV_CONFIG='[1, 2]'", "valid dictionary"]),
        ({"VLM_OV_CONFIG": '{"NUM_STREAMS": [1]}'}, ["VLM_OV_CONFIG.NUM_STREAMS must be"]),
        ({"VLM_DEVICE": "HETERO:"}, ["(empty) is not a device name"]),
        ({"VLM_PORT": "http", "VLM_SEED": "x"}, ["VLM_PORT='http'", "VLM_SEED='x'"]),
    ],
)
def test_startup_with_bad_settings_fails_readably(
    tmp_path: Path, env: dict[str, str], words: list[str]
) -> None:
    result = run_app(tmp_path, **env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr
