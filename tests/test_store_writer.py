"""The store's one writer thread (issue 8): a change queued on the event loop returns
at once, the writer commits the queue in order, reads show what waits, an acceptance
is on disk before it returns, and nothing acknowledged is lost when the process dies.
Every test runs on both kinds of store (a SQLite file, a PostgreSQL database).

A slow disk is injected between the store and its write connection (`SlowDisk`):
every COMMIT waits for the test to open the gate (or two seconds, so that code that
commits on the caller's thread fails the test instead of hanging it)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from storetools import disk_full, io_error, on_disk, url_of

from lmwatch import store as store_module
from lmwatch.clock import VirtualClock
from lmwatch.drivers.sim import SimDriver
from lmwatch.engine import Engine
from lmwatch.errors import Conflict, StoreUnavailable
from lmwatch.model import MigrationRequest, State
from lmwatch.records import Progress
from lmwatch.store import DrainRecord, DrainState, MigrationRecord, Store


class SlowDisk:
    """Stands in for the store's write connection: COMMIT waits for `gate`."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self.gate = threading.Event()
        self.commits_started = 0
        self.commits_done = 0
        self.commit_threads: set[int] = set()
        self.accepted = 0  # migrations inserted in the open transaction
        self.acceptances: list[int] = []  # migrations inserted, per transaction with some

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.startswith("INSERT INTO migrations"):
            self.accepted += 1
        if sql.lstrip().upper().startswith("COMMIT"):
            if self.accepted:
                self.acceptances.append(self.accepted)
                self.accepted = 0
            self.commits_started += 1
            self.commit_threads.add(threading.get_ident())
            self.gate.wait(2.0)
            cursor = self._connection.execute(sql, *args)
            self.commits_done += 1
            return cursor
        return self._connection.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


def slow(store: Store) -> SlowDisk:
    disk = SlowDisk(store._db)
    store._db = disk  # type: ignore[assignment]
    return disk


def _record(number: int, state: State = State.QUEUED) -> MigrationRecord:
    return MigrationRecord(
        id=f"m{number:04d}",
        instance=f"vm{number}",
        source="a",
        destination="b",
        labels={},
        requested_profile=None,
        profile_name="default",
        profile_reason="the default",
        profile={"name": "default"},
        memory_bytes=1024,
        state=state,
        created_at=1000.0 + number,
    )


@pytest.fixture
def store(shared_store: Store) -> Store:
    """Of each kind: the engine and API fixtures of this module use it too."""
    return shared_store


async def test_a_write_on_the_loop_does_not_wait_for_a_slow_commit(store: Store) -> None:
    records = [_record(n) for n in range(3)]
    for record in records:
        store.insert(record, "accepted")
    disk = slow(store)
    loop_thread = threading.get_ident()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    ticking = asyncio.create_task(ticker())
    updated = []
    for record in records:
        updated.append(
            store.update(record, event=("state", "starting", None), at=2.0, state=State.STARTING)
        )
        store.add_event(record.id, 3.0, "note", "a note")
    # Every call returned with no commit done: the disk is the writer thread's.
    assert disk.commits_done == 0
    # The writer thread gets to its first commit within moments (on a loaded machine,
    # more than 50 ms: wait for it, well within the gate's two seconds).
    for _ in range(100):
        await asyncio.sleep(0.01)
        if disk.commits_started:
            break
    assert disk.commits_started >= 1 and disk.commits_done == 0  # the writer is stuck in one
    assert ticks > 5  # and the loop ran on meanwhile
    # Read-your-writes while nothing is written yet.
    assert store.get("m0001") == updated[1]
    assert [r.id for r in store.list(State.STARTING)] == ["m0000", "m0001", "m0002"]
    assert store.list(State.QUEUED) == []
    assert [r.id for r in store.page(State.STARTING, limit=2)] == ["m0000", "m0001"]
    assert [r.id for r in store.page(State.STARTING, limit=2, after="m0001")] == ["m0002"]
    assert [r.state for r in store.unfinished()] == [State.STARTING] * 3
    active = store.active_for_instance("vm2")
    assert active is not None and active.state is State.STARTING
    assert [e.reason for e in store.events("m0002")] == ["accepted", "starting", "a note"]
    assert on_disk(store, "SELECT DISTINCT state FROM migrations") == [("queued",)]
    disk.gate.set()
    assert store.settle(5)
    ticking.cancel()
    assert disk.commit_threads and loop_thread not in disk.commit_threads
    assert on_disk(store, "SELECT DISTINCT state FROM migrations") == [("starting",)]
    assert [e.reason for e in store.events("m0002")] == ["accepted", "starting", "a note"]
    assert store.get("m0001") == updated[1]


