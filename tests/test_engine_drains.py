"""Drains through the real engine, simulator and policies, in virtual time."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from enginerig import EngineRig

from lmwatch.api import drain_out
from lmwatch.drivers.base import UnknownHost
from lmwatch.engine import Engine, EngineSettings
from lmwatch.engine.placing import DestinationDraining
from lmwatch.errors import Conflict, Invalid, NotFound
from lmwatch.model import GIB, MigrationRequest, StartPlan, State
from lmwatch.schemas import placement_out
from lmwatch.store import DrainRecord, DrainState, ItemState

# `src` holds the instances; `b` is the big, fast destination, `c` a small one on a slow
# link, `empty` has nothing on it. `huge` fits nowhere; `never` rewrites faster than
# any link copies and its profile cancels it at its deadline.
INVENTORY = """
hosts:
  - {name: src, memory: 512GiB}
  - {name: b, memory: 96GiB}
  - {name: c, memory: 24GiB}
  - {name: empty, memory: 64GiB}
links:
  - {between: [src, b], bandwidth: 1GiB/s}
  - {between: [src, c], bandwidth: 512MiB/s}
default_bandwidth: 256MiB/s
instances:
  - {name: q1, host: src, memory: 2GiB, working_set: 64MiB, change_rate: 1MiB/s}
  - {name: q2, host: src, memory: 8GiB, working_set: 64MiB, change_rate: 1MiB/s}
  - {name: q3, host: src, memory: 4GiB, working_set: 64MiB, change_rate: 1MiB/s}
  - {name: q4, host: src, memory: 16GiB, working_set: 64MiB, change_rate: 1MiB/s}
  - {name: q5, host: src, memory: 1GiB, working_set: 64MiB, change_rate: 1MiB/s}
"""

EXTRA = """
  - {name: huge, host: src, memory: 200GiB, working_set: 64MiB, change_rate: 1MiB/s}
  - {name: never, host: src, memory: 4GiB, working_set: 4GiB, change_rate: 4GiB/s,
     labels: {tier: strict}}
"""

PROFILES = """
profiles:
  - name: strict
    match: {labels: {tier: strict}}
    max_blackout: 100ms
    deadline: 2m
    on_deadline: cancel
  - name: default
    max_blackout: 500ms
    deadline: 1h
    on_deadline: cancel
"""


class Rig(EngineRig):
    def __init__(self, tmp_path: Path, inventory: str = INVENTORY) -> None:
        settings = EngineSettings(poll_interval=1.0, max_per_source=2, max_per_destination=2)
        super().__init__(tmp_path, inventory, PROFILES, settings, source="src")

    def drain(self, drain_id: str) -> DrainRecord:
        return self.engine.drains.get(drain_id)

    async def until_done(self, drain_id: str, limit: float = 6 * 3600) -> DrainRecord:
        done = await self.clock.run_until(
            lambda: self.drain(drain_id).state.finished, limit=limit, real_timeout=60
        )
        assert done, self.drain(drain_id)
        return self.drain(drain_id)


@pytest.fixture
async def rig(tmp_path: Path) -> Rig:
    rig = Rig(tmp_path)
    await rig.engine.start()
    yield rig
    await rig.engine.stop()


@asynccontextmanager
async def running(tmp_path: Path, inventory: str) -> AsyncIterator[Rig]:
    """A rig on `inventory` whose engine runs inside the block."""
    rig = Rig(tmp_path, inventory)
    await rig.engine.start()
    try:
        yield rig
    finally:
        await rig.engine.stop()


@pytest.fixture
async def hard(tmp_path: Path) -> Rig:
    rig = Rig(tmp_path, INVENTORY + EXTRA)
    await rig.engine.start()
    yield rig
    await rig.engine.stop()


async def test_a_drain_empties_the_host_longest_first_within_the_host_limit(rig: Rig) -> None:
    drain = await rig.engine.drains.submit("src")
    assert drain.state is DrainState.RUNNING
    # Longest expected move first: by memory here (same guests, same kind of link).
    assert [i.instance for i in drain.items] == ["q4", "q2", "q3", "q1", "q5"]
    assert all(i.expected_seconds > 0 for i in drain.items)
    most = 0

    def watch() -> bool:
        nonlocal most
        current = rig.drain(drain.id)
        in_flight = [i for i in current.items if i.state is ItemState.MIGRATING]
        most = max(most, len(in_flight))
        return current.state.finished

    assert await rig.clock.run_until(watch, limit=3600)
    done = rig.drain(drain.id)
    assert done.state is DrainState.COMPLETED, done
    assert {i.state for i in done.items} == {ItemState.MOVED}
    assert most == 2  # never more than the per-source limit handed over at once
    assert await rig.driver.instances_on("src") == []
    assert all(rig.driver.where(i.instance) == i.destination for i in done.items)
    assert rig.engine.drains.eta(done) == 0.0
    # The store has it as it ended.
    stored = rig.store.get_drain(drain.id)
    assert stored is not None and stored.state is DrainState.COMPLETED


async def test_a_drained_guest_is_measured_once_its_start_reuses_the_reading(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drain measures every guest's change rate at submission (to order them); the
    measurement before each start takes a window of seconds on real hosts, so a start
    that follows soon after reuses the drain's reading instead of measuring again."""
    measured = rig.count_measurements(monkeypatch)

    drain = await rig.engine.drains.submit("src")
    assert sorted(measured) == ["q1", "q2", "q3", "q4", "q5"]
    done = await rig.until_done(drain.id)
    assert done.state is DrainState.COMPLETED, done
    assert sorted(measured) == ["q1", "q2", "q3", "q4", "q5"]  # none measured twice
    # The starts that plan with a change rate (a pass of 4 GiB or more over 1 GiB/s)
    # planned with the drain's reading.
    for item in done.items:
        if item.instance in ("q4", "q2", "q3"):
            assert item.migration_id is not None
            start = next(e for e in rig.store.events(item.migration_id) if e.action == "start")
            assert start.data["change_rate"] is not None, start


