"""A job whose link breaks is started again, on real hosts.

Through the real daemon: a quiet guest (128 MiB, 4 MiB rewritten at 2 MiB/s) copies
over the 16 MiB/s link in about 8 s. Once a few MiB have moved, the test resets the
migration's TCP streams (`ss -K`: what a link that breaks under a migration looks
like to QEMU). The job fails and the instance keeps running on the source; the
deadline being far, lmwatch starts the migration again with the same plan (rule
`job-failed`), and the new job completes. Checked: the restart's reason, one restart,
no violation, the guest intact on the destination.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "rig"))
import rigctl
from rigchecks import actions, assert_intact_on, explain, module_daemon, module_guest

pytestmark = pytest.mark.rig

Daemon = Any  # tests/rig/conftest.py: Daemon (the real daemon, over HTTP)
JsonDict = dict[str, Any]

QUIET = "jf-quiet"

PROFILES = """
version: 1
profiles:
  - name: jf-strict
    description: short stops only; nothing forced
    max_blackout: 500ms
    may_slow_down: false
    handover: forbidden
    may_pause: false
    deadline: 5m
    on_deadline: cancel
"""


daemon = module_daemon(PROFILES)
guest = module_guest(QUIET, write_mib=4, rate_mib=2)


def _moved(migration: JsonDict) -> int:
    progress = migration.get("progress") or {}
    return int(progress.get("memory_transferred_bytes") or 0)


@pytest.mark.scenario("a job whose link breaks is started again")
def test_a_job_whose_link_breaks_is_started_again(daemon: Daemon, summary: Any) -> None:
    name = "a job whose link breaks is started again"
    rigctl.wait_heartbeat(QUIET, 90, 3)  # booted, and the writer has swept its memory
    src = rigctl.where_running(QUIET)[0]
    dst = rigctl.other_host(src)
    mid = daemon.submit(QUIET, src, dst, profile="jf-strict")["id"]
    m = daemon.wait_until(mid, lambda m: _moved(m) >= 16 << 20, 60, "16 MiB moved")
    assert m["state"] == "copying", explain(m)
    closed = rigctl.break_migration_streams()
    assert closed >= 1, "no migration stream to break"
    m = daemon.wait_finished(mid, 180)
    summary.outcome(name, m)
    timeline = m["timeline"]
    restarts = [e for e in timeline if e["action"] == "restart"]
    assert len(restarts) == 1, explain(m)
    reason = restarts[0]["reason"]
    assert reason.startswith("the job failed") and f"still runs on {src}" in reason, explain(m)
    assert "starting again" in reason, explain(m)
    assert "restart" in actions(m)
    assert not [e for e in timeline if e["kind"] == "violation"], explain(m)
    assert m["state"] == "completed" and m["restarts"] == 1, explain(m)
    assert_intact_on(QUIET, dst)
    summary.note(name, f"{closed} stream(s) reset: {reason[:90]}")
