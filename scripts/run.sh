#!/usr/bin/env bash
# Install lmwatch (into the project's .venv) and run the daemon on its embedded default: the simulator
# driver with a small simulated inventory and the example profiles. The store
# (lmwatch.db) and the generated API token (lmwatch.token) go to the current
# directory unless configured otherwise (see README: Configuration).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=venv.sh
. "$repo/scripts/venv.sh"
venv_install
exec lmwatch serve "$@"