TWO_DRAINED = """
hosts:
  - {name: src, memory: 512GiB}
  - {name: other, memory: 1024GiB}
  - {name: b, memory: 96GiB}
default_bandwidth: 1GiB/s
instances:
  - {name: q1, host: src, memory: 2GiB, working_set: 64MiB, change_rate: 1MiB/s}
  - {name: q2, host: src, memory: 4GiB, working_set: 64MiB, change_rate: 1MiB/s}
  - {name: o1, host: other, memory: 2GiB, working_set: 64MiB, change_rate: 1MiB/s}
"""


async def test_a_drained_host_is_no_destination_for_another_drain(tmp_path: Path) -> None:
    """`src` is being drained (to `b`) when `other` is: `src` has the most free memory
    for `other`'s instance, so placement alone would put it there, and what lands on a
    host whose drain listed its instances already stays there when that drain
    completes. `b` takes it, and both hosts end empty."""
    async with running(tmp_path, TWO_DRAINED) as rig:
        first = await rig.engine.drains.submit("src", ["b"])
        second = await rig.engine.drains.submit("other")
        for drain in (first, second):
            done = await rig.until_done(drain.id)
            assert done.state is DrainState.COMPLETED, done
            assert {i.destination for i in done.items} == {"b"}, done.items
        assert await rig.driver.instances_on("src") == []
        assert await rig.driver.instances_on("other") == []


async def test_nothing_is_moved_onto_a_host_being_drained(tmp_path: Path) -> None:
    """While `src` is drained, a migration naming it is refused (409, forced too), and
    lmwatch never chooses it, saying why; once the drain ends it takes them again."""
    async with running(tmp_path, TWO_DRAINED) as rig:
        drain = await rig.engine.drains.submit("src", ["b"])
        for force in (False, True):
            with pytest.raises(DestinationDraining, match=f"src is being drained .*{drain.id}"):
                await rig.submit("o1", "src", "other", force=force)
        placement = await rig.engine.place("o1")
        assert placement.host == "b"
        assert placement.rejected["src"] == f"src is being drained (drain {drain.id})"
        # the explain call names the drain beside the reason
        answer = {c.host: c for c in placement_out(placement).candidates}
        assert answer["src"].drain == drain.id and not answer["src"].accepted
        assert answer["b"].drain is None and answer["b"].accepted
        assert rig.store.active_for_instance("o1") is None  # nothing recorded
        assert (await rig.until_done(drain.id)).state is DrainState.COMPLETED
        assert (await rig.engine.place("o1")).host == "src"  # the most free memory again


