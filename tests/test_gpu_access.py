"""The one start-up line that says what keeps the server from the Intel GPU."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from utils.devices import DeviceError, check_device, gpu_access_problem
from utils.settings import Settings


class CpuOnlyCore:
    available_devices = ["CPU"]  # noqa: RUF012

    def get_property(self, device_name: str, name: str) -> list[str]:
        return []


def test_no_device_directory(tmp_path: Path) -> None:
    problem = gpu_access_problem(tmp_path / "dri")
    assert problem is not None and "does not exist" in problem
    assert "compose.gpu.yaml" in problem


def test_no_render_node(tmp_path: Path) -> None:
    (tmp_path / "card0").touch()
    problem = gpu_access_problem(tmp_path)
    assert problem is not None and "no renderD* node" in problem


def test_render_node_of_a_group_this_process_is_not_in(tmp_path: Path) -> None:
    (tmp_path / "renderD128").touch()
    problem = gpu_access_problem(tmp_path, can_open=lambda node: False)
    assert problem is not None
    assert "renderD128 belongs to group" in problem and "RENDER_GID=" in problem


def test_usable_render_node(tmp_path: Path) -> None:
    (tmp_path / "renderD128").touch()
    assert gpu_access_problem(tmp_path, can_open=lambda node: True) is None


def test_start_up_logs_the_problem_in_one_line(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(
        "utils.devices.gpu_access_problem", lambda: f"{tmp_path} does not exist: (test)"
    )
    with caplog.at_level(logging.WARNING, logger="utils.devices"), pytest.raises(DeviceError):
        check_device(Settings(_env_file=None, device="AUTO:GPU,CPU"), CpuOnlyCore())
    lines = [r.getMessage() for r in caplog.records if "does not exist" in r.getMessage()]
    assert lines == [f"VLM_DEVICE=AUTO:GPU,CPU: {tmp_path} does not exist: (test)"]
    assert "\n" not in lines[0]
