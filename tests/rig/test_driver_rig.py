"""The libvirt driver against the real two-host rig (rig/setup.sh, rig/up.sh).

Every real migration is checked on the destination: the guest runs there and its
heartbeats go on with bad=0 (no memory lost). Skipped with the rig's own reason
when it is not there, except under CI=true, where a missing rig fails.
Timings are printed (pytest -s) and written to $LMWATCH_RIG_TIMINGS (default
/tmp/lmwatch-driver-rig-timings.json).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from lmwatch.clock import WallClock
from lmwatch.drivers.base import ActionRefused, DriverError
from lmwatch.drivers.libvirt_driver import HostConfig, LibvirtDriver
from lmwatch.model import MIB, JobResult, MigrationRequest, Phase, Sample, StartPlan

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "rig"))
import rigctl

pytestmark = [pytest.mark.rig, pytest.mark.asyncio(loop_scope="module")]

TIMINGS: dict[str, dict[str, Any]] = {}
TIMINGS_FILE = os.environ.get("LMWATCH_RIG_TIMINGS", "/tmp/lmwatch-driver-rig-timings.json")
LINK = 16 * MIB  # a link the busy guest never converges over
IDLE = StartPlan(arm_handover=False, arm_slow_down=False, blackout_budget=0.3)


@pytest.fixture(scope="module", autouse=True)
def rig() -> Any:
    ok, why = rigctl.rig_available()
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"rig not available under CI: {why}")
        pytest.skip(why)
    yield
    if TIMINGS:
        Path(TIMINGS_FILE).write_text(json.dumps(TIMINGS, indent=2))
        print("\ndriver rig timings:", json.dumps(TIMINGS, indent=2))


def hosts() -> dict[str, HostConfig]:
    return {
        h: HostConfig(uri=rigctl.host_uri(h), migration_address="tcp://127.0.0.1")
        for h in rigctl.HOSTS
    }


@asynccontextmanager
async def opened() -> AsyncIterator[LibvirtDriver]:
    driver = LibvirtDriver(hosts(), WallClock())
    try:
        yield driver
    finally:
        await driver.close()


@asynccontextmanager
async def guest(name: str, **kwargs: Any) -> AsyncIterator[str]:
    """A booted rig guest on host a; destroyed everywhere afterwards."""
    t0 = time.monotonic()
    await asyncio.to_thread(rigctl.define_guest, "a", name, **kwargs)
    await asyncio.to_thread(rigctl.wait_heartbeat, name, 90.0, 2)
    TIMINGS.setdefault(name, {})["boot_s"] = round(time.monotonic() - t0, 2)
    try:
        yield name
    finally:
        await asyncio.to_thread(rigctl.destroy_everywhere, name)


async def follow(
    driver: LibvirtDriver,
    mid: str,
    until: Callable[[Sample], bool] | None = None,
    limit: float = 120.0,
) -> list[Sample]:
    """Sample (woken by events) until the job ends or `until` holds."""
    samples: list[Sample] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        sample = await driver.sample(mid)
        samples.append(sample)
        if sample.phase.finished or (until is not None and until(sample)):
            return samples
        await driver.wait_event(mid, 0.5)
    raise AssertionError(f"migration {mid} did not reach the expected point in {limit:.0f} s")


async def assert_runs_healthy(name: str, host: str) -> dict[str, int]:
    """The guest runs on `host` only, and its heartbeats continue with bad=0."""
    assert await asyncio.to_thread(rigctl.where_running, name) == [host]
    before = await asyncio.to_thread(rigctl.last_heartbeat, name, host)
    assert before is not None, f"no heartbeat from {name} on {host}"
    assert await asyncio.to_thread(rigctl.heartbeats_continue, name, 3.0)
    after = await asyncio.to_thread(rigctl.last_heartbeat, name, host)
    assert after is not None and after["n"] > before["n"]
    assert before["bad"] == 0 and after["bad"] == 0, f"memory lost: {after}"
    return after


def reported_downtime(driver: LibvirtDriver, mid: str) -> float | None:
    """The hypervisor's own final-stop figure (completed statistics), for the timings."""
    stats = driver._jobs[mid].completed_stats or {}
    value = stats.get("downtime")
    return None if value is None else round(value / 1000.0, 3)


