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

A write that fails (a full disk, an I/O error) never reaches the caller: the change
is kept in memory, in order, reads show it, and `flush` writes it, once, when the
store takes writes again (the engine retries with back-off). Meanwhile `problem`
says why the store is not healthy, and the daemon accepts no new migration. The same
holds when the file at the store's path is no longer the one open (deleted or
replaced): the daemon goes on recording into the file it has open, keeps a full copy
of it next to the path (`<store>.rescued`), and says how to put it back.
"""

from __future__ import annotations

import builtins
import errno
import fcntl
import json
import os
import sqlite3
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from lmwatch.logs import get_logger
from lmwatch.model import State

log = get_logger("lmwatch.store")

SCHEMA_VERSION = 5

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
    request_fingerprint TEXT,
    placement TEXT,
    restart TEXT
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
CREATE TABLE IF NOT EXISTS drains (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    finished_at REAL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS drains_host ON drains(host, state);
CREATE INDEX IF NOT EXISTS drains_created ON drains(created_at, id);
"""

_JSON_FIELDS = ("labels", "profile", "plan", "progress", "outcome", "placement", "restart")
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


class StoreUnwritable(StoreError):
    """The store does not take writes now (full disk, file deleted): nothing new is
    accepted until it does; what is running goes on."""


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
    # How the destination was placed: {"how": "chosen"|"named"|"forced", "reason": ...};
    # None for migrations accepted before placement was recorded.
    placement: Mapping[str, Any] | None = None
    # Starting the migration again (`Action.RESTART`): {"count", "pending", "plan",
    # "planned_rate", "job_started_at"}; None when it never was. `pending` holds from
    # the intent (written before the job is cancelled) until the new job started.
    restart: Mapping[str, Any] | None = None


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


class DrainState(StrEnum):
    """Lifecycle of a drain."""

    RUNNING = "running"  # moving instances off the host
    CANCELLING = "cancelling"  # nothing new is started; migrations under way go on
    COMPLETED = "completed"  # every instance left the host (or there was none)
    FAILED = "failed"  # it ended with instances still on the host; their entries say why
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (DrainState.COMPLETED, DrainState.FAILED, DrainState.CANCELLED)


class ItemState(StrEnum):
    """Where one instance of a drain stands."""

    PENDING = "pending"  # waiting for a slot (not handed to the engine yet)
    SUBMITTING = "submitting"  # destination chosen and recorded; being handed over
    MIGRATING = "migrating"  # its migration is queued or running
    MOVED = "moved"  # it runs on its destination
    BLOCKED = "blocked"  # no destination can take it (the reason says why)
    FAILED = "failed"  # its migration ended without moving it and is not retried
    CANCELLED = "cancelled"  # the drain was cancelled before it was started

    @property
    def finished(self) -> bool:
        return self in (ItemState.MOVED, ItemState.BLOCKED, ItemState.FAILED, ItemState.CANCELLED)


