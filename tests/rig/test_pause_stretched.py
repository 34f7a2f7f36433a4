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
import sys
from pathlib import Path
from typing import Any

import pytest

from lmwatch.drivers.simphysics import Tuning
from lmwatch.policies import DEFAULT

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "rig"))
import rigctl
from rigchecks import (
    actions,
    assert_started_again_after_a_pause,
    explain,
    module_daemon,
    module_guest,
    pause_profile,
)

pytestmark = pytest.mark.rig

Daemon = Any  # tests/rig/conftest.py: Daemon (the real daemon, over HTTP)
JsonDict = dict[str, Any]

BUSY = "ps-busy"
MAX_PAUSE = 5.0  # seconds
SLOWED_MIB = 4  # MiB/s the link carries once it slowed under the pause

PROFILES = pause_profile("ps-pause", MAX_PAUSE, deadline="5m")


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
    restart, ended, stopped = assert_started_again_after_a_pause(m, BUSY, dst, MAX_PAUSE)
    reason = restart["reason"]
    assert reason.startswith("paused ") and "now moves at" in reason, explain(m)
    assert "starting again" in reason, explain(m)
    resumed_after = _at(ended) - _at(restart)
    assert 0 < resumed_after <= DEFAULT.cancel_resume, explain(m)
    summary.note(
        name,
        f"first pause ended after {stopped:.2f}s, {resumed_after:.2f}s after the decision "
        f"to stop the job (the policy allows {DEFAULT.cancel_resume:.1f}s, the simulator "
        f"takes {Tuning().cancel_delay:.1f}s): {reason[:90]}",
    )


def _at(entry: JsonDict) -> float:
    return dt.datetime.fromisoformat(entry["at"].replace("Z", "+00:00")).timestamp()
