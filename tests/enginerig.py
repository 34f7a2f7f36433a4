"""The harness the engine tests share: an engine on a simulated inventory, in virtual
time, with its profiles, store and metrics, and what a test does with it (submit,
run until finished, read the actions taken, restart the daemon)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmwatch.clock import VirtualClock
from lmwatch.drivers.inventory import load_inventory_text
from lmwatch.drivers.sim import SimDriver
from lmwatch.drivers.sim_world import SqliteWorld, WorldKeeper
from lmwatch.engine import Engine, EngineSettings
from lmwatch.metrics import Metrics
from lmwatch.model import ChangeRate, MigrationRequest
from lmwatch.profiles import ProfileRegistry
from lmwatch.store import Store, is_database_url


class EngineRig:
    """One simulated cloud and one lmwatch engine supervising it.

    With `durable_world` the simulated hosts keep their world in the store (its file,
    or its database), so `restart` behaves as a daemon restarted beside real hosts:
    jobs went on meanwhile and moved instances stay moved. Without it the driver
    outlives the engines (`new_engine`), which is the same thing seen from the engine.

    `store_location` is where the store is opened (and opened again at `restart`): a
    SQLite file (by default `lmwatch.db` in tmp_path) or a postgresql:// URL."""

    def __init__(
        self,
        tmp_path: Path,
        inventory: str,
        profiles: str,
        settings: EngineSettings | None = None,
        *,
        durable_world: bool = False,
        source: str = "a",
        store_location: str | None = None,
    ) -> None:
        self.clock = VirtualClock()
        self.inventory = load_inventory_text(inventory)
        self.profile_file = tmp_path / "profiles.yaml"
        self.profile_file.write_text(profiles)
        self.registry = ProfileRegistry(self.profile_file)
        self.store_path = store_location or str(tmp_path / "lmwatch.db")
        self.store = Store.open(self.store_path)
        self.durable_world = durable_world
        self.driver = self.new_driver()
        self.metrics = Metrics()
        self.settings = settings if settings is not None else EngineSettings(poll_interval=1.0)
        self.source = source
        self.engine = self.new_engine()

    def new_driver(self) -> SimDriver:
        world: WorldKeeper | None = None
        if self.durable_world and is_database_url(self.store_path):
            from lmwatch.drivers.sim_world_pg import PostgresWorld

            world = PostgresWorld(self.store_path)
        elif self.durable_world:
            world = SqliteWorld(self.store_path)
        return SimDriver(self.inventory, self.clock, world=world)

    def new_engine(self) -> Engine:
        """An engine on this rig's driver, store, profiles and metrics (not started)."""
        return Engine(
            driver=self.driver,
            store=self.store,
            profiles=self.registry,
            clock=self.clock,
            metrics=self.metrics,
            settings=self.settings,
        )

    async def restart(self, down_for: float = 0.0) -> Engine:
        """Stop the daemon, let `down_for` seconds pass, open its store (and world)
        again and start a new one."""
        await self.engine.stop()
        self.store.close()
        await self.clock.advance(down_for)
        self.store = Store.open(self.store_path)
        if self.durable_world:
            self.driver = self.new_driver()
        self.metrics = Metrics()
        self.engine = self.new_engine()
        await self.engine.start()
        return self.engine

    async def submit(
        self, instance: str, dest: str | None = "b", source: str | None = None, **extra: object
    ) -> str:
        request = MigrationRequest(instance, source or self.source, dest, **extra)  # type: ignore[arg-type]
        record, _ = await self.engine.submit(request)
        return record.id

    async def migrate(self, instance: str, source: str = "a", dest: str = "b") -> str:
        return await self.submit(instance, dest, source)

    async def finish(self, *ids: str, limit: float = 4 * 3600) -> None:
        done = await self.clock.run_until(lambda: self.engine.finished(ids), limit=limit)
        assert done, [self.engine.get(i).state for i in ids]

    def actions(self, migration_id: str) -> list[str]:
        """The actions decided for a migration, in order, besides continuing."""
        return [
            e.action
            for e in self.store.events(migration_id)
            if e.kind == "decision" and e.action not in (None, "continue", "start")
        ]

    def count_measurements(self, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        """The instances whose change rate the driver measures from now on, in order."""
        measured: list[str] = []
        original = self.driver.measure_change_rate

        async def counting(instance: str, host: str) -> ChangeRate | None:
            measured.append(instance)
            return await original(instance, host)

        monkeypatch.setattr(self.driver, "measure_change_rate", counting)
        return measured
