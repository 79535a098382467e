#!/usr/bin/env bash
# Install the project into ./.venv from poetry.lock. Idempotent: a second run
# with the same lock file and groups returns at once.
#   scripts/install.sh            serving + export + dev groups (tests, quick start)
#   VLM_INSTALL_GROUPS=export scripts/install.sh   without the dev tools
#   VLM_INSTALL_GROUPS= scripts/install.sh         slim serving install
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
groups=${VLM_INSTALL_GROUPS-export,dev}
poetry_version=2.5.1
stamp=.venv/.installed
want="$(sha256sum poetry.lock pyproject.toml | sha256sum | cut -c1-16) groups=${groups}"

if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi

# Poetry lives in its own small environment so it never mixes with the project's.
if [[ ! -x .poetry/bin/poetry ]]; then
    echo "[install] Poetry ${poetry_version} into .poetry/" >&2
    "$python" -m venv .poetry
    .poetry/bin/pip install --quiet --disable-pip-version-check "poetry==${poetry_version}"
fi

export POETRY_VIRTUALENVS_IN_PROJECT=true POETRY_VIRTUALENVS_PREFER_ACTIVE_PYTHON=true
[[ -d .venv ]] || "$python" -m venv .venv
args=(install --no-interaction --sync)
[[ -n $groups ]] && args+=(--with "$groups")
echo "[install] poetry ${args[*]}" >&2
start=$SECONDS
# scripts/poetry_simple.py reads PyPI through its simple index, which every
# mirror serves; plain Poetry would need the JSON API as well.
VIRTUAL_ENV="$PWD/.venv" .poetry/bin/python scripts/poetry_simple.py "${args[@]}" >&2
echo "[install] done in $((SECONDS - start)) s" >&2
echo "$want" > "$stamp"
