#!/usr/bin/env bash
# Install PostgreSQL from Debian's package for the tests that need a real database
# (tests/pgtools.py starts a throwaway cluster of its own in a temporary directory,
# as an unprivileged user, on a free port; nothing here starts or configures one).
# Idempotent: when the server binaries are there it only says where, in well under a
# second. Installing needs root on Debian (apt-get); elsewhere it says what is missing.
# The Python side (psycopg, with its own libpq) comes from the `postgres` extra.
set -euo pipefail

find_bindir() {
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

if bindir="$(find_bindir)"; then
    echo "postgres: server binaries in $bindir"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "postgres: not installed and cannot install it here (needs root and apt-get);" \
         "install your distribution's PostgreSQL server package" >&2
    exit 1
fi
echo "== apt-get install postgresql"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends postgresql >/dev/null
# The package creates and (under systemd) starts a cluster of its own on port 5432;
# the tests start their own, so do not leave that one running.
if [ -d /run/systemd/system ]; then
    systemctl disable --now postgresql.service >/dev/null 2>&1 || true
elif command -v pg_lsclusters >/dev/null; then
    pg_lsclusters --no-header 2>/dev/null | while read -r version name _ status _; do
        if [ "$status" = online ]; then pg_ctlcluster "$version" "$name" stop || true; fi
    done
fi
bindir="$(find_bindir)" || { echo "postgres: installed, but no initdb/pg_ctl found" >&2; exit 1; }
echo "postgres: server binaries in $bindir"
