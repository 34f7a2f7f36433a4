"""The simulator driver in virtual time: checks, moves, actions, faults, restarts."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from samplingtools import page_sampling_spread

from lmwatch.clock import VirtualClock
from lmwatch.drivers.base import (
    CHANGE_RATE_WINDOW,
    ActionRefused,
    AlreadyOnDestination,
    Driver,
    DriverError,
    HostUnreachable,
    Incompatible,
    InsufficientResources,
    NameTaken,
    NotOnSource,
    Refused,
    UnknownHost,
    UnknownInstance,
)
from lmwatch.drivers.inventory import Inventory, default_inventory, load_inventory_text
from lmwatch.drivers.sim import SimDriver
from lmwatch.drivers.simphysics import Tuning
from lmwatch.model import GIB, MIB, MigrationRequest, Phase, StartPlan

INVENTORY = load_inventory_text("""
hosts:
  - {name: host-a, memory: 64GiB}
  - {name: host-b, memory: 64GiB}
  - {name: host-c, memory: 6GiB, handover: false, slow_down: false}
links:
  - {between: [host-a, host-b], bandwidth: 1GiB/s}
default_bandwidth: 256MiB/s
instances:
  - {name: idle, host: host-a, memory: 4GiB, working_set: 64MiB, change_rate: 1MiB/s}
  - {name: idle-2, host: host-a, memory: 4GiB, working_set: 64MiB, change_rate: 1MiB/s}
  - {name: busy, host: host-a, memory: 4GiB, working_set: 1GiB, change_rate: 2GiB/s}
  - {name: big, host: host-a, memory: 8GiB, working_set: 1GiB, change_rate: 1MiB/s}
  - name: bursty
    host: host-b
    memory: 2GiB
    change_rate: {pattern: bursty, base: 10MiB/s, peak: 110MiB/s, period: 20s, duty: 0.1}
    labels: {tier: web}
