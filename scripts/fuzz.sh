#!/usr/bin/env bash
# Fuzz every operation of the server's OpenAPI schema with schemathesis and
# fail on any 5xx answer (or a server that stops answering).
#
#   scripts/fuzz.sh                 # starts a server with the tiny model on loopback
#   scripts/fuzz.sh http://HOST:PORT [extra schemathesis args]   # an already running server
#
# FUZZ_MAX_EXAMPLES (default 60) cases per operation, FUZZ_MAX_TIME (default 300 s)
# bounds the run, FUZZ_SEED makes it reproducible, VLM_API_KEY is sent as a bearer key.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
# schemathesis's CLI, run with one guard: on Python 3.11.7 `ast.parse` can raise
# "SystemError: AST constructor recursion depth mismatch" when hypothesis parses
# source only to describe a lambda in a report; that description falls back to
# "<unknown>" instead of aborting the run.
SCHEMATHESIS_MAIN='
import sys
import hypothesis.internal.lambda_sources as sources
describe = sources._lambda_description
def guarded(f, *args, **kwargs):
    try:
        return describe(f, *args, **kwargs)
    except SystemError:
        return "lambda: <unknown>"
sources._lambda_description = guarded
from schemathesis.cli import schemathesis
sys.argv[0] = "schemathesis"
schemathesis()
'
MAX_EXAMPLES=${FUZZ_MAX_EXAMPLES:-60}
MAX_TIME=${FUZZ_MAX_TIME:-300}
SEED=${FUZZ_SEED:-1234}
SERVER_PID=""
LOG=""

cleanup() {
    if [[ -n "$SERVER_PID" ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

if [[ $# -ge 1 && "$1" == http* ]]; then
    BASE=${1%/}
    shift
else
    PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    BASE="http://127.0.0.1:$PORT"
    LOG=$(mktemp -t fuzz-server.XXXXXX.log)
    # The tiny random-weight model, exported with the same settings the tests
    # use, so an existing test build is reused.
    VLM_HOST=127.0.0.1 VLM_PORT=$PORT \
        VLM_MODEL_NAME=${VLM_MODEL_NAME:-embedded/tiny-qwen2-vl} \
        VLM_MODEL_CACHE_DIR=${VLM_MODEL_CACHE_DIR:-.cache/test-models} \
        VLM_COMPRESSION_GROUP_SIZE=${VLM_COMPRESSION_GROUP_SIZE:-16} \
        VLM_DEFAULT_MAX_TOKENS=${VLM_DEFAULT_MAX_TOKENS:-16} \
        VLM_LOG_LEVEL=warning \
        "$PY" app.py >"$LOG" 2>&1 &
    SERVER_PID=$!
    echo "fuzz: server pid $SERVER_PID on $BASE (log: $LOG)"
fi

AUTH=()
if [[ -n "${VLM_API_KEY:-}" ]]; then
    AUTH=(-H "Authorization: Bearer $VLM_API_KEY")
fi

# Wait for readiness (model export and warm-up may take a while).
for _ in $(seq 1 600); do
    if curl -fsS "${AUTH[@]}" "$BASE/ready" >/dev/null 2>&1; then
        break
    fi
    if [[ -n "$SERVER_PID" ]] && ! kill -0 "$SERVER_PID" 2>/dev/null; then
        echo "fuzz: the server exited while starting:" >&2
        cat "$LOG" >&2
        exit 1
    fi
    sleep 1
done
curl -fsS "${AUTH[@]}" "$BASE/ready" >/dev/null

status=0
"$PY" -c "$SCHEMATHESIS_MAIN" run "$BASE/openapi.json" \
    --checks not_a_server_error \
    --phases examples,coverage,fuzzing \
    --max-examples "$MAX_EXAMPLES" \
    --max-time "$MAX_TIME" \
    --seed "$SEED" \
    --workers 2 \
    --request-timeout 60 \
    --generation-database none \
    --suppress-health-check all \
    --no-color \
    "${AUTH[@]}" "$@" || status=$?

# The server must still be alive and ready afterwards.
if ! curl -fsS "${AUTH[@]}" "$BASE/ready" >/dev/null; then
    echo "fuzz: the server is not ready after the run" >&2
    status=1
fi
if [[ -n "$LOG" ]] && grep -q "Traceback" "$LOG"; then
    echo "fuzz: the server logged a traceback:" >&2
    grep -n -A20 "Traceback" "$LOG" | head -80 >&2
    status=1
fi
echo "fuzz: exit status $status"
exit "$status"
