"""Operator commands as events in the migration's inbox: the supervision task alone
carries them out, in arrival order, right after the start and between polls."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from enginerig import EngineRig
from test_engine import Rig
from test_engine_disks import DISK_INVENTORY, ONE_PROFILE

from lmwatch.drivers.sim import SimDriver
from lmwatch.errors import Conflict
from lmwatch.model import Action, MigrationRequest, StartPlan, State
from lmwatch.store import MigrationRecord


class SlowStart(SimDriver):
    """The simulator, with a start that waits until the test lets it go on, and a
    count of the cancels the hypervisor was asked for."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.cancels = 0

    async def start(self, migration_id: str, request: MigrationRequest, plan: StartPlan) -> None:
        self.entered.set()
        await self.release.wait()
        await super().start(migration_id, request, plan)

    async def cancel(self, migration_id: str) -> None:
        self.cancels += 1
        await super().cancel(migration_id)


async def _copying(rig: Rig, mid: str) -> None:
    assert await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.COPYING)
    await rig.clock.advance(3.0)


async def test_a_cancel_sent_while_the_start_is_under_way_applies_once_it_returns(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    driver = SlowStart(rig.driver.inventory, rig.clock)
    rig.driver = driver
    rig.engine = rig.new_engine()
    await rig.engine.start()
    mid = await rig.migrate("idle")
    assert await rig.clock.run_until(driver.entered.is_set, limit=120)
    assert rig.engine.get(mid).state is State.STARTING
    cancel = asyncio.ensure_future(rig.engine.cancel(mid))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not cancel.done()  # it waits for the start, which is half done
    assert driver.cancels == 0
    driver.release.set()
    record = await asyncio.wait_for(cancel, timeout=10)
    assert isinstance(record, MigrationRecord)
    await rig.finish(mid)
    assert rig.engine.get(mid).state is State.CANCELLED
    assert driver.cancels == 1
    assert rig.actions(mid) == ["cancel"]
    assert driver.where("idle") == "a"
    await rig.engine.stop()


async def test_a_cancel_then_a_force_at_the_same_moment_apply_in_arrival_order(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    await rig.engine.start()
    mid = await rig.migrate("busy-db")  # 'db': handover allowed
    await _copying(rig, mid)
    cancelled, forced = await asyncio.gather(
        rig.engine.cancel(mid), rig.engine.force_complete(mid), return_exceptions=True
    )
    assert isinstance(cancelled, MigrationRecord)
    assert isinstance(forced, Conflict) and "being cancelled" in str(forced)
    await rig.finish(mid)
    assert rig.engine.get(mid).state is State.CANCELLED
    assert rig.actions(mid) == ["cancel"]  # no handover slipped in
    await rig.engine.stop()


async def test_a_force_then_a_cancel_at_the_same_moment_apply_in_arrival_order(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    await rig.engine.start()
    mid = await rig.migrate("busy-db")
    await _copying(rig, mid)
    forced, cancelled = await asyncio.gather(
        rig.engine.force_complete(mid), rig.engine.cancel(mid), return_exceptions=True
    )
    assert not isinstance(forced, BaseException) and forced.action is Action.HANDOVER
    assert isinstance(cancelled, Conflict) and "handover" in str(cancelled)
    await rig.finish(mid)
    assert rig.engine.get(mid).state is State.COMPLETED
    assert rig.actions(mid) == ["handover"]
    await rig.engine.stop()


async def test_a_command_wakes_the_supervision_at_once_between_polls(tmp_path: Path) -> None:
    """With a minute between polls, the answer still comes without waiting for it."""
    rig = Rig(tmp_path, poll_interval=60.0)
    await rig.engine.start()
    mid = await rig.migrate("busy-db")
    assert await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.COPYING)
    before = rig.clock.now()
    decision = await asyncio.wait_for(rig.engine.force_complete(mid), timeout=10)
    assert decision.action is Action.HANDOVER
    assert rig.clock.now() == before  # virtual time stood still: nothing slept a poll
    await rig.engine.stop()


async def test_a_cancel_during_a_hypervisor_outage_cuts_the_back_off_short(
    tmp_path: Path,
) -> None:
    """The supervision task backs off while the hypervisor does not answer samples; a
    cancel arriving then is carried out at once, not after the back-off."""
    rig = Rig(tmp_path, error_tolerance=600.0)
    await rig.engine.start()
    mid = await rig.migrate("busy-plain")
    await _copying(rig, mid)
    rig.driver.inject_fault("driver_error_on_sample", migration_id=mid, count=10_000)
    await rig.clock.advance(5.0)  # in the outage: the back-off has grown to seconds
    before = rig.clock.now()
    record = await asyncio.wait_for(rig.engine.cancel(mid), timeout=10)
    assert isinstance(record, MigrationRecord)
    assert rig.clock.now() == before
    assert rig.actions(mid) == ["cancel"]
    rig.driver.clear_faults()
    await rig.finish(mid)
    assert rig.engine.get(mid).state is State.CANCELLED
    await rig.engine.stop()


async def test_a_force_pending_during_the_disk_copy_survives_a_restart(tmp_path: Path) -> None:
    """The operator's request to finish, made while the disks were copied, is carried
    out after a restart once they are in sync (paused, as accepted), not forgotten."""
    rig = EngineRig(tmp_path, DISK_INVENTORY, ONE_PROFILE, durable_world=True)
    await rig.engine.start()
    record, _ = await rig.engine.submit(MigrationRequest("files", "a", "b"))
    await rig.clock.advance(4.0)
    decision = await rig.engine.force_complete(record.id, accept_pause=True)
    assert decision.action is Action.CONTINUE and "once the disks are in sync" in decision.reason

    second = await rig.restart()
    assert await rig.clock.run_until(lambda: second.finished([record.id]), limit=600)
    done = second.get(record.id)
    assert done.state is State.COMPLETED
    assert done.outcome is not None and done.outcome.method == "paused"
    events = rig.store.events(record.id)
    pauses = [e for e in events if e.action == "pause"]
    assert len(pauses) == 1
    assert pauses[0].reason.startswith("finishing on request")
    assert (pauses[0].data or {}).get("origin") == "operator"
    restarted = next(i for i, e in enumerate(events) if "resumed after a restart" in e.reason)
    assert events.index(pauses[0]) > restarted
    assert rig.driver.where("files") == "b"
    await second.stop()


async def test_a_command_waiting_when_the_supervision_stops_is_answered(tmp_path: Path) -> None:
    """A cancel waiting while the restarted daemon cannot reach the host again gets a
    clear 409 when the daemon stops, not an answer that never comes."""
    rig = Rig(tmp_path, error_tolerance=900.0)
    await rig.engine.start()
    mid = await rig.migrate("busy-plain")
    await _copying(rig, mid)
    await rig.engine.stop()
    rig.driver.inject_fault("source_gone", host="a", duration=600)
    rig.engine = rig.new_engine()
    await rig.engine.start()
    await rig.clock.advance(2.0)  # re-attaching, backing off: the host does not answer
    cancel = asyncio.ensure_future(rig.engine.cancel(mid))
    await rig.clock.advance(2.0)
    assert not cancel.done()
    await rig.engine.stop()
    with pytest.raises(Conflict, match="stopping"):
        await asyncio.wait_for(cancel, timeout=10)
    assert rig.actions(mid) == []
