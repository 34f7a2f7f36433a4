"""Several engines in one process on one database, driving one simulated world (one
SimDriver object), each with its own store and member: the engine-level rig of the
cluster tests (tests/test_cluster_engines.py) and of the takeover figure
(lmwatch/bench/cluster.py has its own copy of the essentials)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmwatch.clock import WallClock
from lmwatch.cluster.membership import Membership
from lmwatch.drivers.inventory import load_inventory_text
from lmwatch.drivers.sim import SimDriver
from lmwatch.engine import Engine, EngineSettings
from lmwatch.logs import get_logger
from lmwatch.metrics import Metrics
from lmwatch.model import MigrationRequest
from lmwatch.policies.leases import LeaseTerms
from lmwatch.profiles import ProfileRegistry
from lmwatch.store import Store

log = get_logger("clustertools")

PROFILES = """
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

ACTIONS = ("start", "pause", "handover", "cancel", "set_blackout_budget")


def inventory(
    sources: int, per_source: int, *, memory: str = "256MiB", rate: str = "1MiB/s"
) -> str:
    """`sources` hosts s0.. each with `per_source` instances, and two destinations."""
    hosts = [f"  - {{name: s{i}, memory: 512GiB}}" for i in range(sources)]
    hosts += ["  - {name: d0, memory: 1024GiB}", "  - {name: d1, memory: 1024GiB}"]
    instances = [
        f"  - {{name: vm-{i}-{n}, host: s{i}, memory: {memory}, working_set: 32MiB, "
        f"change_rate: {rate}}}"
        for i in range(sources)
        for n in range(per_source)
    ]
    return (
        "hosts:\n"
        + "\n".join(hosts)
        + "\ndefault_bandwidth: 4Gbit/s\ninstances:\n"
        + "\n".join(instances)
        + "\n"
    )


@dataclass
class Counted:
    """Driver calls per (action, migration), over every engine."""

    calls: Counter[tuple[str, str]] = field(default_factory=Counter)

    def wrap(self, driver: SimDriver) -> None:
        for action in ACTIONS:
            original = getattr(driver, action)

            def counted(migration_id: str, *args: Any, _o: Any = original, _a: str = action) -> Any:
                self.calls[(_a, migration_id)] += 1
                return _o(migration_id, *args)

            setattr(driver, action, counted)

    def most(self, action: str) -> int:
        return max((n for (a, _), n in self.calls.items() if a == action), default=0)

    def count(self, action: str) -> int:
        return sum(n for (a, _), n in self.calls.items() if a == action)


@dataclass
class Node:
    name: str
    store: Store
    membership: Membership
    engine: Engine
    alive: bool = True

    async def kill(self) -> None:
        """As SIGKILL: nothing released, no outcome written; the lease runs out."""
        started = time.monotonic()
        self.alive = False
        self.membership.keeper.stop()
        await self.engine.stop()
        self.store.close()
        self.membership.stop()
        log.info("member-killed", member=self.name, seconds=round(time.monotonic() - started, 3))

    async def close(self) -> None:
        if self.alive:
            await self.kill()


class Cluster:
    def __init__(
        self,
        tmp_path: Path,
        url: str,
        inventory_text: str,
        *,
        lease: float = 2.0,
        poll: float = 0.1,
        per_source: int = 2,
        per_destination: int = 2,
    ) -> None:
        self.url = url
        self.clock = WallClock()
        self.driver = SimDriver(load_inventory_text(inventory_text), self.clock)
        self.counted = Counted()
        self.counted.wrap(self.driver)
        profiles = tmp_path / "profiles.yaml"
        profiles.write_text(PROFILES)
        self.profiles = profiles
        self.lease = lease
        self.poll = poll
        self.settings = EngineSettings(
            poll_interval=poll, max_per_source=per_source, max_per_destination=per_destination
        )
        self.nodes: list[Node] = []

    async def add(self, name: str, url: str | None = None) -> Node:
        store = Store.open(url or self.url)
        membership = Membership(url or self.url, name, LeaseTerms.for_lease(self.lease))
        membership.start()
        deadline = time.monotonic() + 10
        while membership.keeper.member is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert membership.keeper.member is not None
        engine = Engine(
            driver=self.driver,
            store=store,
            profiles=ProfileRegistry(self.profiles),
            clock=self.clock,
            metrics=Metrics(),
            settings=self.settings,
            membership=membership,
        )
        await engine.start()
        node = Node(name, store, membership, engine)
        self.nodes.append(node)
        return node

    async def submit(self, node: Node, instance: str, source: str, destination: str) -> str:
        record, _ = await node.engine.submit(MigrationRequest(instance, source, destination))
        return record.id

    def live(self) -> list[Node]:
        return [n for n in self.nodes if n.alive]

    def owner_of(self, migration_id: str) -> Node | None:
        owners = [n for n in self.live() if migration_id in n.engine.supervised()]
        assert len(owners) <= 1, f"{migration_id} supervised by {[n.name for n in owners]}"
        return owners[0] if owners else None

    async def wait(self, predicate: Any, timeout: float, step: float = 0.05) -> float:
        """Seconds until `predicate()` held (AssertionError after `timeout`)."""
        started = time.monotonic()
        while not predicate():
            if time.monotonic() - started > timeout:
                raise AssertionError(f"not within {timeout}s")
            await asyncio.sleep(step)
        return time.monotonic() - started

    async def close(self) -> None:
        for node in self.nodes:
            await node.close()
        await self.driver.close()
