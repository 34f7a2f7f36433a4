"""Placement in the engine, on the simulator: reservations, chosen, named, forced, explain."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from enginerig import EngineRig

from lmwatch.drivers.base import Incompatible, InsufficientResources, NotOnSource, UnknownHost
from lmwatch.drivers.inventory import load_inventory_text
from lmwatch.drivers.sim import SimDriver
from lmwatch.engine import Engine, EngineSettings
from lmwatch.engine.placing import GroupConflict, NoDestination
from lmwatch.engine.records import request_of
from lmwatch.errors import Invalid
from lmwatch.model import State

# b has room for four of the 4 GiB instances; c cannot hand over; d is small.
INVENTORY = """
hosts:
  - {name: a, memory: 512GiB}
  - {name: b, memory: 16GiB}
  - {name: c, memory: 12GiB, handover: false, cpus: 4}
  - {name: d, memory: 8GiB}
links:
  - {between: [a, b], bandwidth: 1GiB/s}
  - {between: [a, c], bandwidth: 1GiB/s}
  - {between: [a, d], bandwidth: 1GiB/s}
default_bandwidth: 1GiB/s
instances:
  - {name: w1, host: a, memory: 4GiB, working_set: 64MiB, change_rate: 1MiB/s}
  - {name: w2, host: a, memory: 4GiB, working_set: 64MiB, change_rate: 1MiB/s}
  - {name: w3, host: a, memory: 4GiB, working_set: 64MiB, change_rate: 1MiB/s}
  - {name: w4, host: a, memory: 4GiB, working_set: 64MiB, change_rate: 1MiB/s}
  - {name: w5, host: a, memory: 4GiB, working_set: 64MiB, change_rate: 1MiB/s}
  - {name: g1, host: a, memory: 1GiB, working_set: 64MiB, change_rate: 1MiB/s,
     labels: {group: shard}}
  - {name: g2, host: b, memory: 1GiB, working_set: 64MiB, change_rate: 1MiB/s,
     labels: {group: shard}}
  - {name: db, host: a, memory: 2GiB, working_set: 64MiB, change_rate: 1MiB/s,
     labels: {tier: database}}
  - {name: pinned, host: a, memory: 1GiB, working_set: 64MiB, change_rate: 1MiB/s,
     pinned_cpus: "6-7"}
"""

PROFILES = """
profiles:
  - name: db
    match: {labels: {tier: database}}
    max_blackout: 300ms
    handover: allowed
    max_degraded: 60s
  - name: default
    max_blackout: 1s
