"""The simulator's world kept in the store: what a restarted daemon finds. Every test
runs against both keepers: the SQLite file and a real PostgreSQL database."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pgtools import PgCluster

from lmwatch.clock import VirtualClock
from lmwatch.drivers.base import DriverError
from lmwatch.drivers.inventory import load_inventory_text
from lmwatch.drivers.sim import SimDriver
from lmwatch.drivers.sim_world import SqliteWorld, WorldKeeper
from lmwatch.model import GIB, MigrationRequest, Phase, StartPlan

INVENTORY_TEXT = """
hosts:
  - {name: a, memory: 64GiB}
  - {name: b, memory: 64GiB}
links:
  - {between: [a, b], bandwidth: 1GiB/s}
default_bandwidth: 1GiB/s
instances:
  - {name: small, host: a, memory: 1GiB, working_set: 16MiB, change_rate: 1MiB/s}
  - {name: big, host: a, memory: 16GiB, working_set: 16MiB, change_rate: 1MiB/s}
"""
INVENTORY = load_inventory_text(INVENTORY_TEXT)
PLAIN = StartPlan(arm_handover=False, arm_slow_down=False, blackout_budget=0.3)


def request(instance: str, source: str = "a", destination: str = "b") -> MigrationRequest:
    return MigrationRequest(instance=instance, source=source, destination=destination)


Keeper = Callable[[], WorldKeeper]


@pytest.fixture(params=["sqlite", "postgres"])
def keeper(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Keeper]:
    """Opens the same kept world anew (as each (re)started daemon does); all closed at
    the end."""
    opened: list[WorldKeeper] = []

    if request.param == "sqlite":
        path = str(tmp_path / "store.db")

        def open_sqlite() -> WorldKeeper:
            opened.append(SqliteWorld(path))
            return opened[-1]

        yield open_sqlite
    else:
        from lmwatch.drivers.sim_world_pg import PostgresWorld

        url = request.getfixturevalue("pg_url")

        def open_postgres() -> WorldKeeper:
            opened.append(PostgresWorld(url))
            return opened[-1]

        yield open_postgres
    for world in opened:
        world.close()


def driver_on(
    keeper: Keeper, clock: VirtualClock, inventory_text: str = INVENTORY_TEXT
) -> SimDriver:
    """A driver as a (re)started daemon builds it: the inventory, and the kept world."""
    return SimDriver(load_inventory_text(inventory_text), clock, world=keeper())


async def test_a_running_job_goes_on_while_no_daemon_watches(keeper: Keeper) -> None:
    clock = VirtualClock()
    first = driver_on(keeper, clock)
    await first.start("m", request("big"), PLAIN)
    await clock.advance(3.0)
    before = await first.sample("m")
    # The daemon dies (nothing closed); 5 s pass before the next one starts.
    await clock.advance(5.0)
    second = driver_on(keeper, clock)
    after = await second.sample("m")
    assert after.phase is Phase.COPYING
    moved = after.memory_transferred - before.memory_transferred
    assert moved == pytest.approx(5 * GIB, rel=0.02)  # 1 GiB/s for the 5 s unwatched
    await clock.advance(20.0)
    assert (await second.result("m")).phase is Phase.COMPLETED
    assert second.where("big") == "b"


async def test_a_moved_instance_stays_moved_and_an_ended_job_keeps_its_result(
    keeper: Keeper,
) -> None:
    clock = VirtualClock()
    first = driver_on(keeper, clock)
    await first.start("m", request("small"), PLAIN)
    await clock.advance(10.0)
    assert first.where("small") == "b"
    second = driver_on(keeper, clock)
    assert second.where("small") == "b"
    assert second.free_memory("b") == first.free_memory("b")
    assert (await second.result("m")).phase is Phase.COMPLETED
    assert await second.reattach("m", request("small"), PLAIN) is not None


async def test_without_a_kept_world_the_job_is_unknown() -> None:
    """What the daemon met before the world was kept (and still meets in memory)."""
    clock = VirtualClock()
    first = SimDriver(INVENTORY, clock)
    await first.start("m", request("big"), PLAIN)
    second = SimDriver(INVENTORY, clock)
    result = await second.reattach("m", request("big"), PLAIN)
    assert result is not None and result.phase is Phase.FAILED
    assert result.error is not None and "no longer known" in result.error


async def test_faults_and_actions_are_kept(keeper: Keeper) -> None:
    clock = VirtualClock()
    first = driver_on(keeper, clock)
    await first.start("m", request("big"), PLAIN)
    await clock.advance(2.0)
    first.inject_fault("link_break", between=("a", "b"))
    second = driver_on(keeper, clock)
    stalled = await second.sample("m")
    await clock.advance(5.0)
    assert (await second.sample("m")).memory_transferred == stalled.memory_transferred
    with pytest.raises(DriverError, match="cannot reach"):
        await second.start("other", request("small"), PLAIN)
    await second.cancel("m")
    third = driver_on(keeper, clock)
    await clock.advance(5.0)
    assert (await third.result("m")).phase is Phase.CANCELLED
    assert third.where("big") == "a"


async def test_instances_gone_from_the_inventory_are_dropped_new_ones_placed(
    keeper: Keeper,
) -> None:
    clock = VirtualClock()
    first = driver_on(keeper, clock)
    await first.start("m", request("small"), PLAIN)
    await clock.advance(10.0)
    edited = INVENTORY_TEXT.replace(
        "  - {name: big, host: a, memory: 16GiB, working_set: 16MiB, change_rate: 1MiB/s}\n",
        "  - {name: fresh, host: b, memory: 2GiB, working_set: 16MiB, change_rate: 1MiB/s}\n",
    )
    second = driver_on(keeper, clock, edited)
    assert {i.name: i.host for i in second.instances()} == {"small": "b", "fresh": "b"}


async def test_the_world_is_saved_periodically_not_only_on_actions(keeper: Keeper) -> None:
    """A restart replays at most `save_every` seconds of a job on its own."""
    clock = VirtualClock()
    world = keeper()
    first = SimDriver(INVENTORY, clock, world=world, save_every=2.0)
    await first.start("m", request("big"), PLAIN)
    saved_at = world.load()
    assert saved_at is not None and saved_at.jobs["m"][1] == clock.now()
    await clock.advance(3.0)
    await first.sample("m")
    later = world.load()
    assert later is not None and later.jobs["m"][1] >= saved_at.jobs["m"][1] + 2.0


DISK_TEXT = """
hosts:
  - {name: a, memory: 64GiB, disk: 100GiB}
  - {name: b, memory: 64GiB, disk: 100GiB}
