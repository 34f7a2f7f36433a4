"""A store that stops taking writes (a full disk) or whose file is deleted while the
daemon runs: supervision goes on, nothing new is accepted, readiness and metrics say
so, and every change reaches the store once, in order, when it takes writes again.

Failures are injected between the store and its connection (`FaultyDisk`): a full
disk makes the database's writes fail with "database or disk is full" (SQLite's
error, or PostgreSQL's DiskFull), which is what the proxy raises, statement by
statement, while reads go on. Every test runs on both kinds of store but those of a
file deleted or replaced, which only a SQLite store has."""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from apitools import Api
from prometheus_client.parser import text_string_to_metric_families
from storetools import disk_full, on_disk

from lmwatch.clock import VirtualClock
from lmwatch.engine import Engine
from lmwatch.model import State
from lmwatch.records import Progress
from lmwatch.store import MigrationRecord, Store, StoreError, is_database_url

WRITES = ("INSERT", "UPDATE", "DELETE", "COMMIT")


class FaultyDisk:
    """Stands in for a store's connection. While `full`, every statement that writes
    fails as on a full disk; `fail_commits` fails that many COMMITs only (the case
    where SQLite leaves the transaction open)."""

    def __init__(self, connection: Any, error: Exception) -> None:
        self._connection = connection
        self._error = error
        self.full = False
        self.fail_commits = 0
        self.failures = 0

    def execute(self, sql: str, *args: Any) -> Any:
        verb = sql.lstrip().split(None, 1)[0].upper()
        failing = self.full and verb in WRITES
        if verb == "COMMIT" and self.fail_commits > 0:
            self.fail_commits -= 1
            failing = True
        if failing:
            self.failures += 1
            raise self._error
        return self._connection.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


def faulty(store: Store) -> FaultyDisk:
    disk = FaultyDisk(store._db, disk_full(store))
    store._db = disk  # type: ignore[assignment]
    return disk


@pytest.fixture
def store(shared_store: Store) -> Store:
    """Of each kind: the engine and API fixtures of this module use it too."""
    return shared_store


def stored_timeline(store: Store, migration_id: str) -> list[tuple[Any, ...]]:
    """What is on disk, read through a connection of its own."""
    return on_disk(
        store,
        "SELECT at, kind, reason, action FROM events WHERE migration_id=? ORDER BY seq",
        migration_id,
    )


def logged(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 5.0) -> bool:
    """Whether `text` is logged within `timeout` real seconds (by another thread)."""
    give_up = time.monotonic() + timeout
    while text not in caplog.text:
        if time.monotonic() > give_up:
            return False
        time.sleep(0.01)
    return True


def written(store: Store) -> bool:
    """Whether the store takes writes, once its writer thread has tried what waits
    (virtual time runs ahead of the thread: wait for it, in real time)."""
    assert store.settle(5)
    return not store.failing()


def stored_state(store: Store, migration_id: str) -> str:
    return str(on_disk(store, "SELECT state FROM migrations WHERE id=?", migration_id)[0][0])


def metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not exposed")


def record(store: Store, migration_id: str = "m1") -> MigrationRecord:
    accepted = MigrationRecord(
        id=migration_id,
        instance="vm",
        source="a",
        destination="b",
        labels={},
        requested_profile=None,
        profile_name="default",
        profile_reason="default",
        profile={},
        memory_bytes=1,
        state=State.QUEUED,
        created_at=1.0,
    )
    store.insert(accepted, "accepted")
    return accepted


# --- the store ------------------------------------------------------------------------


def test_a_failed_commit_does_not_leave_the_transaction_open(store: Store) -> None:
    queued = record(store)
    disk = faulty(store)
    disk.fail_commits = 1
    starting = store.update(queued, event=("state", "starting", None), at=2.0, state=State.STARTING)
    assert store.settle(5)  # the writer thread tried it
    assert store.failing()
    assert not disk._connection.in_transaction
    assert store.flush(3.0)
    store.update(starting, event=("state", "copying", None), at=4.0, state=State.COPYING)
    assert store.settle(5)
    assert stored_timeline(store, "m1") == [
        (1.0, "state", "accepted", None),
        (2.0, "state", "starting", None),
        (4.0, "state", "copying", None),
    ]
    assert stored_state(store, "m1") == "copying"


