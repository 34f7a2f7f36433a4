"""The CLI against a real API server (aiohttp) over the real engine, in virtual time:
what the CLI tests share (`served`, `Cli`, `accepted_id`). Each test module brings its
own inventory and profiles."""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from aiohttp.test_utils import TestServer

from lmwatch import cli
from lmwatch.api import create_app
from lmwatch.clock import VirtualClock
from lmwatch.drivers.inventory import load_inventory_text
from lmwatch.drivers.sim import SimDriver
from lmwatch.engine import Engine, EngineSettings
from lmwatch.metrics import Metrics
from lmwatch.model import State
from lmwatch.profiles import ProfileRegistry
from lmwatch.store import Store

TOKEN = "test-token"


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Cli:
    """Runs `lmwatch` commands against the served API."""

    clock: VirtualClock
    engine: Engine
    url: str

    async def run(self, *argv: str, token: str | None = TOKEN) -> Result:
        out, err = io.StringIO(), io.StringIO()
        auth = ["--token", token] if token else []
        code = await cli.run(
            ["--url", self.url, *auth, *argv], stdout=out, stderr=err, clock=self.clock
        )
        return Result(code, out.getvalue(), err.getvalue())

    async def run_with_time(self, *argv: str, limit: float = 4 * 3600) -> Result:
        """Run a command while virtual time moves (for `--follow`)."""
        task = asyncio.create_task(self.run(*argv))
        assert await self.clock.run_until(task.done, limit=limit)
        return await task

    async def until_state(self, migration_id: str, *states: State, limit: float = 3600) -> None:
        ok = await self.clock.run_until(
            lambda: self.engine.get(migration_id).state in states, limit=limit
        )
        assert ok, self.engine.get(migration_id).state


@asynccontextmanager
async def served(tmp_path: Path, inventory: str, profiles: str) -> AsyncIterator[Cli]:
    """An engine on the simulator driver with these inventory and profiles, and its API
    served on a local port, in virtual time."""
    clock = VirtualClock()
    driver = SimDriver(load_inventory_text(inventory), clock)
    path = tmp_path / "profiles.yaml"
    path.write_text(profiles)
    registry = ProfileRegistry(path, clock=clock)
    metrics = Metrics()
    engine = Engine(
        driver=driver,
        store=Store.open(tmp_path / "lmwatch.db"),
        profiles=registry,
        clock=clock,
        metrics=metrics,
        settings=EngineSettings(poll_interval=1.0),
    )
    await engine.start()
    server = TestServer(create_app(engine, registry, metrics, TOKEN))
    await server.start_server()
    try:
        yield Cli(clock, engine, str(server.make_url("")).rstrip("/"))
    finally:
        await server.close()
        await engine.stop()
        await driver.close()


def accepted_id(result: Result) -> str:
    """The id a command printed on its first line."""
    first = result.out.splitlines()[0].strip()
    assert re.fullmatch(r"[0-9a-f-]{36}", first), result.out
    return first