def record(name: str, result: JobResult, started: float, **extra: Any) -> None:
    TIMINGS.setdefault(name, {}).update(
        total_s=round(time.monotonic() - started, 2),
        phase=result.phase.value,
        blackout_s=None if result.blackout_seconds is None else round(result.blackout_seconds, 3),
        passes=result.passes,
        transferred_mib=round(result.transferred / MIB, 1),
        running_on=result.running_on,
        **extra,
    )


async def test_idle_migration_completes() -> None:
    async with guest("lmw-drv-idle", labels={"tier": "database"}) as name, opened() as driver:
        request = MigrationRequest(name, "a", "b")
        info = await driver.preflight(request)
        assert info.labels == {"tier": "database"}
        assert (await driver.reachable()) == {"a": True, "b": True}
        caps = await driver.capabilities("a", "b")
        assert caps.handover and caps.slow_down
        t0 = time.monotonic()
        rate = await driver.measure_change_rate(name, "a")
        TIMINGS.setdefault(name, {})["change_rate_measure_s"] = round(time.monotonic() - t0, 2)
        TIMINGS[name]["change_rate_mib_s"] = (
            None if rate is None else round(rate.bytes_per_second / MIB, 2)
        )
        assert rate is None or rate.window > 0  # the seconds the measurement covered
        started = time.monotonic()
        await driver.start("m-idle", request, IDLE)
        samples = await follow(driver, "m-idle")
        result = await driver.result("m-idle")
        record(name, result, started, first_sample_passes=samples[0].passes)
        assert result.phase is Phase.COMPLETED, result.error
        assert result.running_on == "b"
        assert result.blackout_seconds is not None and result.blackout_seconds < 2.0
        assert result.transferred > 0
        assert samples[0].passes >= 1
        await assert_runs_healthy(name, "b")


async def start_busy(driver: LibvirtDriver, name: str, mid: str, plan: StartPlan) -> list[Sample]:
    """Start a guest that never converges over LINK and follow it to its third pass."""
    await driver.start(mid, MigrationRequest(name, "a", "b"), plan)
    samples = await follow(driver, mid, until=lambda s: s.passes >= 3)
    assert not samples[-1].phase.finished, "the busy guest finished on its own"
    return samples


def busy_plan(**kwargs: Any) -> StartPlan:
    return StartPlan(
        **{"arm_handover": False, "arm_slow_down": False, "blackout_budget": 0.3, "bandwidth": LINK}
        | kwargs
    )


async def test_busy_guest_completes_by_pause() -> None:
    async with guest("lmw-drv-pause", write_mib=32, rate_mib=40) as name, opened() as driver:
        started = time.monotonic()
        samples = await start_busy(driver, name, "m-pause", busy_plan())
        assert samples[-1].change_rate > 0  # measured after the first pass
        assert samples[-1].memory_remaining > 0
        t_pause = time.monotonic()
        await driver.pause("m-pause")
        after = await follow(driver, "m-pause")
        result = await driver.result("m-pause")
        record(
            name,
            result,
            started,
            after_pause_s=round(time.monotonic() - t_pause, 2),
            hypervisor_downtime_s=reported_downtime(driver, "m-pause"),
        )
        assert result.phase is Phase.COMPLETED, result.error
        assert result.paused and result.running_on == "b"
        assert result.blackout_seconds is not None and result.blackout_seconds > 0.3
        assert any(s.phase is Phase.COMPLETING for s in after[:-1]) or len(after) == 1
        await assert_runs_healthy(name, "b")


