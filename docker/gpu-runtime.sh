#!/bin/sh
# Install Intel's GPU user-space drivers (compute-runtime: OpenCL and Level Zero) and
# clinfo into a Debian-based image, from a Debian release that carries them for the
# image's own release (docs/deployment.md says why):
#
#   trixie (Debian 13, the default base): Debian 13 has no compute-runtime, Debian
#       testing (forky) has it. Only the driver packages and the C/C++ runtime they
#       are built against (glibc, libstdc++) are taken from forky; apt pinning keeps
#       every other package on trixie.
#   bookworm (Debian 12): its own compute-runtime (22.43: OpenCL only, GPUs up to
#       Arc/DG2 and 12th-gen Core); it has no Level Zero GPU driver.
#
# The mirror is the one the image already uses. APT_CHECK_VALID_UNTIL=false lets
# apt read a frozen snapshot of the archive whose testing index has expired.
set -eu

. /etc/os-release
check_valid_until=${APT_CHECK_VALID_UNTIL:-true}
mirror=$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ \
    2>/dev/null | head -1 | tr -d ' ')
mirror=${mirror:-http://deb.debian.org/debian}

# From forky: the drivers, their compiler and memory-manager libraries, the loaders,
# and the runtime libraries these were built against (each needs the newer one).
forky_packages="intel-opencl-icd libze-intel-gpu1 libigc2 libigdfcl2 libigdgmm12 libze1
ocl-icd-libopencl1 libc6 libc-bin libc-gconv-modules-extra libgcc-s1 libstdc++6 gcc-16-base"

case ${VERSION_CODENAME:-} in
trixie)
    echo "deb $mirror forky main" >/etc/apt/sources.list.d/gpu-forky.list
    {
        echo "Package: $(echo "$forky_packages" | tr '\n' ' ')"
        echo "Pin: release n=forky"
        echo "Pin-Priority: 500"
        echo
        echo "Package: *"
        echo "Pin: release n=forky"
        echo "Pin-Priority: -1"
    } >/etc/apt/preferences.d/gpu-forky
    packages="ocl-icd-libopencl1 intel-opencl-icd libze1 libze-intel-gpu1 clinfo"
    ;;
bookworm)
    packages="ocl-icd-libopencl1 intel-opencl-icd libze1 clinfo"
    ;;
*)
    echo "gpu-runtime.sh: no known source of Intel's GPU drivers for ${PRETTY_NAME:-this base}" \
        "(supported: Debian 13 trixie, Debian 12 bookworm)" >&2
    exit 1
    ;;
esac

export DEBIAN_FRONTEND=noninteractive
apt-get update -o Acquire::Check-Valid-Until="$check_valid_until"
# shellcheck disable=SC2086  # a list of package names
apt-get install -y --no-install-recommends $packages
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
# What came from where, in the build log.
dpkg-query -W -f '${Package} ${Version}\n' $packages libigc2 libigdgmm12 libc6 libstdc++6 \
    2>/dev/null || true
getent group render >/dev/null || groupadd --system render
