#!/usr/bin/env bash
# Everything the tests need, then the tests: Python packages, PostgreSQL's server and
# the real two-host rig where this machine allows it (root on Debian with apt), and pytest
# (with arguments: pytest with those; without: most tests in parallel, then the
# multi-daemon and rig tests alone).
# Without the rig the real-hypervisor tests skip with the reason; with CI=true
# such a skip fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=venv.sh
. scripts/venv.sh
venv_install test

# PostgreSQL's server for the tests of several daemons on one database (each session
# starts a throwaway cluster of its own); without it those tests skip and say why.
bash scripts/postgres.sh || echo "postgres: not installed; the PostgreSQL tests will skip" >&2

# Two rigs side by side (slots 0 and 1, rig/lib.sh), one per pytest worker of the rig's
# tests: they spend most of their time waiting on guests and hosts, not on the CPU.
rig_slots=(0 1)
rig_started=0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ -r /etc/debian_version ] \
    && [ "${LMWATCH_NO_RIG:-0}" != 1 ]; then
    bash rig/setup.sh
    for slot in "${rig_slots[@]}"; do LMWATCH_RIG_SLOT=$slot bash rig/up.sh >/dev/null; done
    rig_started=1
else
    echo "rig: not set up (needs root on Debian with apt, and LMWATCH_NO_RIG unset);" \
         "real-hypervisor tests will skip" >&2
fi
cleanup() {
    if [ "$rig_started" = 1 ]; then
        for slot in "${rig_slots[@]}"; do LMWATCH_RIG_SLOT=$slot bash rig/down.sh || true; done
    fi
}
trap cleanup EXIT

if [ "$#" -gt 0 ]; then
    python -m pytest "$@"  # what was asked, as asked
else
    # Most tests on one worker per core (pytest-xdist). Apart afterwards, away from that
    # CPU-bound part: the tests of several daemons or engines on one database (real
    # leases and polls of a second or less: a takeover missed its 10 s under a busy
    # machine), two at a time (they mostly wait: a quarter of the CPU), then the rig's,
    # one worker per rig, a test file each (a file's guests are set up once), their
    # printed figures (start overhead, the simulator's fidelity) measured beside one
    # other rig test only.
    cluster=(tests/test_cluster_*.py tests/test_store_postgres.py)
    ignore=(--ignore=tests/rig)
    for path in "${cluster[@]}"; do ignore+=("--ignore=$path"); done
    # Every part runs whatever the one before gives: a failure outside the rig still
    # shows how the rig's tests fare. The exit status is the first non-zero one.
    status=0
    part() { local code=0; python -m pytest "$@" || code=$?; [ "$status" != 0 ] || status=$code; }
    part -n auto --maxprocesses 8 "${ignore[@]}"
    part -n 2 "${cluster[@]}"
    part -n "${#rig_slots[@]}" --dist loadfile tests/rig
    exit "$status"
fi
