"""Shared fixtures: a virtual clock, a small simulated inventory, profiles from text,
an engine, an API client that checks every answer against the OpenAPI document, and a
real PostgreSQL (tests/pgtools.py) for the tests that need one."""

from __future__ import annotations

import asyncio
import gc
import io
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from apitools import SMALL_INVENTORY, SMALL_PROFILES, TOKEN, Api, OpenApiChecker
from pgtools import PgCluster, availability, running_cluster
from storetools import KINDS

from lmwatch.api import create_app
from lmwatch.clock import VirtualClock
from lmwatch.drivers.inventory import Inventory, load_inventory_text
from lmwatch.drivers.sim import SimDriver
from lmwatch.engine import Engine, EngineSettings
from lmwatch.metrics import Metrics
from lmwatch.profiles import ProfileRegistry
from lmwatch.schemas import openapi_document
from lmwatch.store import Store


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """A test still running after `faulthandler_timeout` prints where its asyncio tasks
    wait (the thread stacks that faulthandler prints show only the event loop's wait)."""
    after = float(item.config.getini("faulthandler_timeout") or 0)
    timer = threading.Timer(after, _print_pending_tasks, (item,)) if after > 0 else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()


def _print_pending_tasks(item: pytest.Item) -> None:
    tasks = [t for t in gc.get_objects() if isinstance(t, asyncio.Task) and not t.done()]
    text = io.StringIO()
    print(f"\n{item.nodeid} still runs: {len(tasks)} asyncio tasks pending", file=text)
    for task in tasks:
        task.print_stack(file=text)
    writer = item.config.get_terminal_writer()
    writer.line(text.getvalue())
    writer.flush()


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def inventory() -> Inventory:
    return load_inventory_text(SMALL_INVENTORY, source="<test inventory>")


@pytest.fixture
def driver(inventory: Inventory, clock: VirtualClock) -> SimDriver:
    return SimDriver(inventory, clock)


@pytest.fixture
def profiles_file(tmp_path: Path) -> Path:
    path = tmp_path / "profiles.yaml"
    path.write_text(SMALL_PROFILES, encoding="utf-8")
    return path


@pytest.fixture
def registry(profiles_file: Path, clock: VirtualClock) -> ProfileRegistry:
    return ProfileRegistry(profiles_file, clock=clock)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store.open(tmp_path / "lmwatch.db")
    yield opened
    opened.close()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def engine_settings() -> EngineSettings:
    return EngineSettings(poll_interval=1.0)


@pytest.fixture
async def engine(
    driver: SimDriver,
    store: Store,
    registry: ProfileRegistry,
    clock: VirtualClock,
    metrics: Metrics,
    engine_settings: EngineSettings,
) -> AsyncIterator[Engine]:
    running = Engine(
        driver=driver,
        store=store,
        profiles=registry,
        clock=clock,
        metrics=metrics,
        settings=engine_settings,
    )
    await running.start()
    yield running
    await running.stop()


@pytest.fixture(scope="session")
def openapi() -> dict[str, Any]:
    return openapi_document()


@pytest.fixture
def checker(openapi: dict[str, Any]) -> OpenApiChecker:
    return OpenApiChecker(openapi)


@pytest.fixture
async def api(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    engine: Engine,
    registry: ProfileRegistry,
    metrics: Metrics,
    checker: OpenApiChecker,
) -> Api:
    client = await aiohttp_client(create_app(engine, registry, metrics, TOKEN))
    return Api(client, TOKEN, checker)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One throwaway PostgreSQL server for the session. Without PostgreSQL the tests
    using it skip with the reason; under CI=true they fail: CI never passes by skipping."""
    ok, why = availability()
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL not available under CI=true: {why}")
        pytest.skip(f"PostgreSQL not available: {why}")
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A fresh, empty database of the session's cluster."""
    return pg_cluster.database()


@pytest.fixture(params=KINDS)
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a fresh store of each kind is (the shared store suite: a module runs its
    tests on both by overriding `store` with `shared_store`): a SQLite file in
    tmp_path, or an empty PostgreSQL database (skipped without PostgreSQL, failed
    under CI=true)."""
    if request.param == "sqlite":
        return str(tmp_path / "lmwatch.db")
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def shared_store(store_location: str) -> Iterator[Store]:
    opened = Store.open(store_location)
    yield opened
    opened.close()
