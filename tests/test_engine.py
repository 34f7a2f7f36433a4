"""Engine + store + simulator + real policies, whole migrations in virtual time."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from enginerig import EngineRig
from storetools import on_disk, run_sql

from lmwatch import render, schemas
from lmwatch.drivers.base import ActionRefused
from lmwatch.drivers.inventory import load_inventory_text
from lmwatch.drivers.sim import SimDriver
from lmwatch.engine import Engine, EngineSettings
from lmwatch.errors import Conflict, Invalid
from lmwatch.metrics import Metrics
from lmwatch.model import Capabilities, ChangeRate, JobResult, Method, Phase, Sample, State
from lmwatch.policies import DEFAULT
from lmwatch.profiles import ProfileRegistry
from lmwatch.store import SCHEMA_VERSION, MigrationRecord, Store, StoreError, is_database_url

INVENTORY = """
hosts:
  - {name: a, memory: 512GiB}
  - {name: b, memory: 512GiB}
  - {name: c, memory: 2GiB}
links:
  - {between: [a, b], bandwidth: 1GiB/s}
default_bandwidth: 1GiB/s
instances:
  - {name: idle, host: a, memory: 4GiB, working_set: 64MiB, change_rate: 1MiB/s}
  - {name: idle2, host: a, memory: 2GiB, working_set: 64MiB, change_rate: 1MiB/s}
  - {name: idle3, host: a, memory: 2GiB, working_set: 64MiB, change_rate: 1MiB/s}
  - name: busy-db
    host: a
    memory: 16GiB
    working_set: 4GiB
    change_rate: 1500MiB/s
    labels: {tier: database}
  - name: busy-batch
    host: a
    memory: 16GiB
    working_set: 4GiB
    change_rate: 1500MiB/s
    labels: {tier: batch}
  - name: busy-plain
    host: a
    memory: 16GiB
    working_set: 4GiB
    change_rate: 1500MiB/s
  - {name: big, host: a, memory: 8GiB, working_set: 64MiB, change_rate: 1MiB/s}
  - name: busy-slow
    host: a
    memory: 16GiB
    working_set: 16GiB
    change_rate: 3000MiB/s
    labels: {tier: slow}
  - {name: idle-slow, host: a, memory: 2GiB, working_set: 64MiB, change_rate: 1MiB/s,
     labels: {tier: slow}}
"""

PROFILES = """
profiles:
  - name: db
    match: {labels: {tier: database}}
    max_blackout: 300ms
    handover: allowed
    max_degraded: 60s
    deadline: 20m
    on_deadline: complete
  - name: batch
    match: {labels: {tier: batch}}
    max_blackout: 1s
    may_pause: true
    max_pause: 10s
    deadline: 30m
    on_deadline: complete
  - name: slowable
    match: {labels: {tier: slow}}
    max_blackout: 300ms
    may_slow_down: true
    deadline: 1h
    on_deadline: cancel
  - name: strict
    max_blackout: 300ms
    deadline: 2h
    on_deadline: cancel
"""


class Rig(EngineRig):
    """An engine on the inventory above, in virtual time; each new engine counts its
    metrics from zero, as a restarted daemon does."""

    def __init__(
        self,
        tmp_path: Path,
        profiles: str = PROFILES,
        *,
        inventory: str = INVENTORY,
        store_location: str | None = None,
        **settings: object,
    ) -> None:
        super().__init__(
            tmp_path,
            inventory,
            profiles,
            EngineSettings(**settings),  # type: ignore[arg-type]
            store_location=store_location,
        )

    def new_engine(self) -> Engine:
        self.metrics = Metrics()
        return super().new_engine()


@pytest.fixture
async def rig(tmp_path: Path) -> Rig:
    rig = Rig(tmp_path)
    await rig.engine.start()
    yield rig
    await rig.engine.stop()


async def test_idle_instance_converges_without_any_forcing_decision(rig: Rig) -> None:
    mid = await rig.migrate("idle")
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.state is State.COMPLETED
    assert record.outcome is not None
    assert record.outcome.method == Method.CONVERGED.value
    assert rig.actions(mid) == []
    assert rig.driver.where("idle") == "b"
    # 4 GiB over 1 GiB/s: about four seconds plus a short last pass.
    assert 3.5 < record.outcome.total_seconds < 15
    assert record.progress is not None and record.progress.memory_remaining == 0


async def test_unchanged_continue_decisions_are_not_logged_every_poll(rig: Rig) -> None:
    mid = await rig.migrate("big")  # 8 GiB over 1 GiB/s: a first pass of eight polls
    await rig.finish(mid)
    continues = [e for e in rig.store.events(mid) if e.action == "continue"]
    assert 1 <= len(continues) <= 3


async def test_never_converging_database_is_handed_over(rig: Rig) -> None:
    mid = await rig.migrate("busy-db")
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.state is State.COMPLETED
    assert record.outcome is not None
    assert record.outcome.method == Method.HANDOVER.value
    assert "handover" in rig.actions(mid)
    assert "pause" not in rig.actions(mid)
    # Decided from the rates soon after the first pass, not at the 20 minute deadline.
    assert record.outcome.total_seconds < 120


async def test_never_converging_batch_is_paused_within_max_pause(rig: Rig) -> None:
    mid = await rig.migrate("busy-batch")
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.outcome is not None
    assert record.outcome.method == Method.PAUSED.value
    assert record.outcome.blackout_seconds is not None
    assert record.outcome.blackout_seconds <= 10.0
    assert "handover" not in rig.actions(mid)


@pytest.mark.parametrize("restarted_while_waiting", [False, True])
async def test_a_pause_whose_link_breaks_for_good_is_ended_within_max_pause(
    rig: Rig, restarted_while_waiting: bool
) -> None:
    """The link breaks right after lmwatch paused the guest and never comes back:
    waiting would keep it stopped until the link times out (30s, over `max_pause` of
    10s). lmwatch stops the job instead, and the instance runs on the source again well
    within the bound; a new job is tried for `restart_wait_seconds` (10 minutes), and
    the migration ends failed with the instance still on the source. Its end says the
    job was stopped to start again, also when another daemon took over the waiting
    (which did not see the stop: it said the job failed)."""
    mid = await rig.migrate("busy-batch")
    assert await rig.clock.run_until(lambda: "pause" in rig.actions(mid), limit=3600)
    rig.driver.inject_fault("link_break", between=("a", "b"))
    if restarted_while_waiting:
        assert await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.STARTING)
        await rig.restart(down_for=5.0)
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.state is State.FAILED, record.outcome
    assert record.outcome is not None and record.outcome.running_on == "a"
    events = rig.store.events(mid)
    paused = next(e for e in events if e.action == "pause")
    restart = next(e for e in events if e.action == "restart")
    assert "nothing has moved" in restart.reason and "resumes on the source" in restart.reason
    ended = next(e for e in events if e.reason.startswith("the pause ended"))
    assert ended.at - paused.at <= 10.0 and ended.data["paused_seconds"] <= 10.0
    failed = next(e for e in events if e.kind == "state" and e.state == State.FAILED.value)
    assert "was stopped to start again, but the new start failed (tried" in failed.reason
    wait = DEFAULT.restart_wait_seconds
    assert wait - 5.0 <= failed.at - restart.at <= wait + 5.0
    assert rig.driver.where("busy-batch") == "a"
    assert not [e for e in events if e.kind == "violation"]


WIDE = """
  - name: wide-batch
    host: a
    memory: 32GiB
    working_set: 8704MiB
    change_rate: 3000MiB/s
    labels: {tier: batch}
"""


async def wide_rig(tmp_path: Path, cancel_delay: float) -> Rig:
    """A started engine on the inventory with `wide-batch`, on hosts where a stopped job
    ends `cancel_delay` seconds after the stop was asked."""
    rig = Rig(tmp_path, inventory=INVENTORY + WIDE)
    rig.driver.tuning = dataclasses.replace(rig.driver.tuning, cancel_delay=cancel_delay)
    await rig.engine.start()
    return rig


async def paused_wide_batch(rig: Rig) -> tuple[str, Any]:
    """`wide-batch` migrated until lmwatch pauses it: its id and the pause's decision."""
    mid = await rig.migrate("wide-batch")
    assert await rig.clock.run_until(lambda: "pause" in rig.actions(mid), limit=3600)
    return mid, next(e for e in rig.store.events(mid) if e.action == "pause")


