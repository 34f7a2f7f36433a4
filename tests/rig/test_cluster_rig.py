"""Two daemons on one PostgreSQL database drive the rig's real hosts; the one
supervising a running migration is killed (SIGKILL) and the other finishes it.

Both daemons are members of one cluster (`store_url`, `member`, a 3 s lease) with
the libvirt driver on hosts a and b. A busy guest (32 MiB rewritten at 40 MiB/s,
never converging over the 16 MiB/s link) migrates under a profile that may pause it
for up to 5 s. While its first pass is copying (a fifth of it done), the daemon
holding its lease is killed: the profile may pause the guest as soon as that pass
ends, so a later kill could find the migration already completing or done. The
other must take the migration over (within the lease plus a poll, with some slack
for the rig), re-attach to the running job, gather evidence again and finish it:
exactly one final state, at most one pause, the guest intact on the destination.
The figures go to the rig summary.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "rig"))
import rigctl
from rigchecks import timeline_text

from lmwatch.bench.cluster_daemons import lease_holder

pytestmark = pytest.mark.rig

Daemon = Any  # tests/rig/conftest.py: Daemon (the real daemon, over HTTP)
JsonDict = dict[str, Any]
FINISHED = ("completed", "cancelled", "failed")

BUSY = "cl-busy"
LEASE = 3.0
KILL_AT_PERCENT = 20  # of the first pass: 128 MiB at 16 MiB/s take about 8 s
PROFILES = """
version: 1
profiles:
  - name: cl-pause
    max_blackout: 300ms
    may_slow_down: false
    handover: forbidden
    may_pause: true
    max_pause: 5s
    deadline: 90s
    on_deadline: cancel
"""


@pytest.fixture(scope="module", autouse=True)
def guest() -> Iterator[None]:
    rigctl.define_guest("a", BUSY, write_mib=32, rate_mib=40)
    yield
    rigctl.destroy_everywhere(BUSY)


@pytest.mark.scenario("two daemons, owner killed")
def test_the_other_daemon_finishes_a_migration_whose_owner_was_killed(
    pg_url: str, daemon_factory: Any, summary: Any
) -> None:
    name = "two daemons, owner killed"
    daemons: dict[str, Daemon] = {
        member: daemon_factory(PROFILES, store_url=pg_url, member=member, lease=LEASE)
        for member in ("m1", "m2")
    }
    try:
        rigctl.wait_heartbeat(BUSY, 90, 3)
        src = rigctl.where_running(BUSY)[0]
        dst = rigctl.other_host(src)
        first = daemons["m1"]
        mid = first.submit(BUSY, src, dst, profile="cl-pause")["id"]
        m = first.wait_until(
            mid,
            lambda m: (
                m["state"] == "copying"
                and (m["progress"] or {}).get("percent_copied", 0) >= KILL_AT_PERCENT
            ),
            60,
            f"copying, {KILL_AT_PERCENT}% copied",
        )
        assert m["state"] == "copying", timeline_text(m)
        at_kill = f"pass {m['progress']['passes']}, {m['progress']['percent_copied']:.0f}% copied"
        owner = lease_holder(pg_url, mid)
        assert owner in daemons, f"lease of {mid} held by {owner!r}"
        other = daemons["m2" if owner == "m1" else "m1"]
        daemons[owner].kill()
        killed = time.monotonic()
        taken = None
        while time.monotonic() < killed + LEASE + 30:
            if lease_holder(pg_url, mid) == other.member:
                taken = time.monotonic() - killed
                break
            time.sleep(0.05)
        assert taken is not None, f"{other.member} did not take {mid} over\n{other.log()}"
        m = other.wait_finished(mid, 120)
        summary.note(
            name,
            f"{owner} killed in {at_kill}; {other.member} held the lease {taken:.1f}s later",
        )
        summary.outcome(name, m)
        ends = [e for e in m["timeline"] if e["kind"] == "state" and e["state"] in FINISHED]
        pauses = [e for e in m["timeline"] if e["kind"] == "decision" and e["action"] == "pause"]
        assert len(ends) == 1 and len(pauses) <= 1, timeline_text(m)
        assert m["state"] == "completed", timeline_text(m)
        assert rigctl.where_running(BUSY) == [dst], rigctl.domain_states(BUSY)
        assert rigctl.heartbeats_continue(BUSY, 2.0), f"{BUSY}: heartbeats stopped on {dst}"
        hb = rigctl.last_heartbeat(BUSY)
        assert hb is not None and hb["host"] == dst and hb["bad"] == 0, hb
    finally:
        for daemon in daemons.values():
            if daemon.proc is not None and daemon.proc.poll() is None:
                daemon.stop()
