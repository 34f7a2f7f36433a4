"""The daemon's clock: durations never follow a step of the system's wall clock."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from lmwatch.clock import WallClock
from lmwatch.drivers.inventory import load_inventory_text
from lmwatch.drivers.sim import SimDriver
from lmwatch.engine import Engine, EngineSettings
from lmwatch.metrics import Metrics
from lmwatch.model import MigrationRequest, State
from lmwatch.profiles import ProfileRegistry
from lmwatch.store import Store

HOUR = 3600.0


def step_the_wall_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + seconds)


def test_wall_clock_reads_epoch_seconds_and_ignores_a_step(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = WallClock()
    before = clock.now()
    assert abs(before - time.time()) < 1.0  # epoch seconds, for timestamps and the store
    step_the_wall_clock(monkeypatch, HOUR)
    after = clock.now()
    assert 0.0 <= after - before < 1.0  # an hour's step is not an hour passed
    assert abs(WallClock().now() - time.time()) < 1.0  # a new start takes the new time


INVENTORY = """
hosts:
  - {name: a, memory: 256GiB}
  - {name: b, memory: 256GiB}
links:
  - {between: [a, b], bandwidth: 1GiB/s}
default_bandwidth: 1GiB/s
instances:
  - {name: vm, host: a, memory: 64GiB, working_set: 64MiB, change_rate: 1MiB/s}
"""

PROFILES = """
profiles:
  - name: strict
    max_blackout: 300ms
    deadline: 20m
    on_deadline: cancel
"""


async def test_a_wall_clock_step_of_an_hour_does_not_fire_a_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = WallClock()
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(PROFILES)
    store = Store.open(tmp_path / "lmwatch.db")
    engine = Engine(
        driver=SimDriver(load_inventory_text(INVENTORY), clock),
        store=store,
        profiles=ProfileRegistry(profiles, clock=clock),
        clock=clock,
        metrics=Metrics(),
        settings=EngineSettings(poll_interval=0.05, measure_change_rate=False),
    )
    await engine.start()
    try:
        record, _ = await engine.submit(MigrationRequest("vm", "a", "b"))
        for _ in range(200):
            if engine.get(record.id).state is State.COPYING:
                break
            await asyncio.sleep(0.02)
        assert engine.get(record.id).state is State.COPYING
        step_the_wall_clock(monkeypatch, HOUR)  # 20 minutes' deadline, an hour's step
        await asyncio.sleep(0.5)  # ten polls
        current = engine.get(record.id)
        assert current.state is State.COPYING
        assert current.deadline_at is not None and current.deadline_at > clock.now() + 15 * 60
        decisions = [e for e in store.events(record.id) if e.kind == "decision"]
        assert [e.action for e in decisions if e.action not in ("start", "continue")] == []
        assert not [e for e in decisions if "deadline" in e.reason and e.action != "start"]
    finally:
        await engine.stop()
        store.close()


async def test_a_long_run_in_virtual_time_may_wait_for_work_outside_the_loop_at_any_point() -> None:
    import concurrent.futures
    import threading

    from lmwatch.clock import VirtualClock, outside

    clock = VirtualClock()
    done: list[bool] = []

    async def worker() -> None:
        await clock.sleep(10)
        time.sleep(0.2)  # the run has taken more real time than `real_timeout` by now
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        threading.Timer(0.01, future.set_result, (None,)).start()
        await outside(clock, asyncio.wrap_future(future))  # a short wait of its own
        done.append(True)

    task = asyncio.create_task(worker())
    assert await clock.run_until(lambda: bool(done), real_timeout=0.1)
    await task