links:
  - {between: [a, b], bandwidth: 1GiB/s}
instances:
  - {name: files, host: a, memory: 1GiB, working_set: 16MiB, disk: 20GiB, disk_writes: 10MiB/s}
"""


async def test_a_restart_mid_disk_copy_finds_the_copy_gone_on_and_finishes_it(
    keeper: Keeper,
) -> None:
    clock = VirtualClock()
    first = driver_on(keeper, clock, DISK_TEXT)
    await first.start("m", request("files"), PLAIN)
    await clock.advance(4.0)
    before = await first.sample("m")
    assert before.disk_remaining > 0
    # The daemon dies mid disk copy; 5 s pass before the next one starts.
    await clock.advance(5.0)
    second = driver_on(keeper, clock, DISK_TEXT)
    assert await second.reattach("m", request("files"), PLAIN) is None  # still running
    after = await second.sample("m")
    assert after.phase is Phase.COPYING and after.memory_transferred == 0
    assert after.disk_total == 20 * GIB
    assert after.disk_remaining < before.disk_remaining - 4 * GIB  # it went on unwatched
    await clock.advance(30.0)
    assert (await second.result("m")).phase is Phase.COMPLETED
    third = driver_on(keeper, clock, DISK_TEXT)
    assert third.where("files") == "b"
    assert third.free_storage("b") == 80 * GIB and third.free_storage("a") == 120 * GIB


async def test_an_ended_job_is_kept_a_day_then_dropped_by_the_periodic_save(
    keeper: Keeper,
) -> None:
    clock = VirtualClock()
    first = driver_on(keeper, clock)
    await first.start("m", request("small"), PLAIN)
    await clock.advance(10.0)
    assert (await first.result("m")).phase is Phase.COMPLETED
    # Other jobs' changes (saves of a few jobs) keep it; so does a restart within the day.
    await clock.advance(23 * 3600.0)
    await first.start("n", request("big"), PLAIN)
    assert (await driver_on(keeper, clock).result("m")).phase is Phase.COMPLETED
    # A day after it ended, the periodic full save drops it, from memory and the file.
    await clock.advance(2 * 3600.0)
    await first.sample("n")
    with pytest.raises(DriverError):
        await first.result("m")
    with pytest.raises(DriverError):
        await driver_on(keeper, clock).result("m")


async def test_the_postgres_world_is_kept_across_a_restart_of_the_database(
    pg_url: str, pg_cluster: PgCluster
) -> None:
    """The connection the restart broke is replaced on the next save."""
    from lmwatch.drivers.sim_world_pg import PostgresWorld

    clock = VirtualClock()
    world = PostgresWorld(pg_url)
    first = SimDriver(INVENTORY, clock, world=world)
    await first.start("m", request("big"), PLAIN)
    pg_cluster.restart()
    await first.cancel("m")  # an action: saved at once
    second = SimDriver(INVENTORY, clock, world=PostgresWorld(pg_url))
    await clock.advance(5.0)
    assert (await second.result("m")).phase is Phase.CANCELLED
    world.close()