""")

PLAIN = StartPlan(arm_handover=False, arm_slow_down=False, blackout_budget=0.3)
ARMED = StartPlan(arm_handover=True, arm_slow_down=True, blackout_budget=0.3)


def request(instance: str, source: str = "host-a", destination: str = "host-b") -> MigrationRequest:
    return MigrationRequest(instance=instance, source=source, destination=destination)


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def driver(clock: VirtualClock) -> SimDriver:
    return SimDriver(INVENTORY, clock)


async def wait(driver: SimDriver, clock: VirtualClock, mid: str, timeout: float) -> float:
    """Run wait_event in virtual time; returns the virtual seconds it slept."""
    start = clock.now()
    task = asyncio.ensure_future(driver.wait_event(mid, timeout))
    assert await clock.run_until(task.done, limit=timeout + 1)
    await task
    return clock.now() - start


def test_is_a_driver(driver: SimDriver) -> None:
    assert isinstance(driver, Driver)
    assert driver.name == "sim"


async def test_idle_migration_moves_the_instance(driver: SimDriver, clock: VirtualClock) -> None:
    info = await driver.preflight(request("idle"))
    assert (info.host, info.memory_bytes) == ("host-a", 4 * GIB)
    free_before = driver.free_memory("host-b")
    await driver.start("m1", request("idle"), PLAIN)
    sample = await driver.sample("m1")
    assert (sample.phase, sample.passes, sample.change_rate) == (Phase.COPYING, 1, 0.0)
    assert sample.memory_remaining == 4 * GIB
    await clock.advance(2.0)
    sample = await driver.sample("m1")
    assert sample.memory_transferred == pytest.approx(2 * GIB, rel=0.01)
    assert sample.transfer_rate == 1 * GIB
    await clock.advance(3.0)
    result = await driver.result("m1")
    assert result.phase is Phase.COMPLETED and result.running_on == "host-b"
    assert result.blackout_seconds is not None and result.blackout_seconds < 0.3
    assert driver.where("idle") == "host-b"
    assert driver.free_memory("host-b") == free_before - 4 * GIB
    assert (await driver.describe("idle")).host == "host-b"
    # and back again
    await driver.start("m2", request("idle", "host-b", "host-a"), PLAIN)
    await clock.advance(10.0)
    assert driver.where("idle") == "host-a"


@pytest.mark.parametrize(
    ("req", "error", "message"),
    [
        (request("idle", "host-z"), UnknownHost, "host-z"),
        (request("idle", destination="host-z"), UnknownHost, "host-z"),
        (request("nobody"), UnknownInstance, "nobody"),
        (request("bursty"), AlreadyOnDestination, "already runs on host-b"),
        (request("bursty", "host-a", "host-c"), NotOnSource, "runs on host-b"),
        (request("idle", "host-a", "host-a"), Refused, "same host"),
        (request("big", "host-a", "host-c"), InsufficientResources, "host-c has"),
    ],
)
async def test_preflight_refusals(
    driver: SimDriver, req: MigrationRequest, error: type[Refused], message: str
) -> None:
    with pytest.raises(error, match=message) as caught:
        await driver.preflight(req)
    assert type(caught.value) is error
    with pytest.raises(error):
        await driver.start("m", req, PLAIN)


async def test_second_migration_is_refused_and_reservations_are_not_the_drivers(
    driver: SimDriver,
) -> None:
    await driver.start("m1", request("idle", "host-a", "host-c"), PLAIN)
    with pytest.raises(Refused, match="already migrating"):
        await driver.preflight(request("idle", "host-a", "host-c"))
    # host-c has 6 GiB: the 4 GiB copying there are the engine's to reserve (one place
    # subtracts reservations), so the driver reports and checks its own free figure.
    assert (await driver.host_info("host-c")).free_memory == 6 * GIB
    await driver.preflight(request("idle-2", "host-a", "host-c"))


async def test_force_skips_only_the_memory_check(driver: SimDriver) -> None:
    big = request("big", "host-a", "host-c")
    with pytest.raises(InsufficientResources):
        await driver.preflight(big)
    info = await driver.preflight(dataclasses.replace(big, force=True))
    assert info.name == "big"
    with pytest.raises(AlreadyOnDestination):
        await driver.preflight(dataclasses.replace(request("bursty"), force=True))


async def test_host_info_lists_the_instances_running_there(driver: SimDriver) -> None:
    info = await driver.host_info("host-b")
    assert info.free_memory == driver.free_memory("host-b")
    assert {i.name for i in info.instances} == {
        i.name for i in driver.instances() if i.host == "host-b"
    }
    assert all(i.host == "host-b" for i in info.instances)
    with pytest.raises(UnknownHost):
        await driver.host_info("host-z")


async def test_instances_are_found_by_uuid(driver: SimDriver) -> None:
    uuid = next(i.uuid for i in INVENTORY.instances if i.name == "bursty")
    info = await driver.describe(uuid)
    assert (info.name, info.host, dict(info.labels)) == ("bursty", "host-b", {"tier": "web"})
    with pytest.raises(UnknownInstance):
        await driver.describe("bursty", host="host-a")
    assert {i.name for i in driver.instances()} == {i.name for i in INVENTORY.instances}


async def test_capabilities_and_arming(driver: SimDriver) -> None:
    caps = await driver.capabilities("host-a", "host-c")
    assert not caps.handover and caps.slow_down
    assert not (await driver.capabilities("host-c", "host-a")).slow_down
    with pytest.raises(Incompatible):
        await driver.start("m", request("idle", "host-a", "host-c"), ARMED)


async def test_measure_change_rate(driver: SimDriver) -> None:
    # distinct bytes dirtied in the window the real driver and the benchmark measure
    # over, as the hypervisor's page sampling reads them: writing 2 GiB/s over a 1 GiB
    # working set dirties all of it in a second, no more (a sequential writer)
    busy = await driver.measure_change_rate("busy", "host-a")
    assert busy is not None and busy.window == CHANGE_RATE_WINDOW == 1
    spread = page_sampling_spread(GIB, 1.0, 4 * GIB)
    assert busy.bytes_per_second == pytest.approx(GIB, abs=spread)
    assert spread < 0.2 * GIB
    # a burst of 110 MiB/s for 2 s in every 20 s, 10 MiB/s otherwise: the window sees
    # the burst the pattern begins with
    bursty = await driver.measure_change_rate("bursty", "host-b")
    assert bursty is not None and bursty.window == CHANGE_RATE_WINDOW
    assert bursty.bytes_per_second == pytest.approx(
        110 * MIB, abs=page_sampling_spread(110 * MIB, 1.0, 2 * GIB)
    )
    assert bursty.bytes_per_second > 10 * MIB * 3
    # each reading draws its own scatter, as each real one samples other pages
    readings = {(await driver.measure_change_rate("busy", "host-a")) for _ in range(5)}
    assert len(readings) > 1
    with pytest.raises(NotOnSource):
        await driver.measure_change_rate("busy", "host-b")


async def test_never_converging_then_pause(driver: SimDriver, clock: VirtualClock) -> None:
    await driver.start("m", request("busy"), PLAIN)
    await clock.advance(600)
    sample = await driver.sample("m")
    assert sample.phase is Phase.COPYING and sample.passes > 50
    assert sample.change_rate > 0 and sample.expected_blackout is not None
    await driver.pause("m")
    assert (await driver.sample("m")).phase is Phase.COMPLETING
    await clock.advance(5)
    result = await driver.result("m")
    assert result.phase is Phase.COMPLETED and result.paused
    assert result.blackout_seconds is not None
    assert 0.03 < result.blackout_seconds <= 1.0 + 0.03 + 1e-6  # at most W/B + device state


async def test_raising_the_budget_completes(driver: SimDriver, clock: VirtualClock) -> None:
    await driver.start("m", request("busy"), PLAIN)
    await clock.advance(60)
    await driver.set_blackout_budget("m", 1.2)
    assert (await driver.sample("m")).blackout_budget == 1.2
    await clock.advance(5)
    result = await driver.result("m")
    assert result.phase is Phase.COMPLETED and not result.paused
    assert result.blackout_seconds is not None and result.blackout_seconds <= 1.2


async def test_handover_and_cancel_rules(driver: SimDriver, clock: VirtualClock) -> None:
    await driver.start("plain", request("busy"), PLAIN)
    await clock.advance(10)
    with pytest.raises(ActionRefused, match="not armed"):
        await driver.handover("plain")
    await driver.cancel("plain")
    await clock.advance(Tuning().cancel_delay + 0.1)
    assert (await driver.result("plain")).phase is Phase.CANCELLED
    assert driver.where("busy") == "host-a"

    await driver.start("armed", request("busy"), ARMED)
    await clock.advance(10)
    await driver.handover("armed")
    assert driver.where("busy") == "host-b"
    with pytest.raises(ActionRefused, match="cannot cancel once handed over"):
        await driver.cancel("armed")
    await clock.advance(5)
    result = await driver.result("armed")
    assert result.handed_over and result.blackout_seconds is not None
    assert result.blackout_seconds < 0.1


async def test_bandwidth_cap_and_sharing(driver: SimDriver, clock: VirtualClock) -> None:
    await driver.start("alone", request("idle"), PLAIN)
    await driver.set_bandwidth("alone", 512 * MIB)
    await clock.advance(1)
    assert (await driver.sample("alone")).transfer_rate == 512 * MIB
    await driver.set_bandwidth("alone", None)
    await driver.start("other", request("idle-2"), PLAIN)
    await clock.advance(1)
    rates = [(await driver.sample(m)).transfer_rate for m in ("alone", "other")]
    assert rates == [pytest.approx(0.5 * GIB), pytest.approx(0.5 * GIB)]


async def test_wait_event_wakes_at_the_next_pass(driver: SimDriver, clock: VirtualClock) -> None:
    await driver.start("m", request("busy"), PLAIN)
    # 4 GiB at 1 GiB/s, counted again once less than the budget's worth (0.3 GiB) is left
    assert await wait(driver, clock, "m", 60.0) == pytest.approx(3.7, abs=0.01)
    assert (await driver.sample("m")).passes == 2
    assert await wait(driver, clock, "m", 0.5) == pytest.approx(0.5)
    await driver.cancel("m")
    assert await wait(driver, clock, "m", 60.0) == pytest.approx(Tuning().cancel_delay, abs=0.01)
    assert (await driver.sample("m")).phase is Phase.CANCELLED


async def test_reattach(driver: SimDriver, clock: VirtualClock) -> None:
    await driver.start("m", request("idle"), PLAIN)
    assert await driver.reattach("m", request("idle"), PLAIN) is None
    await clock.advance(10)
    result = await driver.reattach("m", request("idle"), PLAIN)
    assert result is not None and result.phase is Phase.COMPLETED
    lost = await driver.reattach("gone", request("busy"), PLAIN)
    assert lost is not None and lost.phase is Phase.FAILED
    assert lost.running_on == "host-a"
    assert lost.error == (
        "the migration is no longer known to the hypervisor; instance runs on host-a"
    )


async def test_unknown_migration_and_early_result(driver: SimDriver) -> None:
    with pytest.raises(DriverError, match="no migration"):
        await driver.sample("nope")
    await driver.start("m", request("idle"), PLAIN)
    with pytest.raises(DriverError, match="still running"):
        await driver.result("m")


# ----------------------------------------------------------------------- faults


async def test_link_break_fails_after_timeout(driver: SimDriver, clock: VirtualClock) -> None:
    await driver.start("m", request("big"), PLAIN)
    await clock.advance(2)
    driver.inject_fault("link_break", between=("host-b", "host-a"))
    frozen = await driver.sample("m")
    await clock.advance(20)
    assert (await driver.sample("m")).memory_transferred == frozen.memory_transferred
    await clock.advance(15)
    result = await driver.result("m")
    assert result.phase is Phase.FAILED and result.running_on == "host-a"
    assert driver.where("big") == "host-a"
    with pytest.raises(DriverError, match="cannot reach"):
        await driver.start("again", request("big"), PLAIN)
    driver.clear_faults()
    await driver.start("again", request("big"), PLAIN)


async def test_link_break_during_handover_loses_the_instance(
    driver: SimDriver, clock: VirtualClock
) -> None:
    await driver.start("m", request("busy"), ARMED)
    await clock.advance(10)
    await driver.handover("m")
    driver.inject_fault("link_break", between=("host-a", "host-b"))
    await clock.advance(40)
    result = await driver.result("m")
    assert result.phase is Phase.FAILED and result.error is not None
    assert "the link broke during the handover" in result.error
    assert driver.where("busy") is None
    assert "busy" not in {i.name for i in driver.instances()}
    with pytest.raises(UnknownInstance, match="lost"):
        await driver.preflight(request("busy"))


@pytest.mark.parametrize("when", ["start", "job"])
async def test_destination_refuses(driver: SimDriver, clock: VirtualClock, when: str) -> None:
    driver.inject_fault("destination_refuses", host="host-b", when=when)
    if when == "start":
        with pytest.raises(DriverError, match="refused the incoming instance"):
            await driver.start("m", request("idle"), PLAIN)
        return
    await driver.start("m", request("idle"), PLAIN)
    await clock.advance(1)
    result = await driver.result("m")
    assert result.phase is Phase.FAILED and result.error is not None
    assert "refused the incoming instance" in result.error
    assert driver.where("idle") == "host-a"


async def test_source_gone_fails_the_copy(driver: SimDriver, clock: VirtualClock) -> None:
    await driver.start("m", request("busy"), PLAIN)
    await clock.advance(5)
    driver.inject_fault("source_gone", host="host-a", duration=60)
    with pytest.raises(DriverError, match="host-a does not answer"):
        await driver.sample("m")
    assert (await driver.reachable())["host-a"] is False
    with pytest.raises(HostUnreachable):
        await driver.preflight(request("idle"))
    await clock.advance(61)
    result = await driver.result("m")
    assert result.phase is Phase.FAILED and result.running_on == "host-a"


async def test_source_gone_during_handover_completes(
    driver: SimDriver, clock: VirtualClock
) -> None:
    await driver.start("m", request("busy"), ARMED)
    await clock.advance(5)
    await driver.handover("m")
    driver.inject_fault("source_gone", host="host-a", duration=10)
    await clock.advance(11)
    result = await driver.result("m")
    assert result.phase is Phase.COMPLETED and result.running_on == "host-b"
    assert driver.where("busy") == "host-b"


async def test_injected_sample_errors(driver: SimDriver) -> None:
    await driver.start("m", request("idle"), PLAIN)
    driver.inject_fault("driver_error_on_sample", count=2)
    for _ in range(2):
        with pytest.raises(DriverError):
            await driver.sample("m")
    assert (await driver.sample("m")).phase is Phase.COPYING
    await driver.start("other", request("idle-2"), PLAIN)
    driver.inject_fault("driver_error_on_sample", migration_id="m", count=1)
    assert (await driver.sample("other")).phase is Phase.COPYING
    with pytest.raises(DriverError):
        await driver.sample("m")
    assert (await driver.sample("m")).phase is Phase.COPYING
    with pytest.raises(ValueError, match="unknown fault"):
        driver.inject_fault("meteor")


# ------------------------------------------------------------- default inventory


async def test_default_inventory_is_watchable() -> None:
    clock = VirtualClock()
    driver = SimDriver(default_inventory(), clock)
    inv: Inventory = driver.inventory
    ends: dict[str, float | None] = {}
    for instance in inv.instances:
        source = instance.host
        destination = "host-b" if source == "host-a" else "host-a"
        await driver.start(instance.name, request(instance.name, source, destination), PLAIN)
    await clock.advance(180)
    for instance in inv.instances:
        sample = await driver.sample(instance.name)
        ends[instance.name] = sample.time if sample.phase.finished else None
    assert ends["web-1"] is not None and ends["cache-1"] is not None
    assert ends["db-1"] is None and ends["batch-1"] is None


async def test_a_link_is_shared_until_one_job_ends(driver: SimDriver, clock: VirtualClock) -> None:
    await driver.start("small", request("idle"), PLAIN)  # 4 GiB
    await driver.start("large", request("big"), PLAIN)  # 8 GiB
    await clock.advance(7.9)
    assert not (await driver.sample("small")).phase.finished
    await clock.advance(0.3)  # both at half of 1 GiB/s: the small one ends at ~8 s
    assert (await driver.sample("small")).phase is Phase.COMPLETED
    assert (await driver.sample("large")).transfer_rate == 1 * GIB
    await clock.advance(3.7)
    assert not (await driver.sample("large")).phase.finished
    await clock.advance(0.5)  # then alone at full speed: ends at ~12 s
    assert (await driver.sample("large")).phase is Phase.COMPLETED


PINNED = load_inventory_text("""
hosts:
  - {name: host-a, memory: 64GiB, cpus: 16, numa_nodes: 2}
  - name: host-b
    memory: 64GiB
    cpus: 8
    numa_nodes: 1
    defined:
      - {name: taken, uuid: 0badc0de-0000-4000-8000-000000000002}
      - {name: leftover, uuid: 0badc0de-0000-4000-8000-000000000003}
      - {name: renamed-old, uuid: 0badc0de-0000-4000-8000-000000000004}
  - {name: host-c, memory: 64GiB}
