"""The settings table in docs/configuration.md lists exactly the Settings fields, with
their defaults; README's short table and every page name only real settings."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from scripts import settings_table
from utils.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
CONFIGURATION = ROOT / "docs" / "configuration.md"
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
ROW = re.compile(r"^\| `(VLM_[A-Z0-9_]+)` \| (.*?) \| (.*) \|$", flags=re.M)
NAME = re.compile(r"\bVLM_[A-Z0-9_]*[A-Z0-9]\b")
# VLM_* variables that the shell scripts, CI and compose files read, not the server's
# Settings (a page may name them; a misspelt setting is in none of these files).
SCRIPTS = [
    *(ROOT / "scripts").glob("*.sh"),
    *(ROOT / ".ci").glob("*"),
    *ROOT.glob("compose*.yaml"),
    ROOT / "setup.sh",
]
NOT_SETTINGS = {"VLM_API_KEY"} | {
    name for path in SCRIPTS if path.is_file() for name in NAME.findall(path.read_text())
} - {f"VLM_{name.upper()}" for name in Settings.model_fields}


def table_rows(text: str) -> dict[str, tuple[str, str]]:
    rows = ROW.findall(text)
    names = [name for name, _, _ in rows]
    assert len(names) == len(set(names)), "a variable is listed twice"
    return {name: (default, meaning) for name, default, meaning in rows}


def generated_rows() -> dict[str, tuple[str, str]]:
    text = CONFIGURATION.read_text()
    assert settings_table.START in text and settings_table.END in text, "no table markers"
    section = text.split(settings_table.START, 1)[1].split(settings_table.END, 1)[0]
    return table_rows(section)


def env_names() -> set[str]:
    return {f"VLM_{name}".upper() for name in Settings.model_fields}


@pytest.fixture(autouse=True)
def _no_vlm_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("VLM_")]:
        monkeypatch.delenv(name)


def test_table_lists_exactly_the_settings() -> None:
    listed = set(generated_rows())
    assert listed - env_names() == set(), "the table lists variables Settings does not have"
    assert env_names() - listed == set(), "Settings has variables the table does not list"


def test_every_variable_has_a_meaning() -> None:
    for name, (_, meaning) in generated_rows().items():
        assert len(meaning) > 10, name


@pytest.mark.parametrize("name", sorted(env_names()))
def test_documented_default_is_the_real_default(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Setting the variable to the value the table shows changes nothing."""
    default, _ = generated_rows()[name]
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
    text = CONFIGURATION.read_text()
    assert settings_table.replace_block(text) == text, (
        "run: python scripts/settings_table.py --write"
    )


def test_readme_defaults_are_the_generated_ones() -> None:
    readme = table_rows(README.read_text())
    assert readme, "README has no settings table"
    generated = generated_rows()
    for name, (default, _) in readme.items():
        assert name in generated, name
        assert default == generated[name][0], name


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_pages_name_only_real_settings(page: Path) -> None:
    named = set(NAME.findall(page.read_text()))
    assert named - env_names() - NOT_SETTINGS == set(), f"{page.name} names unknown settings"