async def test_a_pause_whose_link_breaks_near_its_end_is_stopped_at_its_last_look(
    tmp_path: Path,
) -> None:
    """A pause of about 8.5 s (`max_pause` 10 s) on hosts where a stopped job resumes
    the instance `cancel_resume` (3 s) later, the longest the policy allows for. The
    last look that can keep the pause within 10 s is then at 7 s: the engine samples
    the pause then, and half a second before, and the link breaks 6.7 s in, with 1.8
    GiB still to copy: the job is stopped at 7 s on what that half second shows.
    Sampled once a second only, the second before 7 s would still say the rest arrives
    in time, the break would show at 8 s, and the instance would run again past its
    bound. (The deadline being far, the migration starts again; the
    new job fails on the broken link.)"""
    rig = await wide_rig(tmp_path, DEFAULT.cancel_resume)
    try:
        mid, paused = await paused_wide_batch(rig)
        assert "8.5s paused" in paused.reason or "8.6s paused" in paused.reason, paused.reason
        last_look = 10.0 - DEFAULT.cancel_resume
        await rig.clock.advance(paused.at + last_look - 0.3 - rig.clock.now())
        rig.driver.inject_fault("link_break", between=("a", "b"))
        await rig.finish(mid)
        events = rig.store.events(mid)
        stop = next(e for e in events if e.action in ("cancel", "restart"))
        assert stop.data["rule"] == "pause-outlasts-bound", stop.reason
        assert stop.at - paused.at == pytest.approx(last_look, abs=0.01)
        ended = next(e for e in events if e.reason.startswith("the pause ended"))
        assert ended.data["paused_seconds"] <= 10.0, ended.reason
        assert not [e for e in events if e.kind == "violation"]
        assert rig.driver.where("wide-batch") == "a"
    finally:
        await rig.engine.stop()


async def test_a_pause_keeps_its_last_look_across_a_restart_of_lmwatch(tmp_path: Path) -> None:
    """lmwatch restarts 1 s into a pause of about 8.5 s (`max_pause` 10 s). The new daemon
    reads when the pause began from the timeline, so the pause keeps its last look at
    7 s (stops take 3 s here, the policy's allowance) and its bound: the link breaks at
    6.7 s and the job is stopped at 7 s. Counted from the first sample the new daemon
    took, the pause would have looked 1.5 s too young."""
    rig = await wide_rig(tmp_path, DEFAULT.cancel_resume)
    mid, paused = await paused_wide_batch(rig)
    await rig.clock.advance(paused.at + 1.0 - rig.clock.now())
    await rig.restart(down_for=0.5)
    try:
        last_look = 10.0 - DEFAULT.cancel_resume
        await rig.clock.advance(paused.at + last_look - 0.3 - rig.clock.now())
        rig.driver.inject_fault("link_break", between=("a", "b"))
        await rig.finish(mid)
        events = rig.store.events(mid)
        assert [e for e in events if e.reason == "supervision resumed after a restart"]
        stop = next(e for e in events if e.action in ("cancel", "restart"))
        assert stop.data["rule"] == "pause-outlasts-bound", stop.reason
        assert stop.at - paused.at == pytest.approx(last_look, abs=0.01), stop.reason
        assert not [e for e in events if e.kind == "violation"]
    finally:
        await rig.engine.stop()


async def test_a_stop_measured_slower_than_allowed_brings_the_next_last_look_forward(
    tmp_path: Path,
) -> None:
    """Between hosts where a stopped job ends 4 s after the stop was asked (longer than
    the 3 s the policy allows by default), the first pause's link breaks at once and
    the job is stopped (the link stays down: no new job starts, and the migration ends
    failed, the instance on the source): lmwatch learns the 4 s. The next pause on these
    hosts gets its last look 4 s before its bound ends, at 6 s, and half a second
    before: its link, breaking at 5.77 s, is caught there, and the instance runs again
    within the 10 s.
    (Read over the second before 6 s, as at any other look, the rest would still arrive
    in time; 3 s before the bound, half a second before 7 s, a stop would end the pause
    at 10.5 s.)"""
    rig = await wide_rig(tmp_path, 4.0)
    try:
        first, _ = await paused_wide_batch(rig)
        rig.driver.inject_fault("link_break", between=("a", "b"))
        await rig.finish(first)
        assert rig.engine.get(first).state is State.FAILED
        assert rig.driver.where("wide-batch") == "a"
        rig.driver.inject_fault("link_restore", between=("a", "b"))
        second, paused = await paused_wide_batch(rig)
        await rig.clock.advance(paused.at + 5.77 - rig.clock.now())
        rig.driver.inject_fault("link_break", between=("a", "b"))
        await rig.finish(second)
        events = rig.store.events(second)
        stop = next(e for e in events if e.action in ("cancel", "restart"))
        assert stop.at - paused.at == pytest.approx(6.0, abs=0.01), stop.reason
        ended = next(e for e in events if e.reason.startswith("the pause ended"))
        assert ended.data["paused_seconds"] <= 10.0 + 1e-6, ended.reason
        assert "4.00s after the job was stopped" in ended.reason
        assert not [e for e in events if e.kind == "violation"]
    finally:
        await rig.engine.stop()


async def test_the_stop_times_learned_are_learned_again_after_a_restart_of_lmwatch(
    tmp_path: Path,
) -> None:
    """Between hosts where a stopped job ends 4 s after the stop was asked, an
    operator's cancel teaches the 4 s (the cancelled end on the timeline says so); the
    daemon restarted reads it back, so its first pause between these hosts gets its
    last look 4 s before the bound, not the 3 s allowed by default."""
    rig = await wide_rig(tmp_path, 4.0)
    try:
        mid = await rig.migrate("big")
        await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.COPYING)
        await rig.engine.cancel(mid)
        await rig.finish(mid)
        ended = rig.store.events(mid)[-1]
        assert ended.state == State.CANCELLED.value
        assert ended.data["stop_seconds"] == pytest.approx(4.0, abs=1.0)
        await rig.restart()
        assert rig.engine.stop_time("a", "b") == pytest.approx(ended.data["stop_seconds"])
    finally:
        await rig.engine.stop()


async def _completed_after_one_restart(rig: Rig, mid: str) -> tuple[MigrationRecord, list[Any]]:
    """Run `mid` (busy-batch) to its end: it completed on b after one restart. Its
    record and timeline."""
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.state is State.COMPLETED, record.outcome
    assert record.restart is not None and record.restart.count == 1
    assert rig.driver.where("busy-batch") == "b"
    return record, rig.store.events(mid)


async def test_a_pause_the_link_slows_is_ended_and_the_migration_started_again(rig: Rig) -> None:
    """The link falls to 5 % right after lmwatch paused the guest: the pause would
    outlast `max_pause` (10s), so the job is stopped and the instance runs on the
    source again; the deadline (30m) leaves time for a new job, so the migration
    starts again instead of ending cancelled, and completes once the link is back."""
    mid = await rig.migrate("busy-batch")
    assert await rig.clock.run_until(lambda: "pause" in rig.actions(mid), limit=3600)
    rig.driver.inject_fault("link_slow", between=("a", "b"), share=0.05)
    assert await rig.clock.run_until(lambda: "restart" in rig.actions(mid), limit=600)
    rig.driver.inject_fault("link_restore", between=("a", "b"))
    record, events = await _completed_after_one_restart(rig, mid)
    paused = next(e for e in events if e.action == "pause")
    restart = next(e for e in events if e.action == "restart")
    assert restart.data["rule"] == "pause-outlasts-bound"
    assert "now moves at" in restart.reason and "starting again" in restart.reason
    ended = next(e for e in events if e.reason.startswith("the pause ended"))
    again = next(e for e in events if e.reason.startswith("copying started again"))
    assert paused.at < restart.at <= ended.at <= again.at
    assert ended.data["paused_seconds"] <= 10.0 and "runs on a again" in ended.reason
    assert not [e for e in events if e.kind == "violation"]
    # the new job was free to pause again; its pause is the one the outcome shows
    assert record.outcome is not None
    assert record.paused is (record.outcome.method == Method.PAUSED.value)