async def test_a_drain_reads_the_hosts_being_drained_once_to_plan_its_instances(
    tmp_path: Path,
) -> None:
    """Submitting a drain places each of the host's instances; which hosts are being
    drained is read from the store once for all of them, not once per instance, and
    that read is the one that checked the host is not being drained already."""
    async with running(tmp_path, INVENTORY) as rig:
        read = rig.store.unfinished_drains
        calls = 0

        def counted() -> list[DrainRecord]:
            nonlocal calls
            calls += 1
            return read()

        rig.store.unfinished_drains = counted  # type: ignore[method-assign]
        drain = await rig.engine.drains.submit("src")
        assert len(drain.items) == 5
        assert calls == 1, calls


# `late` arrives on `src` from `c` over a slow link; `q1` leaves `src` within seconds.
ARRIVING = """
hosts:
  - {name: src, memory: 64GiB}
  - {name: b, memory: 96GiB}
  - {name: c, memory: 64GiB}
links:
  - {between: [src, b], bandwidth: 1GiB/s}
default_bandwidth: 256MiB/s
instances:
  - {name: q1, host: src, memory: 1GiB, working_set: 64MiB, change_rate: 1MiB/s}
  - {name: late, host: c, memory: 16GiB, working_set: 64MiB, change_rate: 1MiB/s}
"""


