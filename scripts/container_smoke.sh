#!/usr/bin/env bash
# Container smoke test: what a new user does, from this checkout.
#
#   scripts/container_smoke.sh
#
# 1. builds the export, serve and serve-gpu images from docker/Dockerfile and checks
#    that the serving image holds no PyTorch and stays under 1 GB, and that the
#    export image holds no dev tools;
# 2. `source setup.sh`, then the compose stack of compose.yaml on
#    embedded/tiny-qwen2-vl: the export service first, then the server;
# 3. waits until the server is healthy, sends a chat request with a base64 image and
#    one with a base64 video_url, checks /device and /metrics;
# 4. brings the stack down and up again and checks the export was reused;
# 5. starts serve-gpu without a GPU and checks it says what is missing in one line;
# 6. removes every container, volume and image it made (and restores .env).
#
# Settings (environment):
#   VLM_SMOKE_ENGINE      docker or podman (default: docker when its daemon answers,
#                         else podman)
#   VLM_SMOKE_BUILD       build command (default: "$VLM_SMOKE_ENGINE build"; podman
#                         gets --format docker so HEALTHCHECK is kept)
#   VLM_SMOKE_COMPOSE     compose command (default: "docker compose", or
#                         "podman-compose" for podman)
#   VLM_SMOKE_BASE_IMAGE  base image (default: the Dockerfile's, python:3.11-slim-trixie)
#   VLM_SMOKE_BUILD_ARGS  more build arguments, e.g. "--build-arg APT_CHECK_VALID_UNTIL=false"
#   VLM_SMOKE_PORT        host port of the server (default 18080)
#   VLM_SMOKE_GPU         1 (default) also builds and starts serve-gpu; 0 skips it
#   VLM_SMOKE_TIMEOUT     seconds to wait for health (default 900)
#   VLM_SMOKE_KEEP        1 keeps images, volumes and containers for a look afterwards
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

log() { printf '[smoke %4ds] %s\n' "$SECONDS" "$*" >&2; }
fail() {
    log "FAILED: $*"
    exit 1
}