def test_failed_writes_are_kept_shown_and_written_once_in_order(store: Store) -> None:
    queued = record(store)
    disk = faulty(store)
    disk.full = True
    starting = store.update(queued, event=("state", "starting", None), at=2.0, state=State.STARTING)
    store.add_event("m1", 3.0, "note", "a note")
    progressed = store.update(starting, progress=Progress(passes=1))
    progressed = store.update(progressed, progress=Progress(passes=2))
    copying = store.update(
        progressed, event=("state", "copying", None), at=4.0, state=State.COPYING
    )
    assert store.settle(5)
    assert store.failing() and store.problem() is not None
    assert "database or disk is full" in (store.problem() or "")
    # Reads show what is not written yet.
    assert store.get("m1") == copying
    assert [r.id for r in store.unfinished()] == ["m1"]
    assert store.list(State.COPYING) == [copying]
    assert [e.reason for e in store.events("m1")] == ["accepted", "starting", "a note", "copying"]
    assert stored_timeline(store, "m1") == [(1.0, "state", "accepted", None)]
    # A retry that fails again writes nothing, not even a part.
    assert not store.flush(5.0)
    assert stored_timeline(store, "m1") == [(1.0, "state", "accepted", None)]
    disk.full = False
    assert store.flush(6.0)
    assert not store.failing() and store.problem() is None and store.pending() == 0
    assert stored_timeline(store, "m1") == [
        (1.0, "state", "accepted", None),
        (2.0, "state", "starting", None),
        (3.0, "note", "a note", None),
        (4.0, "state", "copying", None),
    ]
    assert stored_state(store, "m1") == "copying"
    assert store.get("m1") == copying
    assert store.flush(7.0)  # nothing left: nothing written twice
    assert len(stored_timeline(store, "m1")) == 4


def test_a_new_migration_is_not_recorded_while_writes_fail(store: Store) -> None:
    queued = record(store)
    disk = faulty(store)
    disk.full = True
    store.update(queued, event=("state", "starting", None), at=2.0, state=State.STARTING)
    assert store.settle(5)
    disk.full = False  # even if this one could be written: it would jump the queue
    with pytest.raises(Exception, match="cannot be written"):
        record(store, "m2")
    assert store.get("m2") is None


# --- the daemon, through its API --------------------------------------------------------


