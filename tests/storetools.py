"""The shared store test suite's tools: a store of either kind (a SQLite file, a
PostgreSQL database through the `pg_url` fixture), what its database holds read
directly (not through the store), and the errors its database gives when it cannot
write (raised by the tests' fault injectors between the store and its connection)."""

from __future__ import annotations

import sqlite3
from typing import Any

from lmwatch.store import Store, is_database_url

KINDS = ("sqlite", "postgresql")


def url_of(store: Store) -> str:
    """Where the store is: its file, or its database's URL (with the user)."""
    return str(getattr(store._backend, "url", store.path))


def on_disk(store: Store | str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of `sql` (`?` placeholders) read from the store's database directly."""
    where = store if isinstance(store, str) else url_of(store)
    if is_database_url(where):
        import psycopg

        with psycopg.connect(where, autocommit=True) as connection:
            return [tuple(row) for row in connection.execute(sql.replace("?", "%s"), args)]
    with sqlite3.connect(where) as connection:
        return connection.execute(sql, args).fetchall()


def disk_full(store: Store) -> Exception:
    """The error the store's database gives for a write when its disk is full."""
    if is_database_url(url_of(store)):
        from psycopg import errors

        return errors.DiskFull("database or disk is full")
    return sqlite3.OperationalError("database or disk is full")


def io_error(store: Store) -> Exception:
    """The error of a write that failed on the disk (not a full one)."""
    if is_database_url(url_of(store)):
        from psycopg import errors

        return errors.IoError("disk I/O error")
    return sqlite3.OperationalError("disk I/O error")


def run_sql(location: str, *statements: str) -> None:
    """Run statements on a store's database directly, in one transaction (a store
    from another version of lmwatch, a hand edit)."""
    if is_database_url(location):
        import psycopg

        with psycopg.connect(location) as connection:  # commits on leaving
            for statement in statements:
                connection.execute(statement)
        return
    connection = sqlite3.connect(location)
    try:
        for statement in statements:
            connection.execute(statement)
        connection.commit()
    finally:
        connection.close()
