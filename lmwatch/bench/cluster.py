"""Takeover after a member dies: how long until another member supervises the dead
one's migration, over many trials, and how many actions were applied twice.

    python -m lmwatch.bench.cluster --url postgresql://user@host:port/database --trials 20

Engine level, in one process (the issue's figure; docs/cluster.md): two engines share
one simulated world (one SimDriver object) and the database at `--url`, each with
its own store and member. Each trial starts members `a` and `b` (new names each
trial), submits one migration leaving a host `a` holds, waits until it copies,
kills `a` as SIGKILL would (its lease keeper and tasks stopped, nothing released,
no outcome written) and times until `b` supervises the migration; the migration
then runs to its end under `b`. Printed, not asserted: the median and the maximum
takeover time, and the driver actions (start, pause, handover, cancel) applied
more than once to one migration over all trials (must be 0).

The database must be one lmwatch may use as a store (its tables are created).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmwatch.clock import WallClock
from lmwatch.cluster.membership import Membership
from lmwatch.drivers.inventory import load_inventory_text
from lmwatch.drivers.sim import SimDriver
from lmwatch.engine import Engine, EngineSettings
from lmwatch.metrics import Metrics
from lmwatch.model import MigrationRequest, State
from lmwatch.policies.leases import LeaseTerms
from lmwatch.profiles import ProfileRegistry
from lmwatch.store import Store

_PROFILES = """
version: 1
profiles:
  - name: default
    max_blackout: 500ms
    may_slow_down: true
    handover: allowed
    max_degraded: 60s
    deadline: 2h
    on_deadline: complete
"""
_HOSTS = 4
_ACTIONS = ("start", "pause", "handover", "cancel")


def _inventory(trials: int) -> str:
    hosts = [f"  - {{name: s{i}, memory: 512GiB}}" for i in range(_HOSTS)]
    instances = [
        f"  - {{name: vm-{t}-{i}, host: s{i}, memory: 1GiB, working_set: 64MiB, "
        "change_rate: 1MiB/s}"
        for t in range(trials)
        for i in range(_HOSTS)
    ]
    return (
        "hosts:\n"
        + "\n".join([*hosts, "  - {name: d0, memory: 4096GiB}"])
        + "\ndefault_bandwidth: 2Gbit/s\ninstances:\n"
        + "\n".join(instances)
        + "\n"
    )


async def _until(predicate: Callable[[], bool], timeout: float, step: float = 0.01) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"not within {timeout}s")
        await asyncio.sleep(step)
    return time.monotonic() - started


class _Member:
    def __init__(
        self, url: str, name: str, driver: SimDriver, profiles: Path, lease: float, poll: float
    ) -> None:
        self.store = Store.open(url)
        self.membership = Membership(url, name, LeaseTerms.for_lease(lease))
        self.engine = Engine(
            driver=driver,
            store=self.store,
            profiles=ProfileRegistry(profiles),
            clock=WallClock(),
            metrics=Metrics(),
            settings=EngineSettings(poll_interval=poll),
            membership=self.membership,
        )
        self.alive = False

    async def start(self) -> None:
        self.membership.start()
        await _until(lambda: self.membership.keeper.member is not None, 10)
        await self.engine.start()
        self.alive = True

    async def kill(self) -> None:
        """As SIGKILL would leave it: nothing released, no outcome written."""
        if not self.alive:
            return
        self.alive = False
        self.membership.keeper.stop()
        await self.engine.stop()
        self.store.close()
        self.membership.stop()


async def _trial(
    url: str, trial: int, driver: SimDriver, profiles: Path, lease: float, poll: float
) -> float:
    """One kill of the owner; seconds until the other member supervises its migration."""
    a = _Member(url, f"a{trial}", driver, profiles, lease, poll)
    b = _Member(url, f"b{trial}", driver, profiles, lease, poll)
    try:
        await a.start()
        await b.start()

        def sources() -> list[str]:
            last = a.membership.last
            return [h for h in last.hosts if h.startswith("s")] if last is not None else []

        await _until(lambda: bool(sources()), 10)
        source = sources()[0]
        record, _ = await b.engine.submit(
            MigrationRequest(f"vm-{trial}-{source[1:]}", source, "d0")
        )
        await _until(
            lambda: (
                record.id in a.engine.supervised()
                and a.engine.get(record.id).state is State.COPYING
            ),
            30,
        )
        killed = time.monotonic()
        await a.kill()
        await _until(lambda: record.id in b.engine.supervised(), 10 * lease)
        took = time.monotonic() - killed
        await _until(lambda: b.engine.get(record.id).state.finished, 120, step=0.05)
        return took
    finally:
        await a.kill()
        await b.kill()


async def trials(url: str, count: int, *, lease: float, poll: float) -> tuple[list[float], int]:
    """Takeover times (seconds) and the actions applied twice to one migration."""
    clock = WallClock()
    driver = SimDriver(load_inventory_text(_inventory(count)), clock)
    calls: Counter[tuple[str, str]] = Counter()
    for action in _ACTIONS:
        original = getattr(driver, action)

        def counted(migration_id: str, *args: Any, _o: Any = original, _a: str = action) -> Any:
            calls[(_a, migration_id)] += 1
            return _o(migration_id, *args)

        setattr(driver, action, counted)
    times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="lmwatch-bench-cluster-") as scratch:
        profiles = Path(scratch) / "profiles.yaml"
        profiles.write_text(_PROFILES)
        for trial in range(count):
            times.append(await _trial(url, trial, driver, profiles, lease, poll))
            print(f"trial {trial + 1}: taken over after {times[-1]:.2f}s", flush=True)
    await driver.close()
    twice = sum(1 for n in calls.values() if n > 1)
    return times, twice


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="postgresql://... (a database to use)")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--lease", type=float, default=2.0, help="seconds (default 2)")
    parser.add_argument("--poll", type=float, default=0.1, help="seconds (default 0.1)")
    args = parser.parse_args(argv)
    times, twice = asyncio.run(trials(args.url, args.trials, lease=args.lease, poll=args.poll))
    print(
        f"takeover after a kill, {len(times)} trials, lease {args.lease}s, poll {args.poll}s: "
        f"median {statistics.median(times):.2f}s, max {max(times):.2f}s; "
        f"actions applied twice: {twice}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