async def test_a_pause_whose_link_breaks_is_ended_and_started_again_once_the_link_carries(
    rig: Rig,
) -> None:
    """The link breaks right after lmwatch paused the guest: nothing moves, so the
    pause would last as long as the link stays down. The job is stopped and the
    instance runs on the source again within `max_pause` (10 s); a new job is tried
    every 5 s and starts once the link is back (it used to end the migration
    cancelled, as if a link down for a while were down for good)."""
    mid = await rig.migrate("busy-batch")
    assert await rig.clock.run_until(lambda: "pause" in rig.actions(mid), limit=3600)
    rig.driver.inject_fault("link_break", between=("a", "b"))
    assert await rig.clock.run_until(lambda: "restart" in rig.actions(mid), limit=600)
    await rig.clock.advance(40.0)
    record = rig.engine.get(mid)
    # waiting for the link: no job runs, the instance on the source (it said
    # "completing", the state of the job it paused, until a new job started)
    assert record.state is State.STARTING, record.outcome
    assert record.restart is not None and record.restart.pending
    assert record.restart.start_by is not None
    assert rig.driver.where("busy-batch") == "a"
    with pytest.raises(Conflict, match="waits to start again"):
        await rig.engine.force_complete(mid)
    # the stopped job's progress, its ETA and its gauges are gone: they said it would
    # finish soon (a pause of a few seconds)
    assert record.progress is None
    rendered = rig.engine.metrics.render().decode()
    assert "lmwatch_migration_eta_seconds{" not in rendered
    assert "lmwatch_migration_remaining_bytes{" not in rendered
    # the view says so, and until when (the API's body and `lmwatch show`)
    view = schemas.migration(record, rig.store.events(mid)).model_dump(mode="json")
    by = datetime.fromtimestamp(record.restart.start_by, UTC)
    assert datetime.fromisoformat(view["starting_again_by"]) == by
    assert f"waiting    to start again, trying until {view['starting_again_by']}" in (
        render.migration_detail(view)
    )
    rig.driver.inject_fault("link_restore", between=("a", "b"))
    assert await rig.clock.run_until(
        lambda: "lmwatch_migration_eta_seconds{" in rig.engine.metrics.render().decode()
    )  # the new job's, once it runs
    record, events = await _completed_after_one_restart(rig, mid)
    assert schemas.migration_summary(record).starting_again_by is None
    restart = next(e for e in events if e.action == "restart")
    assert restart.data["rule"] == "pause-outlasts-bound"
    assert "nothing has moved" in restart.reason
    assert "starting again once the link carries" in restart.reason
    ended = next(e for e in events if e.reason.startswith("the pause ended"))
    waiting = next(e for e in events if e.reason.startswith("could not start again yet"))
    again = next(e for e in events if e.reason.startswith("copying started again"))
    assert restart.at <= ended.at <= waiting.at < again.at
    assert again.at - restart.at >= 40.0  # not before the link came back
    assert ended.data["paused_seconds"] <= 10.0 and "runs on a again" in ended.reason
    assert not [e for e in events if e.kind == "violation"]


async def test_a_restart_of_lmwatch_while_the_paused_job_stops_still_ends_the_pause_first(
    tmp_path: Path, store_location: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lmwatch stops right after deciding to start again from a stretched pause (the
    intent is recorded, the job being stopped). The next daemon finds the job ended,
    records the pause's end (the instance runs on the source again) and starts the
    new job: one start again, one end of the pause, the migration completes."""
    rig = Rig(tmp_path, store_location=store_location)
    await rig.engine.start()
    mid = await rig.migrate("busy-batch")
    assert await rig.clock.run_until(lambda: "pause" in rig.actions(mid), limit=3600)
    rig.driver.inject_fault("link_slow", between=("a", "b"), share=0.05)
    assert await rig.clock.run_until(lambda: "restart" in rig.actions(mid), limit=600)
    record = rig.engine.get(mid)
    assert record.restart is not None and record.restart.pending and record.paused
    asked: list[bool] = []
    reattach = SimDriver.reattach

    async def reattach_noting_the_pause(*args: Any, paused: bool = False) -> Any:
        asked.append(paused)  # the driver is told the pause was lmwatch's
        return await reattach(*args, paused=paused)

    monkeypatch.setattr(SimDriver, "reattach", reattach_noting_the_pause)
    await rig.restart(down_for=5.0)
    rig.driver.inject_fault("link_restore", between=("a", "b"))
    await rig.finish(mid)
    assert asked == [True]
    record = rig.engine.get(mid)
    assert record.state is State.COMPLETED, record.outcome
    assert record.restart is not None and record.restart.count == 1
    events = rig.store.events(mid)
    assert len([e for e in events if e.reason.startswith("the pause ended")]) == 1
    assert len([e for e in events if e.reason.startswith("copying started again")]) == 1
    assert len([e for e in events if e.reason == "supervision resumed after a restart"]) == 1
    await rig.engine.stop()


async def test_hopeless_instance_is_cancelled_early_with_the_reason(rig: Rig) -> None:
    mid = await rig.migrate("busy-plain")
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.state is State.CANCELLED
    assert record.outcome is not None
    # The deadline was two hours: a steady, hopeless workload is given up on once
    # patience (three quarters of it: workloads change phase) has run out, before the
    # deadline itself.
    patience = rig.settings.policy.patience * 7200
    assert patience <= record.outcome.total_seconds < patience + 60 < 7200
    cancel = [e for e in rig.store.events(mid) if e.action == "cancel"]
    assert cancel and "steady" in cancel[0].reason
    assert cancel[0].data["rule"] == "waiting-stopped-paying"
    assert rig.driver.where("busy-plain") == "a"
    # Every decision says which rule made it; "continue" is logged again when the rule
    # changes (or after a while), never because a number in the text moved.
    decisions = [e for e in rig.store.events(mid) if e.kind == "decision" and e.action != "start"]
    assert decisions and all(e.data.get("rule") for e in decisions)
    continues = [e for e in decisions if e.action == "continue"]
    for before, after in itertools.pairwise(continues):
        assert (
            before.data["rule"] != after.data["rule"]
            or after.at - before.at >= rig.settings.continue_log_interval - 1e-6
        )


async def test_restart_mid_migration_supervises_to_the_end_exactly_once(
    tmp_path: Path, store_location: str
) -> None:
    rig = Rig(tmp_path, store_location=store_location)
    await rig.engine.start()
    mid = await rig.migrate("big")
    await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.COPYING)
    await rig.clock.advance(2.0)
    await rig.engine.stop()
    # The job goes on without a supervisor; a new engine on the same store takes it back.
    second = rig.new_engine()
    rig.engine = second
    await second.start()
    await rig.finish(mid)
    record = second.get(mid)
    assert record.state is State.COMPLETED
    finished = [e for e in rig.store.events(mid) if e.kind == "state" and e.state == "completed"]
    assert len(finished) == 1
    assert any("resumed after a restart" in e.reason for e in rig.store.events(mid))
    samples = {
        s.name: s.samples
        for s in second.metrics.registry.collect()
        if s.name == "lmwatch_migrations_finished"
    }
    total = sum(
        s.value for s in samples["lmwatch_migrations_finished"] if s.name.endswith("_total")
    )
    assert total == 1
    await second.stop()


async def test_restart_after_the_job_ended_unwatched_records_the_truth(
    tmp_path: Path, store_location: str
) -> None:
    rig = Rig(tmp_path, store_location=store_location)
    await rig.engine.start()
    mid = await rig.migrate("idle")
    await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.COPYING)
    await rig.engine.stop()
    await rig.clock.advance(600)  # the job completes while nobody watches
    second = rig.new_engine()
    await second.start()
    await rig.clock.run_until(lambda: second.get(mid).state.finished)
    assert second.get(mid).state is State.COMPLETED
    await second.stop()


async def test_per_source_limit_queues_the_rest(tmp_path: Path) -> None:
    rig = Rig(tmp_path, max_per_source=1)
    await rig.engine.start()
    ids = [await rig.migrate(name) for name in ("idle", "idle2", "idle3")]
    peak = 0

    def observe() -> bool:
        nonlocal peak
        running = [i for i in ids if rig.engine.get(i).state not in (State.QUEUED,)]
        active = [i for i in running if not rig.engine.get(i).state.finished]
        peak = max(peak, len(active))
        return rig.engine.finished(ids)

    assert await rig.clock.run_until(observe, limit=3600)
    assert peak == 1
    assert all(rig.engine.get(i).state is State.COMPLETED for i in ids)
    await rig.engine.stop()


async def test_driver_error_fails_one_migration_and_the_others_go_on(tmp_path: Path) -> None:
    rig = Rig(tmp_path, error_tolerance=20.0)
    await rig.engine.start()
    broken = await rig.migrate("big")
    healthy = await rig.migrate("idle", "a", "b")
    await rig.clock.run_until(lambda: rig.engine.get(broken).state is State.COPYING)
    rig.driver.inject_fault("driver_error_on_sample", migration_id=broken, count=10_000)
    await rig.finish(broken, healthy)
    failed = rig.engine.get(broken)
    assert failed.state is State.FAILED
    assert failed.outcome is not None and "did not answer" in str(
        [e.reason for e in rig.store.events(broken)]
    )
    assert rig.engine.get(healthy).state is State.COMPLETED
    await rig.engine.stop()


async def test_second_migration_of_the_same_instance_conflicts(rig: Rig) -> None:
    await rig.migrate("big")
    before = len(rig.store.list())
    with pytest.raises(Conflict):
        await rig.migrate("big")
    with pytest.raises(Invalid):
        await rig.migrate("idle", "a", "a")
    assert len(rig.store.list()) == before


async def test_cancel_after_completion_conflicts_and_changes_nothing(rig: Rig) -> None:
    mid = await rig.migrate("idle")
    await rig.finish(mid)
    events = len(rig.store.events(mid))
    with pytest.raises(Conflict):
        await rig.engine.cancel(mid)
    assert len(rig.store.events(mid)) == events
    assert rig.engine.get(mid).state is State.COMPLETED


async def test_operator_cancel_leaves_the_instance_on_the_source(rig: Rig) -> None:
    mid = await rig.migrate("big")
    await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.COPYING)
    await rig.engine.cancel(mid)
    await rig.finish(mid)
    assert rig.engine.get(mid).state is State.CANCELLED
    assert rig.driver.where("big") == "a"


async def test_force_complete_hands_over_when_the_profile_allows(rig: Rig) -> None:
    mid = await rig.migrate("busy-db")
    await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.COPYING)
    await rig.clock.advance(3.0)
    decision = await rig.engine.force_complete(mid)
    assert decision.action.value in ("handover", "raise-blackout")
    await rig.finish(mid)
    assert rig.engine.get(mid).state is State.COMPLETED


async def test_force_complete_refused_when_the_profile_allows_nothing(rig: Rig) -> None:
    mid = await rig.migrate("busy-plain")
    await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.COPYING)
    await rig.clock.advance(3.0)
    with pytest.raises(Conflict):
        await rig.engine.force_complete(mid)
    decision = await rig.engine.force_complete(mid, accept_pause=True)
    assert decision.action.value == "pause"
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.outcome is not None and record.outcome.method == "paused"


async def test_an_accepted_pause_stays_the_operators_after_a_restart(
    tmp_path: Path, store_location: str
) -> None:
    """The profile allows no pause; the operator forced one and accepted it. A restart
    mid-pause must not hold it to the profile's bound (which would cancel it)."""
    rig = Rig(tmp_path, store_location=store_location)
    await rig.engine.start()
    mid = await rig.migrate("busy-plain")
    await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.COPYING)
    await rig.clock.advance(3.0)
    decision = await rig.engine.force_complete(mid, accept_pause=True)
    assert decision.action.value == "pause"
    await rig.clock.advance(1.0)
    await rig.engine.stop()
    rig.engine = rig.new_engine()
    await rig.engine.start()
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.outcome is not None and record.outcome.method == "paused", record.outcome
    await rig.engine.stop()


