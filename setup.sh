# shellcheck shell=bash
# Configure the server for `python app.py` and `docker compose`:
#
#     source setup.sh                      # defaults
#     VLM_DEVICE=GPU source setup.sh       # values already in the environment win
#
# Sets every VLM_* variable below (a value already in the environment is kept,
# otherwise the documented default), validates them, exports them, writes them
# to .env next to this file (compose and the server both read it) and creates
# the model cache directory. Other VLM_* variables in the environment are
# validated by the server and copied to .env as they are, and so are the proxy
# variables (http_proxy, https_proxy, no_proxy and their upper-case forms), which
# the export container needs to download models from behind a proxy.
# VLM_SERVICE_PORT is accepted as another name of VLM_PORT.
#
# Meant to be sourced: a bad value prints what is wrong and returns 1, leaving
# the shell, its options and the existing .env as they were.

if [ -z "${BASH_VERSION:-}" ]; then
    echo "setup.sh: run it with bash (source setup.sh in a bash shell)" >&2
    # shellcheck disable=SC2317  # exit is reached when the file is executed, not sourced
    return 1 2>/dev/null || exit 1
fi

_vlm_setup() {
    local -  # shell options set below are restored when this function returns
    set +e +u +o pipefail

    local root
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd) || return 1

    # name|default|meaning (defaults match utils/settings.py)
    local -a spec=(
        "VLM_MODEL_NAME|embedded/tiny-qwen2-vl|model id or local directory to serve"
        "VLM_COMPRESSION_WEIGHT_FORMAT|int4|weight format of the export (int4, int8, fp16)"
        "VLM_DEVICE|CPU|OpenVINO device (CPU, GPU, GPU.N, AUTO, HETERO:..., MULTI:...)"
        "VLM_MODEL_CACHE_DIR|models|directory of exported models (Docker: a named volume)"
        "VLM_HOST|0.0.0.0|address the server listens on"
        "VLM_PORT|8000|port the server listens on"
        "VLM_SEED|42|sampling seed when a request gives none"
        "VLM_LOG_LEVEL|info|debug, info, warning or error"
        "VLM_DEFAULT_MAX_TOKENS|512|output token limit when a request gives none"
        "VLM_MAX_QUEUE|64|requests waiting or running at once (more get 429)"
        "VLM_MAX_NUM_SEQS|16|sequences batched together per step"
        "VLM_KV_CACHE_SIZE_GB|2|KV cache size in whole GB"
        "VLM_MAX_IMAGES_PER_REQUEST|16|images allowed in one request"
        "VLM_MAX_VIDEOS_PER_REQUEST|2|videos allowed in one request"
        "VLM_MAX_VIDEO_FRAMES|32|frames sampled from one video at most"
        "VLM_MAX_BODY_BYTES|100663296|largest request body in bytes"
    )

    local -a errors=() names=() values=() origins=()
    local -A setting=()
    local entry name default value origin
    for entry in "${spec[@]}"; do
        IFS='|' read -r name default _ <<<"$entry"
        if [[ -n ${!name+set} && -n ${!name} ]]; then
            value=${!name} origin="environment"
        elif [[ $name == VLM_PORT && -n ${VLM_SERVICE_PORT:-} ]]; then
            value=$VLM_SERVICE_PORT origin="VLM_SERVICE_PORT"
        else
            value=$default origin="default"
        fi
        value=${value#"${value%%[![:space:]]*}"}  # trim
        value=${value%"${value##*[![:space:]]}"}
        case $name in
            VLM_DEVICE) value=${value^^} ;;
            VLM_COMPRESSION_WEIGHT_FORMAT | VLM_LOG_LEVEL) value=${value,,} ;;
        esac
        names+=("$name") values+=("$value") origins+=("$origin")
        setting[$name]=$value
    done

    local dev='[A-Z][A-Z0-9_]*(\.[0-9]+)?'
    local i
    for i in "${!names[@]}"; do
        name=${names[i]} value=${values[i]}
        case $name in
            VLM_MODEL_NAME | VLM_MODEL_CACHE_DIR | VLM_HOST)
                [[ -n $value && $value != *[[:space:]]* ]] ||
                    errors+=("$name='$value': must be non-empty, without spaces") ;;
            VLM_COMPRESSION_WEIGHT_FORMAT)
                [[ $value =~ ^(int4|int8|fp16)$ ]] ||
                    errors+=("$name='$value': use int4, int8 or fp16") ;;
            VLM_DEVICE)
                [[ $value =~ ^($dev|AUTO|AUTO:-?$dev(,-?$dev)*|(HETERO|MULTI|BATCH):$dev(,$dev)*)$ ]] &&
                    [[ ! $value =~ ^(HETERO|MULTI|BATCH)$ ]] ||
                    errors+=("$name='$value': use CPU, GPU, GPU.N, AUTO, AUTO:GPU,CPU, HETERO:GPU,CPU or MULTI:GPU,CPU") ;;
            VLM_PORT)
                [[ $value =~ ^[0-9]{1,5}$ ]] && ((10#$value >= 1 && 10#$value <= 65535)) ||
                    errors+=("$name='$value': must be a whole number from 1 to 65535") ;;
            VLM_SEED)
                [[ $value =~ ^[0-9]{1,19}$ ]] ||
                    errors+=("$name='$value': must be a whole number (0 or more)") ;;
            VLM_LOG_LEVEL)
                [[ $value =~ ^(debug|info|warning|error)$ ]] ||
                    errors+=("$name='$value': use debug, info, warning or error") ;;
            VLM_MAX_IMAGES_PER_REQUEST | VLM_MAX_VIDEOS_PER_REQUEST)
                [[ $value =~ ^[0-9]{1,9}$ ]] ||
                    errors+=("$name='$value': must be a whole number (0 or more)") ;;
            *)
                [[ $value =~ ^[0-9]{1,12}$ ]] && ((10#$value >= 1)) ||
                    errors+=("$name='$value': must be a whole number above 0") ;;
        esac
        [[ $value != *"'"* && $value != *$'\n'* ]] ||
            errors+=("$name: quotes and newlines are not allowed")
    done

    if [[ -n ${VLM_SERVICE_PORT:-} && $VLM_SERVICE_PORT != "${setting[VLM_PORT]}" ]]; then
        errors+=("VLM_PORT='${setting[VLM_PORT]}' and VLM_SERVICE_PORT='$VLM_SERVICE_PORT' disagree: set one of them (VLM_SERVICE_PORT is an alias of VLM_PORT)")
    fi

    # Other VLM_* variables already exported, and the proxy settings, go to .env as
    # they are.
    local -a extra=()
    local known=" ${names[*]} "
    while IFS= read -r name; do
        [[ $known == *" $name "* ]] && continue
        value=${!name}
        if [[ $value == *"'"* || $value == *$'\n'* ]]; then
            errors+=("$name: quotes and newlines are not allowed")
            continue
        fi
        extra+=("$name")
    done < <(compgen -e | grep -E '^(VLM_|(http|https|no)_proxy$|(HTTP|HTTPS|NO)_PROXY$)' | sort)

    if [[ -n ${VLM_OV_CONFIG:-} ]] && command -v python3 >/dev/null 2>&1; then
        python3 -c 'import json, sys; v = json.loads(sys.argv[1]); assert isinstance(v, dict)' \
            "$VLM_OV_CONFIG" 2>/dev/null ||
            errors+=("VLM_OV_CONFIG='$VLM_OV_CONFIG': must be a JSON object, e.g. {\"PERFORMANCE_HINT\": \"LATENCY\"}")
    fi

    if ((${#errors[@]})); then
        printf 'setup.sh: nothing was changed; fix these and source it again:\n' >&2
        printf '  %s\n' "${errors[@]}" >&2
        return 1
    fi

    local cache=${setting[VLM_MODEL_CACHE_DIR]}
    [[ $cache == /* ]] || cache="$root/$cache"
    if ! mkdir -p "$cache" 2>/dev/null; then
        printf 'setup.sh: cannot create the model cache directory %s\n' "$cache" >&2
        return 1
    fi

    # Compose-only: the group that owns the GPU render node on this host.
    local render_gid="" node
    for node in /dev/dri/renderD*; do
        [[ -e $node ]] && render_gid=$(stat -c %g "$node" 2>/dev/null) && break
    done

    local env_file="$root/.env" tmp
    tmp=$(mktemp "$root/.env.XXXXXX") || return 1
    {
        printf '# Written by setup.sh; read by the server (python app.py) and docker compose.\n'
        for i in "${!names[@]}"; do
            printf "%s='%s'\n" "${names[i]}" "${values[i]}"
        done
        for name in "${extra[@]}"; do
            printf "%s='%s'\n" "$name" "${!name}"
        done
        if [[ -n $render_gid ]]; then printf "RENDER_GID='%s'\n" "$render_gid"; fi
    } >"$tmp"
    if ! mv -f "$tmp" "$env_file"; then
        rm -f "$tmp"
        printf 'setup.sh: cannot write %s\n' "$env_file" >&2
        return 1
    fi

    for i in "${!names[@]}"; do
        export "${names[i]}=${values[i]}"
    done
    [[ -n $render_gid ]] && export RENDER_GID=$render_gid

    printf 'setup.sh: wrote %s\n' "$env_file"
    for i in "${!names[@]}"; do
        printf '  %-32s %-28s (%s)\n' "${names[i]}" "${values[i]}" "${origins[i]}"
    done
    local shown
    for name in "${extra[@]}"; do
        shown=${!name}
        # a proxy URL's password stays out of the terminal (it is in .env)
        [[ $shown =~ ^(.*://[^:/@]*:)[^/@]*(@.*)$ ]] && shown="${BASH_REMATCH[1]}***${BASH_REMATCH[2]}"
        printf '  %-32s %-28s (environment)\n' "$name" "$shown"
    done
    [[ -n $render_gid ]] && printf '  %-32s %-28s (owner of %s)\n' RENDER_GID "$render_gid" "$node"
    printf '  model cache: %s\n' "$cache"
    if [[ ${setting[VLM_DEVICE]} == *GPU* ]]; then
        [[ -n $render_gid ]] ||
            printf 'setup.sh: warning: no /dev/dri/renderD* here; the GPU is not visible to this host.\n' >&2
        printf 'next: docker compose -f compose.gpu.yaml up -d   (or: python app.py)\n'
    else
        printf 'next: docker compose up -d   (or: python app.py)\n'
    fi
    return 0
}

_vlm_status=0
_vlm_setup "$@" || _vlm_status=$?
unset -f _vlm_setup
# Leave no helper variable behind: eval expands the status before unsetting it.
eval "unset _vlm_status; return $_vlm_status 2>/dev/null || exit $_vlm_status"
