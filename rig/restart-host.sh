#!/bin/bash
# restart-host.sh a|b [restart|stop|start]
# Stop (SIGTERM, wait for exit) and/or start one rig host's libvirtd.  Running guests
# (QEMU processes) are left alone: the new libvirtd re-attaches to them.
# Note: with a migration in flight, a stopped libvirtd lingers up to ~30 s before exiting.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/lib.sh"
h=${1:?usage: restart-host.sh a|b [restart|stop|start]}; what=${2:-restart}
[[ $h == a || $h == b ]] || { echo "unknown host $h" >&2; exit 2; }
[[ -d $BASE/$h/etc ]] || { echo "host $h was never brought up: run rig/up.sh" >&2; exit 1; }
t0=$(date +%s.%N)
el() { awk -v a="$(date +%s.%N)" -v b="$t0" 'BEGIN{printf "%.1f", a-b}'; }
if [[ $what == restart || $what == stop ]]; then stop_host "$h"; echo "host $h stopped after $(el)s" >&2; fi
if [[ $what == restart || $what == start ]]; then
    if [[ -z $(host_pid "$h") ]]; then start_host "$h"; fi
    wait_host "$h" 90
    echo "host $h up after $(el)s" >&2
fi