instances:
  - {name: free, host: host-a, memory: 1GiB}
  - {name: within, host: host-a, memory: 1GiB, pinned_cpus: "0-7,^3", pinned_nodes: 0}
  - {name: wide, host: host-a, memory: 1GiB, pinned_cpus: "4-11"}
  - {name: far, host: host-a, memory: 1GiB, pinned_nodes: 1}
  - {name: taken, host: host-a, memory: 1GiB}
  - name: leftover
    host: host-a
    memory: 1GiB
    uuid: 0badc0de-0000-4000-8000-000000000003
  - name: renamed
    host: host-a
    memory: 1GiB
    uuid: 0badc0de-0000-4000-8000-000000000004
""")


@pytest.mark.parametrize(
    ("instance", "destination", "error", "message"),
    [
        ("free", "host-b", None, ""),
        ("within", "host-b", None, ""),
        ("wide", "host-c", None, ""),  # host-c does not model its CPUs
        ("leftover", "host-b", None, ""),  # the same name and uuid: the same instance
        ("wide", "host-b", Incompatible, "pinned to host CPUs 8-11, host host-b has CPUs 0-7"),
        ("far", "host-b", Incompatible, "pinned to host memory nodes 1, host host-b has nodes 0"),
        (
            "taken",
            "host-b",
            NameTaken,
            "host host-b already defines an instance named 'taken' with another identity "
            "(uuid 0badc0de-0000-4000-8000-000000000002); remove or rename it there first",
        ),
        ("renamed", "host-b", NameTaken, "under another name, 'renamed-old'"),
    ],
)
async def test_preflight_pinning_and_definitions(
    clock: VirtualClock,
    instance: str,
    destination: str,
    error: type[Refused] | None,
    message: str,
) -> None:
    driver = SimDriver(PINNED, clock)
    req = request(instance, "host-a", destination)
    if error is None:
        assert (await driver.preflight(req)).name == instance
        return
    with pytest.raises(error) as caught:
        await driver.preflight(req)
    assert message in str(caught.value)
    with pytest.raises(error):
        await driver.start("m", req, PLAIN)
    assert driver.where(instance) == "host-a"


async def test_an_instance_with_jitter_reports_scattered_transfer_rates() -> None:
    """`jitter` in the inventory is a real host's noise: the transfer-rate readings
    scatter within the share, the bytes moved do not."""
    inventory = load_inventory_text("""
