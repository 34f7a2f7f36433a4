#!/bin/bash
# Stop the rig: destroy and undefine every guest on both hosts, stop both libvirtds,
# kill any QEMU they left behind.  Idempotent.  Serial/QEMU logs stay in $BASE/<h>/log/.
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/lib.sh"
[[ $(id -u) -eq 0 ]] || { echo "down.sh: must run as root" >&2; exit 1; }
for h in "${HOSTS[@]}"; do
    [[ -d $BASE/$h ]] || continue
    uri=$(host_uri "$h")
    if [[ -n $(host_pid "$h") ]] && host_answers "$h"; then
        for dom in $(timeout 20 virsh -q -c "$uri" list --all --name 2>/dev/null); do
            timeout 20 virsh -q -c "$uri" destroy "$dom" >/dev/null 2>&1
            timeout 20 virsh -q -c "$uri" undefine "$dom" >/dev/null 2>&1
        done
        save_caps "$h"
    fi
    stop_host "$h"
    # QEMU processes whose libvirtd is gone (crash, kill) still have their pid files
    for f in "$BASE/$h"/run/qemu/*.pid; do
        [[ -s $f ]] || continue
        pid=$(cat "$f")
        if [[ -d /proc/$pid ]] && grep -q qemu "/proc/$pid/comm" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null; fi
    done
    find "$BASE/$h" -mindepth 1 -maxdepth 1 ! -name log -exec rm -rf {} +
done
rm -f "$BASE/env"
echo "$RIG_NAME down" >&2
