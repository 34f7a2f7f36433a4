#!/usr/bin/env bash
# Install lmwatch and run the daemon on its embedded default: the simulator
# driver with a small simulated inventory and the example profiles.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e .
exec lmwatch serve "$@"