hosts: [{name: host-a, memory: 64GiB}, {name: host-b, memory: 64GiB}]
default_bandwidth: 1GiB/s
instances:
  - {name: noisy, host: host-a, memory: 16GiB, working_set: 64MiB, jitter: 0.05}
  - {name: exact, host: host-a, memory: 16GiB, working_set: 64MiB}
""")
    clock = VirtualClock()
    driver = SimDriver(inventory, clock)
    await driver.start("n", request("noisy"), PLAIN)
    await driver.start("e", request("exact"), PLAIN)
    readings: dict[str, list[float]] = {"n": [], "e": []}
    for _ in range(5):
        await clock.advance(0.7)
        for job in readings:
            readings[job].append((await driver.sample(job)).transfer_rate)
    shared = readings["e"][0]  # the two share the link
    assert readings["e"] == [shared] * 5
    assert all(0.95 * shared <= r <= 1.05 * shared for r in readings["n"])
    assert len(set(readings["n"])) == 5


# ------------------------------------------------------------------ local disks

DISKS = load_inventory_text("""
hosts:
  - {name: host-a, memory: 64GiB, disk: 500GiB}
  - {name: host-b, memory: 64GiB, disk: 100GiB}
  - {name: host-c, memory: 64GiB, disk: 50GiB}
  - {name: host-d, memory: 64GiB}