async def test_an_acceptance_waits_for_the_disk_without_stopping_the_loop(store: Store) -> None:
    disk = slow(store)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    ticking = asyncio.create_task(ticker())
    accepting = asyncio.create_task(store.insert_async(_record(1), "accepted"))
    await asyncio.sleep(0.05)
    assert not accepting.done()  # not acknowledged before it is on disk
    assert ticks > 5
    assert store.get("m0001") is None  # nor shown
    disk.gate.set()
    await asyncio.wait_for(accepting, 5)
    ticking.cancel()
    assert on_disk(store, "SELECT id FROM migrations") == [("m0001",)]
    assert store.get("m0001") == _record(1)


def test_writes_reach_the_file_in_the_order_they_were_made(store: Store) -> None:
    records = {n: _record(n) for n in range(20)}
    for record in records.values():
        store.insert(record, "accepted")
    expected = []
    for step in range(30):
        number = (step * 7) % 20
        record = records[number]
        if step % 3 == 0:
            store.add_event(record.id, 10.0 + step, "note", f"note {step}")
        else:
            records[number] = store.update(
                record,
                event=("decision", f"step {step}", None),
                at=10.0 + step,
                progress=Progress(passes=step),
            )
        store.update(records[number], progress=Progress(passes=step, memory_total=1))  # merges
        records[number] = store.get(record.id) or record
        expected.append((record.id, 10.0 + step))
    store.close()
    rows = on_disk(store, "SELECT migration_id, at FROM events WHERE at < 100 ORDER BY seq")
    assert rows == expected
    reopened = Store.open(url_of(store))
    try:
        for number, record in records.items():
            assert reopened.get(record.id) == record, number
    finally:
        reopened.close()


def test_close_writes_everything_queued(store_location: str) -> None:
    store = Store.open(store_location)
    record = store.update(_record(1), state=State.COPYING)  # no row yet: nothing to update
    store.insert(_record(2), "accepted")
    for step in range(200):
        store.add_event("m0002", float(step), "note", f"n{step}")
    store.update(_record(2), event=("state", "copying", None), at=300.0, state=State.COPYING)
    store.close()
    assert record.state is State.COPYING
    assert on_disk(store, "SELECT COUNT(*) FROM events WHERE migration_id='m0002'") == [(202,)]
    assert on_disk(store, "SELECT state FROM migrations WHERE id='m0002'") == [("copying",)]


def test_a_writer_error_keeps_the_changes_and_writes_them_once(store: Store) -> None:
    store.insert(_record(1), "accepted")

    class Broken:
        def __init__(self, connection: Any) -> None:
            self.connection = connection
            self.broken = True

        def execute(self, sql: str, *args: Any) -> Any:
            if self.broken and sql.startswith("UPDATE"):
                raise io_error(store)
            return self.connection.execute(sql, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.connection, name)

    broken = Broken(store._db)
    store._db = broken  # type: ignore[assignment]
    copying = store.update(
        _record(1), event=("state", "copying", None), at=2.0, state=State.COPYING
    )
    assert store.settle(5)
    assert store.failing() and "disk I/O error" in (store.problem() or "")
    assert store.get("m0001") == copying
    with pytest.raises(Exception, match="cannot be written"):
        store.insert(_record(2), "accepted")
    broken.broken = False
    store.retry(3.0)
    assert store.settle(5) and not store.failing() and store.pending() == 0
    assert on_disk(store, "SELECT reason FROM events ORDER BY seq") == [
        ("accepted",),
        ("copying",),
    ]


def test_a_drain_change_is_queued_and_shown(store: Store) -> None:
    drain = DrainRecord(id="d1", host="a", state=DrainState.RUNNING, created_at=1.0, items=())
    store.insert_drain(drain)
    disk = slow(store)
    done = DrainRecord(
        id="d1", host="a", state=DrainState.COMPLETED, created_at=1.0, items=(), finished_at=2.0
    )
    store.update_drain(done)
    assert disk.commits_done == 0
    assert store.get_drain("d1") == done
    assert store.unfinished_drains() == []
    disk.gate.set()
    assert store.settle(5)
    assert on_disk(store, "SELECT state FROM drains") == [("completed",)]