async def test_busy_guest_completes_by_handover() -> None:
    async with guest("lmw-drv-handover", write_mib=32, rate_mib=40) as name, opened() as driver:
        started = time.monotonic()
        await start_busy(driver, name, "m-hand", busy_plan(arm_handover=True))
        t_switch = time.monotonic()
        await driver.handover("m-hand")
        after = await follow(driver, "m-hand")
        result = await driver.result("m-hand")
        record(name, result, started, after_handover_s=round(time.monotonic() - t_switch, 2))
        assert result.phase is Phase.COMPLETED, result.error
        assert result.handed_over and result.running_on == "b"
        if len(after) > 1:
            assert after[0].phase is Phase.HANDOVER
        with pytest.raises(ActionRefused):
            await driver.cancel("m-hand")
        await assert_runs_healthy(name, "b")


async def test_cancel_leaves_instance_on_source() -> None:
    async with guest("lmw-drv-cancel", write_mib=32, rate_mib=40) as name, opened() as driver:
        started = time.monotonic()
        await start_busy(driver, name, "m-cancel", busy_plan())
        t_cancel = time.monotonic()
        await driver.cancel("m-cancel")
        await follow(driver, "m-cancel")
        result = await driver.result("m-cancel")
        record(name, result, started, after_cancel_s=round(time.monotonic() - t_cancel, 2))
        assert (result.phase, result.running_on) == (Phase.CANCELLED, "a")
        assert result.transferred > 0
        await assert_runs_healthy(name, "a")


@pytest.mark.parametrize("reattached", [False, True], ids=["same-driver", "reattached"])
async def test_a_paused_job_stopped_to_start_again_resumes_the_instance_first(
    reattached: bool,
) -> None:
    """What the engine does when a pause outlasts its bound and the migration starts
    again: pause, cancel during the pause's copy, and once the job ended start a new
    job under the same id. In between, the instance runs (not paused) on the source;
    the new job completes. `reattached`: a new driver (a restarted daemon, told by the
    record that the pause was lmwatch's) finds the job ending or ended; whichever of
    the hypervisor (this one resumes an aborted job's instance itself) and the driver
    resumes it, it runs."""
    mid = f"m-again-{int(reattached)}"
    async with guest(f"lmw-drv-again-{int(reattached)}", write_mib=32, rate_mib=40) as name:
        started = time.monotonic()
        request = MigrationRequest(name, "a", "b")
        first = LibvirtDriver(hosts(), WallClock())
        await start_busy(first, name, mid, busy_plan())
        await first.pause(mid)  # the rest (about 32 MiB) takes 2s over the 16 MiB/s link
        await first.cancel(mid)
        driver = first
        if reattached:
            await first.close()
            driver = LibvirtDriver(hosts(), WallClock())
            ended = await driver.reattach(mid, request, busy_plan(), paused=True)
            if ended is None:  # still ending: follow it to its end
                await follow(driver, mid)
                ended = await driver.result(mid)
        else:
            await follow(driver, mid)
            ended = await driver.result(mid)
        try:
            assert ended.running_on == "a", ended
            assert ended.phase in (Phase.CANCELLED, Phase.FAILED), ended
            await assert_runs_healthy(name, "a")  # running, not left paused
            await driver.start(mid, request, busy_plan())
            await follow(driver, mid, until=lambda s: s.passes >= 2)
            await driver.pause(mid)
            await follow(driver, mid)
            result = await driver.result(mid)
            record(name, result, started, first_phase=ended.phase.value)
            assert result.phase is Phase.COMPLETED, result.error
            assert result.running_on == "b"
            await assert_runs_healthy(name, "b")
        finally:
            await driver.close()


async def test_reattach_with_a_second_driver() -> None:
    async with guest("lmw-drv-reattach", write_mib=32, rate_mib=40) as name:
        request = MigrationRequest(name, "a", "b")
        plan = busy_plan()
        started = time.monotonic()
        first = LibvirtDriver(hosts(), WallClock())
        await start_busy(first, name, "m-re", plan)
        await first.close()  # the daemon "restarts": its connections go away
        async with opened() as second:
            t_re = time.monotonic()
            assert await second.reattach("m-re", request, plan) is None
            sample = (await follow(second, "m-re", until=lambda s: True))[-1]
            assert sample.phase is Phase.COPYING and sample.passes >= 3
            await second.set_blackout_budget("m-re", 0.5)
            await second.pause("m-re")
            await follow(second, "m-re")
            result = await second.result("m-re")
            record(name, result, started, after_reattach_s=round(time.monotonic() - t_re, 2))
            assert result.phase is Phase.COMPLETED, result.error
            assert result.running_on == "b"
            await assert_runs_healthy(name, "b")
            # a third driver finds the ended job and reports it truthfully
            async with opened() as third:
                again = await third.reattach("m-re", request, plan)
                assert again is not None and again.phase is Phase.COMPLETED
                assert again.running_on == "b"


