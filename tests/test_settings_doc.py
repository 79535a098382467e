"""README's settings table lists exactly the Settings fields, with their defaults."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from scripts import settings_table
from utils.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_rows() -> dict[str, tuple[str, str]]:
    text = README.read_text()
    section = text.split("<!-- section: settings -->", 1)[1].split("<!-- section:", 1)[0]
    rows = re.findall(r"^\| `(VLM_[A-Z0-9_]+)` \| (.*?) \| (.*) \|$", section, flags=re.M)
    names = [name for name, _, _ in rows]
    assert len(names) == len(set(names)), "a variable is listed twice"
    return {name: (default, meaning) for name, default, meaning in rows}


def env_names() -> set[str]:
    return {f"VLM_{name}".upper() for name in Settings.model_fields}


@pytest.fixture(autouse=True)
def _no_vlm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("VLM_")]:
        monkeypatch.delenv(name)


def test_table_lists_exactly_the_settings() -> None:
    listed = set(readme_rows())
    assert listed - env_names() == set(), "README lists variables Settings does not have"
    assert env_names() - listed == set(), "Settings has variables README does not list"


def test_every_variable_has_a_meaning() -> None:
    for name, (_, meaning) in readme_rows().items():
        assert len(meaning) > 10, name


@pytest.mark.parametrize("name", sorted(env_names()))
def test_documented_default_is_the_real_default(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Setting the variable to the value the README shows changes nothing."""
    default, _ = readme_rows()[name]
    field = name.removeprefix("VLM_").lower()
    real = getattr(Settings(_env_file=None), field)
    if default == "unset":
        assert real is None
    elif default == "empty":
        assert real in ([], "")
    else:
        assert default.startswith("`") and default.endswith("`"), default
        monkeypatch.setenv(name, default.strip("`"))
        assert getattr(Settings(_env_file=None), field) == real


def test_table_is_what_the_generator_writes() -> None:
    text = README.read_text()
    assert settings_table.replace_block(text) == text, (
        "run: python scripts/settings_table.py --write"
    )