_CRASHER = """
import os, signal, sys
from lmwatch.store import Store, MigrationRecord
from lmwatch.model import State
from lmwatch.records import Progress
store = Store.open(sys.argv[1])
for n in range(200):
    record = MigrationRecord(
        id=f"m{n:04d}", instance=f"vm{n}", source="a", destination="b", labels={},
        requested_profile=None, profile_name="p", profile_reason="r", profile={},
        memory_bytes=1, state=State.QUEUED, created_at=float(n),
    )
    store.insert(record, "accepted")
    print(record.id, flush=True)  # acknowledged
    for k in range(20):  # transitions queued behind it, never waited for
        step = Progress(passes=k)
        store.update(record, event=("note", f"k{k}", None), at=float(n), progress=step)
    if n == 150:
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_process_loses_no_acknowledged_acceptance(store_location: str) -> None:
    path = store_location
    done = subprocess.run(
        [sys.executable, "-c", _CRASHER, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    acknowledged = done.stdout.split()
    assert len(acknowledged) == 151
    stored = {row[0] for row in on_disk(path, "SELECT id FROM migrations")}
    assert set(acknowledged) <= stored
    reopened = Store.open(path)
    try:
        assert reopened.unreadable() == []
        assert {r.id for r in reopened.unfinished()} == stored
    finally:
        reopened.close()


# --- intent before action: the engine waits for the writer before acting on a host --


async def test_an_action_on_the_hypervisor_waits_for_its_intent_to_be_in_the_file(
    engine: Engine,
    driver: SimDriver,
    store: Store,
    clock: VirtualClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    request = MigrationRequest(instance="strict", source="a", destination="b")
    record, _ = await engine.submit(request)
    assert await clock.run_until(lambda: engine.get(record.id).state is State.COPYING)
    assert store.settle(5)
    disk = slow(store)
    threading.Timer(0.3, disk.gate.set).start()  # a slow disk: 300 ms a commit
    seen: list[list[tuple[Any, ...]]] = []
    original = driver.cancel

    async def cancel(migration_id: str) -> None:
        seen.append(
            on_disk(
                store,
                "SELECT kind, action FROM events WHERE migration_id=? AND action='cancel'",
                migration_id,
            )
        )
        await original(migration_id)

    monkeypatch.setattr(driver, "cancel", cancel)
    await engine.cancel(record.id)
    assert seen == [[("decision", "cancel")]]  # on disk before the hypervisor was asked
    assert await clock.run_until(lambda: engine.finished([record.id]), limit=600)


def test_waiting_for_the_writer_ends_when_writes_fail(store: Store) -> None:
    store.insert(_record(1), "accepted")
    assert store.written_soon().done()  # nothing waits
    disk = slow(store)
    store.add_event("m0001", 2.0, "note", "a note")
    waiting = store.written_soon()
    assert not waiting.done()
    disk.gate.set()
    waiting.result(timeout=5)
    assert on_disk(store, "SELECT COUNT(*) FROM events") == [(2,)]

    class Full:
        def __init__(self, connection: Any) -> None:
            self.connection = connection

        def execute(self, sql: str, *args: Any) -> Any:
            if sql.startswith("INSERT"):
                raise disk_full(store)
            return self.connection.execute(sql, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.connection, name)

    store._db = Full(disk._connection)  # type: ignore[assignment]
    store.add_event("m0001", 3.0, "note", "another")
    store.written_soon().result(timeout=5)  # kept in memory: nobody waits for space
    assert store.failing() and store.pending() == 1
    assert store.written_soon().done()


# --- acceptances: checked in turn, written together ---------------------------------


async def test_concurrent_acceptances_share_one_flush(
    engine: Engine, store: Store, clock: VirtualClock
) -> None:
    disk = slow(store)
    threading.Timer(0.3, disk.gate.set).start()  # a slow disk: 300 ms a commit
    requests = [
        MigrationRequest(instance=name, source="a", destination="b")
        for name in ("quiet", "quiet2", "quiet3", "strict")
    ]
    accepted = await asyncio.gather(*(engine.submit(r) for r in requests))
    assert [replayed for _, replayed in accepted] == [False] * 4
    # Checked one after another, written together: at most the first one alone.
    assert sum(disk.acceptances) == 4 and len(disk.acceptances) <= 2
    ids = {record.id for record, _ in accepted}
    assert {row[0] for row in on_disk(store, "SELECT id FROM migrations")} == ids


async def test_a_request_is_checked_against_acceptances_not_yet_on_disk(
    engine: Engine, store: Store
) -> None:
    disk = slow(store)
    threading.Timer(0.3, disk.gate.set).start()
    first = MigrationRequest(instance="quiet", source="a", destination="b")
    other = MigrationRequest(instance="quiet", source="a", destination="b")
    keyed = MigrationRequest(instance="quiet2", source="a", destination="b")
    results = await asyncio.gather(
        engine.submit(first),
        engine.submit(other),
        engine.submit(keyed, "k1"),
        engine.submit(keyed, "k1"),
        engine.submit(dataclasses.replace(keyed, labels={"x": "y"}), "k1"),
        return_exceptions=True,
    )
    record, replayed = results[0]  # type: ignore[misc]
    assert not replayed
    assert isinstance(results[1], Conflict) and "already migrating" in str(results[1])
    keyed_record, keyed_replayed = results[2]  # type: ignore[misc]
    replay, was_replayed = results[3]  # type: ignore[misc]
    assert replay.id == keyed_record.id and was_replayed  # answered once it is on disk
    assert not keyed_replayed
    assert isinstance(results[4], Conflict) and "Idempotency-Key" in str(results[4])
    stored = {row[0] for row in on_disk(store, "SELECT id FROM migrations")}
    assert stored == {record.id, keyed_record.id}


async def test_an_acceptance_whose_write_fails_is_refused_and_holds_nothing(
    engine: Engine, store: Store, clock: VirtualClock
) -> None:
    class FailsOnce:
        def __init__(self, connection: Any) -> None:
            self.connection = connection
            self.failing = True

        def execute(self, sql: str, *args: Any) -> Any:
            if self.failing and sql.startswith("COMMIT"):
                self.failing = False
                raise disk_full(store)
            return self.connection.execute(sql, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.connection, name)

    store._db = FailsOnce(store._db)  # type: ignore[assignment]
    request = MigrationRequest(instance="quiet", source="a", destination="b")
    with pytest.raises(StoreUnavailable, match="cannot be written"):
        await engine.submit(request)
    assert engine._book.load("b").reservations == 0
    assert engine._accepting == {}
    assert store.settle(5) and store.failing()
    store.retry()
    assert store.settle(5) and not store.failing()
    record, replayed = await engine.submit(request)
    assert not replayed and engine.get(record.id).instance == "quiet"


async def test_a_page_decodes_only_the_rows_it_returns_however_much_waits_unwritten(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At 2,000 migrations hundreds of progress changes wait for the writer at any
    # moment; a page of 10 must not read and decode that many rows more.
    records = [_record(n) for n in range(300)]
    for record in records:
        store.insert(record, "accepted")
    disk = slow(store)
    # Changes held unwritten: every other migration starts (a page filtered by state
    # must see it).
    for record in records[::2]:
        store.update(record, event=("state", "starting", None), at=2.0, state=State.STARTING)
    decoded = 0
    real = store_module._from_row

    def counting(row: Any) -> MigrationRecord:
        nonlocal decoded
        decoded += 1
        return real(row)

    monkeypatch.setattr(store_module, "_from_row", counting)
    everything = store.list()
    starting = store.list(State.STARTING)
    queued = store.list(State.QUEUED)
    assert len(starting) == 150 and len(queued) == 150
    for state, whole in ((None, everything), (State.STARTING, starting), (State.QUEUED, queued)):
        after: str | None = None
        shown: list[str] = []
        while True:
            decoded = 0
            page = store.page(state, limit=10, after=after)
            assert decoded <= 10
            if not page:
                break
            shown += [r.id for r in page]
            after = page[-1].id
        assert shown == [r.id for r in whole]
    disk.gate.set()
    assert store.settle(5)


def test_an_acceptance_that_breaks_a_constraint_is_refused_alone(store: Store) -> None:
    # In one transaction with others (PostgreSQL aborts a transaction at its first
    # failed statement: the acceptance is undone alone, to a savepoint).
    store.insert(_record(1), "accepted")
    disk = slow(store)
    store.add_event("m0001", 2.0, "note", "held at its commit")  # the writer waits here
    _wait_until(lambda: disk.commits_started == 1)
    twice = store.insert_soon(_record(1), "accepted again")  # the same id
    fresh = store.insert_soon(_record(2), "accepted")
    store.add_event("m0001", 3.0, "note", "after")
    disk.gate.set()
    with pytest.raises(store_module.StoreError, match="cannot record migration m0001"):
        twice.result(timeout=5)
    fresh.result(timeout=5)
    assert store.settle(5) and not store.failing()
    assert disk.acceptances == [2]  # both tried in one transaction; one went in
    assert on_disk(store, "SELECT id FROM migrations ORDER BY id") == [("m0001",), ("m0002",)]
    assert on_disk(store, "SELECT reason FROM events ORDER BY seq") == [
        ("accepted",),
        ("held at its commit",),
        ("accepted",),
        ("after",),
    ]


def _wait_until(condition: Any, timeout: float = 5.0) -> None:
    import time

    give_up = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < give_up, "timed out"
        time.sleep(0.005)
