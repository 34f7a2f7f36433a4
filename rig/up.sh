#!/bin/bash
# Start the two libvirt hosts "a" and "b" of the rig (idempotent) and print their URIs
# (of slot $LMWATCH_RIG_SLOT, 0 by default; lib.sh).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/lib.sh"
[[ $(id -u) -eq 0 ]] || { echo "up.sh: must run as root" >&2; exit 1; }
command -v libvirtd >/dev/null || { echo "up.sh: libvirtd missing: run rig/setup.sh" >&2; exit 1; }
t0=$(date +%s.%N)
mkdir -p "$BASE"
started=()
for h in "${HOSTS[@]}"; do
    if [[ -n $(host_pid "$h") ]] && host_answers "$h"; then continue; fi
    [[ -n $(host_pid "$h") ]] && stop_host "$h"     # running but not answering: restart it
    write_conf "$h"
    # QEMU capabilities from the rig cache (else libvirtd probes QEMU: ~8 s; both hosts
    # probe in parallel on the very first start)
    seed_caps "$h" || true
    start_host "$h"
    started+=("$h")
done
for h in "${started[@]}"; do wait_host "$h" 90; done
for h in "${started[@]}"; do save_caps "$h"; done
for h in "${HOSTS[@]}"; do ensure_pool "$h" || { echo "host $h: storage pool $POOL did not start" >&2; exit 1; }; done
# Migration ports stalled by a test that did not live to let them through again
# (tests/rig/test_pause_stalled.py; rigctl.STALL_TABLE): every migration would stall
if command -v nft >/dev/null && nft list table inet "$STALL_TABLE" >/dev/null 2>&1; then
    nft delete table inet "$STALL_TABLE"
    echo "$RIG_NAME: migration ports were stalled (nft table $STALL_TABLE): let through again" >&2
fi
{
    echo "LMWATCH_RIG_DIR=$BASE"
    echo "LMWATCH_RIG_URI_A=$(host_uri a)"
    echo "LMWATCH_RIG_URI_B=$(host_uri b)"
} >"$BASE/env"
if [[ ${#started[@]} -gt 0 ]]; then
    printf '%s up (started: %s) in %.1fs\n' "$RIG_NAME" "${started[*]}" "$(awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN{print a-b}')" >&2
else
    echo "$RIG_NAME already up" >&2
fi
for h in "${HOSTS[@]}"; do echo "$h $(host_uri "$h")"; done
