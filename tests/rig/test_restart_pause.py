"""A daemon restarted mid-migration decides from fresh evidence, not its first sample.

Through the real daemon: a busy guest (32 MiB rewritten at 40 MiB/s) that never
converges over the 16 MiB/s link migrates under a profile that may pause for at most
1200 ms (no handover, no slow-down). Once its first pass has ended the daemon is
killed (SIGKILL) and started again; it re-attaches and takes the migration to its
end.

Before the fix, the restarted daemon paused on its very first sample, predicting a
0.74 s pause; the pause lasted 2.18 s. Now: the migration ends exactly once, completed
or cancelled, the guest is intact where it runs, a pause (if any) stays within
max_pause, and after the restart the timeline shows lmwatch gathering evidence (a
continue) before any pause decision.

This guest needs about 2 s of pause, so the right outcome is no pause: the policy then
waits for a quieter phase until its patience runs out or the deadline comes, and
cancels. The profile's 60 s deadline (on_deadline: cancel) bounds the test.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "rig"))
import rigctl
from rigchecks import assert_intact_on, explain, module_daemon, module_guest, pause_profile

pytestmark = pytest.mark.rig

Daemon = Any  # tests/rig/conftest.py: Daemon (the real daemon, over HTTP)
JsonDict = dict[str, Any]
FINISHED = ("completed", "cancelled", "failed")

BUSY = "rp-busy"
BUSY_WRITE = (32, 40)  # MiB rewritten, MiB/s: never converges over the 16 MiB/s link
MAX_PAUSE = 1.2  # seconds
RESTARTED = "supervision resumed after a restart"

PROFILES = pause_profile("rp-pause", MAX_PAUSE, deadline="60s")


daemon = module_daemon(PROFILES)
guest = module_guest(BUSY, write_mib=BUSY_WRITE[0], rate_mib=BUSY_WRITE[1])


@pytest.mark.scenario("restart, then pause only on evidence")
def test_restarted_daemon_gathers_evidence_before_pausing(daemon: Daemon, summary: Any) -> None:
    name = "restart, then pause only on evidence"
    rigctl.wait_heartbeat(BUSY, 90, 3)  # booted, and the writer has swept its memory
    src = rigctl.where_running(BUSY)[0]
    dst = rigctl.other_host(src)
    m = daemon.submit(BUSY, src, dst, profile="rp-pause")
    mid = m["id"]
    # kill it during copying, once the first pass has ended
    m = daemon.wait_until(
        mid,
        lambda m: m["state"] == "copying" and (m["progress"] or {}).get("passes", 0) >= 2,
        60,
        "copying pass 2",
    )
    assert m["state"] == "copying", explain(m)
    passes_at_kill = m["progress"]["passes"]
    daemon.kill()
    killed_at = time.monotonic()
    time.sleep(1.0)
    daemon.start()
    summary.note(
        name,
        f"SIGKILL in pass {passes_at_kill}, answering again "
        f"{time.monotonic() - killed_at:.1f}s later",
    )

    try:
        m = daemon.wait_finished(mid, 90)
    except TimeoutError as error:
        raise AssertionError(f"{error}\nwhere {BUSY} runs: {rigctl.domain_states(BUSY)}") from None
    summary.outcome(name, m)

    # ended exactly once, completed or cancelled, and the guest is intact where it runs
    ends = [e for e in m["timeline"] if e["kind"] == "state" and e["state"] in FINISHED]
    assert len(ends) == 1, explain(m)
    assert [x["id"] for x in daemon.list()].count(mid) == 1
    assert m["state"] in ("completed", "cancelled"), explain(m)
    assert_intact_on(BUSY, dst if m["state"] == "completed" else src)

    # after the restart: evidence first (a continue), then any pause
    timeline = m["timeline"]
    resumed = [i for i, e in enumerate(timeline) if RESTARTED in e["reason"]]
    assert resumed, f"no {RESTARTED!r} in the timeline\n" + explain(m)
    after = timeline[resumed[-1] + 1 :]
    decisions = [e for e in after if e["kind"] == "decision"]
    assert decisions, explain(m)
    pauses = [i for i, e in enumerate(decisions) if e["action"] == "pause"]
    first_pause = pauses[0] if pauses else len(decisions)
    evidence = [
        e
        for e in decisions[:first_pause]
        if e["action"] == "continue" or "gathering evidence" in e["reason"]
    ]
    assert evidence, "the restarted daemon acted before gathering evidence\n" + explain(m)
    summary.note(name, f"first decision after the restart: {decisions[0]['reason'][:100]}")

    # a pause, if there was one, stayed within max_pause
    paused = bool(pauses) or (m["outcome"] or {}).get("method") == "paused"
    if paused:
        blackout = m["outcome"]["blackout_seconds"]
        assert blackout is not None, explain(m)
        assert blackout <= MAX_PAUSE, f"paused {blackout:.2f}s > {MAX_PAUSE}s\n" + explain(m)

    # still accounted once a little later (nothing finishes it again)
    time.sleep(1.0)
    assert len([e for e in daemon.get(mid)["timeline"] if e["state"] in FINISHED]) == 1
