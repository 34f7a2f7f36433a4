"""Drains in the store: written whole, read back, found when unfinished; a store of
an older version gains the table, one of a newer version is refused. On both kinds of
store (SQLite, PostgreSQL) but for the deleted file, which only SQLite has."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from storetools import on_disk, run_sql

from lmwatch.store import (
    SCHEMA_VERSION,
    DrainItem,
    DrainRecord,
    DrainState,
    HostDraining,
    ItemState,
    Store,
    StoreError,
    StoreUnwritable,
)


def _drain(drain_id: str = "d1", host: str = "host-a") -> DrainRecord:
    return DrainRecord(
        id=drain_id,
        host=host,
        state=DrainState.RUNNING,
        created_at=1_800_000_000.0,
        items=(
            DrainItem("db-1", 64 * 1024**3, 55.0),
            DrainItem(
                "web-1",
                2 * 1024**3,
                2.0,
                state=ItemState.MIGRATING,
                migration_id="m1",
                destination="host-b",
                attempts=(("host-c", "host-c refused it"),),
                reason="migrating",
            ),
        ),
        destinations=("host-b", "host-c"),
        profile="web",
    )


def test_a_drain_round_trips(store_location: str) -> None:
    store = Store.open(store_location)
    drain = _drain()
    store.insert_drain(drain)
    assert store.get_drain("d1") == drain
    moved = dataclasses.replace(
        drain,
        state=DrainState.COMPLETED,
        finished_at=1_800_000_100.0,
        items=tuple(dataclasses.replace(i, state=ItemState.MOVED) for i in drain.items),
        reason="host-a is empty",
    )
    store.update_drain(moved)
    store.close()
    again = Store.open(store_location)
    try:
        assert again.get_drain("d1") == moved
        assert again.get_drain("nope") is None
        assert again.unfinished_drains() == []
        assert again.drains() == [moved]
    finally:
        again.close()


def test_a_drain_state_never_moves_back(store_location: str) -> None:
    """A cancel recorded through one daemon stands against another daemon's older
    copy of the running drain; an ended drain stays ended."""
    store = Store.open(store_location)
    drain = _drain()
    store.insert_drain(drain)
    cancelling = dataclasses.replace(drain, state=DrainState.CANCELLING, reason="cancelled")
    store.update_drain(cancelling)
    store.update_drain(dataclasses.replace(drain, reason="still running"))  # the older copy
    store.close()
    store = Store.open(store_location)
    try:
        assert store.get_drain("d1") == cancelling
        ended = dataclasses.replace(cancelling, state=DrainState.CANCELLED, finished_at=1.9e9)
        store.update_drain(ended)
        store.update_drain(cancelling)
    finally:
        store.close()
    again = Store.open(store_location)
    try:
        assert again.get_drain("d1") == ended
    finally:
        again.close()


def test_a_second_unfinished_drain_of_a_host_is_refused(store_location: str) -> None:
    """Two drains of one host recorded at once (on PostgreSQL through two daemons'
    stores): one is written, the other refused; once the first ends, the host may be
    drained again."""
    first = Store.open(store_location)
    second = Store.open(store_location) if store_location.startswith("postgres") else first
    try:
        waits = [first.insert_drain_soon(_drain("d1")), second.insert_drain_soon(_drain("d2"))]
        refusals: list[str | None] = []
        for wait in waits:
            try:
                wait.result(10)
                refusals.append(None)
            except HostDraining as refused:
                refusals.append(str(refused))
        assert refusals.count(None) == 1, refusals
        kept, other = ("d1", "d2") if refusals[0] is None else ("d2", "d1")
        assert refusals == [None, f"host host-a is already draining (drain {kept})"] or (
            refusals == [f"host host-a is already draining (drain {kept})", None]
        )
        assert [d.id for d in first.unfinished_drains()] == [kept]
        assert first.get_drain(other) is None and second.get_drain(other) is None
        drain = first.get_drain(kept)
        assert drain is not None
        first.update_drain(dataclasses.replace(drain, state=DrainState.COMPLETED, finished_at=2e9))
        first.insert_drain(_drain("d3"))  # written after the end, in order
        assert [d.id for d in first.unfinished_drains()] == ["d3"]
    finally:
        first.close()
        if second is not first:
            second.close()


def test_unfinished_drains_are_found(shared_store: Store) -> None:
    store = shared_store
    store.insert_drain(_drain("d1"))
    store.insert_drain(dataclasses.replace(_drain("d2", "host-b"), state=DrainState.CANCELLED))
    store.insert_drain(dataclasses.replace(_drain("d3", "host-c"), state=DrainState.CANCELLING))
    assert [d.id for d in store.unfinished_drains()] == ["d1", "d3"]


def test_a_drain_is_refused_while_the_store_file_is_lost(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.db")
    (tmp_path / "s.db").unlink()  # the file at the path is no longer the open one
    assert store.check_file() is not None
    with pytest.raises(StoreUnwritable):
        store.insert_drain(_drain())


def test_a_version_3_store_gains_the_drains_table(store_location: str) -> None:
    path = store_location
    Store.open(path).close()
    run_sql(
        path,
        "DROP TABLE drains",
        "ALTER TABLE migrations DROP COLUMN restart",  # added by version 5
        "UPDATE meta SET value='3' WHERE key='schema_version'",
    )
    store = Store.open(path)
    try:
        row = store._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        assert row["value"] == str(SCHEMA_VERSION)
        store.insert_drain(_drain())
        assert store.get_drain("d1") is not None
        assert store._db.execute("SELECT restart FROM migrations").fetchall() == []
    finally:
        store.close()


def test_a_store_of_a_newer_version_is_refused_untouched(store_location: str) -> None:
    Store.open(store_location).close()
    newer = str(SCHEMA_VERSION + 1)
    run_sql(store_location, f"UPDATE meta SET value='{newer}' WHERE key='schema_version'")
    with pytest.raises(StoreError, match=f"schema version {newer} is newer than this lmwatch"):
        Store.open(store_location)
    assert on_disk(store_location, "SELECT value FROM meta WHERE key='schema_version'") == [
        (newer,)
    ]
    # The refused store let go of its database (a PostgreSQL store: of its lock).
    run_sql(store_location, f"UPDATE meta SET value='{SCHEMA_VERSION}'")
    Store.open(store_location).close()