links:
  - {between: [host-a, host-b], bandwidth: 1GiB/s}
default_bandwidth: 1GiB/s
instances:
  - {name: db-3, host: host-a, memory: 2GiB, working_set: 64MiB, disk: 80GiB}
  - name: files
    host: host-a
    memory: 2GiB
    working_set: 64MiB
    change_rate: 1MiB/s
    disk: 30GiB
    disk_writes: 10MiB/s
  - {name: plain, host: host-a, memory: 2GiB, working_set: 64MiB}
""")


async def test_preflight_refuses_disks_the_destination_cannot_hold() -> None:
    driver = SimDriver(DISKS, VirtualClock())
    with pytest.raises(InsufficientResources) as refused:
        await driver.preflight(request("db-3", destination="host-c"))
    assert refused.value.kind == "insufficient-resources"
    assert str(refused.value) == (
        "host-c has 50.0GiB of local storage free, db-3's disks need 80.0GiB"
    )
    info = await driver.preflight(request("db-3", destination="host-b"))
    assert info.local_disk_bytes == 80 * GIB
    # a forced placement skips the memory check, not this one: the copy could not fit
    forced = MigrationRequest(instance="db-3", source="host-a", destination="host-c", force=True)
    with pytest.raises(InsufficientResources, match="local storage"):
        await driver.preflight(forced)
    # without disks, or to a host whose storage is not modelled: no storage check
    await driver.preflight(request("plain", destination="host-c"))
    await driver.preflight(request("db-3", destination="host-d"))


async def test_disks_of_migrations_under_way_count_as_taken() -> None:
    clock = VirtualClock()
    driver = SimDriver(DISKS, clock)
    await driver.start("m1", request("db-3"), PLAIN)  # 80 of host-b's 100 GiB
    with pytest.raises(InsufficientResources, match=r"20\.0GiB of local storage free"):
        await driver.preflight(request("files"))
    await driver.cancel("m1")
    await clock.advance(Tuning().cancel_delay + 0.1)
    await driver.preflight(request("files"))  # the cancelled copy is discarded


async def test_a_completed_migration_moves_the_disk_with_the_instance() -> None:
    clock = VirtualClock()
    driver = SimDriver(DISKS, clock)
    await driver.start("m", request("files"), PLAIN)
    await clock.advance(10.0)
    sample = await driver.sample("m")
    assert sample.disk_total == 30 * GIB and 0 < sample.disk_remaining < 30 * GIB
    assert sample.memory_transferred == 0
    assert driver.free_storage("host-b") == 100 * GIB  # taken only once it has moved
    await clock.advance(60.0)
    result = await driver.result("m")
    assert result.phase is Phase.COMPLETED and driver.where("files") == "host-b"
    assert driver.free_storage("host-b") == 70 * GIB
    assert driver.free_storage("host-a") == 530 * GIB
    assert driver.free_storage("host-d") is None
    assert (await driver.describe("files")).local_disk_bytes == 30 * GIB


async def test_instances_on_follows_where_instances_run(
    driver: SimDriver, clock: VirtualClock
) -> None:
    assert [i.name for i in await driver.instances_on("host-a")] == [
        "idle",
        "idle-2",
        "busy",
        "big",
    ]
    assert [i.name for i in await driver.instances_on("host-b")] == ["bursty"]
    assert await driver.instances_on("host-c") == []
    await driver.start("m1", request("idle"), PLAIN)
    await clock.advance(10.0)
    assert "idle" not in {i.name for i in await driver.instances_on("host-a")}
    moved = [i for i in await driver.instances_on("host-b") if i.name == "idle"]
    assert moved and moved[0].host == "host-b" and moved[0].memory_bytes == 4 * GIB
    with pytest.raises(UnknownHost):
        await driver.instances_on("host-z")
    driver.inject_fault("source_gone", host="host-b", duration=30)
    with pytest.raises(HostUnreachable):
        await driver.instances_on("host-b")


async def test_host_info_agrees_with_where_while_instances_move() -> None:
    # The default inventory, with moves in every state: copying, handed over (running
    # on the destination before it completes), completed, cancelled.
    clock = VirtualClock()
    driver = SimDriver(default_inventory(), clock)
    await driver.start("copying", request("db-1"), PLAIN)
    await driver.start("handed", request("db-2", "host-b", "host-a"), ARMED)
    await driver.start("done", request("web-1"), PLAIN)
    await driver.start("cancelled", request("cache-1", "host-a", "host-c"), PLAIN)
    await clock.advance(1.0)
    await driver.handover("handed")
    await driver.cancel("cancelled")
    assert driver.where("db-2") == "host-a"  # running there before it completes
    for seconds in (0.5, 5.0, 60.0):
        await clock.advance(seconds)
        hosts = {h.name for h in driver.inventory.hosts}
        for host in sorted(hosts):
            info = await driver.host_info(host)
            expected = [i.name for i in driver.inventory.instances if driver.where(i.name) == host]
            assert [i.name for i in info.instances] == expected, (host, seconds)
            assert [i.name for i in await driver.instances_on(host)] == expected


async def test_a_cancelled_migration_can_be_started_again_and_the_guest_writes_on() -> None:
    inventory = load_inventory_text("""
