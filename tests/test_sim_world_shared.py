"""One simulated world in PostgreSQL driven by several drivers at once (issue 11):
a job taken over where its dead holder left it, drivers in separate processes
changing the world together without losing each other's changes, and each
driver answering from what the others did."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import signal
from typing import Any

import psycopg
import pytest

from lmwatch.clock import VirtualClock
from lmwatch.drivers.base import DriverError, NotOnSource, Refused
from lmwatch.drivers.inventory import load_inventory_text
from lmwatch.drivers.sim import SimDriver
from lmwatch.drivers.sim_world_pg import PostgresWorld
from lmwatch.model import GIB, MIB, MigrationRequest, Phase, StartPlan

INVENTORY_TEXT = """
hosts:
  - {name: a, memory: 64GiB}
  - {name: b, memory: 64GiB}
  - {name: c, memory: 64GiB}
default_bandwidth: 1GiB/s
instances:
  - {name: small, host: a, memory: 1GiB, working_set: 16MiB, change_rate: 1MiB/s}
  - {name: big, host: a, memory: 16GiB, working_set: 16MiB, change_rate: 1MiB/s}
  - {name: large, host: a, memory: 16GiB, working_set: 16MiB, change_rate: 1MiB/s}
"""
PLAIN = StartPlan(arm_handover=False, arm_slow_down=False, blackout_budget=0.3)


def request(instance: str, source: str = "a", destination: str = "b") -> MigrationRequest:
    return MigrationRequest(instance=instance, source=source, destination=destination)


def driver(url: str, clock: VirtualClock, text: str = INVENTORY_TEXT, **kw: float) -> SimDriver:
    """A driver as one daemon builds it (its own keeper: its own connection)."""
    return SimDriver(load_inventory_text(text), clock, world=PostgresWorld(url), **kw)


def holder_of(url: str, job_id: str) -> tuple[str, float]:
    with psycopg.connect(url) as db:
        row = db.execute("SELECT holder, at FROM sim_shared_jobs WHERE id = %s", (job_id,))
        found = row.fetchone()
    assert found is not None
    return str(found[0]), float(found[1])


async def test_a_job_is_taken_over_where_its_dead_holder_left_it(pg_url: str) -> None:
    clock = VirtualClock()
    first = driver(pg_url, clock, save_every=1.0)
    await first.start("m", request("big"), PLAIN)
    await clock.advance(5.0)
    last = await first.sample("m")  # saved with it (a second since the last save)
    assert holder_of(pg_url, "m")[1] == clock.now()
    # The first daemon is killed (nothing closed); 2 s later another takes its job.
    await clock.advance(2.0)
    second = driver(pg_url, clock)
    assert await second.reattach("m", request("big"), PLAIN) is None  # still running
    assert second._shared is not None
    assert holder_of(pg_url, "m")[0] == second._shared.holder
    now = await second.sample("m")
    assert now.phase is Phase.COPYING and now.passes == last.passes
    # From where the first left it: what it had sent, and 1 GiB/s for the 2 s since.
    assert now.memory_transferred == pytest.approx(last.memory_transferred + 2 * GIB, rel=0.01)
    assert now.memory_remaining < last.memory_remaining
    await clock.advance(30.0)
    assert (await second.result("m")).phase is Phase.COMPLETED
    assert second.where("big") == "b"
    assert first.where("big") == "b"  # the first's view: the world, not its memory
    taken_at = holder_of(pg_url, "m")
    # The first, still holding its copy, can no longer save it: it drops the job.
    with pytest.raises(DriverError, match="no migration 'm' is known"):
        await first.sample("m")
    with pytest.raises(DriverError, match="no migration 'm' is known"):
        await first.cancel("m")
    assert holder_of(pg_url, "m") == taken_at  # nothing of the first's written
    # The instance moved once: its memory left a and reached b once.
    third = driver(pg_url, clock)
    assert third.free_memory("a") == 80 * GIB and third.free_memory("b") == 48 * GIB


START = 1_800_000_000.0  # every process's virtual clock starts here


async def _start_and_hang(url: str, ready: Any) -> None:
    clock = VirtualClock(START)
    sim = driver(url, clock, save_every=1.0)
    await sim.start("m", request("big"), PLAIN)
    await clock.advance(5.0)
    await sim.sample("m")  # saved at START + 5
    ready.set()
    await asyncio.sleep(3600)  # until killed


def start_and_hang(url: str, ready: Any) -> None:
    asyncio.run(_start_and_hang(url, ready))


async def test_a_job_of_a_killed_process_is_taken_over_by_another(pg_url: str) -> None:
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    process = context.Process(target=start_and_hang, args=(pg_url, ready))
    process.start()
    try:
        assert ready.wait(60)
    finally:
        os.kill(process.pid or 0, signal.SIGKILL)
        process.join(10)
    assert holder_of(pg_url, "m")[1] == START + 5.0
    clock = VirtualClock(START + 7.0)
    sim = driver(pg_url, clock)
    assert await sim.reattach("m", request("big"), PLAIN) is None
    now = await sim.sample("m")
    assert now.phase is Phase.COPYING
    assert now.memory_transferred == pytest.approx(7 * GIB, rel=0.02)  # 1 GiB/s since START
    await clock.advance(30.0)
    assert (await sim.result("m")).phase is Phase.COMPLETED
    assert sim.where("big") == "b" and sim.free_memory("b") == 48 * GIB


async def test_two_drivers_starting_one_instance_at_once_start_it_once(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both checked before either started: the database refuses the second start."""
    clock = VirtualClock()
    first = driver(pg_url, clock)
    second = driver(pg_url, clock)
    checked = await second.preflight(request("big"))

    async def stale_preflight(_: MigrationRequest) -> Any:
        return checked

    monkeypatch.setattr(second, "preflight", stale_preflight)
    await first.start("m", request("big"), PLAIN)
    with pytest.raises(Refused, match="already migrating"):
        await second.start("n", request("big"), PLAIN)
    with pytest.raises(DriverError, match="no migration 'n' is known"):
        await second.sample("n")
    await clock.advance(30.0)
    assert first.where("big") == "b" and second.free_memory("b") == 48 * GIB