async def test_a_pause_is_a_violation_even_when_the_migration_then_fails(rig: Rig) -> None:
    """The operator forced a pause the profile does not allow; the link then broke and
    the migration failed 30s later. The instance was stopped all that time: the
    timeline and the metric say the profile was exceeded, as on a completion."""
    mid = await rig.migrate("busy-plain")
    await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.COPYING)
    await rig.clock.advance(3.0)
    await rig.engine.force_complete(mid, accept_pause=True)
    rig.driver.inject_fault("link_break", between=("a", "b"))
    await rig.finish(mid)
    assert rig.engine.get(mid).state is State.FAILED
    violations = [e for e in rig.store.events(mid) if e.kind == "violation"]
    assert [v.reason for v in violations] == [
        "profile 'strict' exceeded: paused though not allowed"
    ]
    sample = rig.engine.metrics.registry.get_sample_value(
        "lmwatch_profile_violations_total", {"profile": "strict", "kind": "pause"}
    )
    assert sample == 1


async def test_profile_edit_mid_migration_is_applied_or_explained(rig: Rig) -> None:
    mid = await rig.migrate("busy-plain")
    await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.COPYING)
    # Grant pause and handover to the fallback profile while copying.
    edited = PROFILES.replace(
        "  - name: strict\n    max_blackout: 300ms\n",
        "  - name: strict\n    max_blackout: 300ms\n    handover: allowed\n"
        "    may_pause: true\n    max_pause: 10s\n",
    )
    rig.profile_file.write_text(edited)
    rig.registry.reload()
    await rig.finish(mid)
    events = rig.store.events(mid)
    notes = [e.reason for e in events if e.kind == "note"]
    assert any("edited profile" in n for n in notes)
    # Handover was not armed at start: the log says so, and the pause is used instead.
    assert any("handover" in n for n in notes[1:]) or any("handover" in n for n in notes)
    record = rig.engine.get(mid)
    assert record.outcome is not None
    assert record.outcome.method == "paused"
    assert "handover" not in rig.actions(mid)


async def test_a_budget_lowered_to_nothing_stays_lowered_and_the_deadline_still_comes(
    rig: Rig,
) -> None:
    # An operator tightens the profile below what the switchover alone takes (50 ms
    # assumed): the budget goes to 0 once, and the profile's deadline still ends it.
    mid = await rig.migrate("busy-plain")
    await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.COPYING)
    rig.profile_file.write_text(
        PROFILES.replace(
            "  - name: strict\n    max_blackout: 300ms\n    deadline: 2h\n",
            "  - name: strict\n    max_blackout: 40ms\n    deadline: 10m\n",
        )
    )
    rig.registry.reload()
    await rig.finish(mid, limit=3600)
    record = rig.engine.get(mid)
    assert record.state is State.CANCELLED
    assert record.blackout_budget == 0.0
    lowered = [e.reason for e in rig.store.events(mid) if "lowering the budget" in e.reason]
    assert len(lowered) == 1, lowered
    assert lowered[0].endswith("to 0ms")


async def test_accepted_request_is_durable_before_it_is_acknowledged(
    tmp_path: Path, store_location: str
) -> None:
    rig = Rig(tmp_path, store_location=store_location)
    await rig.engine.start()
    mid = await rig.migrate("idle")
    # A connection of its own to the same database sees it at once.
    assert on_disk(store_location, "SELECT instance FROM migrations WHERE id=?", mid) == [("idle",)]
    await rig.engine.stop()
    rig.store.close()


def test_store_refuses_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        Store.open(tmp_path / "gone" / "lmwatch.db")


def test_store_refuses_a_read_only_file(tmp_path: Path) -> None:
    path = tmp_path / "lmwatch.db"
    Store.open(path).close()
    path.chmod(0o444)
    try:
        with pytest.raises(StoreError, match="not writable"):
            Store.open(path)
    finally:
        path.chmod(0o644)


async def test_engine_keeps_running_when_one_supervisor_crashes(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmwatch import policies

    original = policies.decide
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("bug in a policy")
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(policies, "decide", flaky)
    first = await rig.migrate("big")
    await rig.finish(first)
    assert rig.engine.get(first).state is State.FAILED
    second = await rig.migrate("idle")
    await rig.finish(second)
    assert rig.engine.get(second).state is State.COMPLETED
    await asyncio.sleep(0)


async def test_reattach_retries_while_the_hypervisor_is_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmwatch.drivers.base import DriverError

    rig = Rig(tmp_path)
    await rig.engine.start()
    mid = await rig.migrate("big")
    await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.COPYING)
    await rig.engine.stop()
    original = rig.driver.reattach
    failures = {"left": 3}

    async def flaky(*args: object, **kwargs: object) -> object:
        if failures["left"]:
            failures["left"] -= 1
            raise DriverError("connection refused")
        return await original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(rig.driver, "reattach", flaky)
    second = rig.new_engine()
    await second.start()
    await rig.clock.run_until(lambda: second.get(mid).state.finished)
    assert second.get(mid).state is State.COMPLETED
    reasons = [e.reason for e in rig.store.events(mid)]
    assert any("retrying" in r for r in reasons)
    await second.stop()


