"""The PostgreSQL store's writes under claims (lmwatch/cluster/fencing.py): a
migration's changes are written only while this member's claim on it is current;
a stale one's are dropped, reported, and never retried; the outcome retires the
claim in its transaction; an acceptance offers its migration's unit."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from pgtools import PgCluster, TcpProxy
from storetools import on_disk

from lmwatch.cluster import leases
from lmwatch.cluster.fencing import MIGRATION, Fencing
from lmwatch.cluster.membership import Membership
from lmwatch.cluster.pg import Connection, connect
from lmwatch.cluster.schema import ensure_schema
from lmwatch.model import State
from lmwatch.policies.leases import LeaseTerms
from lmwatch.store import MigrationRecord, Store


def _record(n: int) -> MigrationRecord:
    return MigrationRecord(
        id=f"m{n:04d}",
        instance=f"vm{n}",
        source="a",
        destination="b",
        labels={},
        requested_profile=None,
        profile_name="default",
        profile_reason="the default",
        profile={},
        memory_bytes=1 << 30,
        state=State.COPYING,
        created_at=1_800_000_000.0 + n,
    )


@pytest.fixture
def db(pg_url: str) -> Iterator[Connection]:
    conn = connect(pg_url)
    ensure_schema(conn)
    yield conn
    conn.close()


@pytest.fixture
def fenced_store(pg_url: str) -> Iterator[tuple[Store, Fencing, list[tuple[str, str]]]]:
    store = Store.open(pg_url)
    fencing = Fencing()
    store.fence(fencing)
    heard: list[tuple[str, str]] = []
    fencing.on_stale(lambda migration_id, why: heard.append((migration_id, why)))
    yield store, fencing, heard
    store.close()


def test_an_acceptance_offers_its_migration_in_its_transaction(
    fenced_store: tuple[Store, Fencing, list[tuple[str, str]]], pg_url: str
) -> None:
    store, _, _ = fenced_store
    store.insert(_record(1), "accepted")
    rows = on_disk(pg_url, "SELECT kind, key, owner FROM cluster_leases")
    assert rows == [("migration", "m0001", None)]


def test_changes_are_written_under_a_current_claim_and_the_outcome_retires_it(
    fenced_store: tuple[Store, Fencing, list[tuple[str, str]]], pg_url: str, db: Connection
) -> None:
    store, fencing, heard = fenced_store
    record = _record(1)
    store.insert(record, "accepted")
    member = leases.register(db, "a", 30)
    (claim,) = leases.claim(db, member, MIGRATION)
    fencing.hold(record.id, claim)
    updated = store.update(record, event=("note", "copying", None), paused=True)
    assert store.flush()
    assert on_disk(pg_url, "SELECT paused FROM migrations") == [(1,)]
    store.update(updated, event=("state", "completed", None), state=State.COMPLETED)
    assert store.flush()
    assert on_disk(pg_url, "SELECT state FROM migrations") == [("completed",)]
    assert on_disk(pg_url, "SELECT key FROM cluster_leases") == []  # retired with it
    assert not fencing.holds(record.id) and heard == []


def test_changes_under_a_stale_claim_are_dropped_reported_and_never_retried(
    fenced_store: tuple[Store, Fencing, list[tuple[str, str]]], pg_url: str, db: Connection
) -> None:
    store, fencing, heard = fenced_store
    record, other = _record(1), _record(2)
    store.insert(record, "accepted")
    store.insert(other, "accepted")
    a = leases.register(db, "a", 0.5)
    claims = {c.key: c for c in leases.claim(db, a, MIGRATION)}
    for key, claim in claims.items():
        fencing.hold(key, claim)
    time.sleep(0.6)  # a's lease runs out; b claims what a held
    b = leases.register(db, "b", 30)
    assert [c.key for c in leases.claim(db, b, MIGRATION, keys=[record.id])] == [record.id]
    store.update(record, event=("decision", "pause", "pause"), paused=True)
    assert store.flush()  # written: nothing failed, the change was dropped
    assert on_disk(pg_url, "SELECT paused FROM migrations WHERE id = ?", record.id) == [(0,)]
    assert on_disk(
        pg_url,
        "SELECT count(*) FROM events WHERE migration_id = ? AND kind = 'decision'",
        record.id,
    ) == [(0,)]
    assert heard and heard[0][0] == record.id
    assert "now claimed by member b" in heard[0][1]
    assert not fencing.holds(record.id)
    # a's lease has run out: its claim on the other is stale too ("lease run out").
    store.update(other, event=("note", "late", None), paused=True)
    assert store.flush()
    assert on_disk(pg_url, "SELECT paused FROM migrations WHERE id = ?", other.id) == [(0,)]
    assert heard[-1][0] == other.id
    # Never retried: nothing is left waiting, and a later change of it is dropped too.
    assert store.pending() == 0
    store.update(record, event=("note", "later", None), paused=True)
    assert store.flush()
    assert on_disk(pg_url, "SELECT paused FROM migrations WHERE id = ?", record.id) == [(0,)]


def test_without_fencing_a_postgresql_store_writes_as_before(pg_url: str) -> None:
    store = Store.open(pg_url)
    try:
        record = _record(1)
        store.insert(record, "accepted")
        store.update(record, paused=True)
        assert store.flush()
        assert on_disk(pg_url, "SELECT paused FROM migrations") == [(1,)]
        assert on_disk(pg_url, "SELECT count(*) FROM cluster_leases") == [(0,)]
    finally:
        store.close()


def test_a_transaction_a_cut_off_member_left_hanging_frees_its_locks_before_its_lease_ends(
    pg_cluster: PgCluster, pg_url: str, db: Connection
) -> None:
    proxy = TcpProxy(pg_cluster.port)
    database = pg_url.rsplit("/", 1)[1].split("?", 1)[0]
    membership = Membership(
        pg_cluster.url(database, port=proxy.port), "a", LeaseTerms.for_lease(3.0)
    )
    try:
        conn = membership._connection()
        member = leases.register(conn, "a", 3.0)
        leases.offer(conn, MIGRATION, ["m0001"])
        (claim,) = leases.claim(conn, member, MIGRATION)
        locked, finish = threading.Event(), threading.Event()

        def hang() -> None:
            with contextlib.suppress(Exception), leases.fenced(conn, claim):
                locked.set()
                finish.wait(30)  # the member is cut off here, inside its transaction

        worker = threading.Thread(target=hang)
        worker.start()
        assert locked.wait(5)
        proxy.hold()
        cut = time.monotonic()
        row = "SELECT 1 FROM cluster_leases WHERE key = 'm0001' FOR UPDATE NOWAIT"
        while True:
            try:
                with db.transaction():
                    db.execute(row)
                break
            except psycopg.errors.LockNotAvailable:
                assert time.monotonic() - cut < 10, "the row stayed locked"
                time.sleep(0.05)
        freed = time.monotonic() - cut
        # Freed by the server after the idle limit, before the lease could have run out.
        assert freed < membership.terms.lease - membership.terms.renew_every, freed
        finish.set()
        worker.join(30)
    finally:
        proxy.close()
        membership.stop()
