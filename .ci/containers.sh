#!/usr/bin/env bash
# CI: run scripts/container_smoke.sh with whatever container engine this machine can
# offer. Exit 0 with a notice when it can offer none (the smoke test is then skipped).
#
# - A Docker daemon that answers is used as it is, with the official base image.
# - Otherwise, as root on Debian, rootful podman is installed from Debian packages and
#   set up for CI machines: runc (crun refuses hybrid cgroup layouts), cgroupfs, open-file
#   limits within the hard limit, and a stand-in base image built with mmdebstrap from
#   the host's Debian archive (CI reaches no container registry). Builds mount the
#   host's CA bundle, because TLS to the package registries may be re-signed by a CA
#   only the host trusts; nothing of it stays in the images.
set -euo pipefail
cd "$(dirname "$0")/.."
state=${VLM_CI_CONTAINERS_DIR:-/var/tmp/ov-vlm-ci-containers}
suite=bookworm # Debian 12: Python 3.11, like the default base image
note() { echo "[ci containers] $*" >&2; }

if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    exec env VLM_SMOKE_ENGINE=docker scripts/container_smoke.sh
fi
if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
    note "no Docker daemon, and podman cannot be installed here (needs root and apt): skipped"
    exit 0
fi

mkdir -p "$state"
export CONTAINERS_CONF=$state/containers.conf
if ! command -v podman >/dev/null || ! command -v mmdebstrap >/dev/null; then
    note "installing podman and mmdebstrap"
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            podman buildah runc fuse-overlayfs slirp4netns uidmap netavark aardvark-dns conmon \
            catatonit golang-github-containers-common iptables mmdebstrap; } >/dev/null 2>&1 ||
        { note "podman could not be installed: skipped"; exit 0; }
fi
[[ -x $state/venv/bin/podman-compose ]] ||
    { python3 -m venv "$state/venv" && "$state/venv/bin/pip" install -q podman-compose; }
cat >"$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
if ! podman info >/dev/null 2>&1; then
    note "podman does not run on this machine: skipped"
    exit 0
fi

# The stand-in base: Debian's minimal system with its python3 linked under
# /usr/local/bin, like the official python images.
base=localhost/ov-vlm-ci-base:$suite
if ! podman image exists "$base"; then
    note "building the stand-in base image $base"
    mirror=$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list \
        /etc/apt/sources.list.d/ 2>/dev/null | grep -v security | head -1 | tr -d ' ' || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    mmdebstrap --variant=minbase --include=ca-certificates,netbase,python3,python3-venv,python3-pip \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/usr/lib/python3*/EXTERNALLY-MANAGED' \
        --customize-hook='for n in python python3 pip pip3; do
            t=/usr/bin/python3; case $n in pip*) t=/usr/bin/pip3;; esac
            ln -sf "$t" "$1/usr/local/bin/$n"; done' \
        "$suite" "$state/base.tar" "deb $mirror $suite main" "deb $mirror $suite-updates main" \
        >"$state/mmdebstrap.log" 2>&1 || { tail -20 "$state/mmdebstrap.log" >&2; exit 1; }
    podman import --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$state/base.tar" "$base" >/dev/null
    rm -f "$state/base.tar"
fi

# pip and requests in the build trust the host's CA bundle (see the top).
ca=/etc/ssl/certs/ca-certificates.crt
[[ -f $ca ]] || { note "no CA bundle at $ca: skipped"; exit 0; }
stdlib=$(podman run --rm "$base" python3 -c 'import sysconfig; print(sysconfig.get_path("stdlib"))')
printf 'import os\nfor _name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT"):\n    os.environ.setdefault(_name, "%s")\n' \
    "$ca" >"$state/sitecustomize.py"

export VLM_SMOKE_ENGINE=podman VLM_SMOKE_BASE_IMAGE=$base
export VLM_SMOKE_BUILD="podman build --format docker -v $ca:$ca:ro -v $state/sitecustomize.py:$stdlib/sitecustomize.py:ro"
export VLM_SMOKE_COMPOSE="$state/venv/bin/podman-compose"
export VLM_SMOKE_BUILD_ARGS=${VLM_SMOKE_BUILD_ARGS:---build-arg APT_CHECK_VALID_UNTIL=false}
exec scripts/container_smoke.sh