async def test_a_cancel_under_way_is_not_repeated_at_every_poll(tmp_path: Path) -> None:
    # Polls faster than the cancel takes; a short deadline, so that the cancel comes
    # within minutes (the fallback's 2 h would take 100,000 polls to get there).
    rig = Rig(tmp_path, PROFILES.replace("deadline: 2h", "deadline: 4m"), poll_interval=0.05)
    await rig.engine.start()
    mid = await rig.migrate("busy-plain")
    await rig.finish(mid)
    assert rig.engine.get(mid).state is State.CANCELLED
    assert rig.actions(mid).count("cancel") == 1
    await rig.engine.stop()


async def test_a_profile_edited_while_lmwatch_was_down_applies_after_restart(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    await rig.engine.start()
    mid = await rig.migrate("busy-plain")  # fallback 'strict': nothing allowed
    await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.COPYING)
    await rig.engine.stop()
    rig.profile_file.write_text(
        PROFILES.replace(
            "  - name: strict\n    max_blackout: 300ms\n",
            "  - name: strict\n    max_blackout: 300ms\n    may_pause: true\n    max_pause: 10s\n",
        )
    )
    rig.registry = ProfileRegistry(rig.profile_file)  # a new daemon reads the file afresh
    second = rig.new_engine()
    await second.start()
    await rig.clock.run_until(lambda: second.get(mid).state.finished)
    record = second.get(mid)
    assert record.outcome is not None and record.outcome.method == "paused"
    assert any("edited profile" in e.reason for e in rig.store.events(mid))
    await second.stop()


async def test_a_migration_cancelled_while_queued_never_starts(tmp_path: Path) -> None:
    rig = Rig(tmp_path, max_per_source=1)
    await rig.engine.start()
    first = await rig.migrate("idle")
    second = await rig.migrate("idle2")
    assert rig.engine.get(second).state is State.QUEUED
    await rig.engine.cancel(second)
    await rig.finish(first)
    await rig.clock.advance(60)
    assert rig.engine.get(second).state is State.CANCELLED
    assert [e.state for e in rig.store.events(second) if e.kind == "state"] == [
        "queued",
        "cancelled",
    ]
    assert rig.driver.where("idle2") == "a"
    assert rig.engine.active_count() == 0
    await rig.engine.stop()


async def test_a_profile_matched_by_uuid_survives_a_reload(tmp_path: Path) -> None:
    import uuid as uuidlib

    from lmwatch.drivers.inventory import UUID_NAMESPACE

    instance_uuid = str(uuidlib.uuid5(UUID_NAMESPACE, "busy-plain"))
    by_uuid = PROFILES.replace(
        "profiles:\n",
        f"profiles:\n  - name: pinned\n    match: {{uuids: ['{instance_uuid}']}}\n"
        "    max_blackout: 300ms\n    deadline: 2h\n    on_deadline: cancel\n",
    ).replace(
        "  - name: strict\n    max_blackout: 300ms\n",
        "  - name: strict\n    max_blackout: 300ms\n    may_pause: true\n    max_pause: 10s\n",
    )
    rig = Rig(tmp_path, profiles=by_uuid)
    await rig.engine.start()
    mid = await rig.migrate("busy-plain")
    assert rig.engine.get(mid).profile_name == "pinned"
    rig.registry.reload()  # unchanged file: the uuid match must still hold
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.profile_name == "pinned"
    assert record.state is State.CANCELLED  # 'pinned' allows no pause
    await rig.engine.stop()


async def test_giving_up_on_a_silent_hypervisor_stops_the_job(tmp_path: Path) -> None:
    rig = Rig(tmp_path, error_tolerance=20.0)
    await rig.engine.start()
    mid = await rig.migrate("busy-plain")
    await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.COPYING)
    rig.driver.inject_fault("driver_error_on_sample", migration_id=mid, count=10_000)
    await rig.finish(mid)
    assert rig.engine.get(mid).state is State.FAILED
    rig.driver.clear_faults()
    await rig.clock.advance(5)
    job = await rig.driver.sample(mid)
    assert job.phase is Phase.CANCELLED  # not left copying with nobody watching
    assert rig.driver.where("busy-plain") == "a"
    assert any("asked the hypervisor to stop it" in e.reason for e in rig.store.events(mid))
    await rig.engine.stop()


async def test_force_complete_while_cancelling_is_refused(tmp_path: Path) -> None:
    rig = Rig(tmp_path, poll_interval=0.05)
    await rig.engine.start()
    mid = await rig.migrate("busy-db")
    await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.COPYING)
    await rig.clock.advance(3.0)
    await rig.engine.cancel(mid)
    with pytest.raises(Conflict):
        await rig.engine.force_complete(mid)
    await rig.finish(mid)
    assert rig.engine.get(mid).state is State.CANCELLED
    await rig.engine.stop()


async def test_the_start_plan_knows_the_link_speed(rig: Rig) -> None:
    mid = await rig.migrate("busy-slow")
    await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.COPYING)
    start = next(e for e in rig.store.events(mid) if e.action == "start")
    assert "slow-down armed at" in start.reason and "from the start" in start.reason