async def test_an_action_on_a_job_taken_over_is_refused_and_not_written(pg_url: str) -> None:
    clock = VirtualClock()
    first = driver(pg_url, clock, save_every=60.0)
    await first.start("m", request("big"), PLAIN)
    await clock.advance(2.0)
    second = driver(pg_url, clock)
    assert await second.reattach("m", request("big"), PLAIN) is None
    with pytest.raises(DriverError, match="no migration 'm' is known"):
        await first.cancel("m")  # its save finds the job held by the second
    await clock.advance(30.0)
    assert (await second.result("m")).phase is Phase.COMPLETED  # not cancelled


async def test_an_instance_moved_by_one_driver_is_refused_from_its_old_host_by_another(
    pg_url: str,
) -> None:
    clock = VirtualClock()
    mover = driver(pg_url, clock)
    other = driver(pg_url, clock)
    assert other.where("small") == "a"  # what it knew before
    await mover.start("m", request("small"), PLAIN)
    # Under way there: refused here too, and not started twice.
    with pytest.raises(Refused, match="already migrating"):
        await other.preflight(request("small", "a", "c"))
    await clock.advance(10.0)
    assert mover.where("small") == "b"
    with pytest.raises(NotOnSource, match="runs on b, not on a"):
        await other.preflight(request("small", "a", "c"))
    with pytest.raises(NotOnSource):
        await other.start("again", request("small", "a", "c"), PLAIN)
    assert (await other.preflight(request("small", "b", "c"))).host == "b"
    assert {i.host for i in await other.instances_on("b")} == {"b"}
    assert [i.name for i in await other.instances_on("b")] == ["small"]
    assert other.free_memory("b") == 63 * GIB


async def test_a_job_another_driver_holds_is_seen_where_it_is_now(pg_url: str) -> None:
    """Hosts go on with a migration whoever watches: its holder has not advanced it,
    yet the other driver sees the instance on its destination once it got there."""
    clock = VirtualClock()
    mover = driver(pg_url, clock)
    other = driver(pg_url, clock)
    await mover.start("m", request("small"), PLAIN)
    await clock.advance(10.0)  # the mover is not asked anything meanwhile
    assert other.where("small") == "b"
    assert {i.name: i.host for i in other.instances()} == {"small": "b", "big": "a", "large": "a"}


async def test_a_fault_injected_through_one_driver_reaches_the_others(pg_url: str) -> None:
    clock = VirtualClock()
    first = driver(pg_url, clock)
    second = driver(pg_url, clock, save_every=1.0)
    await second.start("m", request("big"), PLAIN)
    first.inject_fault("link_break", between=("a", "b"))
    with pytest.raises(DriverError, match="cannot reach"):
        await second.start("n", request("small"), PLAIN)
    await clock.advance(1.0)
    await second.sample("m")  # its periodic save reads the faults: the link is broken
    stalled = await second.sample("m")
    await clock.advance(3.0)
    assert (await second.sample("m")).memory_transferred == stalled.memory_transferred
    first.clear_faults()
    await second.start("n", request("small"), PLAIN)


