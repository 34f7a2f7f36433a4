"""A pause the link stretches is ended and the migration started again, on real hosts.

Through the real daemon: a busy guest (32 MiB rewritten at 40 MiB/s) never converges
over the 16 MiB/s link, and the profile may pause it for up to 5 s: lmwatch pauses it
(about 2 s of copy). As soon as the pause shows on the timeline, the test lowers the
migration's bandwidth on the source to 4 MiB/s (what a link that slows under a pause
looks like to the hypervisor): the rest would now keep the instance stopped past 5 s.
lmwatch stops the job, so the instance runs on the source again, and, the deadline
being far, starts the migration again; the new job gets the link's full bandwidth
(its plan sets it) and finishes. Checked: the restart's reason, the pause's end on
the timeline within max_pause, no violation, the guest intact on the destination,
one restart, and that the instance ran again within the policy's `cancel_resume`
of the decision to stop the job (the time the policy allows a stop to take when it
decides a pause's last look; printed).
"""

from __future__ import annotations

import datetime as dt
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from lmwatch.drivers.simphysics import Tuning
from lmwatch.policies import DEFAULT

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "rig"))
import rigctl
from rigchecks import actions, assert_intact_on, explain, module_daemon, module_guest

pytestmark = pytest.mark.rig

Daemon = Any  # tests/rig/conftest.py: Daemon (the real daemon, over HTTP)
JsonDict = dict[str, Any]

BUSY = "ps-busy"
MAX_PAUSE = 5.0  # seconds
SLOWED_MIB = 4  # MiB/s the link carries once it slowed under the pause

PROFILES = f"""
version: 1
profiles:
  - name: ps-pause
    description: may pause for a few seconds; never handed over, never slowed
    max_blackout: 300ms
    may_slow_down: false
    handover: forbidden
    may_pause: true
    max_pause: {MAX_PAUSE * 1000:.0f}ms
    deadline: 5m
    on_deadline: cancel
"""


daemon = module_daemon(PROFILES)
guest = module_guest(BUSY, write_mib=32, rate_mib=40)


@pytest.mark.scenario("a pause the link stretches starts the migration again")
def test_a_pause_the_link_stretches_starts_the_migration_again(
    daemon: Daemon, summary: Any
) -> None:
    name = "a pause the link stretches starts the migration again"
    rigctl.wait_heartbeat(BUSY, 90, 3)  # booted, and the writer has swept its memory
    src = rigctl.where_running(BUSY)[0]
    dst = rigctl.other_host(src)
    mid = daemon.submit(BUSY, src, dst, profile="ps-pause")["id"]
    m = daemon.wait_until(mid, lambda m: "pause" in actions(m), 90, "a pause")
    assert "pause" in actions(m), explain(m)
    dom = rigctl.lookup(src, BUSY)
    assert dom is not None
    try:
        dom.migrateSetMaxSpeed(SLOWED_MIB, 0)  # the link slows under the pause
    finally:
        dom.connect().close()
    m = daemon.wait_finished(mid, 240)
    summary.outcome(name, m)
    timeline = m["timeline"]
    restarts = [e for e in timeline if e["action"] == "restart"]
    assert len(restarts) == 1, explain(m)
    reason = restarts[0]["reason"]
    assert reason.startswith("paused ") and "now moves at" in reason, explain(m)
    assert "starting again" in reason, explain(m)
    ended = [e for e in timeline if e["reason"].startswith("the pause ended")]
    assert len(ended) == 1, explain(m)
    length = re.search(r"stopped for ([0-9.]+)s", ended[0]["reason"])
    assert length is not None, explain(m)
    stopped = float(length.group(1))
    assert stopped <= MAX_PAUSE, explain(m)
    assert not [e for e in timeline if e["kind"] == "violation"], explain(m)
    assert m["state"] == "completed" and m["restarts"] == 1, explain(m)
    assert_intact_on(BUSY, dst)
    resumed_after = _at(ended[0]) - _at(restarts[0])
    assert 0 < resumed_after <= DEFAULT.cancel_resume, explain(m)
    summary.note(
        name,
        f"first pause ended after {stopped:.2f}s, {resumed_after:.2f}s after the decision "
        f"to stop the job (the policy allows {DEFAULT.cancel_resume:.1f}s, the simulator "
        f"takes {Tuning().cancel_delay:.1f}s): {reason[:90]}",
    )


def _at(entry: JsonDict) -> float:
    return dt.datetime.fromisoformat(entry["at"].replace("Z", "+00:00")).timestamp()