hosts:
  - {name: host-a, memory: 64GiB}
  - {name: host-b, memory: 64GiB}
default_bandwidth: 100MiB/s
instances:
  - name: grower
    host: host-a
    memory: 8GiB
    working_set: 2GiB
    change_rate: {pattern: growing, start: 10MiB/s, per_minute: 60MiB/s, max: 50MiB/s}
""")
    clock = VirtualClock()
    driver = SimDriver(inventory, clock)
    await driver.start("m1", request("grower"), PLAIN)
    await clock.advance(30.0)
    with pytest.raises(DriverError, match="already started"):
        await driver.start("m1", request("grower"), PLAIN)  # still running
    await driver.cancel("m1")
    await clock.advance(5.0)
    assert (await driver.result("m1")).phase is Phase.CANCELLED
    slowed = dataclasses.replace(ARMED, slow_down_initial=0.5)
    await driver.start("m1", request("grower"), slowed)
    sample = await driver.sample("m1")
    assert sample.phase is Phase.COPYING and sample.passes == 1
    assert sample.memory_remaining == 8 * GIB  # copying begins anew
    job = driver._jobs["m1"]
    assert job.model.plan == slowed
    # 35 s after the first start the guest writes 10 + 35 MiB/s, not 10 again.
    assert job.model.change_rate_now() == pytest.approx(45 * MIB)
    await clock.advance(1800.0)
    assert (await driver.result("m1")).phase is Phase.COMPLETED
    assert driver.where("grower") == "host-b"
