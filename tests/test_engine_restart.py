"""Engine + store + simulator + real policies: a migration started again at a higher
slow-down start level when the guest's writing outgrew the start plan (also across a
restart of the daemon), and a job that failed while no daemon watched started again."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

from enginerig import EngineRig

from lmwatch.drivers.base import DriverError
from lmwatch.model import Phase, State
from lmwatch.schemas import migration_summary
from lmwatch.store import Store

# A guest that writes 30 MiB/s at the start and 400 MiB/s more every minute, up to
# 2 GiB/s, over a 1 Gbit/s link: at the hypervisor's schedule (20 %, +10 % every two
# passes of minutes) it misses the 30-minute deadline; started again at 80 % it fits.
INVENTORY = """
hosts:
  - {name: a, memory: 512GiB}
  - {name: b, memory: 512GiB}
links:
  - {between: [a, b], bandwidth: 1Gbit/s}
default_bandwidth: 1Gbit/s
instances:
  - name: grower
    host: a
    memory: 32GiB
    working_set: 16GiB
    writer: random
    change_rate: {pattern: growing, start: 30MiB/s, per_minute: 400MiB/s, max: 2GiB/s}
"""

PROFILES = """
profiles:
  - name: batch
    max_blackout: 1s
    may_pause: true
    max_pause: 5s
    may_slow_down: true
    deadline: 30m
    on_deadline: complete