async def test_change_rate_measured_once_and_reused_when_recent(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The measurement before start delays a migration by seconds on real hosts: one
    measurement serves an instance for a while, so a round trip measures once; and
    none is made where one pass of memory takes less than a few measurements (`idle2`:
    2 GiB over 1 GiB/s), since the first pass tells as much as soon."""
    measured = rig.count_measurements(monkeypatch)
    there = await rig.migrate("big")  # 8 GiB: a pass of 8 s
    await rig.finish(there)
    assert measured == ["big"]
    back = await rig.migrate("big", "b", "a")
    await rig.finish(back)
    assert measured == ["big"]  # reused: measured moments ago
    assert rig.engine.get(back).state is State.COMPLETED
    await rig.clock.advance(rig.engine.settings.change_rate_max_age + 1)
    again = await rig.migrate("big")
    await rig.finish(again)
    assert measured == ["big", "big"]  # too old to reuse
    other = await rig.migrate("idle2")
    await rig.finish(other)
    assert measured == ["big", "big"]
    assert rig.engine.get(other).state is State.COMPLETED
    note = next(e for e in rig.store.events(other) if "not measured" in e.reason)
    assert "one pass of 2.0GiB takes about 2" in note.reason, note.reason


async def test_the_link_rate_is_learned_where_the_hosts_do_not_give_it(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hosts whose configuration gives no bandwidth (libvirt's hosts without a cap):
    the first migration between them measures its guest, as the link's speed is
    unknown; once one has completed, the rate it moved at stands in for the link's, so
    a small guest is not measured (its first pass tells as much as soon) and a guest
    that writes faster than that link is slowed from the start."""
    measured = rig.count_measurements(monkeypatch)
    original_capabilities = rig.driver.capabilities

    async def unknown_bandwidth(source: str, destination: str) -> Capabilities:
        found = await original_capabilities(source, destination)
        return dataclasses.replace(found, bandwidth=None)

    monkeypatch.setattr(rig.driver, "capabilities", unknown_bandwidth)
    first = await rig.migrate("idle3")  # 2 GiB: measured, the link being unknown
    await rig.finish(first)
    assert rig.engine.get(first).state is State.COMPLETED
    assert measured == ["idle3"]
    small = await rig.migrate("idle2")
    await rig.finish(small)
    assert measured == ["idle3"]
    note = next(e for e in rig.store.events(small) if "not measured" in e.reason)
    assert "one pass of 2.0GiB takes about 2" in note.reason, note.reason
    busy = await rig.migrate("busy-slow")
    await rig.clock.run_until(lambda: rig.engine.get(busy).state is State.COPYING)
    start = next(e for e in rig.store.events(busy) if e.action == "start")
    assert "slow-down armed at" in start.reason and "from the start" in start.reason


SLOW_SWITCH = INVENTORY.replace(
    "  - {between: [a, b], bandwidth: 1GiB/s}",
    "  - {between: [a, b], bandwidth: 1GiB/s, switchover: 200ms}",
).replace(
    "  - {name: big, host: a,",
    "  - {name: floor, host: a, memory: 4GiB, working_set: 200MiB, change_rate: 1500MiB/s}\n"
    "  - {name: big, host: a,",
)


async def test_switchover_is_learned_and_an_exceeded_profile_is_recorded(tmp_path: Path) -> None:
    """The first migration on a pair plans with the default switchover; its measured
    blackout teaches the real one, so the next plan leaves room for it. A blackout
    over max_blackout is recorded as a violation, in the timeline and the metrics."""
    rig = Rig(tmp_path)
    rig.driver = SimDriver(load_inventory_text(SLOW_SWITCH), rig.clock)
    rig.engine = rig.new_engine()
    await rig.engine.start()
    assert rig.engine.switchover("a", "b") == pytest.approx(0.05)
    first = await rig.migrate("floor")  # strict: 300ms, the 200MiB floor needs ~195ms
    await rig.finish(first)
    record = rig.engine.get(first)
    assert record.state is State.COMPLETED
    assert record.outcome is not None and record.outcome.blackout_seconds > 0.3
    violations = [e for e in rig.store.events(first) if e.kind == "violation"]
    assert violations and "blackout" in violations[0].reason
    assert (
        rig.engine.metrics.registry.get_sample_value(
            "lmwatch_profile_violations_total", {"profile": "strict", "kind": "blackout"}
        )
        == 1
    )
    learned = rig.engine.switchover("a", "b")
    assert learned >= 0.14
    second = await rig.migrate("idle", "a", "b")
    await rig.finish(second)
    plan = rig.engine.get(second).plan
    assert plan is not None and plan.blackout_budget <= 0.3 - learned + 1e-9
    assert not [e for e in rig.store.events(second) if e.kind == "violation"]
    # A new engine on the same store remembers what was learned.
    await rig.engine.stop()
    rig.engine = rig.new_engine()
    await rig.engine.start()
    assert rig.engine.switchover("a", "b") == pytest.approx(learned)


TIGHT = PROFILES.replace(
    "profiles:\n",
    "profiles:\n"
    "  - name: tight\n"
    "    match: {labels: {tier: tight}}\n"
    "    max_blackout: 100ms\n"
    "    handover: allowed\n"
    "    deadline: 20m\n"
    "    on_deadline: complete\n",
    1,
)
TIGHT_SWITCH = SLOW_SWITCH.replace(
    "  - {name: big, host: a,",
    "  - {name: tight-db, host: a, memory: 2GiB, working_set: 64MiB, change_rate: 1MiB/s,\n"
    "     labels: {tier: tight}}\n"
    "  - {name: big, host: a,",
    1,
)


async def test_a_profile_shorter_than_the_measured_switch_is_cancelled_at_once(
    tmp_path: Path,
) -> None:
    """Once the switch between two hosts has been measured at about 200 ms, a profile
    that allows 100 ms stopped cannot be met there by any way to finish: its migration
    is cancelled at the first decision, saying why, and the instance stays put. Before
    the measurement (the assumed 50 ms) the same migration is tried."""
    rig = Rig(tmp_path, TIGHT)
    rig.driver = SimDriver(load_inventory_text(TIGHT_SWITCH), rig.clock)
    rig.engine = rig.new_engine()
    await rig.engine.start()
    tried = await rig.migrate("tight-db")  # nothing measured yet: planned with 50 ms
    await rig.finish(tried)
    assert rig.engine.get(tried).state is State.COMPLETED
    assert not [e for e in rig.store.events(tried) if e.action == "cancel"]
    back = await rig.migrate("tight-db", "b", "a")
    await rig.finish(back)
    learned = rig.engine.switchover("a", "b")
    assert learned >= 0.14
    mid = await rig.migrate("tight-db")
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.state is State.CANCELLED
    cancel = [e for e in rig.store.events(mid) if e.action == "cancel"]
    assert cancel and cancel[0].data["rule"] == "switch-outlasts-bound", cancel
    assert "the 100ms the profile allows" in cancel[0].reason
    assert record.outcome is not None and record.outcome.total_seconds < 2.0
    assert rig.driver.where("tight-db") == "a"


def _columns(location: str) -> list[str]:
    """The migrations table's columns, as the database itself lists them."""
    if is_database_url(location):
        sql = "SELECT column_name FROM information_schema.columns WHERE table_name='migrations'"
    else:
        sql = "SELECT name FROM pragma_table_info('migrations')"
    return [row[0] for row in on_disk(location, sql)]


def test_a_version_1_store_is_upgraded_in_place(store_location: str) -> None:
    path = store_location
    Store.open(path).close()
    run_sql(
        path,
        "ALTER TABLE migrations DROP COLUMN uuid",
        "ALTER TABLE migrations DROP COLUMN placement",
        "ALTER TABLE migrations DROP COLUMN restart",
        "UPDATE meta SET value='1' WHERE key='schema_version'",
    )
    assert "uuid" not in _columns(path)
    store = Store.open(path)
    version = store._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    assert version["value"] == str(SCHEMA_VERSION)
    store.close()
    columns = _columns(path)
    assert "uuid" in columns and "placement" in columns and "restart" in columns


def test_a_version_4_store_gains_the_restart_column_and_keeps_its_rows(
    store_location: str,
) -> None:
    path = store_location
    store = Store.open(path)
    store.insert(_stored_record("m-old"), "accepted")
    store.close()
    run_sql(
        path,
        "ALTER TABLE migrations DROP COLUMN restart",
        "UPDATE meta SET value='4' WHERE key='schema_version'",
    )
    store = Store.open(path)
    try:
        assert "restart" in _columns(path)
        version = store._db.execute("SELECT value FROM meta WHERE key='schema_version'")
        assert version.fetchone()["value"] == str(SCHEMA_VERSION) == "5"
        kept = store.get("m-old")
        assert kept is not None and kept.restart is None and kept.instance == "vm-old"
    finally:
        store.close()


def _stored_record(migration_id: str) -> MigrationRecord:
    return MigrationRecord(
        id=migration_id,
        instance="vm-old",
        source="a",
        destination="b",
        labels={},
        requested_profile=None,
        profile_name="default",
        profile_reason="the default",
        profile={},
        memory_bytes=1,
        state=State.QUEUED,
        created_at=1.0,
    )


async def test_a_failed_change_rate_measurement_does_not_stop_the_migration(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmwatch.drivers.base import DriverError

    async def broken(instance: str, host: str) -> ChangeRate | None:
        raise DriverError("measurement timed out")

    monkeypatch.setattr(rig.driver, "measure_change_rate", broken)
    mid = await rig.migrate("big")  # (8 GiB: a pass long enough to measure first)
    await rig.finish(mid)
    assert rig.engine.get(mid).state is State.COMPLETED
    assert any("could not be measured" in e.reason for e in rig.store.events(mid))


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("labels", "{not json", "column labels: Expecting property name"),
        ("plan", "[1, 2]", "column plan: a JSON list, not an object"),
        ("plan", '{"arm_handover": true}', "column plan: StartPlan.__init__() missing"),
        ("state", "copyng", "column state: 'copyng' is not a valid State"),
        ("progress", '{"passes": "three"}', "column progress: passes: not a number: 'three'"),
        ("restart", '{"count": 1, "pending": true}', "column restart: pending without the plan"),
        ("profile", '{"name": "x", "max_blackout": "soon"}', "column profile: max_blackout: Value"),
    ],
)
async def test_a_corrupt_row_stops_the_start_naming_it_and_changing_nothing(
    tmp_path: Path, store_location: str, column: str, value: str, reason: str
) -> None:
    from lmwatch.store import UnreadableStore

    rig = Rig(tmp_path, store_location=store_location)
    await rig.engine.start()
    mid = await rig.migrate("big")
    await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.COPYING)
    await rig.engine.stop()
    run_sql(store_location, f"UPDATE migrations SET {column}='{value}' WHERE id='{mid}'")
    events = len(rig.store.events(mid))
    second = rig.new_engine()
    with pytest.raises(UnreadableStore) as refused:
        await second.start()
    message = str(refused.value)
    assert f"store row for migration {mid} cannot be read: {reason}" in message
    assert "refuses to start" in message
    tool = "psql" if is_database_url(store_location) else "sqlite3"
    assert f"{tool} {rig.store.path} \"SELECT * FROM migrations WHERE id='{mid}'\"" in message
    assert "\n" not in message  # one line per unreadable row
    assert second.active_count() == 0
    assert len(rig.store.events(mid)) == events  # nothing was written
    await second.stop()


