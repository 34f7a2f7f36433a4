"""Two moves over one link: a move started while another is stopped for its final
copy must not take part of the bandwidth that stop was sized with."""

from __future__ import annotations

import asyncio
from pathlib import Path

from enginerig import EngineRig

from lmwatch.engine import EngineSettings
from lmwatch.model import Phase, State

# One fast link, two quiet instances: each stops with a remainder of about
# bandwidth x budget, copied in the stop at the share the move had when it stopped.
INVENTORY = """
hosts:
  - {name: a, memory: 64GiB}
  - {name: b, memory: 64GiB}
links:
  - {between: [a, b], bandwidth: 25Gbit/s}
default_bandwidth: 1Gbit/s
instances:
  - {name: first, host: a, memory: 4GiB, working_set: 128MiB, change_rate: 10MiB/s}
  - {name: second, host: a, memory: 4GiB, working_set: 128MiB, change_rate: 10MiB/s}
"""
PROFILES = """
profiles:
  - name: quick
    max_blackout: 500ms
    deadline: 10m
    on_deadline: cancel
"""


async def test_a_move_does_not_join_a_link_while_another_is_in_its_final_stop(
    tmp_path: Path,
) -> None:
    rig = EngineRig(
        tmp_path, INVENTORY, PROFILES, EngineSettings(poll_interval=1.0, max_per_destination=2)
    )
    await rig.engine.start()
    try:
        first = await rig.submit("first", "b")
        # Step until the hypervisor has stopped the first guest for its final copy.
        for _ in range(2000):
            await rig.clock.advance(0.005)
            if (await rig.driver.sample(first)).phase is Phase.COMPLETING:
                break
        else:
            raise AssertionError("the first move never reached its final stop")
        stop_began = rig.clock.now()
        second = await rig.submit("second", "b")
        await rig.finish(first, second)
        for mid in (first, second):
            record = rig.engine.get(mid)
            assert record.state is State.COMPLETED
            assert record.outcome is not None
            assert record.outcome.blackout_seconds <= 0.5, record.outcome
            assert not [e for e in rig.store.events(mid) if e.kind == "violation"]
        # The second started only once the first had left its stop (not merely queued:
        # the per-destination limit let it start at once).
        started = rig.engine.get(second).started_at
        done = rig.engine.get(first).finished_at
        assert started is not None and done is not None
        assert stop_began < started
        assert started >= done - rig.engine.settings.poll_interval
    finally:
        await rig.engine.stop()


SLOW_LINK = INVENTORY.replace("bandwidth: 25Gbit/s", "bandwidth: 1Gbit/s")


async def test_a_cancel_cuts_short_the_wait_for_a_finishing_move_on_the_link(
    tmp_path: Path,
) -> None:
    """A move waiting to join a link is not deaf: a cancel sent meanwhile is carried
    out at once, not after the other move's long final copy."""
    rig = EngineRig(
        tmp_path, SLOW_LINK, PROFILES, EngineSettings(poll_interval=1.0, max_per_destination=2)
    )
    await rig.engine.start()
    try:
        first = await rig.submit("first", "b")
        await rig.clock.advance(0.5)
        await rig.driver.pause(first)  # 4GiB left at 1Gbit/s: a stop of about 34 s
        assert (await rig.driver.sample(first)).phase is Phase.COMPLETING
        second = await rig.submit("second", "b")
        await rig.clock.advance(1.0)
        assert rig.engine.get(second).state is State.STARTING  # waiting for the link
        asked = rig.clock.now()
        cancel = asyncio.ensure_future(rig.engine.cancel(second))
        done = await rig.clock.run_until(cancel.done, limit=60)
        assert done and rig.clock.now() - asked < 5.0
        assert (await rig.driver.sample(first)).phase is Phase.COMPLETING  # still stopped
        await rig.finish(second)
        assert rig.engine.get(second).state is State.CANCELLED
    finally:
        await rig.engine.stop()
