#!/bin/bash
# Install everything the two-host libvirt rig needs and build its guest.
# Idempotent: every step checks whether it is already done; a second run takes seconds.
# Run as root on Debian 12 (bookworm).  Uses the python3 first on PATH for pip.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
[[ $(id -u) -eq 0 ]] || { echo "setup.sh: must run as root" >&2; exit 1; }
t0=$(date +%s.%N)
step() { local now; now=$(date +%s.%N); printf '[setup %6.1fs] %s\n' "$(awk -v a="$now" -v b="$t0" 'BEGIN{print a-b}')" "$*"; }

export DEBIAN_FRONTEND=noninteractive
BPO_PKGS=(qemu-system-x86 libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-driver-storage libvirt-dev libvirt-clients pkg-config)
# iproute2: `ss -K` breaks migration streams; nftables: `nft` stalls them
BASE_PKGS=(busybox-static cpio gcc libc6-dev gzip util-linux iproute2 nftables)

# 1. bookworm-backports in the Suites: line of the main archive entry
SRC=/etc/apt/sources.list.d/debian.sources
added_bpo=0
if [[ -f $SRC ]]; then
    if ! grep -qE '^Suites:.*\bbookworm-backports\b' "$SRC"; then
        # the stanza whose Suites: has plain "bookworm" (not -security)
        sed -i -E '/^Suites:.*(^| )bookworm( |$)/ s/$/ bookworm-backports/' "$SRC"
        grep -qE '^Suites:.*\bbookworm-backports\b' "$SRC" || { echo "setup.sh: could not add bookworm-backports to $SRC" >&2; exit 1; }
        added_bpo=1
        step "added bookworm-backports to $SRC"
    fi
elif ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deb http://deb.debian.org/debian bookworm-backports main" > /etc/apt/sources.list.d/bookworm-backports.list
    added_bpo=1
fi

# 2. packages: skip apt entirely when everything is installed and QEMU/libvirt come from backports
pkg_ok() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
is_bpo() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null | grep -q 'bpo'; }
need_apt=0
for p in "${BPO_PKGS[@]}" "${BASE_PKGS[@]}"; do pkg_ok "$p" || need_apt=1; done
for p in qemu-system-x86 libvirt-daemon libvirt-daemon-driver-qemu; do is_bpo "$p" || need_apt=1; done
if [[ $need_apt == 1 ]]; then
    step "apt-get update"
    apt-get update -q >/dev/null
    step "apt-get install (backports QEMU/libvirt)"
    apt-get install -y -q --no-install-recommends -t bookworm-backports \
        "${BPO_PKGS[@]}" "${BASE_PKGS[@]}" >/dev/null
    for p in qemu-system-x86 libvirt-daemon; do
        is_bpo "$p" || { echo "setup.sh: $p is not the backports version" >&2; exit 1; }
    done
else
    step "packages already installed"
fi
step "qemu $(dpkg-query -W -f='${Version}' qemu-system-x86), libvirt $(dpkg-query -W -f='${Version}' libvirt-daemon)"

# 3. libvirt-python for the python3 on PATH, matching the C library's version
LV=$(pkg-config --modversion libvirt)
have=$(python3 -c 'import libvirt; print(libvirt.getVersion())' 2>/dev/null || true)
if [[ -z "$have" ]]; then
    step "pip install libvirt-python==$LV into $(command -v python3)"
    python3 -m pip install -q "libvirt-python==$LV" || python3 -m pip install -q "libvirt-python<=$LV"
else
    step "libvirt-python already importable"
fi

# 4. the guest (kernel + initramfs), cached by a hash of its sources
step "guest"
"$HERE/guest/build.sh"
step "done"