@dataclass(frozen=True, slots=True)
class DrainItem:
    instance: str
    memory_bytes: int
    expected_seconds: float  # expected duration of its move (the ordering's estimate)
    state: ItemState = ItemState.PENDING
    migration_id: str | None = None  # current (latest) migration
    destination: str | None = None
    attempts: tuple[tuple[str, str], ...] = ()  # (destination, why it did not move there)
    reason: str = ""  # the last thing that happened to it, in words
    warning: str = ""  # said at submission: why it may not find room at its turn

    def as_json(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "memory_bytes": self.memory_bytes,
            "expected_seconds": self.expected_seconds,
            "state": self.state.value,
            "migration_id": self.migration_id,
            "destination": self.destination,
            "attempts": [list(a) for a in self.attempts],
            "reason": self.reason,
            "warning": self.warning,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DrainItem:
        return cls(
            instance=str(data["instance"]),
            memory_bytes=int(data["memory_bytes"]),
            expected_seconds=float(data["expected_seconds"]),
            state=ItemState(data["state"]),
            migration_id=data.get("migration_id"),
            destination=data.get("destination"),
            attempts=tuple((str(d), str(r)) for d, r in data.get("attempts", ())),
            reason=str(data.get("reason", "")),
            warning=str(data.get("warning", "")),
        )


@dataclass(frozen=True, slots=True)
class DrainRecord:
    id: str
    host: str
    state: DrainState
    created_at: float
    items: tuple[DrainItem, ...]  # in drain order (the order they are started in)
    destinations: tuple[str, ...] | None = None  # only these hosts; None: any
    profile: str | None = None
    finished_at: float | None = None
    reason: str = ""  # how it ended, or what it is doing

    def body(self) -> str:
        return json.dumps(
            {
                "items": [item.as_json() for item in self.items],
                "destinations": None if self.destinations is None else list(self.destinations),
                "profile": self.profile,
                "reason": self.reason,
            },
            sort_keys=True,
        )


def _drain_from_row(row: sqlite3.Row) -> DrainRecord:
    try:
        body = json.loads(row["body"])
        destinations = body.get("destinations")
        return DrainRecord(
            id=row["id"],
            host=row["host"],
            state=DrainState(row["state"]),
            created_at=row["created_at"],
            finished_at=row["finished_at"],
            items=tuple(DrainItem.from_json(item) for item in body["items"]),
            destinations=None if destinations is None else tuple(destinations),
            profile=body.get("profile"),
            reason=body.get("reason", ""),
        )
    except (ValueError, TypeError, KeyError) as error:
        raise StoreError(f"store row for drain {row['id']} cannot be read: {error}") from None


@dataclass(frozen=True, slots=True)
class _Write:
    """One transaction not written yet: columns of a migration to set, and/or an event."""

    migration_id: str
    row: dict[str, Any]
    event: tuple[float, str, str, str | None, str | None, Mapping[str, Any] | None] | None


# What a write can fail with: SQLite's errors (full disk, I/O error, read-only file)
# and the operating system's.
_WRITE_ERRORS = (sqlite3.Error, OSError)


class Store:
    def __init__(self, connection: sqlite3.Connection, path: str) -> None:
        self._db = connection
        self.path = path
        # Writes that failed, oldest first, and the latest record of each migration
        # they change: reads show these until `flush` has written them.
        self._pending: deque[_Write] = deque()
        self._unwritten: dict[str, MigrationRecord] = {}
        self._write_error: str | None = None  # why the last write failed (None: writable)
        self._file_error: str | None = None  # the file at `path` is not the open one
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._changes = 0  # writes since open (the rescue copy is refreshed when it grows)
        self._rescued_at: int | None = None
        self._failure_listeners: list[Callable[[], None]] = []

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
        if text != ":memory:":
            info = os.stat(text)
            store._identity = (info.st_dev, info.st_ino)
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
            if version < 3:  # version 2 did not say how the destination was placed
                self._db.execute("ALTER TABLE migrations ADD COLUMN placement TEXT")
            # version 4 added the drains table (created above, IF NOT EXISTS)
            if version < 5:  # version 4 could not start a migration again
                self._db.execute("ALTER TABLE migrations ADD COLUMN restart TEXT")
            self._db.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            # A COMMIT that fails (SQLITE_FULL) leaves the transaction open: roll it
            # back too, or every later BEGIN fails ("within a transaction").
            if self._db.in_transaction:
                with suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            raise

    @contextmanager
    def _flushed(self) -> Iterator[None]:
        """The transaction inside is flushed to disk before it returns."""
        self._db.execute("PRAGMA synchronous=FULL")
        try:
            yield
        finally:
            self._db.execute("PRAGMA synchronous=NORMAL")

    def close(self) -> None:
        """Write what is still pending if the store takes it, refresh the rescue copy
        when the file was lost, and close. What cannot be written is logged."""
        if self._pending or self._write_error is not None:
            self.flush()
        if self._pending:
            log.error(
                "store-writes-lost",
                path=self.path,
                pending=len(self._pending),
                migrations=len({write.migration_id for write in self._pending}),
                error=self._write_error,
                note="a restart re-attaches the running migrations and reads them from the hosts",
            )
        if self._file_error is not None:
            self._rescue(force=True)
        self._db.close()

    def healthy(self) -> bool:
        try:
            self._db.execute("SELECT 1").fetchone()
        except sqlite3.Error:
            return False
        return True

    # -- health -----------------------------------------------------------------------

    def on_write_failure(self, listener: Callable[[], None]) -> None:
        """Call `listener` on every failed write attempt (the metrics count them)."""
        self._failure_listeners.append(listener)

    @property
    def rescue_path(self) -> str:
        return self.path + ".rescued"

    def problem(self) -> str | None:
        """Why the store cannot take new work now (None: it can), for operators."""
        if self._file_error is not None:
            return self._file_error
        if self._write_error is not None:
            kept = len(self._pending)
            return (
                f"the store cannot be written: {self._write_error}; "
                f"{kept} change{'s' if kept != 1 else ''} kept in memory until it can; "
                "free space on its file system (or fix the error); retry later"
            )
        return None

    def failing(self) -> bool:
        """Whether writes are failing (and `flush` should be retried)."""
        return self._write_error is not None

    def pending(self) -> int:
        return len(self._pending)

    def check_file(self) -> str | None:
        """Whether the file at the path is still the one open; `problem()` after.

        A store file deleted or replaced while the daemon runs would lose every
        later write at the next start. The daemon keeps recording into the file it
        has open (the running migrations go on), accepts nothing new, and keeps a
        copy of it at `rescue_path`, refreshed as it changes and when the store closes.
        """
        if self._identity is None:
            return self.problem()
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            what = "was deleted"
        except OSError as error:
            what = f"cannot be checked ({error.strerror})"
        else:
            same = (info.st_dev, info.st_ino) == self._identity
            what = "" if same else "was replaced by another file"
        if not what:
            if self._file_error is not None:
                log.info("store-file-back", path=self.path)
            self._file_error = None
            return self.problem()
        copy = self._rescue(force=False)
        if copy is None:
            saved = (
                f"lmwatch keeps a copy of everything it recorded in {self.rescue_path}; stop "
                f"lmwatch (it refreshes the copy as it stops), move {self.rescue_path} to "
                f"{self.path} and start it again"
            )
        else:
            saved = (
                f"the copy to {self.rescue_path} failed ({copy}); do not stop lmwatch: "
                "free space, it retries"
            )
        message = (
            f"the store file {self.path} {what} while lmwatch ran; running migrations are "
            f"still supervised, new ones are refused; {saved}"
        )
        if message != self._file_error:
            log.error("store-file-lost", path=self.path, rescue=self.rescue_path, detail=message)
        self._file_error = message
        return message

    def _rescue(self, *, force: bool) -> str | None:
        """Copy the open database to `rescue_path` (None: done, else why not)."""
        if not force and self._rescued_at == self._changes:
            return None
        temporary = self.rescue_path + ".tmp"
        try:
            target = sqlite3.connect(temporary)
            try:
                self._db.backup(target)
            finally:
                target.close()
            os.replace(temporary, self.rescue_path)
        except _WRITE_ERRORS as error:
            with suppress(OSError):
                os.unlink(temporary)
            log.error("store-rescue-failed", path=self.path, rescue=self.rescue_path, error=error)
            return str(error)
        self._rescued_at = self._changes
        log.info("store-rescued", path=self.path, rescue=self.rescue_path)
        return None

    def _failed(self, error: BaseException, migration_id: str | None) -> None:
        first = self._write_error is None
        self._write_error = str(error) or type(error).__name__
        for listener in self._failure_listeners:
            listener()
        (log.error if first else log.warning)(
            "store-write-failed",
            path=self.path,
            migration=migration_id,
            pending=len(self._pending),
            error=self._write_error,
            note="changes are kept in memory and written when the store takes writes again",
        )

    def _write(self, write: _Write, record: MigrationRecord | None) -> None:
        """Write now, or keep it (after the ones already waiting) for `flush`."""
        if record is not None:
            self._unwritten[record.id] = record
        if self._pending or self._write_error is not None:
            last = self._pending[-1] if self._pending else None
            if (
                last is not None
                and write.event is None
                and last.event is None
                and last.migration_id == write.migration_id
            ):
                # Consecutive column updates of one migration (progress) merge.
                self._pending[-1] = replace(last, row={**last.row, **write.row})
            else:
                self._pending.append(write)
            return
        try:
            self._commit(write)
        except _WRITE_ERRORS as error:
            self._pending.append(write)
            self._failed(error, write.migration_id)
            return
        if record is not None:
            self._unwritten.pop(record.id, None)

    def _commit(self, write: _Write) -> None:
        with self._transaction():
            if write.row:
                assignments = ", ".join(f"{key}=?" for key in write.row)
                self._db.execute(
                    f"UPDATE migrations SET {assignments} WHERE id=?",
                    (*write.row.values(), write.migration_id),
                )
            if write.event is not None:
                self._add_event(write.migration_id, *write.event)
        self._changes += 1

    def flush(self, now: float | None = None) -> bool:
        """Write the kept changes, oldest first, each once; whether the store is
        writable again. With none kept, a small write probes it."""
        if self._write_error is None and not self._pending:
            return True
        written = 0
        try:
            if not self._pending:
                with self._transaction():
                    self._db.execute(
                        "INSERT OR REPLACE INTO meta(key, value) VALUES('write_checked_at', ?)",
                        (str(now or 0.0),),
                    )
            while self._pending:
                self._commit(self._pending[0])
                self._pending.popleft()
                written += 1
        except _WRITE_ERRORS as error:
            self._failed(error, self._pending[0].migration_id if self._pending else None)
            return False
        self._unwritten.clear()
        self._write_error = None
        log.info("store-writes-resumed", path=self.path, written=written)
        return True

    # -- migrations -------------------------------------------------------------

    def insert(self, record: MigrationRecord, reason: str) -> None:
        """Persist a newly accepted migration and its first event, atomically.

        Unlike the other writes this one raises (StoreUnwritable) when it cannot be
        written: a migration is acknowledged only once it is on disk."""
        problem = self.problem()
        if problem is not None:
            raise StoreUnwritable(problem)
        values = _to_row(record)
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        try:
            with self._flushed(), self._transaction():
                self._db.execute(
                    f"INSERT INTO migrations({columns}) VALUES({marks})", tuple(values.values())
                )
                self._add_event(record.id, record.created_at, "state", reason, None, record.state)
        except sqlite3.IntegrityError as error:
            raise StoreError(f"cannot record migration {record.id}: {error}") from error
        except _WRITE_ERRORS as error:
            self._failed(error, record.id)
            raise StoreUnwritable(
                f"the store cannot be written: {self._write_error}; retry later"
            ) from error
        self._changes += 1

    def update(
        self,
        record: MigrationRecord,
        *,
        event: tuple[str, str, str | None] | None = None,
        at: float | None = None,
        data: Mapping[str, Any] | None = None,
        **changes: Any,
    ) -> MigrationRecord:
        """Apply `changes` to a migration (and log `event` = (kind, reason, action)) atomically.

        Never raises for a write that fails: the change is kept and written later."""
        updated = replace(record, **changes)
        row = {key: value for key, value in _to_row(updated).items() if key in changes}
        logged = None
        if event is not None:
            kind, reason, action = event
            when = at if at is not None else updated.created_at
            logged = (when, kind, reason, action, changes.get("state"), data)
        if row or logged is not None:
            self._write(_Write(record.id, row, logged), updated)
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
        """Log an event of a migration; kept and written later when the write fails."""
        self._write(_Write(migration_id, {}, (at, kind, reason, action, None, data)), None)

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

    def _latest(self, record: MigrationRecord) -> MigrationRecord:
        return self._unwritten.get(record.id, record)

    def get(self, migration_id: str) -> MigrationRecord | None:
        if migration_id in self._unwritten:
            return self._unwritten[migration_id]
        row = self._db.execute("SELECT * FROM migrations WHERE id=?", (migration_id,)).fetchone()
        return None if row is None else _from_row(row)

    def by_idempotency_key(self, key: str) -> MigrationRecord | None:
        row = self._db.execute(
            "SELECT * FROM migrations WHERE idempotency_key=?", (key,)
        ).fetchone()
        return None if row is None else self._latest(_from_row(row))

    def list(self, state: State | None = None) -> list[MigrationRecord]:
        if state is None or self._unwritten:
            rows = self._db.execute("SELECT * FROM migrations ORDER BY created_at, id")
        else:
            rows = self._db.execute(
                "SELECT * FROM migrations WHERE state=? ORDER BY created_at, id", (state.value,)
            )
        records = [self._latest(_from_row(row)) for row in rows.fetchall()]
        return [r for r in records if state is None or r.state is state]

    def page(
        self, state: State | None = None, *, limit: int, after: str | None = None
    ) -> builtins.list[MigrationRecord]:
        """At most `limit` migrations in list order (created_at, id), after the migration
        `after` (a cursor: the last id of the previous page; [] when unknown)."""
        if self._unwritten:  # changes not written yet decide states: read through list()
            records = self.list(state)
            if after is not None:
                known = self.get(after)
                if known is None:
                    return []
                key = (known.created_at, known.id)
                records = [r for r in records if (r.created_at, r.id) > key]
            return records[:limit]
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
        if self._unwritten:
            return [r for r in self.list() if not r.state.finished]
        finished = tuple(s.value for s in State if s.finished)
        rows = self._db.execute(
            "SELECT * FROM migrations WHERE state NOT IN (?, ?, ?) ORDER BY created_at, id",
            finished,
        )
        return [_from_row(row) for row in rows.fetchall()]

    def active_for_instance(self, instance: str) -> MigrationRecord | None:
        if self._unwritten:  # changes not written yet decide states
            return next((r for r in self.unfinished() if r.instance == instance), None)
        finished = tuple(s.value for s in State if s.finished)
        row = self._db.execute(
            "SELECT * FROM migrations WHERE instance=? AND state NOT IN (?, ?, ?) "
            "ORDER BY created_at, id LIMIT 1",
            (instance, *finished),
        ).fetchone()
        return None if row is None else _from_row(row)

    def events(self, migration_id: str) -> builtins.list[Event]:
        """The migration's events, with those not written yet after the written ones."""
        rows = self._db.execute(
            "SELECT * FROM events WHERE migration_id=? ORDER BY seq", (migration_id,)
        ).fetchall()
        events = [
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
        seq = events[-1].seq if events else 0
        for write in self._pending:
            if write.migration_id != migration_id or write.event is None:
                continue
            at, kind, reason, action, state, data = write.event
            seq += 1  # provisional: the real one is given when it is written
            events.append(
                Event(seq, migration_id, at, kind, reason, action, state, dict(data or {}))
            )
        return events

    # -- drains -----------------------------------------------------------------

    def insert_drain(self, drain: DrainRecord) -> None:
        """Persist a new drain (flushed); StoreUnwritable when it cannot be written:
        a drain is acknowledged only once it is on disk."""
        problem = self.problem()
        if problem is not None:
            raise StoreUnwritable(problem)
        try:
            with self._flushed(), self._transaction():
                self._db.execute(
                    "INSERT INTO drains(id, host, state, created_at, finished_at, body) "
                    "VALUES(?, ?, ?, ?, ?, ?)",
                    (
                        drain.id,
                        drain.host,
                        drain.state.value,
                        drain.created_at,
                        drain.finished_at,
                        drain.body(),
                    ),
                )
        except _WRITE_ERRORS as error:
            self._failed(error, None)
            raise StoreUnwritable(
                f"the store cannot be written: {self._write_error}; retry later"
            ) from error
        self._changes += 1

    def update_drain(self, drain: DrainRecord) -> bool:
        """Write a drain's new state; False (logged, kept by the caller, written with
        its next change) when the store does not take it now."""
        try:
            with self._transaction():
                self._db.execute(
                    "UPDATE drains SET state=?, finished_at=?, body=? WHERE id=?",
                    (drain.state.value, drain.finished_at, drain.body(), drain.id),
                )
        except _WRITE_ERRORS as error:
            log.warning("drain-write-failed", drain=drain.id, path=self.path, error=str(error))
            return False
        self._changes += 1
        return True

    def get_drain(self, drain_id: str) -> DrainRecord | None:
        row = self._db.execute("SELECT * FROM drains WHERE id=?", (drain_id,)).fetchone()
        return None if row is None else _drain_from_row(row)

    def drains(self) -> builtins.list[DrainRecord]:
        """Every drain, oldest first."""
        rows = self._db.execute("SELECT * FROM drains ORDER BY created_at, id").fetchall()
        return [_drain_from_row(row) for row in rows]

    def unfinished_drains(self) -> builtins.list[DrainRecord]:
        unfinished = tuple(s.value for s in DrainState if not s.finished)
        marks = ", ".join("?" for _ in unfinished)
        rows = self._db.execute(
            f"SELECT * FROM drains WHERE state IN ({marks}) ORDER BY created_at, id", unfinished
        ).fetchall()
        return [_drain_from_row(row) for row in rows]


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