async def test_source_daemon_restart_mid_migration() -> None:
    """The source's libvirtd restarts while it migrates: the outcome is where the guest runs."""
    async with guest("lmw-drv-restart", write_mib=32, rate_mib=40) as name, opened() as driver:
        started = time.monotonic()
        await start_busy(driver, name, "m-restart", busy_plan())
        assert all(t.daemon for t in threading.enumerate() if t.name.startswith("lmw-migrate"))
        restart = asyncio.ensure_future(asyncio.to_thread(rigctl.restart_host, "a"))
        errors = 0
        deadline = time.monotonic() + 150.0
        while time.monotonic() < deadline:
            try:
                if (await driver.sample("m-restart")).phase.finished:
                    break
            except DriverError:  # the source does not answer yet: ask again (as the engine does)
                errors += 1
                await asyncio.sleep(0.5)
                continue
            await driver.wait_event("m-restart", 0.5)
        result = await driver.result("m-restart")
        await restart
        record(name, result, started, sample_errors=errors)
        where = await asyncio.to_thread(rigctl.where_running, name)
        if result.phase is Phase.COMPLETED:
            assert result.running_on == "b" and where == ["b"], (result, where)
        else:
            assert result.phase is Phase.FAILED, result
            assert result.running_on == "a" and where == ["a"], (result, where)
        assert result.running_on is not None
        await assert_runs_healthy(name, result.running_on)


async def test_disk_copy_then_memory() -> None:
    """An instance with a 64 MiB local disk that it writes: pre-flight counts the disk,
    samples show the disk copy first (not in sync, no memory moved, a measured disk
    rate), then memory passes with the disks in sync; it ends up healthy on b."""
    name = "lmw-drv-disk"
    await asyncio.to_thread(rigctl.make_disk_image, "a", name, 64, 5)
    disk = {"rate_kib": 512, "secs": 30, "mib": 8}
    try:
        async with (
            guest(name, write_mib=16, rate_mib=4, disk=disk) as name,
            opened() as driver,
        ):
            request = MigrationRequest(name, "a", "b")
            assert (await driver.preflight(request)).local_disk_bytes == 64 * MIB
            started = time.monotonic()
            await driver.start("m-disk", request, busy_plan())
            samples = await follow(driver, "m-disk")
            result = await driver.result("m-disk")
            copying = [s for s in samples if not s.disks_in_sync]
            record(
                name,
                result,
                started,
                disk_samples=len(copying),
                disk_rate_mib_s=max((round(s.disk_rate / MIB, 1) for s in copying), default=0),
            )
            assert (result.phase, result.running_on) == (Phase.COMPLETED, "b"), result.error
            assert copying, samples
            assert all(s.memory_transferred == 0 and s.passes == 1 for s in copying)
            assert all(s.disk_total >= 64 * MIB for s in copying)
            assert any(0 < s.disk_remaining < 64 * MIB for s in copying)
            assert any(s.disk_rate > 4 * MIB for s in copying), [s.disk_rate for s in copying]
            memory = [s for s in samples if s.memory_transferred > 0 and not s.phase.finished]
            assert memory and all(s.disks_in_sync for s in memory)
            assert samples.index(copying[-1]) < samples.index(memory[0])
            assert samples[-1].disk_remaining == 0 and samples[-1].disk_total >= 64 * MIB
            await assert_runs_healthy(name, "b")
    finally:
        for host in rigctl.HOSTS:
            await asyncio.to_thread(rigctl.remove_disk_image, host, name)