async def test_a_link_is_shared_with_the_jobs_other_drivers_hold_on_it(pg_url: str) -> None:
    """The documented model: a driver shares a link among its own jobs on it and the
    others' unended jobs on it as read at its last periodic save."""
    clock = VirtualClock()
    first = driver(pg_url, clock, save_every=1.0)
    second = driver(pg_url, clock, save_every=1.0)
    await first.start("m", request("big"), PLAIN)
    await second.start("n", request("large"), PLAIN)
    await clock.advance(0.25)
    for sim, job in ((first, "m"), (second, "n")):
        await clock.advance(1.0)
        await sim.sample(job)  # a periodic save: counts the other's job
    before = (await first.sample("m")).memory_transferred
    await clock.advance(0.5)
    after = (await first.sample("m")).memory_transferred
    assert after - before == pytest.approx(0.25 * GIB, rel=0.05)  # half of 1 GiB/s


# ---------------------------------------------------------------- several at once

PER_SOURCE = 30
INSTANCE_MEMORY = 256 * MIB


def many_text(sources: int) -> str:
    hosts = [f"  - {{name: s{k}, memory: 64GiB}}" for k in range(sources)]
    hosts += ["  - {name: d0, memory: 64GiB}", "  - {name: d1, memory: 64GiB}"]
    instances = [
        f"  - {{name: v{k}-{i}, host: s{k}, memory: 256MiB, working_set: 8MiB,"
        " change_rate: 1MiB/s}"
        for k in range(sources)
        for i in range(PER_SOURCE)
    ]
    return (
        "hosts:\n"
        + "\n".join(hosts)
        + "\ndefault_bandwidth: 1GiB/s\ninstances:\n"
        + "\n".join(instances)
        + "\n"
    )


def destination(i: int) -> str:
    return f"d{i % 2}"


async def _drive(url: str, sources: int, k: int) -> list[tuple[str, str]]:
    """One daemon's share: every instance of source s{k}, to d0 and d1 at once."""
    clock = VirtualClock()
    sim = driver(url, clock, many_text(sources))
    running: set[str] = set()
    for i in range(PER_SOURCE):
        migration = f"m{k}-{i}"
        await sim.start(migration, request(f"v{k}-{i}", f"s{k}", destination(i)), PLAIN)
        running.add(migration)
    ended: list[tuple[str, str]] = []
    for _ in range(600):
        if not running:
            break
        await clock.advance(0.5)
        for migration in sorted(running):
            sample = await sim.sample(migration)
            if sample.phase.finished:
                ended.append((migration, (await sim.result(migration)).phase.value))
                running.discard(migration)
    await sim.close()
    return ended


def drive(url: str, sources: int, k: int) -> list[tuple[str, str]]:
    return asyncio.run(_drive(url, sources, k))


@pytest.mark.parametrize("drivers", [2, 3])
async def test_drivers_in_separate_processes_lose_none_of_each_others_changes(
    pg_url: str, drivers: int
) -> None:
    driver(pg_url, VirtualClock(), many_text(drivers))  # the world made before they start
    context = multiprocessing.get_context("spawn")
    with context.Pool(drivers) as pool:
        shares = [pool.apply_async(drive, (pg_url, drivers, k)) for k in range(drivers)]
        ended = [share.get(timeout=240) for share in shares]
    for k, share in enumerate(ended):
        assert sorted(share) == sorted((f"m{k}-{i}", "completed") for i in range(PER_SOURCE))
    look = driver(pg_url, VirtualClock(), many_text(drivers))
    placed = {i.name: i.host for i in look.instances()}
    assert placed == {
        f"v{k}-{i}": destination(i) for k in range(drivers) for i in range(PER_SOURCE)
    }
    # Each move applied exactly once: every host's free memory is what the moves say.
    for k in range(drivers):
        assert look.free_memory(f"s{k}") == 64 * GIB + PER_SOURCE * INSTANCE_MEMORY
    for d in ("d0", "d1"):
        arrived = drivers * PER_SOURCE // 2
        assert look.free_memory(d) == 64 * GIB - arrived * INSTANCE_MEMORY
    saved = PostgresWorld(pg_url).load()
    assert saved is not None and len(saved.jobs) == drivers * PER_SOURCE
    for blob, _ in saved.jobs.values():
        assert pickle.loads(blob).settled