async def test_a_queued_migration_starts_with_the_profile_in_force_when_it_starts(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path, max_per_source=1)
    await rig.engine.start()
    first = await rig.migrate("big")
    queued = await rig.migrate("busy-plain")  # fallback 'strict': nothing allowed
    assert rig.engine.get(queued).state is State.QUEUED
    # While it waits, the operator grants handover to its profile.
    rig.profile_file.write_text(
        PROFILES.replace(
            "  - name: strict\n    max_blackout: 300ms\n",
            "  - name: strict\n    max_blackout: 300ms\n    handover: allowed\n"
            "    max_degraded: 60s\n",
        )
    )
    rig.registry.reload()
    assert rig.engine.get(queued).state is State.QUEUED
    await rig.finish(first, queued)
    record = rig.engine.get(queued)
    assert record.plan is not None and record.plan.arm_handover is True
    assert record.profile["handover"] == "allowed"
    events = rig.store.events(queued)
    changed = [i for i, e in enumerate(events) if "reloaded while queued" in e.reason]
    started = [i for i, e in enumerate(events) if e.action == "start"]
    assert changed and started and changed[0] < started[0]
    assert record.state is State.COMPLETED
    assert record.outcome is not None and record.outcome.method == "handover"
    await rig.engine.stop()


async def test_a_handover_the_hypervisor_refuses_is_not_taken_as_done(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hypervisor refuses the policy's first two handovers (as when the link is
    down at that moment): the record must not say handed over, and the policy decides
    again at its next samples, until one is taken."""
    handover = rig.driver.handover
    refusals = 2

    async def refusing(migration_id: str) -> None:
        nonlocal refusals
        if refusals:
            refusals -= 1
            raise ActionRefused("the link to the destination is down")
        await handover(migration_id)

    monkeypatch.setattr(rig.driver, "handover", refusing)
    mid = await rig.migrate("busy-db")
    assert await rig.clock.run_until(
        lambda: any("handover refused" in e.reason for e in rig.store.events(mid)), limit=600
    )
    assert not rig.engine.get(mid).handed_over
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert refusals == 0 and record.state is State.COMPLETED, record.outcome
    assert record.outcome is not None and record.outcome.method == Method.HANDOVER.value
    assert record.handed_over and rig.driver.where("busy-db") == "b"
    assert rig.actions(mid).count("handover") == 3  # two refused, then the one taken


async def test_a_final_stop_whose_link_breaks_is_recorded_with_its_violation(
    tmp_path: Path,
) -> None:
    """The hypervisor stopped the guest for its final copy and the link broke under it.
    QEMU serves no command until that copy ends (it holds its big lock through it), so
    nothing can cut the stop short: the job fails at the link's timeout (30s) and the
    guest runs on the source again. The driver reports how long it was stopped (the
    hypervisor's statistics wait through such a stop, so samples cannot tell), and the
    engine records it with the violation that is, before it starts again (the
    deadline leaves time); the new job completes once the link is back. The guest
    rewrites 200MiB, so its final stop copies them (about 200ms; an idle guest's lasts
    a few ms)."""
    warm = "  - {name: warm, host: a, memory: 4GiB, working_set: 200MiB, change_rate: 2GiB/s}\n"
    rig = Rig(tmp_path, inventory=INVENTORY + warm)
    await rig.engine.start()
    try:
        mid = await rig.migrate("warm")
        for _ in range(10_000):
            await rig.clock.advance(0.02)
            if (await rig.driver.sample(mid)).phase is Phase.COMPLETING:
                break
        rig.driver.inject_fault("link_break", between=("a", "b"))
        assert await rig.clock.run_until(lambda: "restart" in rig.actions(mid), limit=120)
        assert rig.driver.where("warm") == "a"
        assert "cancel" not in rig.actions(mid)  # nothing lmwatch could do would be served
        events = rig.store.events(mid)
        violation = next(e for e in events if e.kind == "violation")
        assert "blackout" in violation.reason and "over 300ms" in violation.reason
        stop = next(e for e in events if e.reason.startswith("the final stop did not complete"))
        assert stop.data["stopped_seconds"] >= 30.0 and "runs on a again" in stop.reason
        rig.driver.inject_fault("link_restore", between=("a", "b"))
        await rig.finish(mid)
        record = rig.engine.get(mid)
        assert record.state is State.COMPLETED, record.outcome
        assert rig.driver.where("warm") == "b"
        violations = [e for e in rig.store.events(mid) if e.kind == "violation"]
        assert len(violations) == 1  # the failed job's stop, once
    finally:
        await rig.engine.stop()


SHORT_DEADLINE = """
profiles:
  - name: strict-soon
    max_blackout: 300ms
    deadline: 3m
    on_deadline: cancel
"""


async def _break_while_copying(rig: Rig, instance: str) -> str:
    mid = await rig.migrate(instance)
    assert await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.COPYING)
    await rig.clock.advance(2.0)
    rig.driver.inject_fault("link_break", between=("a", "b"))
    return mid


async def test_a_job_the_broken_link_fails_is_started_again_once_the_link_carries(
    rig: Rig,
) -> None:
    """The link breaks 2 s into copying and stays down past the hypervisor's timeout
    (30 s): the job fails, the instance still on the source. The deadline (2h) leaves
    time, so lmwatch tries a new job every 5 s; once the link is back one starts and
    the migration completes."""
    mid = await _break_while_copying(rig, "big")
    assert await rig.clock.run_until(lambda: "restart" in rig.actions(mid), limit=120)
    await rig.clock.advance(30.0)
    assert rig.engine.get(mid).state is State.STARTING  # no job: waiting for the link
    rig.driver.inject_fault("link_restore", between=("a", "b"))
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.state is State.COMPLETED, record.outcome
    assert record.restart is not None and record.restart.count == 1
    assert not record.restart.pending
    assert rig.driver.where("big") == "b"
    events = rig.store.events(mid)
    restart = next(e for e in events if e.action == "restart")
    assert restart.data["rule"] == "job-failed"
    assert "the job failed" in restart.reason and "still runs on a" in restart.reason
    waiting = next(e for e in events if e.reason.startswith("could not start again yet"))
    again = next(e for e in events if e.reason.startswith("copying started again"))
    assert restart.at <= waiting.at < again.at
    assert again.at - restart.at >= 30.0  # not before the link came back


async def _fail_while_down_then_finish(rig: Rig, mid: str) -> None:
    """The daemon stops with the link broken under `mid`'s job, which fails while it
    is down (the hypervisor's 30 s) with the instance on a; the link comes back, a new
    daemon starts: the migration completes after one restart."""
    await rig.engine.stop()
    await rig.clock.advance(60.0)
    result = await rig.driver.result(mid)
    assert result.phase is Phase.FAILED and result.running_on == "a", result
    rig.driver.inject_fault("link_restore", between=("a", "b"))
    rig.engine = rig.new_engine()
    await rig.engine.start()
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.state is State.COMPLETED, record.outcome
    assert record.restart is not None and record.restart.count == 1


async def test_a_job_that_failed_while_lmwatch_was_down_is_started_again(rig: Rig) -> None:
    """The link breaks while no daemon watches and the job fails meanwhile, the
    instance still on the source: the daemon started again finds the failed job and,
    the deadline leaving time, starts a new one (from the last progress it stored),
    as it would have had it watched; the migration completes."""
    mid = await _break_while_copying(rig, "big")
    await _fail_while_down_then_finish(rig, mid)
    assert rig.driver.where("big") == "b"
    restart = next(e for e in rig.store.events(mid) if e.action == "restart")
    assert restart.data["rule"] == "job-failed"
    assert "the job failed" in restart.reason and "still runs on a" in restart.reason
    await rig.engine.stop()


class _RateLaterAtStart(SimDriver):
    """Reports no transfer rate in a job's first sample, as libvirt's statistics do
    when copying has just begun."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sampled: set[str] = set()

    async def sample(self, migration_id: str) -> Sample:
        sample = await super().sample(migration_id)
        if migration_id not in self.sampled:
            self.sampled.add(migration_id)
            return dataclasses.replace(sample, transfer_rate=0.0)
        return sample


async def test_the_first_progress_with_the_links_rate_is_stored_at_once(tmp_path: Path) -> None:
    """The daemon dies 2 s into copying (before a progress would be stored again, every
    5 s) and the job fails while it is down: the progress that showed the link's rate
    was stored at once, so the daemon started again can still start a new job."""
    rig = Rig(tmp_path)
    rig.driver = _RateLaterAtStart(load_inventory_text(INVENTORY), rig.clock)
    rig.engine = rig.new_engine()
    await rig.engine.start()
    mid = await _break_while_copying(rig, "big")
    stored = rig.store.get(mid).progress
    assert stored is not None and stored.transfer_rate > 0, stored
    await _fail_while_down_then_finish(rig, mid)
    await rig.engine.stop()


async def test_a_start_the_daemon_did_not_live_to_make_is_made_after_a_restart(
    rig: Rig,
) -> None:
    """The daemon stops after recording its start plan but before the hypervisor got
    the start (the start call never returned): the daemon started again finds no job,
    the instance still on its source, and starts the migration; it does not record it
    failed as a job that ended unwatched."""
    started = asyncio.Event()
    real_start = rig.driver.start

    async def never_returns(*args: Any, **kwargs: Any) -> None:
        started.set()
        await asyncio.Event().wait()

    rig.driver.start = never_returns  # type: ignore[method-assign]
    mid = await rig.migrate("idle")
    assert await rig.clock.run_until(started.is_set)
    record = rig.engine.get(mid)
    assert record.state is State.STARTING and record.plan is not None, record
    await rig.engine.stop()
    rig.driver.start = real_start  # type: ignore[method-assign]
    rig.engine = rig.new_engine()
    await rig.engine.start()
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.state is State.COMPLETED, (record.outcome, rig.store.events(mid))
    assert rig.driver.where("idle") == "b"
    assert [e.action for e in rig.store.events(mid)].count("start") == 2
    await rig.engine.stop()


async def test_a_job_lmwatch_asked_to_end_is_not_started_again_after_a_restart(
    rig: Rig,
) -> None:
    """An operator's cancel was sent, but the job failed before it took (the link
    broke) while no daemon watched: the daemon started again records the end, and
    does not start a migration the operator cancelled again."""
    mid = await _break_while_copying(rig, "big")

    async def lost(migration_id: str) -> None:
        """The hypervisor never gets the cancel."""

    rig.driver.cancel = lost  # type: ignore[method-assign]
    await rig.engine.cancel(mid)
    await rig.engine.stop()
    await rig.clock.advance(60.0)
    assert (await rig.driver.result(mid)).phase is Phase.FAILED
    rig.driver.inject_fault("link_restore", between=("a", "b"))
    rig.engine = rig.new_engine()
    await rig.engine.start()
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.state is State.FAILED and record.restart is None, record
    assert rig.driver.where("big") == "a"
    assert "restart" not in rig.actions(mid)
    await rig.engine.stop()


async def test_a_link_that_stays_broken_ends_the_migration_failed_once_no_job_fits(
    tmp_path: Path,
) -> None:
    """Never back: lmwatch tries until a new job would no longer finish before the
    deadline (3m), then the migration ends failed, the instance on the source."""
    rig = Rig(tmp_path, SHORT_DEADLINE)
    await rig.engine.start()
    mid = await _break_while_copying(rig, "big")
    await rig.finish(mid, limit=600)
    record = rig.engine.get(mid)
    assert record.state is State.FAILED, record.outcome
    assert record.outcome is not None and record.outcome.running_on == "a"
    assert record.deadline_at is not None and record.finished_at is not None
    # the last attempt still left time for a new job: 10 s to start, 8 s to copy 8GiB
    assert record.deadline_at - 18.0 - 5.0 <= record.finished_at <= record.deadline_at - 18.0
    events = rig.store.events(mid)
    ended = [e for e in events if e.kind == "state" and e.state == State.FAILED.value]
    assert ended and "tried" in ended[-1].reason and "keeps running on a" in ended[-1].reason
    assert rig.driver.where("big") == "a"
    await rig.engine.stop()


class _SwitchComesLate(SimDriver):
    """Takes a migration's first handover request without switching the hosts (the
    switch comes some time after the request); its samples say handing over until
    the job ends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked: set[str] = set()
        self.waiting: set[str] = set()

    async def handover(self, migration_id: str) -> None:
        if migration_id in self.asked:
            await super().handover(migration_id)
            return
        self.asked.add(migration_id)
        self.waiting.add(migration_id)

    async def sample(self, migration_id: str) -> Sample:
        sample = await super().sample(migration_id)
        if migration_id in self.waiting and sample.phase is Phase.COPYING:
            return dataclasses.replace(sample, phase=Phase.HANDOVER)
        return sample

    async def result(self, migration_id: str) -> JobResult:
        self.waiting.discard(migration_id)
        return await super().result(migration_id)


async def test_a_handover_the_failure_came_before_is_started_again(tmp_path: Path) -> None:
    """The handover was asked, but the link broke before the hosts switched: the job
    fails with the instance intact on the source. lmwatch starts again (before, the
    asked handover counted as done, and the migration ended failed), and the new job
    may hand over like any other."""
    rig = Rig(tmp_path)
    rig.driver = _SwitchComesLate(load_inventory_text(INVENTORY), rig.clock)
    rig.engine = rig.new_engine()
    await rig.engine.start()
    mid = await rig.migrate("busy-db")
    assert await rig.clock.run_until(lambda: "handover" in rig.actions(mid), limit=120)
    assert await rig.clock.run_until(lambda: rig.engine.get(mid).handed_over)  # asked
    rig.driver.inject_fault("link_break", between=("a", "b"))
    assert await rig.clock.run_until(lambda: "restart" in rig.actions(mid), limit=120)
    assert not rig.engine.get(mid).handed_over
    rig.driver.inject_fault("link_restore", between=("a", "b"))
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.state is State.COMPLETED, record.outcome
    assert record.outcome is not None and record.outcome.method == Method.HANDOVER.value
    assert rig.driver.where("busy-db") == "b"
    notes = [e.reason for e in rig.store.events(mid) if e.kind == "note"]
    assert any("before the hosts switched: the instance still runs on a" in n for n in notes)
    await rig.engine.stop()


async def test_an_operator_cancel_while_waiting_to_start_again_ends_it_cancelled(
    rig: Rig,
) -> None:
    mid = await _break_while_copying(rig, "big")
    assert await rig.clock.run_until(lambda: "restart" in rig.actions(mid), limit=120)
    with pytest.raises(Conflict, match="waits to start again"):
        await rig.engine.force_complete(mid)
    record = await rig.engine.cancel(mid)
    assert record.state is State.CANCELLED
    assert record.outcome is not None and record.outcome.running_on == "a"
    rig.driver.inject_fault("link_restore", between=("a", "b"))
    await rig.clock.advance(60.0)
    assert rig.engine.get(mid).state is State.CANCELLED  # no job started after it
    assert rig.driver.where("big") == "a"


async def test_a_restart_of_lmwatch_while_waiting_for_the_link_keeps_waiting(
    rig: Rig,
) -> None:
    mid = await _break_while_copying(rig, "big")
    assert await rig.clock.run_until(lambda: "restart" in rig.actions(mid), limit=120)
    await rig.restart(down_for=5.0)
    # the new daemon tries, is refused, and waits on: no job runs
    assert await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.STARTING)
    await rig.clock.advance(10.0)
    assert rig.engine.get(mid).state is State.STARTING
    rig.driver.inject_fault("link_restore", between=("a", "b"))
    await rig.finish(mid)
    record = rig.engine.get(mid)
    assert record.state is State.COMPLETED, record.outcome
    assert record.restart is not None and record.restart.count == 1
    assert rig.driver.where("big") == "b"