engine=${VLM_SMOKE_ENGINE:-}
if [[ -z $engine ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
        engine=docker
    elif command -v podman >/dev/null; then
        engine=podman
    else
        fail "neither a Docker daemon nor podman is available (set VLM_SMOKE_ENGINE)"
    fi
fi
default_build="$engine build"
[[ $engine == podman ]] && default_build="podman build --format docker"
default_compose="docker compose"
[[ $engine == podman ]] && default_compose="podman-compose"
read -r -a build <<<"${VLM_SMOKE_BUILD:-$default_build}"
read -r -a compose <<<"${VLM_SMOKE_COMPOSE:-$default_compose}"
read -r -a build_args <<<"${VLM_SMOKE_BUILD_ARGS:-}"
[[ -n ${VLM_SMOKE_BASE_IMAGE:-} ]] && build_args+=(--build-arg "BASE_IMAGE=$VLM_SMOKE_BASE_IMAGE")
port=${VLM_SMOKE_PORT:-18080}
gpu=${VLM_SMOKE_GPU:-1}
timeout=${VLM_SMOKE_TIMEOUT:-900}
python=$(command -v python3 || command -v python) || fail "needs python3 on the host for the requests"

# Names of our own, so nothing of the user's is touched or removed.
id=smoke$$
export COMPOSE_PROJECT_NAME=ovvlm-$id VLM_IMAGE_REPO=localhost/ov-vlm-server-$id
compose+=(-p "$COMPOSE_PROJECT_NAME" -f compose.yaml)
images=()
made_env=""
tmp=$(mktemp -d)

cleanup() {
    local status=$?
    if [[ ${VLM_SMOKE_KEEP:-0} == 1 ]]; then
        log "kept: project $COMPOSE_PROJECT_NAME, images ${images[*]:-none}"
    else
        log "cleaning up"
        "${compose[@]}" down -v >/dev/null 2>&1 || true
        "$engine" rm -f "$id-gpu" >/dev/null 2>&1 || true
        "$engine" volume rm -f "${COMPOSE_PROJECT_NAME}_models" "${COMPOSE_PROJECT_NAME}_hf-cache" \
            >/dev/null 2>&1 || true
        if ((${#images[@]})); then "$engine" rmi -f "${images[@]}" >/dev/null 2>&1 || true; fi
    fi
    rm -rf "$tmp"
    if [[ -n $made_env ]]; then
        if [[ -f .env.$id ]]; then mv -f ".env.$id" .env; else rm -f .env; fi
        [[ $made_env == with-models ]] && rmdir models 2>/dev/null || true
    fi
    ((status == 0)) && log "PASSED" || log "exit status $status"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. images --------------------------------------------------------------------
image_size() { "$engine" image inspect -f '{{.Size}}' "$1"; }

build_image() { # target tag
    local start=$SECONDS
    log "building $1 as $2"
    "${build[@]}" "${build_args[@]}" -f docker/Dockerfile --target "$1" -t "$2" . \
        >"$tmp/build-$1.log" 2>&1 || { tail -30 "$tmp/build-$1.log" >&2; fail "building $1"; }
    images+=("$2")
    log "built $1 in $((SECONDS - start)) s: $(($(image_size "$2") / 1000000)) MB"
}

# Exit status 0 when none of the modules can be imported in the image.
lacks_modules() { # image module...
    local image=$1
    shift
    "$engine" run --rm --entrypoint python "$image" -c \
        'import importlib.util, sys; found = [m for m in sys.argv[1:] if importlib.util.find_spec(m)]
print(" ".join(found)); sys.exit(1 if found else 0)' "$@" 2>/dev/null
}

log "engine: $engine; build: ${build[*]}; compose: ${compose[*]}; base: ${VLM_SMOKE_BASE_IMAGE:-default}"
build_image export "$VLM_IMAGE_REPO:export"
build_image serve "$VLM_IMAGE_REPO:cpu"
[[ $gpu == 1 ]] && build_image serve-gpu "$VLM_IMAGE_REPO:gpu"

size=$(image_size "$VLM_IMAGE_REPO:cpu")
((size <= 1000000000)) || fail "the serve image is $((size / 1000000)) MB (at most 1000)"
lacks_modules "$VLM_IMAGE_REPO:cpu" torch nncf optimum pytest ruff schemathesis >/dev/null ||
    fail "the serve image has export or dev packages: $(lacks_modules "$VLM_IMAGE_REPO:cpu" \
        torch nncf optimum pytest ruff schemathesis)"
lacks_modules "$VLM_IMAGE_REPO:export" pytest ruff schemathesis mypy >/dev/null ||
    fail "the export image has dev tools"
log "serve image: no torch, $((size / 1000000)) MB; export image: no dev tools"

# --- 2. setup.sh and the export ------------------------------------------------------
[[ -f .env ]] && cp -p .env ".env.$id"
made_env=yes
[[ -d models ]] || made_env=with-models
(
    export VLM_PORT=$port VLM_MODEL_NAME=embedded/tiny-qwen2-vl
    # shellcheck source=../setup.sh
    source ./setup.sh >/dev/null
) || fail "source setup.sh"

container_of() { # service
    "$engine" ps -a -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" \
        --filter "label=com.docker.compose.service=$1" | head -1
}

run_export() {
    "${compose[@]}" up -d export >"$tmp/compose.log" 2>&1 ||
        { cat "$tmp/compose.log" >&2; fail "compose up export"; }
    local container status
    container=$(container_of export)
    [[ -n $container ]] || fail "no export container"
    status=$("$engine" wait "$container")
    "$engine" logs "$container" >"$tmp/export-$1.log" 2>&1
    [[ $status == 0 ]] || { tail -20 "$tmp/export-$1.log" >&2; fail "the export exited $status"; }
}

wait_healthy() { # label, the time `up` was run
    local start=$2 container
    while ((SECONDS - start < timeout)); do
        container=$(container_of server)
        if [[ -n $container ]] &&
            "$engine" exec "$container" python docker/healthcheck.py >/dev/null 2>&1 &&
            "$python" scripts/smoke_client.py ready "http://127.0.0.1:$port"; then
            log "$1: healthy $((SECONDS - start)) s after up"
            return 0
        fi
        sleep 2
    done
    [[ -n $container ]] && "$engine" logs "$container" 2>&1 | tail -30 >&2
    fail "$1: not healthy after $timeout s"
}

start=$SECONDS
log "compose up: export first"
run_export first
grep -q "exporting embedded/tiny-qwen2-vl" "$tmp/export-first.log" ||
    fail "the first export did not export"
log "export done in $((SECONDS - start)) s"

# --- 3. the server ---------------------------------------------------------------------
up=$SECONDS
"${compose[@]}" up -d >"$tmp/compose.log" 2>&1 ||
    { cat "$tmp/compose.log" >&2; fail "compose up"; }
wait_healthy "first start" "$up"
log "from the first up to healthy: $((SECONDS - start)) s (export included)"
"$python" scripts/smoke_client.py check "http://127.0.0.1:$port" >&2 || fail "requests"

# --- 4. down, up: the export is reused ---------------------------------------------------
log "compose down, up again"
"${compose[@]}" down >"$tmp/compose.log" 2>&1 ||
    { cat "$tmp/compose.log" >&2; fail "compose down"; }
up=$SECONDS
run_export second
"${compose[@]}" up -d >"$tmp/compose.log" 2>&1 ||
    { cat "$tmp/compose.log" >&2; fail "compose up (second)"; }
wait_healthy "second start" "$up"
if grep -q "exporting embedded" "$tmp/export-second.log" ||
    ! grep -q "using exported model" "$tmp/export-second.log"; then
    tail -20 "$tmp/export-second.log" >&2
    fail "the second start exported again"
fi
"$engine" logs "$(container_of server)" 2>&1 | grep -q "exporting embedded" &&
    fail "the server exported again"
log "second start reused the export"
"$python" scripts/smoke_client.py check "http://127.0.0.1:$port" >/dev/null || fail "requests"

# --- 5. serve-gpu without a GPU ------------------------------------------------------------
if [[ $gpu == 1 && ! -e /dev/dri ]]; then
    "$engine" run --name "$id-gpu" "$VLM_IMAGE_REPO:gpu" >"$tmp/gpu.log" 2>&1 &&
        fail "serve-gpu started without a GPU"
    grep -q "VLM_DEVICE=GPU: /dev/dri does not exist" "$tmp/gpu.log" ||
        { cat "$tmp/gpu.log" >&2; fail "serve-gpu did not say that /dev/dri is missing"; }
    log "serve-gpu without /dev/dri: $(grep -m1 'does not exist' "$tmp/gpu.log" | sed 's/.*utils.devices: //')"
    # No GPU, so no OpenCL platform: check that Intel's driver is registered and that
    # every library it needs is in the image.
    "$engine" run --rm --entrypoint sh "$VLM_IMAGE_REPO:gpu" -c \
        'lib=$(cat /etc/OpenCL/vendors/intel.icd) && ldd "$lib" >/tmp/ldd &&
         ! grep "not found" /tmp/ldd && echo "$lib resolves" && clinfo | head -1' \
        >"$tmp/clinfo.log" 2>/dev/null || { cat "$tmp/clinfo.log" >&2; fail "Intel's OpenCL driver"; }
    log "serve-gpu: $(tr -s ' \n' ' ' <"$tmp/clinfo.log")"
fi
