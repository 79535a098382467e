"""README's supported-models table is what scripts/models_table.py writes from the
family matrix, and it claims no more than the suite runs."""

from __future__ import annotations

import inspect
import subprocess
import sys

from scripts import models_table
from tests import test_families
from tests.families import BACKENDS, CHECKS, FAMILIES, REMOTE_CODE_FAMILIES
from tests.fixtures.models import REPO


def test_readme_table_is_what_the_generator_writes() -> None:
    text = models_table.DOC.read_text()
    assert models_table.replace_block(text) == text, "run: python scripts/models_table.py --write"


def test_the_checks_named_are_the_matrix_tests() -> None:
    tests = {
        name
        for name, value in inspect.getmembers(test_families, inspect.isfunction)
        if name.startswith("test_")
    }
    assert set(CHECKS) == tests


def test_every_family_runs_every_check_in_both_pipelines() -> None:
    """Collected, not assumed: each family marked tested has each check in the suite."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_families.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    ids = {line.split("::", 1)[1] for line in done.stdout.splitlines() if "::" in line}
    short = {"continuous_batching": "cb", "vlm_pipeline": "vlm"}
    for family in FAMILIES:
        for check in CHECKS:
            params = inspect.signature(getattr(test_families, check)).parameters
            if "family_engine" in params:
                wanted = {f"{check}[{family.kind}-{short[b]}]" for b in BACKENDS}
            else:
                wanted = {f"{check}[{family.kind}]"}
            assert wanted <= ids, f"{family.kind}: {sorted(wanted - ids)} not in the suite"


def test_remote_code_families_say_not_tested() -> None:
    table = models_table.table()
    for title, model_type in REMOTE_CODE_FAMILIES:
        row = next(line for line in table.splitlines() if f"(`{model_type}`)" in line)
        assert title in row and "not tested offline" in row
