"""A job whose link breaks is started again, on real hosts.

Through the real daemon: a quiet guest (128 MiB, 4 MiB rewritten at 2 MiB/s) copies
over the 16 MiB/s link in about 8 s. Once a few MiB have moved, the test resets the
migration's TCP streams (`ss -K`: what a link that breaks under a migration looks
like to QEMU). The job fails and the instance keeps running on the source; the
deadline being far, lmwatch starts the migration again with the same plan (rule
`job-failed`), and the new job completes. Checked: the restart's reason, one restart,
no violation, the guest intact on the destination.

Then the same with the daemon killed (SIGKILL) before the link breaks: the job fails
while no daemon watches; the daemon started again finds the instance on the source,
no job, and starts the migration again as it would have had it seen the failure
(judged on the last progress it stored), and the new job completes.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
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
# 256 MiB, half of it rewritten at 8 MiB/s: a first pass of about 10 s over the 16 MiB/s
# link, so that the daemon is killed while it copies, after it stored a progress that
# shows the link's rate (libvirt's first statistics of a job show none)
UNWATCHED = "jf-unwatched"

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


def _started_again_once(m: JsonDict, source: str) -> str:
    """The reason of the migration's one restart, after a failed job with the instance
    still on `source`; the new job completed with no violation."""
    timeline = m["timeline"]
    restarts = [e for e in timeline if e["action"] == "restart"]
    assert len(restarts) == 1, explain(m)
    reason: str = restarts[0]["reason"]
    assert reason.startswith("the job failed") and f"still runs on {source}" in reason, explain(m)
    assert "starting again" in reason, explain(m)
    assert not [e for e in timeline if e["kind"] == "violation"], explain(m)
    assert m["state"] == "completed" and m["restarts"] == 1, explain(m)
    return reason


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
    reason = _started_again_once(m, src)
    assert "restart" in actions(m)
    assert_intact_on(QUIET, dst)
    summary.note(name, f"{closed} stream(s) reset: {reason[:90]}")


def _stored_transfer_rate(daemon: Daemon, migration_id: str) -> float:
    """The transfer rate in the progress the daemon last stored."""
    store = json.loads(daemon.config_path.read_text())["store_path"]
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5) as db:
        row = db.execute("SELECT progress FROM migrations WHERE id = ?", (migration_id,)).fetchone()
    progress = json.loads(row[0]) if row and row[0] else {}
    return float(progress.get("transfer_rate") or 0.0)


def _wait_no_job(host: str, name: str, timeout: float) -> None:
    """Until `name` on `host` has no job (the migration ended there)."""
    conn = rigctl.connect(host)
    try:
        dom = conn.lookupByName(name)
        until = time.monotonic() + timeout
        while dom.jobInfo()[0] != rigctl.libvirt.VIR_DOMAIN_JOB_NONE:
            assert time.monotonic() < until, rigctl.domain_states(name)
            time.sleep(0.2)
    finally:
        conn.close()


@pytest.mark.scenario("a job that fails while lmwatch is down is started again")
def test_a_job_that_fails_while_the_daemon_is_down_is_started_again(
    daemon: Daemon, summary: Any
) -> None:
    name = "a job that fails while lmwatch is down is started again"
    rigctl.define_guest("a", UNWATCHED, mem_mib=256, write_mib=128, rate_mib=8)
    try:
        rigctl.wait_heartbeat(UNWATCHED, 90, 3)
        mid = daemon.submit(UNWATCHED, "a", "b", profile="jf-strict")["id"]
        began = time.monotonic()
        while _stored_transfer_rate(daemon, mid) <= 0:  # the evidence a restart reads
            assert time.monotonic() - began < 30, explain(daemon.get(mid))
            time.sleep(0.2)
        assert daemon.get(mid)["state"] == "copying", explain(daemon.get(mid))
        daemon.kill()
        closed = rigctl.break_migration_streams()
        assert closed >= 1, "no migration stream to break"
        _wait_no_job("a", UNWATCHED, 60)  # the job failed; nobody watched it
        assert rigctl.where_running(UNWATCHED) == ["a"], rigctl.domain_states(UNWATCHED)
        daemon.start()
        m = daemon.wait_finished(mid, 180)
        summary.outcome(name, m)
        reason = _started_again_once(m, "a")
        assert_intact_on(UNWATCHED, "b")
        summary.note(name, f"killed, {closed} stream(s) reset: {reason[:90]}")
    finally:
        if daemon.proc is None or daemon.proc.poll() is not None:
            daemon.start()
        rigctl.destroy_everywhere(UNWATCHED)
