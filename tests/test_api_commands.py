"""Operator commands through the API of a daemon that does not supervise the migration
(several daemons on one PostgreSQL store), against a real PostgreSQL: the answer is
the owner's (202 with the record, 409 with its refusal), or the documented
`CommandPending` when no owner answers in time; that command is carried out once a
daemon supervises the migration. GET is answered from the store. Every answer is
checked against the OpenAPI document (`Api`).

The owner is a second engine in this process on the same store (`Store` object):
the one-daemon lock of the PostgreSQL store is per store, not per engine."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from apitools import SMALL_INVENTORY, SMALL_PROFILES, TOKEN, Api, OpenApiChecker
from pgtools import free_port

from lmwatch import daemon
from lmwatch.api import create_app
from lmwatch.clock import VirtualClock
from lmwatch.cluster import commands
from lmwatch.cluster.pg import connect
from lmwatch.cluster.schema import ensure_schema
from lmwatch.config import Settings
from lmwatch.drivers.inventory import load_inventory_text
from lmwatch.drivers.sim import SimDriver
from lmwatch.engine import Engine, EngineSettings
from lmwatch.metrics import Metrics
from lmwatch.model import MigrationRequest, State
from lmwatch.profiles import ProfileRegistry
from lmwatch.store import Store

SETTINGS = EngineSettings(poll_interval=1.0, command_wait=5.0, command_poll=0.2)


class Cluster:
    """Two engines on one PostgreSQL store: `owner` supervises what it accepted,
    `api` (started first, so it supervises nothing) serves the HTTP API."""

    def __init__(self, tmp_path: Path, url: str) -> None:
        self.url = url
        self.clock = VirtualClock()
        profiles = tmp_path / "profiles.yaml"
        profiles.write_text(SMALL_PROFILES)
        self.registry = ProfileRegistry(profiles, clock=self.clock)
        self.driver = SimDriver(load_inventory_text(SMALL_INVENTORY), self.clock)
        self.store = Store.open(url)
        self.api = self.engine()
        self.owner: Engine | None = None

    def engine(self) -> Engine:
        return Engine(
            driver=self.driver,
            store=self.store,
            profiles=self.registry,
            clock=self.clock,
            metrics=Metrics(),
            settings=SETTINGS,
        )

    async def start_owner(self) -> Engine:
        self.owner = self.engine()
        await self.owner.start()
        return self.owner

    async def copying(self, instance: str) -> str:
        assert self.owner is not None
        record, _ = await self.owner.submit(MigrationRequest(instance, "a", "b"))
        owner = self.owner
        await self.clock.run_until(lambda: owner.get(record.id).state is State.COPYING)
        return record.id


@pytest.fixture
async def cluster(tmp_path: Path, pg_url: str) -> AsyncIterator[Cluster]:
    running = Cluster(tmp_path, pg_url)
    await running.api.start()
    await running.start_owner()
    yield running
    if running.owner is not None:
        await running.owner.stop()
    await running.api.stop()
    running.store.close()


@pytest.fixture
async def api(
    aiohttp_client: Callable[..., Awaitable[TestClient]],
    cluster: Cluster,
    checker: OpenApiChecker,
) -> Api:
    app = create_app(cluster.api, cluster.registry, Metrics(), TOKEN)
    return Api(await aiohttp_client(app), TOKEN, checker)


def command_rows(url: str, migration_id: str) -> list[tuple[Any, ...]]:
    with connect(url) as conn:
        ensure_schema(conn)
        return [
            tuple(r)
            for r in conn.execute(
                "SELECT kind, outcome, takes, posted_by, applied_by FROM cluster_commands"
                " WHERE migration_id = %s ORDER BY id",
                (migration_id,),
            )
        ]


async def test_get_of_a_migration_supervised_elsewhere_comes_from_the_store(
    cluster: Cluster, api: Api
) -> None:
    mid = await cluster.copying("quiet")
    assert mid not in cluster.api.supervised()
    answer = await api.get(f"/v1/migrations/{mid}")
    assert answer.status == 200
    assert answer.body["state"] == "copying"


async def test_a_cancel_is_answered_with_the_owners_outcome(cluster: Cluster, api: Api) -> None:
    mid = await cluster.copying("quiet")
    answer = await api.post(f"/v1/migrations/{mid}/cancel")
    assert answer.status == 202, answer.body
    # The record as the owner left it (written before it recorded the outcome): its
    # timeline shows the operator's cancel and who asked, through which daemon.
    assert answer.body["id"] == mid
    timeline = answer.body["timeline"]
    assert any(e["action"] == "cancel" for e in timeline)
    assert any("asked through" in e["reason"] and "accepted" not in e["reason"] for e in timeline)
    assert any(e["reason"].endswith("accepted") for e in timeline)
    [(kind, outcome, takes, _, _)] = command_rows(cluster.url, mid)
    assert (kind, outcome, takes) == ("cancel", "accepted", 1)
    owner = cluster.owner
    assert owner is not None
    await cluster.clock.run_until(lambda: owner.get(mid).state.finished)
    assert owner.get(mid).state is State.CANCELLED
    # Once ended, a cancel is the store's to refuse: not passed on, as on one daemon.
    again = await api.post(f"/v1/migrations/{mid}/cancel")
    assert again.status == 409
    assert len(command_rows(cluster.url, mid)) == 1


async def test_a_refusal_is_answered_as_the_owner_refused(cluster: Cluster, api: Api) -> None:
    mid = await cluster.copying("quiet")
    assert (await api.post(f"/v1/migrations/{mid}/cancel")).status == 202
    answer = await api.post(f"/v1/migrations/{mid}/force-complete", {"accept_pause": True})
    assert answer.status == 409
    assert answer.body["type"] == "urn:lmwatch:problem:conflict"
    assert answer.body["detail"] == f"migration {mid} is being cancelled"


async def test_a_force_complete_is_answered_with_the_owners_decision(
    cluster: Cluster, api: Api
) -> None:
    mid = await cluster.copying("db")
    await cluster.clock.advance(2.0)
    answer = await api.post(f"/v1/migrations/{mid}/force-complete", {"accept_pause": True})
    assert answer.status == 202, answer.body
    assert answer.body["migration"]["id"] == mid
    decision = answer.body["decision"]
    owner = cluster.owner
    assert owner is not None
    decided = [
        e for e in owner.events(mid) if e.kind == "decision" and e.data.get("origin") == "operator"
    ]
    assert decided and decision["action"] == decided[-1].action
    assert decision["reason"] == decided[-1].reason


async def test_with_no_owner_the_command_is_recorded_pending_and_carried_out_later(
    cluster: Cluster, api: Api
) -> None:
    mid = await cluster.copying("quiet")
    assert cluster.owner is not None
    await cluster.owner.stop()  # the owner is gone; the migration is unfinished
    cluster.owner = None
    assert cluster.api.relay is not None
    cluster.api.relay.wait = 0.5
    began = time.monotonic()
    answer = await api.post(f"/v1/migrations/{mid}/cancel")
    assert 0.5 <= time.monotonic() - began < 3
    assert answer.status == 202
    assert answer.headers["Location"] == f"/v1/migrations/{mid}"
    pending = answer.body["pending"]
    assert pending["kind"] == "cancel" and pending["accept_pause"] is False
    assert str(pending["id"]) in answer.body["detail"]
    assert answer.body["migration"]["state"] == "copying"
    assert [r[:3] for r in command_rows(cluster.url, mid)] == [("cancel", None, 0)]
    # A daemon that supervises it again carries it out.
    owner = await cluster.start_owner()
    with connect(cluster.url) as conn:
        deadline = time.monotonic() + 10
        while commands.outcome_of(conn, int(pending["id"])) is None:
            assert time.monotonic() < deadline
            await cluster.clock.advance(0.01)
            await asyncio.sleep(0.02)
    await cluster.clock.run_until(lambda: owner.get(mid).state.finished)
    assert owner.get(mid).state is State.CANCELLED
    assert [r[:3] for r in command_rows(cluster.url, mid)] == [("cancel", "accepted", 1)]


async def test_a_database_store_is_what_turns_commands_into_rows(engine: Engine) -> None:
    """With SQLite (the `engine` fixture) nothing is passed on: there is no relay."""
    assert engine.relay is None
    record, _ = await engine.submit(MigrationRequest("quiet", "a", "b"))
    assert not engine.elsewhere(record.id)


def test_without_psycopg_a_sqlite_daemon_still_imports() -> None:
    """The PostgreSQL driver is an extra: the command relay is imported only with a
    PostgreSQL store."""
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "import lmwatch.daemon, lmwatch.api, lmwatch.engine.core\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def test_command_wait_is_a_daemon_setting(tmp_path: Path) -> None:
    settings = Settings(store_path=tmp_path / "x.db", token="t" * 32, command_wait="2s")
    built = await daemon.build(settings, clock=VirtualClock())
    try:
        assert built.engine.settings.command_wait == 2.0
    finally:
        await built.close()
    assert Settings().command_wait == 5.0


async def test_a_database_that_cannot_be_reached_records_nothing_and_says_so(
    cluster: Cluster, api: Api
) -> None:
    from lmwatch.engine.commands import Relay

    mid = await cluster.copying("quiet")
    closed = f"postgresql://127.0.0.1:{free_port()}/lmwatch"
    cluster.api.relay = Relay(closed, wait=1.0, poll=0.2)
    answer = await api.post(f"/v1/migrations/{mid}/cancel")
    assert answer.status == 503
    assert answer.body["type"] == "urn:lmwatch:problem:store-unavailable"
    assert "cannot be reached" in answer.body["detail"]
    assert "nothing was recorded" in answer.body["detail"]
    assert command_rows(cluster.url, mid) == []
