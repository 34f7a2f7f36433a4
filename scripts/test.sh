#!/usr/bin/env bash
# Everything the tests need, then the tests: Python packages, PostgreSQL's server and
# the real two-host rig where this machine allows it (root on Debian with apt), and pytest
# (with arguments: pytest with those; without: the tests outside the rig in parallel,
# then the rig's).
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
    # Everything outside the rig on one worker per core (pytest-xdist), then the rig's
    # tests on their own: they share its two hosts, and their printed figures (start
    # overhead, the simulator's fidelity) should not measure a machine busy with others.
    python -m pytest -n auto --maxprocesses 8 --ignore=tests/rig
    python -m pytest tests/rig
fi
