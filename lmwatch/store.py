"""Durable record of every migration, its state changes and its decisions (SQLite, WAL).

A request is committed before it is acknowledged and every transition is its own
transaction, so a crash of the daemon loses no accepted migration and no outcome.
Calls are short and synchronous; the engine runs them on the event loop thread.

Durability (docs/scale.md): the log is written with `synchronous=NORMAL`, so a
transition costs a write to the log but no disk flush; a daemon that crashes or is
killed loses nothing (the operating system holds what was written), a power loss or
kernel crash may lose the transitions of the last moments (the store stays
consistent; a restart re-attaches and asks the hypervisor how those jobs ended).
Accepting a migration is flushed (`synchronous=FULL` for that transaction, which also
makes everything before it durable): an acknowledged request survives a power loss.
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lmwatch.model import State

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS migrations (
    id TEXT PRIMARY KEY,
    instance TEXT NOT NULL,
    source TEXT NOT NULL,
    destination TEXT NOT NULL,
    labels TEXT NOT NULL,
    requested_profile TEXT,
    profile_name TEXT NOT NULL,
    profile_reason TEXT NOT NULL,
    profile TEXT NOT NULL,
    memory_bytes INTEGER NOT NULL,
    uuid TEXT,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    deadline_at REAL,
    plan TEXT,
    blackout_budget REAL,
    paused INTEGER NOT NULL DEFAULT 0,
    handed_over INTEGER NOT NULL DEFAULT 0,
    progress TEXT,
    outcome TEXT,
    idempotency_key TEXT UNIQUE,
    request_fingerprint TEXT
);
CREATE INDEX IF NOT EXISTS migrations_state ON migrations(state);
CREATE INDEX IF NOT EXISTS migrations_instance ON migrations(instance);
CREATE INDEX IF NOT EXISTS migrations_created ON migrations(created_at, id);
CREATE INDEX IF NOT EXISTS migrations_state_created ON migrations(state, created_at, id);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    migration_id TEXT NOT NULL REFERENCES migrations(id),
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    action TEXT,
    state TEXT,
    reason TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS events_migration ON events(migration_id, seq);
"""

_JSON_FIELDS = ("labels", "profile", "plan", "progress", "outcome")
_BOOL_FIELDS = ("paused", "handed_over")


class StoreError(Exception):
    """The store cannot be opened or written."""


class CorruptRecord(StoreError):
    """A stored migration row that cannot be decoded (a hand edit, a disk fault)."""

    def __init__(self, migration_id: str, reason: str) -> None:
        self.migration_id = migration_id
        self.reason = reason
        super().__init__(f"store row for migration {migration_id} cannot be read: {reason}")


class UnreadableStore(StoreError):
    """Rows the engine cannot start without; one line per row, each saying how to look."""

    def __init__(self, path: str, problems: list[CorruptRecord]) -> None:
        self.problems = problems
        super().__init__(
            "\n".join(
                f"{problem}; lmwatch refuses to start rather than forget an accepted "
                f"migration; inspect it with: sqlite3 {path} "
                f"\"SELECT * FROM migrations WHERE id='{problem.migration_id}'\", "
                "then repair or delete the row"
                for problem in problems
            )
        )


class StoreLocked(StoreError):
    """Another daemon holds the store's lock."""


class StoreLock:
    """An exclusive claim on one store file for the lifetime of one daemon.

    Two daemons on one store would both supervise the same migrations: the second
    re-attaches to the first one's jobs, records them as failed when its own driver
    does not know them, and rewrites the token file. So a daemon takes this lock
    before it touches anything, and a second one stops at once, having changed
    nothing. It is `flock` on `<store>.lock` next to the store file, held through an
    open descriptor: the kernel releases it when the process ends, however it ends,
    so a stale lock file left by a crash never blocks a restart. The file holds the
    holder's pid for the message; it is never removed (removing it would let two
    daemons hold locks on two different files of the same name).
    """

    def __init__(self, path: Path, descriptor: int) -> None:
        self.path = path
        self._descriptor: int | None = descriptor

    @staticmethod
    def lock_path(store_path: str | os.PathLike[str]) -> Path:
        """Where the lock of a store lives: `<store>.lock`, next to the real file."""
        file = Path(store_path).resolve()
        return file.with_name(file.name + ".lock")

    @classmethod
    def acquire(cls, store_path: str | os.PathLike[str]) -> StoreLock:
        """Take the lock without waiting; StoreLocked when another daemon holds it."""
        store = Path(store_path)
        if not store.parent.is_dir():
            raise StoreError(f"store directory {store.parent} does not exist")
        path = cls.lock_path(store)
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise StoreError(f"cannot create the lock file {path}: {error.strerror}") from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = _read_pid(descriptor)
            os.close(descriptor)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f"pid {holder}" if holder is not None else "pid unknown"
                raise StoreLocked(
                    f"another lmwatch daemon ({who}) is using the store {store}; "
                    f"stop it first or give this one another store (lock: {path})"
                ) from None
            raise StoreError(f"cannot lock {path}: {error.strerror}") from None
        try:
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is only for the message; the lock is what counts
        return cls(path, descriptor)

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing the descriptor releases the flock
            self._descriptor = None


