"""A pause whose link stalls is ended, and the migration started again once the link
carries, on real hosts.

Through the real daemon: a busy guest (32 MiB rewritten at 40 MiB/s) never converges
over the 16 MiB/s link, and the profile may pause it for up to 5 s: lmwatch pauses it
(about 2 s of copy). As soon as the pause shows on the timeline, the test drops every
packet on the migration ports (nftables: what a link that stalls looks like to QEMU;
nothing fails, nothing moves). Nothing moving, the pause would last as long as the
link stays still: lmwatch stops the job within `max_pause`, so the instance runs on
the source again, and, the deadline being far, starts the migration again once the
link carries (the test lets packets through again 10 s after the decision). Checked:
the restart's reason (nothing moved, or, read over a second that began before the
stall, a link slowed to a crawl), the pause's end within `max_pause`, no
violation, one restart, the guest intact on the destination. The simulator's model of
a stall (`tests/test_engine.py`) is what the policy was built on; this is the real
stack's answer: the stop is served while the guest is paused and the stream stalled
(not inside the final copy, where QEMU serves no command).
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

BUSY = "pst-busy"
MAX_PAUSE = 5.0  # seconds
STALLED_FOR = 10.0  # seconds the link stays still after lmwatch decided to start again

PROFILES = pause_profile("pst-pause", MAX_PAUSE, deadline="5m")


daemon = module_daemon(PROFILES)
guest = module_guest(BUSY, write_mib=32, rate_mib=40)


@pytest.fixture
def unstalled() -> Iterator[None]:
    """Whatever happens in the test, the migration ports carry again after it."""
    rigctl.unstall_migration_streams()  # a leftover of an interrupted run
    try:
        yield
    finally:
        rigctl.unstall_migration_streams()


@pytest.mark.scenario("a pause whose link stalls starts the migration again")
def test_a_pause_whose_link_stalls_starts_the_migration_again_once_it_carries(
    daemon: Daemon, summary: Any, unstalled: None
) -> None:
    name = "a pause whose link stalls starts the migration again"
    rigctl.wait_heartbeat(BUSY, 90, 3)  # booted, and the writer has swept its memory
    src = rigctl.where_running(BUSY)[0]
    dst = rigctl.other_host(src)
    mid = daemon.submit(BUSY, src, dst, profile="pst-pause")["id"]
    m = daemon.wait_until(mid, lambda m: "pause" in actions(m), 90, "a pause")
    assert "pause" in actions(m), explain(m)
    rigctl.stall_migration_streams()  # the link stalls under the pause
    stalled_at = time.monotonic()
    m = daemon.wait_until(mid, lambda m: "restart" in actions(m), 60, "a restart")
    assert "restart" in actions(m), explain(m)
    decided_at = time.monotonic()
    decided_after = decided_at - stalled_at
    m = daemon.wait_until(
        mid,
        lambda m: any(e["reason"].startswith("the pause ended") for e in m["timeline"]),
        30,
        "the pause's end",
    )
    # the instance runs on the source again, no job moves anything
    assert rigctl.where_running(BUSY) == [src], explain(m)
    time.sleep(max(0.0, STALLED_FOR - (time.monotonic() - decided_at)))
    shown = daemon.get(mid)
    rigctl.unstall_migration_streams()
    m = daemon.wait_finished(mid, 240)
    summary.outcome(name, m)
    restart, _, stopped = assert_started_again_after_a_pause(m, BUSY, dst, MAX_PAUSE)
    reason = restart["reason"]
    # Read over the last second of the pause, the stall shows as nothing moved, or (the
    # bytes sent just before it still in that second) as a link that slowed to a crawl:
    # either way the job is stopped and a new one tried until the link carries.
    stalled = "nothing has moved" in reason and "starting again once the link carries" in reason
    slowed = "now moves at" in reason and "starting again" in reason
    assert stalled or slowed, explain(m)
    summary.note(
        name,
        f"the pause ended after {stopped:.2f}s (limit {MAX_PAUSE:.0f}s), the stop decided "
        f"{decided_after:.1f}s into the stall (read as {'stalled' if stalled else 'slowed'}); "
        f"{STALLED_FOR:.0f}s after it the migration "
        f"was {shown['state']} (starting again by {shown['starting_again_by']})",
    )