async def test_a_drain_moves_what_arrives_after_it_listed_the_host(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A migration to `src` accepted before its drain lands after the drain has listed
    `src` and moved `q1`: the drain waits for it (an ordinary wait, logged as such, not
    as a warning), finds `late` there, moves it too, and completes only with `src`
    empty."""
    caplog.set_level(logging.INFO, logger="lmwatch.drains")
    async with running(tmp_path, ARRIVING) as rig:
        arriving = await rig.submit("late", "src", "c")
        drain = await rig.engine.drains.submit("src")
        assert [i.instance for i in drain.items] == ["q1"]
        waiting = await rig.clock.run_until(
            lambda: "still arriving" in rig.drain(drain.id).reason, limit=60
        )
        assert waiting, rig.drain(drain.id)
        assert rig.drain(drain.id).reason == (
            f"waiting for what is still arriving at src to move it too: late from c "
            f"(migration {arriving})"
        )
        assert rig.store.get_drain(drain.id).reason == rig.drain(drain.id).reason
        waits = [r for r in caplog.records if "drain-not-settled" in r.getMessage()]
        assert waits and {r.levelno for r in waits} == {logging.INFO}
        done = await rig.until_done(drain.id)
        assert rig.engine.get(arriving).state is State.COMPLETED
        assert done.state is DrainState.COMPLETED, done
        late = next(i for i in done.items if i.instance == "late")
        assert late.state is ItemState.MOVED
        assert late.reason.startswith("moved to"), late
        assert await rig.driver.instances_on("src") == []


async def test_an_instance_put_back_on_the_host_is_moved_again(tmp_path: Path) -> None:
    """The drain moved `q1` off `src`; while it waits for `late` to arrive, something
    other than lmwatch moves `q1` back. The host is not empty while `q1` runs there:
    the drain moves it again, saying why, and completes only with `src` empty."""
    async with running(tmp_path, ARRIVING) as rig:
        await rig.submit("late", "src", "c")
        drain = await rig.engine.drains.submit("src")
        assert await rig.clock.run_until(
            lambda: rig.drain(drain.id).items[0].state is ItemState.MOVED, limit=60
        )
        first = rig.drain(drain.id).items[0].migration_id
        assert first is not None
        plan = StartPlan(arm_handover=False, arm_slow_down=False, blackout_budget=0.3)
        back = MigrationRequest("q1", rig.driver.where("q1") or "b", "src")
        await rig.driver.start("not-lmwatch", back, plan)
        assert await rig.clock.run_until(lambda: rig.driver.where("q1") == "src", limit=60)
        done = await rig.until_done(drain.id)
        assert done.state is DrainState.COMPLETED, done
        q1 = next(i for i in done.items if i.instance == "q1")
        assert q1.state is ItemState.MOVED and q1.moves == 1, q1
        assert q1.reason == f"moved to {q1.destination} (again: put back on src 1 time(s))"
        shown = next(e for e in drain_out(rig.engine, done).instances if e.instance == "q1")
        assert shown.moves == 1  # what the API shows
        assert q1.migration_id != first
        assert rig.engine.get(first).state is State.COMPLETED
        assert [i.instance for i in done.items] == ["q1", "late"]
        assert await rig.driver.instances_on("src") == []


async def test_a_drain_of_an_empty_host_waits_for_what_is_arriving(tmp_path: Path) -> None:
    empty = ARRIVING.replace("{name: q1, host: src", "{name: q1, host: b")
    async with running(tmp_path, empty) as rig:
        await rig.submit("late", "src", "c")
        drain = await rig.engine.drains.submit("src")
        assert drain.state is DrainState.RUNNING and drain.items == ()
        done = await rig.until_done(drain.id)
        assert done.state is DrainState.COMPLETED, done
        assert [(i.instance, i.state) for i in done.items] == [("late", ItemState.MOVED)]
        assert await rig.driver.instances_on("src") == []


async def test_the_drain_eta_counts_parallel_slots(rig: Rig) -> None:
    drain = await rig.engine.drains.submit("src")
    eta = rig.engine.drains.eta(drain)
    expected = [i.expected_seconds for i in drain.items]
    assert eta is not None
    assert max(expected) <= eta < sum(expected)


async def test_a_host_with_nothing_on_it_completes_at_once(rig: Rig) -> None:
    drain = await rig.engine.drains.submit("empty")
    assert drain.state is DrainState.COMPLETED
    assert drain.items == ()
    assert "already empty" in drain.reason
    assert rig.engine.drains.get(drain.id).state is DrainState.COMPLETED


async def test_bad_drains_are_refused_and_change_nothing(rig: Rig) -> None:
    with pytest.raises(UnknownHost):
        await rig.engine.drains.submit("nowhere")
    with pytest.raises(UnknownHost):
        await rig.engine.drains.submit("src", ["b", "nowhere"])
    with pytest.raises(Invalid, match="itself"):
        await rig.engine.drains.submit("src", ["b", "src"])
    with pytest.raises(Invalid, match="profile"):
        await rig.engine.drains.submit("src", profile="no-such-profile")
    assert rig.store.drains() == []
    first = await rig.engine.drains.submit("src")
    with pytest.raises(Conflict, match="already draining"):
        await rig.engine.drains.submit("src")
    with pytest.raises(NotFound):
        rig.engine.drains.get("no-such-drain")
    assert [d.id for d in rig.store.drains()] == [first.id]


async def test_destinations_limit_where_instances_go(rig: Rig) -> None:
    drain = await rig.engine.drains.submit("src", ["c"])
    # c has room for 24 GiB: q4 (16) fits, then q2 (8); the rest cannot follow, and
    # the drain says so at submission already.
    warned = {i.instance for i in drain.items if i.warning}
    assert warned == {"q3", "q1", "q5"}
    assert all("likely no room" in i.warning for i in drain.items if i.warning)
    done = await rig.until_done(drain.id)
    assert {i.destination for i in done.items if i.state is ItemState.MOVED} == {"c"}
    moved = sum(i.memory_bytes for i in done.items if i.state is ItemState.MOVED)
    assert moved <= 24 * GIB
    left = [i for i in done.items if i.state is not ItemState.MOVED]
    assert left and all(i.state is ItemState.BLOCKED for i in left)
    assert done.state is DrainState.FAILED
    assert all(i.instance in done.reason for i in left)


async def test_what_cannot_move_is_blocked_at_submission_and_said(hard: Rig) -> None:
    drain = await hard.engine.drains.submit("src")
    blocked = [i for i in drain.items if i.state is ItemState.BLOCKED]
    assert [i.instance for i in blocked] == ["huge"]
    # The measured change rate counts: the busy guest is expected to take longer than
    # a quiet one of the same size on the same link, and is started before it.
    expected = {i.instance: i.expected_seconds for i in drain.items}
    assert expected["never"] > 1.5 * expected["q3"]
    names = [i.instance for i in drain.items]
    assert names.index("never") < names.index("q3")
    assert blocked[0].reason  # the placement's reasons, per host
    done = await hard.until_done(drain.id)
    assert done.state is DrainState.FAILED
    assert "huge" in done.reason


async def test_a_migration_its_profile_cancelled_is_reported_not_retried(hard: Rig) -> None:
    drain = await hard.engine.drains.submit("src")
    done = await hard.until_done(drain.id)
    never = next(i for i in done.items if i.instance == "never")
    assert never.state is ItemState.FAILED
    assert len(never.attempts) == 1 and "cancelled" in never.reason
    assert hard.driver.where("never") == "src"
    assert all(
        i.state is ItemState.MOVED for i in done.items if i.instance not in ("never", "huge")
    )


async def test_a_refusing_destination_is_retried_elsewhere(rig: Rig) -> None:
    rig.driver.inject_fault("destination_refuses", host="b", when="start")
    drain = await rig.engine.drains.submit("src", ["b", "c"])
    done = await rig.until_done(drain.id)
    moved = [i for i in done.items if i.state is ItemState.MOVED]
    assert moved and {i.destination for i in moved} == {"c"}
    tried_b = [i for i in done.items if any(d == "b" for d, _ in i.attempts)]
    assert tried_b  # b was tried (it is the better host) and refused
    assert all(rig.driver.where(i.instance) == "c" for i in moved)


async def test_cancel_stops_queued_work_and_lets_running_moves_finish(rig: Rig) -> None:
    drain = await rig.engine.drains.submit("src")
    await rig.clock.run_until(
        lambda: any(i.state is ItemState.MIGRATING for i in rig.drain(drain.id).items),
        limit=60,
    )
    cancelled = await rig.engine.drains.cancel(drain.id)
    assert cancelled.state is DrainState.CANCELLING
    running = [i for i in cancelled.items if i.state is ItemState.MIGRATING]
    assert running
    assert all(i.state in (ItemState.MIGRATING, ItemState.CANCELLED) for i in cancelled.items)
    done = await rig.until_done(drain.id)
    assert done.state is DrainState.CANCELLED
    for item in done.items:
        if item.instance in {i.instance for i in running}:
            assert item.state is ItemState.MOVED
        else:
            assert item.state is ItemState.CANCELLED
            assert rig.driver.where(item.instance) == "src"
    with pytest.raises(Conflict):
        await rig.engine.drains.cancel(drain.id)


async def test_a_restarted_engine_continues_the_drain(rig: Rig) -> None:
    drain = await rig.engine.drains.submit("src")
    await rig.clock.run_until(
        lambda: any(i.state is ItemState.MOVED for i in rig.drain(drain.id).items), limit=600
    )
    await rig.engine.stop()
    stored = rig.store.get_drain(drain.id)
    assert stored is not None and stored.state is DrainState.RUNNING
    rig.engine = rig.new_engine()
    await rig.engine.start()
    done = await rig.until_done(drain.id)
    assert done.state is DrainState.COMPLETED
    # Each instance moved once: one migration each (a resubmission would be a second).
    per_instance = [r.instance for r in rig.store.list()]
    assert sorted(per_instance) == sorted(i.instance for i in done.items)


async def test_drain_metrics(rig: Rig) -> None:
    drain = await rig.engine.drains.submit("src")
    text = rig.metrics.render().decode()
    assert "lmwatch_drains_active 1.0" in text
    assert f'lmwatch_drain_instances{{drain="{drain.id}",host="src",state="pending"}}' in text
    await rig.until_done(drain.id)
    text = rig.metrics.render().decode()
    assert "lmwatch_drains_active 0.0" in text
    assert drain.id not in text


def test_an_instance_eta_falls_back_to_its_deadline() -> None:
    from lmwatch.engine.drains import eta
    from lmwatch.model import Prediction, State
    from lmwatch.records import Progress
    from lmwatch.store import DrainItem, MigrationRecord

    item = DrainItem("x", GIB, 12.0, state=ItemState.MIGRATING, migration_id="m")
    record = MigrationRecord(
        id="m",
        instance="x",
        source="src",
        destination="b",
        labels={},
        requested_profile=None,
        profile_name="default",
        profile_reason="",
        profile={},
        memory_bytes=GIB,
        state=State.QUEUED,
        created_at=100.0,
        deadline_at=400.0,
    )
    assert eta(item, record, 150.0) == 12.0  # not started: the expected duration

    def predicted(eta_seconds: float | None) -> Prediction:
        return Prediction(0.0, 0.0, 0, eta_seconds, None, None)

    running = dataclasses.replace(
        record, state=State.COPYING, progress=Progress(prediction=predicted(7.5))
    )
    assert eta(item, running, 150.0) == 7.5
    hopeless = dataclasses.replace(running, progress=Progress(passes=3, prediction=predicted(None)))
    assert eta(item, hopeless, 150.0) == 250.0  # its profile acts by the deadline
    # In the first pass, before any prediction: what the pass still takes, not the
    # deadline (an operator read "empty in 19.7m" for a one-minute drain).
    first = dataclasses.replace(
        running,
        progress=Progress(
            passes=1,
            memory_total=GIB,
            memory_remaining=GIB // 2,
            transfer_rate=GIB / 10,
            prediction=predicted(None),
        ),
    )
    assert eta(item, first, 150.0) == pytest.approx(5.0)
    assert eta(item, first, 398.0) == pytest.approx(2.0)  # never past the deadline
    assert first.progress is not None
    disks = dataclasses.replace(
        first,
        progress=dataclasses.replace(
            first.progress, memory_remaining=GIB, disk_remaining=4 * GIB, disk_rate=GIB / 2
        ),
    )
    assert eta(item, disks, 150.0) == pytest.approx(8.0 + 10.0)
    assert eta(item, dataclasses.replace(hopeless, deadline_at=None), 150.0) is None
    assert eta(dataclasses.replace(item, state=ItemState.MOVED), hopeless, 150.0) == 0.0


async def test_a_restart_between_choice_and_answer_adopts_the_same_migration(
    tmp_path: Path,
) -> None:
    """The drain recorded its choice (submitting) and the engine accepted the migration,
    but the daemon died before the drain wrote it down: the restart asks again with the
    same key and gets that migration back, never a second one."""
    from lmwatch.model import MigrationRequest

    rig = Rig(tmp_path)
    await rig.engine.start()
    drain = await rig.engine.drains.submit("src", ["b"])
    await rig.engine.stop()  # before its first step: every instance still pending
    first = drain.items[0]
    key = f"drain-{drain.id}-{first.instance}-0"
    rig.engine = rig.new_engine()
    record, _ = await rig.engine.submit(MigrationRequest(first.instance, "src", "b"), key)
    submitting = dataclasses.replace(first, state=ItemState.SUBMITTING, destination="b")
    rig.store.update_drain(dataclasses.replace(drain, items=(submitting, *drain.items[1:])))
    await rig.engine.start()
    done = await rig.until_done(drain.id)
    assert done.state is DrainState.COMPLETED
    assert done.items[0].migration_id == record.id
    assert [r.id for r in rig.store.list() if r.instance == first.instance] == [record.id]
    await rig.engine.stop()


async def test_a_store_that_refuses_for_a_while_delays_the_drain_without_failing_it(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmwatch.errors import StoreUnavailable

    drain = await rig.engine.drains.submit("src")  # accepted while the store was fine
    effects = rig.engine._effects
    real = effects.refuse_unless_writable
    refusals = {"left": 3}

    def flaky() -> None:
        if refusals["left"] > 0:
            refusals["left"] -= 1
            raise StoreUnavailable("the store cannot be written: disk full; retry later")
        real()

    monkeypatch.setattr(effects, "refuse_unless_writable", flaky)
    done = await rig.until_done(drain.id)
    assert refusals["left"] == 0
    assert done.state is DrainState.COMPLETED
    assert {i.state for i in done.items} == {ItemState.MOVED}


async def test_ids_come_from_the_injected_generator(tmp_path: Path) -> None:
    """Runs that must repeat exactly (the drain benchmark) give the engine its ids: a
    migration's id sets the phase of its polls."""
    rig = Rig(tmp_path)
    ids = iter(f"00000000-0000-4000-8000-{n:012d}" for n in range(100))
    engine = Engine(
        driver=rig.driver,
        store=rig.store,
        profiles=rig.registry,
        clock=rig.clock,
        metrics=rig.metrics,
        settings=rig.settings,
        new_id=lambda: next(ids),
    )
    await engine.start()
    drain = await engine.drains.submit("src")
    assert drain.id == "00000000-0000-4000-8000-000000000000"
    assert await rig.clock.run_until(
        lambda: all(i.migration_id for i in engine.drains.get(drain.id).items), limit=3600
    )
    migration_ids = {i.migration_id for i in engine.drains.get(drain.id).items}
    assert migration_ids <= {f"00000000-0000-4000-8000-{n:012d}" for n in range(1, 100)}
    await engine.stop()
