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

rig_started=0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ -r /etc/debian_version ] \
    && [ "${LMWATCH_NO_RIG:-0}" != 1 ]; then
    bash rig/setup.sh
    bash rig/up.sh
    rig_started=1
else
    echo "rig: not set up (needs root on Debian with apt, and LMWATCH_NO_RIG unset);" \
         "real-hypervisor tests will skip" >&2
fi
cleanup() { if [ "$rig_started" = 1 ]; then bash rig/down.sh || true; fi; }
trap cleanup EXIT

if [ "$#" -gt 0 ]; then
    python -m pytest "$@"  # what was asked, as asked
else
    # Most tests on one worker per core (pytest-xdist). Alone afterwards: the tests of
    # several daemons or engines on one database (real leases and polls of a second or
    # less: a takeover missed its 10 s under a busy machine), and the rig's (they share
    # its two hosts, and their printed figures, start overhead and the simulator's
    # fidelity, should not measure a machine busy with others).
    alone=(tests/test_cluster_*.py tests/test_store_postgres.py)
    ignore=(--ignore=tests/rig)
    for path in "${alone[@]}"; do ignore+=("--ignore=$path"); done
    # Both parts run whatever the first gives: a failure outside the rig still shows
    # how the rig's tests fare. The exit status is the first non-zero one.
    status=0
    python -m pytest -n auto --maxprocesses 8 "${ignore[@]}" || status=$?
    alone_status=0
    python -m pytest "${alone[@]}" tests/rig || alone_status=$?
    [ "$status" != 0 ] || status=$alone_status
    exit "$status"
fi
