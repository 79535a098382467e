"""VLM_SERVICE_PORT is an alias of VLM_PORT; the two disagreeing stops the start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils.settings import Settings, SettingsLoadError, load_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_vlm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("VLM_")]:
        monkeypatch.delenv(name)


def test_service_port_sets_the_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM_SERVICE_PORT", "9100")
    assert Settings(_env_file=None).port == 9100


def test_service_port_from_env_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("VLM_SERVICE_PORT='9101'\n")
    assert Settings(_env_file=tmp_path / ".env").port == 9101


def test_both_names_with_one_value_are_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM_SERVICE_PORT", "9102")
    monkeypatch.setenv("VLM_PORT", "9102")
    assert Settings(_env_file=None).port == 9102


def test_disagreeing_names_are_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM_SERVICE_PORT", "9103")
    monkeypatch.setenv("VLM_PORT", "9000")
    with pytest.raises(SettingsLoadError) as info:
        load_settings(_env_file=None)
    assert "VLM_PORT=9000 and VLM_SERVICE_PORT=9103 disagree" in str(info.value)
    assert "Value error" not in str(info.value)


def test_server_refuses_to_start_when_they_disagree(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "VLM_PORT": "9000", "VLM_SERVICE_PORT": "9104"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "app.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "VLM_SERVICE_PORT=9104 disagree" in result.stderr.strip().splitlines()[-1]
