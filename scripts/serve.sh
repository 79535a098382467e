#!/usr/bin/env bash
# Start the server. Installs the project into ./.venv first when needed.
#   scripts/serve.sh                                              embedded random-weight model
#   VLM_MODEL_NAME=Qwen/Qwen2-VL-2B-Instruct scripts/serve.sh     a real model (exported once)
# Every VLM_* setting (see README) can be set in the environment or in .env.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install.sh
exec .venv/bin/python app.py