"""


def rig_for(
    tmp_path: Path, *, durable_world: bool = False, store_location: str | None = None
) -> EngineRig:
    return EngineRig(
        tmp_path,
        INVENTORY,
        PROFILES,
        durable_world=durable_world,
        store_location=store_location,
    )


def events(rig: EngineRig, mid: str, kind: str, action: str | None = None) -> list[Any]:
    return [
        e
        for e in rig.store.events(mid)
        if e.kind == kind and (action is None or e.action == action)
    ]


def started_again(rig: EngineRig, mid: str) -> list[Any]:
    return [e for e in events(rig, mid, "state") if "copying started again" in e.reason]


def ended_cancelled(rig: EngineRig, mid: str) -> list[Any]:
    return [e for e in events(rig, mid, "state") if e.state == State.CANCELLED.value]


def counter(rig: EngineRig, name: str) -> float:
    return sum(
        s.value
        for family in rig.metrics.registry.collect()
        if family.name == name
        for s in family.samples
        if s.name.endswith("_total")
    )


async def test_a_growing_writer_is_started_again_once_and_completes(tmp_path: Path) -> None:
    rig = rig_for(tmp_path)
    await rig.engine.start()
    mid = await rig.migrate("grower")
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.state is State.COMPLETED
    assert record.outcome is not None and record.outcome.total_seconds <= 1800
    restarts = events(rig, mid, "decision", "restart")
    assert len(restarts) == 1
    assert "starting again with the slow-down from 80%" in restarts[0].reason
    assert restarts[0].data["rule"] == "start-again"
    again = started_again(rig, mid)
    assert len(again) == 1 and again[0].at >= restarts[0].at
    # The plan in the store is the new one; the API's view counts the restart.
    assert record.plan is not None and record.plan.slow_down_initial == 0.8
    assert record.restart is not None and record.restart.pending is False
    assert migration_summary(record).restarts == 1
    assert counter(rig, "lmwatch_restarts") == 1
    # Never reported cancelled on the way.
    assert not ended_cancelled(rig, mid)
    await rig.engine.stop()
    # What the engine held is exactly what the file holds (plan, restarts, progress,
    # outcome, placement: each encoded and decoded without loss).
    assert rig.store.flush()
    reopened = Store.open(rig.store_path)
    try:
        assert reopened.get(mid) == record
    finally:
        reopened.close()


async def test_the_time_a_job_stopped_to_start_again_took_to_end_is_learned(
    tmp_path: Path,
) -> None:
    """Between hosts where a stopped job ends 4 s after the stop was asked, the job
    stopped to start again at a higher slow-down level (the guest was never paused)
    teaches the host pair's stop time, as a stopped pause or a cancel does: the next
    pause between them gets its last look that long before its bound."""
    rig = rig_for(tmp_path)
    rig.driver.tuning = dataclasses.replace(rig.driver.tuning, cancel_delay=4.0)
    await rig.engine.start()
    try:
        assert rig.engine.stop_time("a", "b") is None
        mid = await rig.migrate("grower")
        assert await rig.clock.run_until(lambda: bool(started_again(rig, mid)), limit=3600)
        assert not events(rig, mid, "decision", "pause")
        stopped = rig.engine.stop_time("a", "b")
        assert stopped is not None and 4.0 <= stopped <= 5.0, stopped
        # on the timeline too, where a restarted daemon reads it back
        assert started_again(rig, mid)[0].data["stop_seconds"] == stopped
    finally:
        await rig.engine.stop()


async def test_a_crash_between_the_cancel_and_the_new_start_starts_it_again(
    tmp_path: Path,
) -> None:
    rig = rig_for(tmp_path)
    await rig.engine.start()
    mid = await rig.migrate("grower")
    cancelled: list[str] = []
    cancel = rig.driver.cancel

    async def record_cancel(migration_id: str) -> None:
        await cancel(migration_id)
        cancelled.append(migration_id)

    rig.driver.cancel = record_cancel  # type: ignore[method-assign]
    assert await rig.clock.run_until(lambda: bool(cancelled), limit=3600)
    await rig.engine.stop()  # lmwatch dies before the job has even ended
    assert rig.store.get(mid).restart.pending is True  # type: ignore[union-attr]
    await rig.clock.advance(10.0)  # the job ends cancelled while nobody watches
    assert (await rig.driver.result(mid)).phase is Phase.CANCELLED
    rig.engine = rig.new_engine()
    await rig.engine.start()
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.state is State.COMPLETED
    assert len(started_again(rig, mid)) == 1
    assert not ended_cancelled(rig, mid)
    assert record.restart is not None and record.restart.count == 1
    assert len(events(rig, mid, "decision", "restart")) == 1
    await rig.engine.stop()


async def test_a_crash_after_the_intent_and_before_the_cancel_cancels_and_starts_again(
    tmp_path: Path, store_location: str
) -> None:
    # The simulated hosts keep their world in the store (file or database): the daemon
    # restarts as beside real hosts, its store opened again, the job running on meanwhile.
    rig = rig_for(tmp_path, durable_world=True, store_location=store_location)
    await rig.engine.start()
    mid = await rig.migrate("grower")
    asked: list[str] = []

    async def never_returns(migration_id: str) -> None:
        asked.append(migration_id)
        await asyncio.Event().wait()  # lmwatch dies before the hypervisor got the cancel

    rig.driver.cancel = never_returns  # type: ignore[method-assign]
    assert await rig.clock.run_until(lambda: bool(asked), limit=3600)
    assert rig.store.get(mid).restart.pending is True  # type: ignore[union-attr]
    await rig.restart(down_for=10.0)  # a new driver on the kept world: the job runs on
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.state is State.COMPLETED
    assert record.plan is not None and record.plan.slow_down_initial == 0.8
    assert len(started_again(rig, mid)) == 1
    assert not ended_cancelled(rig, mid)
    assert any("supervision resumed after a restart" in e.reason for e in events(rig, mid, "note"))
    await rig.engine.stop()


def refusing_starts(rig: EngineRig, refusals: int) -> list[float]:
    """Make the hosts refuse the `refusals` starts after the first (the clock times of
    the refused ones are returned, as they come)."""
    start = rig.driver.start
    refused: list[float] = []
    calls = 0

    async def refuse_after_the_first(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if 1 < calls <= 1 + refusals:
            refused.append(rig.clock.now())
            raise DriverError("b refused the incoming instance")
        await start(*args)

    rig.driver.start = refuse_after_the_first  # type: ignore[method-assign]
    return refused


async def test_a_new_start_the_hosts_refuse_for_a_while_is_tried_again(
    tmp_path: Path,
) -> None:
    """The job stopped to start again at a higher level; the hosts refuse the new job
    twice (a destination's daemon restarting, say): it is tried again every 5 s and
    the migration completes. It used to end failed at the first refusal."""
    rig = rig_for(tmp_path)
    refused = refusing_starts(rig, 2)
    await rig.engine.start()
    mid = await rig.migrate("grower")
    assert await rig.clock.run_until(lambda: bool(refused), limit=3600)
    record = rig.engine.get(mid)
    assert record.state is State.STARTING  # no job runs meanwhile
    assert record.restart is not None and record.restart.start_by is not None
    # while the new job still finishes before the deadline, 10 minutes at most
    assert record.restart.start_by <= refused[0] + rig.settings.policy.restart_wait_seconds
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.state is State.COMPLETED, record.outcome
    assert len(refused) == 2 and refused[1] - refused[0] >= 5.0
    assert record.plan is not None and record.plan.slow_down_initial == 0.8
    assert len(started_again(rig, mid)) == 1
    waiting = [e for e in events(rig, mid, "note") if "could not start again yet" in e.reason]
    assert len(waiting) == 1 and "b refused the incoming instance" in waiting[0].reason
    await rig.engine.stop()


async def test_a_new_start_the_hosts_keep_refusing_ends_the_migration_failed_and_says_why(
    tmp_path: Path,
) -> None:
    rig = rig_for(tmp_path)
    refused = refusing_starts(rig, 10_000)
    await rig.engine.start()
    mid = await rig.migrate("grower")
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.state is State.FAILED
    restart = events(rig, mid, "decision", "restart")[0]
    assert restart.data["rule"] == "start-again"
    assert record.restart is not None and record.restart.start_by is not None
    assert refused[-1] <= record.restart.start_by < refused[-1] + 5.0  # tried until then
    assert len(refused) > 1
    ended = events(rig, mid, "state")[-1]
    assert f"new start failed (tried {len(refused)} times): b refused the incoming" in (
        ended.reason
    )
    assert "keeps running on a" in ended.reason
    assert rig.driver.where("grower") == "a"
    await rig.engine.stop()


STEADY = """
hosts:
  - {name: a, memory: 512GiB}
  - {name: b, memory: 512GiB}
links:
  - {between: [a, b], bandwidth: 1GiB/s}
default_bandwidth: 1GiB/s
instances:
  - {name: steady, host: a, memory: 8GiB, working_set: 256MiB, change_rate: 20MiB/s}
"""


async def test_a_job_that_failed_while_the_daemon_was_down_starts_again_beside_kept_hosts(
    tmp_path: Path, store_location: str
) -> None:
    """The simulated hosts keep their world in the store: the link breaks, the daemon
    stops, and the job fails while it is down (the hypervisor's 30 s); the daemon
    opened again on the same store and world finds the instance on the source without
    a job and starts a new one, which completes once the link is back."""
    rig = EngineRig(tmp_path, STEADY, PROFILES, durable_world=True, store_location=store_location)
    await rig.engine.start()
    mid = await rig.migrate("steady")
    assert await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.COPYING)
    await rig.clock.advance(6.0)  # well into the copy, its rate in a stored progress
    rig.driver.inject_fault("link_break", between=("a", "b"))
    await rig.restart(down_for=60.0)
    rig.driver.inject_fault("link_restore", between=("a", "b"))
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.state is State.COMPLETED, record.outcome
    assert record.restart is not None and record.restart.count == 1
    assert [e.data["rule"] for e in events(rig, mid, "decision", "restart")] == ["job-failed"]
    assert len(started_again(rig, mid)) == 1
    await rig.engine.stop()


async def test_a_start_the_daemon_did_not_live_to_make_is_made_beside_kept_hosts(
    tmp_path: Path, store_location: str
) -> None:
    """The daemon stops between recording its start plan and the hypervisor's start
    (the call never returned): the daemon opened again on the same store and world
    finds the instance on its source with no job and starts the migration, planned
    afresh; it completes, with no restart counted and nothing recorded failed."""
    rig = EngineRig(tmp_path, STEADY, PROFILES, durable_world=True, store_location=store_location)
    reached = asyncio.Event()

    async def never_returns(*args: Any, **kwargs: Any) -> None:
        reached.set()
        await asyncio.Event().wait()

    rig.driver.start = never_returns  # type: ignore[method-assign]
    await rig.engine.start()
    mid = await rig.migrate("steady")
    assert await rig.clock.run_until(reached.is_set)
    assert rig.engine.get(mid).state is State.STARTING
    await rig.restart(down_for=30.0)  # a new driver: its start reaches the hosts
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.state is State.COMPLETED, record.outcome
    assert record.restart is None
    assert rig.driver.where("steady") == "b"
    assert len(events(rig, mid, "decision", "start")) == 2
    note = next(e for e in events(rig, mid, "note") if "left no job" in e.reason)
    assert "the instance runs on a" in note.reason
    await rig.engine.stop()
