"""Drains in the store: written whole, read back, found when unfinished; a store of
an older version gains the table."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest

from lmwatch.store import (
    SCHEMA_VERSION,
    DrainItem,
    DrainRecord,
    DrainState,
    ItemState,
    Store,
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


def test_a_drain_round_trips(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.db")
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
    again = Store.open(tmp_path / "s.db")
    assert again.get_drain("d1") == moved
    assert again.get_drain("nope") is None
    assert again.unfinished_drains() == []
    assert again.drains() == [moved]


def test_unfinished_drains_are_found(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.db")
    store.insert_drain(_drain("d1"))
    store.insert_drain(dataclasses.replace(_drain("d2", "host-b"), state=DrainState.CANCELLED))
    store.insert_drain(dataclasses.replace(_drain("d3", "host-c"), state=DrainState.CANCELLING))
    assert [d.id for d in store.unfinished_drains()] == ["d1", "d3"]


def test_a_drain_is_refused_while_the_store_cannot_be_written(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s.db")
    (tmp_path / "s.db").unlink()  # the file at the path is no longer the open one
    assert store.check_file() is not None
    with pytest.raises(StoreUnwritable):
        store.insert_drain(_drain())


def test_a_version_3_store_gains_the_drains_table(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    Store.open(path).close()
    db = sqlite3.connect(path)
    db.execute("DROP TABLE drains")
    db.execute("ALTER TABLE migrations DROP COLUMN restart")  # added by version 5
    db.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
    db.commit()
    db.close()
    store = Store.open(path)
    row = store._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    assert row["value"] == str(SCHEMA_VERSION)
    store.insert_drain(_drain())
    assert store.get_drain("d1") is not None
