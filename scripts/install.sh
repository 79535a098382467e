#!/usr/bin/env bash
# Install the project into ./.venv from poetry.lock. Idempotent: a second run
# with the same lock file and groups returns at once.
#   scripts/install.sh            serving + export + dev groups (tests, quick start)
#   VLM_INSTALL_GROUPS=export scripts/install.sh   without the dev tools
#   VLM_INSTALL_GROUPS= scripts/install.sh         slim serving install
set -euo pipefail
cd "$(dirname "$0")/.."

# The project supports Python 3.10 to 3.12: python3 if it is one of those, else the
# newest of them that runs.
python=${PYTHON:-}
if [[ -z $python ]]; then
    for candidate in python3 python3.12 python3.11 python3.10; do
        if "$candidate" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info < (3, 13))' \
            >/dev/null 2>&1; then
            python=$candidate
            break
        fi
    done
    if [[ -z $python ]]; then
        echo "[install] error: needs Python 3.10, 3.11 or 3.12 (set PYTHON=/path/to/python)" >&2
        exit 1
    fi
fi
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
args=(sync --no-interaction)
[[ -n $groups ]] && args+=(--with "$groups")
echo "[install] poetry ${args[*]}" >&2
start=$SECONDS
# scripts/poetry_simple.py reads PyPI through its simple index, which every
# mirror serves; plain Poetry would need the JSON API as well.
VIRTUAL_ENV="$PWD/.venv" .poetry/bin/python scripts/poetry_simple.py "${args[@]}" >&2
echo "[install] done in $((SECONDS - start)) s" >&2
echo "$want" > "$stamp"