"""


class Rig(EngineRig):
    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path, INVENTORY, PROFILES, EngineSettings(max_per_destination=2))


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    rig = Rig(tmp_path)
    await rig.engine.start()
    yield rig
    await rig.engine.stop()


async def test_a_host_with_room_for_four_accepts_four_and_refuses_the_fifth(rig: Rig) -> None:
    ids = [await rig.submit(name) for name in ("w1", "w2", "w3", "w4")]
    states = {rig.engine.get(i).state for i in ids}
    assert State.QUEUED in states  # two run, two wait for a slot: all four reserve
    with pytest.raises(InsufficientResources) as refused:
        await rig.submit("w5")
    assert refused.value.message == (
        "b has 16.0GiB free, 16.0GiB reserved by 4 migrations; w5 needs 4.0GiB"
    )
    assert rig.store.active_for_instance("w5") is None  # nothing recorded
    # The reservations come from the store's unfinished records: a restart keeps them.
    await rig.engine.stop()
    rig.engine = rig.new_engine()
    await rig.engine.start()
    with pytest.raises(InsufficientResources):
        await rig.submit("w5")
    # Once they have landed the memory is taken for real: still no room, and no
    # migration failed for want of it.
    assert await rig.clock.run_until(lambda: rig.engine.finished(ids), limit=3600)
    assert {rig.engine.get(i).state for i in ids} == {State.COMPLETED}
    with pytest.raises(InsufficientResources, match="b has 0B free"):
        await rig.submit("w5")


async def test_chosen_destination_is_recorded_with_its_reason(rig: Rig) -> None:
    mid = await rig.submit("w1", None)
    record = rig.engine.get(mid)
    assert record.destination == "b"  # most free memory (c: 12 GiB, d: 8 GiB)
    assert record.placement is not None and record.placement.how == "chosen"
    assert record.placement.reason.startswith("b: most free memory after reservations")
    accepted = rig.store.events(mid)[0].reason
    assert "destination chosen: b: most free memory" in accepted
    assert rig.metrics.registry.get_sample_value("lmwatch_placements_total", {"how": "chosen"}) == 1
    # The next one sees the reservation: b has 12 GiB left, as much as c; c's free slot
    # ties too, so the name decides... and w1's migration already counts on b.
    second = rig.engine.get(await rig.submit("w2", None))
    assert second.destination == "c"
    assert second.placement is not None
    assert "fewest migrations" in second.placement.reason


async def test_the_group_rule_named_refused_and_chosen_elsewhere(rig: Rig) -> None:
    with pytest.raises(GroupConflict, match="group 'shard'"):
        await rig.submit("g1", "b")
    with pytest.raises(GroupConflict):
        await rig.submit("g1", "b", force=True)  # force never breaks the group rule
    record = rig.engine.get(await rig.submit("g1", None))
    assert record.destination != "b"
    assert record.placement is not None
    assert "b rejected: instance of group 'shard'" in record.placement.reason


async def test_handover_profiles_avoid_hosts_that_cannot_take_handover(rig: Rig) -> None:
    placement = await rig.engine.place("db", destinations=["c", "d"])
    assert placement.host == "d"
    assert placement.rejected["c"] == "cannot take handover from a, which profile 'db' allows"
    # named, the host is checked as before (the start plan says handover is not armed)
    assert rig.engine.get(await rig.submit("db", "c")).destination == "c"


async def test_forced_skips_capacity_but_never_the_instances_protection(rig: Rig) -> None:
    await rig.submit("w1", "d")
    await rig.submit("w2", "d")
    with pytest.raises(InsufficientResources):
        await rig.submit("w3", "d")
    mid = await rig.submit("w3", "d", force=True)
    record = rig.engine.get(mid)
    assert record.placement is not None and record.placement.how == "forced"
    assert "destination forced" in rig.store.events(mid)[0].reason
    assert rig.metrics.registry.get_sample_value("lmwatch_placements_total", {"how": "forced"}) == 1
    with pytest.raises(Incompatible, match="pinned to host CPUs 6-7"):
        await rig.submit("pinned", "c", force=True)
    with pytest.raises(Invalid, match="force needs a named destination"):
        await rig.submit("w4", None, force=True)


async def test_place_explains_without_moving_anything(rig: Rig) -> None:
    await rig.submit("w1", "b")
    before = [r.id for r in rig.store.list()]
    placement = await rig.engine.place("pinned")
    assert [r.id for r in rig.store.list()] == before
    assert rig.driver.where("pinned") == "a"
    assert placement.host == "b"
    assert placement.rejected == {
        "c": "instance 'pinned' is pinned to host CPUs 6-7, host c has CPUs 0-3"
    }
    b = next(c for c in placement.candidates if c.host == "b")
    assert (b.reserved, b.reservations, b.arriving) == (4 << 30, 1, 1)
    assert [c.host for c in placement.candidates] == ["b", "c", "d"]
    only = await rig.engine.place("pinned", destinations=["d", "a"], exclude=["b"])
    assert [c.host for c in only.candidates] == ["d"]
    with pytest.raises(UnknownHost):
        await rig.engine.place("pinned", destinations=["z"])
    with pytest.raises(NotOnSource):
        await rig.engine.place("pinned", source="b")


async def test_no_destination_names_every_hosts_reason(rig: Rig) -> None:
    for name in ("w1", "w2"):
        await rig.submit(name, "d")
    rig.driver.inject_fault("source_gone", host="c", duration=3600)
    with pytest.raises(NoDestination) as refused:
        await rig.submit("g1", None)
    text = refused.value.message
    assert text.startswith("no host can take g1: ")
    assert "b rejected: instance of group 'shard'" in text
    assert "c rejected: c does not answer" in text
    assert "d rejected: d has 8.0GiB free, 8.0GiB reserved by 2 migrations" in text
    assert refused.value.status == 409 and refused.value.kind == "no-destination"


async def test_a_forced_migration_starts_past_the_hosts_own_memory_check(rig: Rig) -> None:
    """The record remembers the force, so the start (and a restart's re-attach) asks
    the driver without the free-memory check too."""
    for name in ("w1", "w2", "w3"):  # 12 GiB to a host with 8
        await rig.submit(name, "d", force=True)
    assert request_of(rig.store.list()[0]).force
    ids = [r.id for r in rig.store.list()]
    assert await rig.clock.run_until(lambda: rig.engine.finished(ids), limit=3600)
    assert {rig.engine.get(i).state for i in ids} == {State.COMPLETED}


class _StartsWithoutChecking(SimDriver):
    """A driver whose start does not run the pre-flight (as a real hypervisor's start
    only fails once it has begun); counts the starts it was asked for."""

    started: list[str]

    async def start(self, migration_id, request, plan) -> None:  # type: ignore[no-untyped-def]
        self.started = [*getattr(self, "started", []), request.instance]
        await super().start(migration_id, request, plan)

    async def preflight(self, request):  # type: ignore[no-untyped-def]
        if getattr(self, "started", None) is not None and request.instance == "w2":
            raise NotOnSource(f"instance {request.instance!r} runs on c, not on a")
        return await super().preflight(request)


async def test_a_queued_migration_is_checked_again_when_it_starts(tmp_path: Path) -> None:
    # w2 waits behind w1 (one arrival at a time); meanwhile it moved elsewhere. Its
    # start is refused in the pre-flight's words, and the hypervisor is never asked.
    rig = Rig(tmp_path)
    rig.driver = _StartsWithoutChecking(load_inventory_text(INVENTORY), rig.clock)
    rig.engine = Engine(
        driver=rig.driver,
        store=rig.store,
        profiles=rig.registry,
        clock=rig.clock,
        metrics=rig.metrics,
        settings=EngineSettings(max_per_destination=1),
    )
    await rig.engine.start()
    try:
        first = await rig.submit("w1")
        second = await rig.submit("w2")
        assert rig.engine.get(second).state is State.QUEUED
        assert await rig.clock.run_until(lambda: rig.engine.finished([first, second]), limit=600)
        record = rig.engine.get(second)
        assert record.state is State.FAILED
        ended = rig.store.events(second)[-1].reason
        assert "could not start" in ended and "runs on c, not on a" in ended
        assert rig.driver.started == ["w1"]
    finally:
        await rig.engine.stop()
