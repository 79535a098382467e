#!/usr/bin/env bash
# Install (serving + export + dev groups), lint, then run the test suite.
# Arguments go to pytest:  scripts/test.sh -k export -x
# Every step runs; the exit status is non-zero when any of them failed.
set -euo pipefail
cd "$(dirname "$0")/.."

VLM_INSTALL_GROUPS=${VLM_INSTALL_GROUPS-export,dev} scripts/install.sh

start=$SECONDS
failed=()
step() {
    local name=$1
    shift
    echo "[test] $name" >&2
    "$@" || failed+=("$name")
}
step "ruff check" .venv/bin/ruff check .
# Markdown is prose: its code samples are not held to the formatter.
step "ruff format --check" .venv/bin/ruff format --check --extend-exclude "*.md" .
step "mypy" .venv/bin/mypy
step "pytest" .venv/bin/python -m pytest "$@"

if ((${#failed[@]})); then
    echo "[test] FAILED: ${failed[*]} ($((SECONDS - start)) s)" >&2
    exit 1
fi
echo "[test] passed in $((SECONDS - start)) s" >&2