def _read_pid(descriptor: int) -> int | None:
    try:
        text = os.pread(descriptor, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@dataclass(frozen=True, slots=True)
class MigrationRecord:
    id: str
    instance: str
    source: str
    destination: str
    labels: Mapping[str, str]
    requested_profile: str | None
    profile_name: str
    profile_reason: str
    profile: Mapping[str, Any]  # snapshot of the profile at acceptance (JSON form)
    memory_bytes: int
    state: State
    created_at: float
    uuid: str | None = None  # the instance's, as the hypervisor reported it at acceptance
    started_at: float | None = None
    finished_at: float | None = None
    deadline_at: float | None = None
    plan: Mapping[str, Any] | None = None
    blackout_budget: float | None = None
    paused: bool = False
    handed_over: bool = False
    progress: Mapping[str, Any] | None = None  # last sample and prediction
    outcome: Mapping[str, Any] | None = None
    idempotency_key: str | None = None
    request_fingerprint: str | None = None


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    migration_id: str
    at: float
    kind: str  # state | decision | action | note | error
    reason: str
    action: str | None = None
    state: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)


class Store:
    def __init__(self, connection: sqlite3.Connection, path: str) -> None:
        self._db = connection
        self.path = path

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Store:
        """Open (creating if new) the store; StoreError with a clear reason otherwise."""
        text = str(path)
        if text != ":memory:":
            file = Path(text)
            if not file.parent.is_dir():
                raise StoreError(f"store directory {file.parent} does not exist")
            # A file without write bits is read-only for us even when running as root.
            if file.exists() and (not os.access(file, os.W_OK) or not file.stat().st_mode & 0o222):
                raise StoreError(f"store file {file} is not writable (read-only)")
            if not file.exists() and not os.access(file.parent, os.W_OK):
                raise StoreError(f"store directory {file.parent} is not writable")
        try:
            connection = sqlite3.connect(text, isolation_level=None, check_same_thread=False)
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")  # FULL for acceptance: insert()
            connection.execute("PRAGMA foreign_keys=ON")
            connection.execute("PRAGMA busy_timeout=5000")
            store = cls(connection, text)
            store._migrate()
        except sqlite3.Error as error:
            raise StoreError(f"cannot use store {text}: {error}") from error
        return store

    def _migrate(self) -> None:
        # executescript commits on its own; it runs outside an explicit transaction.
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        version = SCHEMA_VERSION if row is None else int(row["value"])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store schema version {version} is newer than this lmwatch "
                f"({SCHEMA_VERSION}); refusing to touch it"
            )
        with self._transaction():
            if version < 2:  # version 1 had no instance uuid
                self._db.execute("ALTER TABLE migrations ADD COLUMN uuid TEXT")
            self._db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    @contextmanager
    def _flushed(self) -> Iterator[None]:
        """The transaction inside is flushed to disk before it returns."""
        self._db.execute("PRAGMA synchronous=FULL")
        try:
            yield
        finally:
            self._db.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        self._db.close()

    def healthy(self) -> bool:
        try:
            self._db.execute("SELECT 1").fetchone()
        except sqlite3.Error:
            return False
        return True

    # -- migrations -------------------------------------------------------------

    def insert(self, record: MigrationRecord, reason: str) -> None:
        """Persist a newly accepted migration and its first event, atomically."""
        values = _to_row(record)
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        try:
            with self._flushed(), self._transaction():
                self._db.execute(
                    f"INSERT INTO migrations({columns}) VALUES({marks})", tuple(values.values())
                )
                self._add_event(record.id, record.created_at, "state", reason, None, record.state)
        except sqlite3.Error as error:
            raise StoreError(f"cannot record migration {record.id}: {error}") from error

    def update(
        self,
        record: MigrationRecord,
        *,
        event: tuple[str, str, str | None] | None = None,
        at: float | None = None,
        data: Mapping[str, Any] | None = None,
        **changes: Any,
    ) -> MigrationRecord:
        """Apply `changes` to a migration (and log `event` = (kind, reason, action)) atomically."""
        updated = replace(record, **changes)
        row = {key: value for key, value in _to_row(updated).items() if key in changes}
        try:
            with self._transaction():
                if row:
                    assignments = ", ".join(f"{key}=?" for key in row)
                    self._db.execute(
                        f"UPDATE migrations SET {assignments} WHERE id=?",
                        (*row.values(), record.id),
                    )
                if event is not None:
                    kind, reason, action = event
                    state = changes.get("state")
                    self._add_event(
                        record.id,
                        at if at is not None else updated.created_at,
                        kind,
                        reason,
                        action,
                        state,
                        data,
                    )
        except sqlite3.Error as error:
            raise StoreError(f"cannot update migration {record.id}: {error}") from error
        return updated

    def add_event(
        self,
        migration_id: str,
        at: float,
        kind: str,
        reason: str,
        action: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        try:
            with self._transaction():
                self._add_event(migration_id, at, kind, reason, action, None, data)
        except sqlite3.Error as error:
            raise StoreError(f"cannot record event for {migration_id}: {error}") from error

    def _add_event(
        self,
        migration_id: str,
        at: float,
        kind: str,
        reason: str,
        action: str | None,
        state: str | None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        self._db.execute(
            "INSERT INTO events(migration_id, at, kind, action, state, reason, data) "
            "VALUES(?, ?, ?, ?, ?, ?, ?)",
            (migration_id, at, kind, action, state, reason, json.dumps(data or {})),
        )

    def get(self, migration_id: str) -> MigrationRecord | None:
        row = self._db.execute("SELECT * FROM migrations WHERE id=?", (migration_id,)).fetchone()
        return None if row is None else _from_row(row)

    def by_idempotency_key(self, key: str) -> MigrationRecord | None:
        row = self._db.execute(
            "SELECT * FROM migrations WHERE idempotency_key=?", (key,)
        ).fetchone()
        return None if row is None else _from_row(row)

    def list(self, state: State | None = None) -> list[MigrationRecord]:
        if state is None:
            rows = self._db.execute("SELECT * FROM migrations ORDER BY created_at, id")
        else:
            rows = self._db.execute(
                "SELECT * FROM migrations WHERE state=? ORDER BY created_at, id", (state.value,)
            )
        return [_from_row(row) for row in rows.fetchall()]

    def page(
        self, state: State | None = None, *, limit: int, after: str | None = None
    ) -> builtins.list[MigrationRecord]:
        """At most `limit` migrations in list order (created_at, id), after the migration
        `after` (a cursor: the last id of the previous page; [] when unknown)."""
        where: builtins.list[str] = []
        params: builtins.list[Any] = []
        if state is not None:
            where.append("state=?")
            params.append(state.value)
        if after is not None:
            cursor = self._db.execute(
                "SELECT created_at, id FROM migrations WHERE id=?", (after,)
            ).fetchone()
            if cursor is None:
                return []
            where.append("(created_at, id) > (?, ?)")
            params += [cursor["created_at"], cursor["id"]]
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        rows = self._db.execute(
            f"SELECT * FROM migrations {clause}ORDER BY created_at, id LIMIT ?", (*params, limit)
        )
        return [_from_row(row) for row in rows.fetchall()]

    def unreadable(self) -> builtins.list[CorruptRecord]:
        """Every migration row that cannot be decoded, each with its id and why."""
        problems: builtins.list[CorruptRecord] = []
        for row in self._db.execute("SELECT * FROM migrations ORDER BY created_at, id"):
            try:
                _from_row(row)
            except CorruptRecord as problem:
                problems.append(problem)
        return problems

    def unfinished(self) -> builtins.list[MigrationRecord]:
        finished = tuple(s.value for s in State if s.finished)
        rows = self._db.execute(
            "SELECT * FROM migrations WHERE state NOT IN (?, ?, ?) ORDER BY created_at, id",
            finished,
        )
        return [_from_row(row) for row in rows.fetchall()]

    def active_for_instance(self, instance: str) -> MigrationRecord | None:
        finished = tuple(s.value for s in State if s.finished)
        row = self._db.execute(
            "SELECT * FROM migrations WHERE instance=? AND state NOT IN (?, ?, ?) "
            "ORDER BY created_at, id LIMIT 1",
            (instance, *finished),
        ).fetchone()
        return None if row is None else _from_row(row)

    def events(self, migration_id: str) -> builtins.list[Event]:
        rows = self._db.execute(
            "SELECT * FROM events WHERE migration_id=? ORDER BY seq", (migration_id,)
        ).fetchall()
        return [
            Event(
                seq=row["seq"],
                migration_id=row["migration_id"],
                at=row["at"],
                kind=row["kind"],
                reason=row["reason"],
                action=row["action"],
                state=row["state"],
                data=json.loads(row["data"] or "{}"),
            )
            for row in rows
        ]


def _to_row(record: MigrationRecord) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for name in MigrationRecord.__slots__:
        value = getattr(record, name)
        if name in _JSON_FIELDS:
            value = None if value is None else json.dumps(dict(value), sort_keys=True)
        elif name in _BOOL_FIELDS:
            value = int(value)
        elif name == "state":
            value = value.value
        row[name] = value
    return row


def _from_row(row: sqlite3.Row) -> MigrationRecord:
    """The record a row holds; CorruptRecord naming the row and column otherwise."""
    values: dict[str, Any] = dict(row)
    column = "id"
    try:
        for column in _JSON_FIELDS:
            raw = values[column]
            values[column] = None if raw is None else json.loads(raw)
            if values[column] is not None and not isinstance(values[column], dict):
                raise ValueError(f"a JSON {type(values[column]).__name__}, not an object")
        for column in _BOOL_FIELDS:
            values[column] = bool(values[column])
        column = "state"
        values["state"] = State(values["state"])
        column = "record"
        return MigrationRecord(**values)
    except (ValueError, TypeError, KeyError) as error:
        raise CorruptRecord(str(values.get("id")), f"column {column}: {error}") from None