async def test_a_full_disk_spell_orphans_nothing(
    api: Api,
    engine: Engine,
    clock: VirtualClock,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    published: list[tuple[str, tuple[Any, ...]]] = []
    original = engine.hub.timeline

    def timeline(record: MigrationRecord, at: float, kind: str, reason: str, *rest: Any) -> None:
        action = rest[0] if rest else None
        published.append((record.id, (at, kind, reason, action)))
        original(record, at, kind, reason, *rest)

    monkeypatch.setattr(engine.hub, "timeline", timeline)
    ids = {}
    for instance in ("quiet", "strict", "quiet2"):
        answer = await api.post(
            "/v1/migrations", {"instance": instance, "source": "a", "destination": "b"}
        )
        assert answer.status == 202, answer.text
        ids[instance] = answer.body["id"]
    assert await clock.run_until(lambda: engine.get(ids["strict"]).state is State.COPYING)
    assert engine.get(ids["quiet2"]).state is State.QUEUED  # two per source at once

    disk = faulty(store)
    disk.full = True
    with caplog.at_level(logging.INFO):
        # The quiet one finishes while nothing can be written; its slot goes to quiet2.
        assert await clock.run_until(
            lambda: engine.get(ids["quiet"]).state is State.COMPLETED, limit=120
        )
        assert await clock.run_until(
            lambda: engine.get(ids["quiet2"]).state is not State.QUEUED, limit=60
        )
        assert not written(store)
    assert disk.failures > 0
    # The writer thread logs the failure just after it has made it visible (failing()):
    # wait for the line in real time.
    assert logged(caplog, "store-write-failed") and f"path={store.path}" in caplog.text

    ready = await api.get("/readyz")
    assert ready.status == 503
    assert ready.body["ready"] is False and ready.body["store"] is False
    assert "cannot be written: database or disk is full" in ready.body["detail"]
    refused = await api.post(
        "/v1/migrations", {"instance": "quiet3", "source": "a", "destination": "b"}
    )
    assert refused.status == 503
    assert refused.content_type == "application/problem+json"
    assert refused.body["detail"].startswith(
        f"the database at {store.path.removeprefix('postgresql://')} cannot be written: "
        "database or disk is full"
        if is_database_url(store.path)
        else "the store cannot be written: database or disk is full"
    )
    assert "retry later" in refused.body["detail"]
    scraped = (await api.get("/metrics")).text
    assert metric(scraped, "lmwatch_store_healthy") == 0
    assert metric(scraped, "lmwatch_store_write_failures_total") >= 1

    cancelled = await api.post(f"/v1/migrations/{ids['strict']}/cancel")
    assert cancelled.status == 202, cancelled.text
    assert await clock.run_until(lambda: engine.finished(ids.values()), limit=600)
    shown = await api.get(f"/v1/migrations/{ids['strict']}")
    assert shown.body["state"] == "cancelled"
    assert engine.active_count() == 0  # every slot is free again
    assert disk.full  # all of it happened without a single write

    disk.full = False
    assert await clock.run_until(lambda: written(store), limit=120)
    assert (await api.get("/readyz")).status == 200
    scraped = (await api.get("/metrics")).text
    assert metric(scraped, "lmwatch_store_healthy") == 1
    for instance, migration_id in ids.items():
        expected = [entry for owner, entry in published if owner == migration_id]
        on_disk = stored_timeline(store, migration_id)
        # Everything that was published is on disk, once, in order.
        assert on_disk == expected, instance
        assert stored_state(store, migration_id) == engine.get(migration_id).state.value
    assert stored_state(store, ids["strict"]) == "cancelled"
    again = await api.post(
        "/v1/migrations", {"instance": "quiet3", "source": "a", "destination": "b"}
    )
    assert again.status == 202, again.text


async def test_a_submission_that_finds_the_disk_full_is_refused_until_it_is_not(
    api: Api, engine: Engine, clock: VirtualClock, store: Store
) -> None:
    disk = faulty(store)
    disk.full = True
    body = {"instance": "quiet", "source": "a", "destination": "b"}
    refused = await api.post("/v1/migrations", body)
    assert refused.status == 503
    assert "cannot be written: database or disk is full" in refused.body["detail"]
    assert "retry later" in refused.body["detail"]
    assert (await api.get("/readyz")).status == 503
    assert engine.list() == []
    disk.full = False
    assert await clock.run_until(lambda: written(store), limit=60)
    assert (await api.get("/readyz")).status == 200
    assert (await api.post("/v1/migrations", body)).status == 202


@pytest.mark.parametrize("store_location", ["sqlite"], indirect=True)  # a file's own
async def test_a_deleted_store_file_stops_new_work_and_loses_nothing(
    api: Api, engine: Engine, clock: VirtualClock, store: Store, tmp_path: Path
) -> None:
    path = Path(store.path)
    assert path.parent == tmp_path
    started = await api.post(
        "/v1/migrations", {"instance": "strict", "source": "a", "destination": "b"}
    )
    migration_id = started.body["id"]
    assert await clock.run_until(lambda: engine.get(migration_id).state is State.COPYING)
    os.unlink(path)
    await clock.advance(engine.settings.store_check_interval + 1)
    scraped = (await api.get("/metrics")).text
    assert metric(scraped, "lmwatch_store_healthy") == 0  # seen without being asked

    ready = await api.get("/readyz")
    assert ready.status == 503 and ready.body["store"] is False
    assert f"the store file {path} was deleted" in ready.body["detail"]
    assert f"{path}.rescued" in ready.body["detail"]
    refused = await api.post(
        "/v1/migrations", {"instance": "quiet", "source": "a", "destination": "b"}
    )
    assert refused.status == 503
    assert "was deleted" in refused.body["detail"]
    assert not path.exists()  # never re-created empty behind the operator's back

    # The running migration is still supervised, and what happens to it is kept.
    assert (await api.post(f"/v1/migrations/{migration_id}/cancel")).status == 202
    assert await clock.run_until(lambda: engine.finished([migration_id]), limit=600)
    timeline = [(e.at, e.kind, e.reason, e.action) for e in engine.events(migration_id)]
    await engine.stop()
    store.close()  # as the daemon stops: the copy is refreshed

    # What the message tells the operator to do brings every migration back.
    os.replace(f"{path}.rescued", path)
    reopened = Store.open(path)
    try:
        back = reopened.get(migration_id)
        assert back is not None and back.state is State.CANCELLED
        assert [(e.at, e.kind, e.reason, e.action) for e in reopened.events(migration_id)] == (
            timeline
        )
    finally:
        reopened.close()


@pytest.mark.parametrize("store_location", ["sqlite"], indirect=True)  # a file's own
async def test_a_replaced_store_file_is_not_written_over(
    api: Api, engine: Engine, store: Store
) -> None:
    path = Path(store.path)
    other = path.with_name("other.db")
    Store.open(other).close()
    os.replace(other, path)
    ready = await api.get("/readyz")
    assert ready.status == 503
    assert f"the store file {path} was replaced by another file" in ready.body["detail"]
    refused = await api.post(
        "/v1/migrations", {"instance": "quiet", "source": "a", "destination": "b"}
    )
    assert refused.status == 503
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT COUNT(*) FROM migrations").fetchone()[0] == 0


@pytest.mark.parametrize("store_location", ["sqlite"], indirect=True)  # a file's own
def test_noticing_a_deleted_file_copies_nothing_and_no_read_re_creates_it(
    store: Store,
) -> None:
    # `check_file` runs on the event loop (every acceptance, /readyz): it only looks.
    # The copy, which reads the whole database, is `keep_rescue`'s, in a worker thread.
    record(store)
    assert store.settle(5)
    path = Path(store.path)
    rescue = Path(store.rescue_path)
    os.unlink(path)
    problem = store.check_file()
    assert problem is not None and "was deleted" in problem
    assert store.file_lost()
    assert not rescue.exists()
    # A read from a thread that never read before finds no file, and makes none.
    with ThreadPoolExecutor(1) as pool, pytest.raises(StoreError, match="unable to open"):
        pool.submit(store.list).result()
    assert not path.exists()
    store.keep_rescue()
    assert rescue.exists()
    assert f"keeps a copy of everything it recorded in {rescue}" in (store.check_file() or "")
    copy = Store.open(rescue)
    try:
        assert copy.get("m1") is not None
    finally:
        copy.close()
