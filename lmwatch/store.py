"""Durable record of every migration, its state changes and its decisions (SQLite, WAL;
or a PostgreSQL database through the same Store: the `Backend` seam, lmwatch/pgstore.py).

One writer thread owns the write connection and commits every change in order,
batching those that wait into one transaction; callers on the event loop queue a
change and return at once, so the loop never waits on the disk. Reads run on the
caller's thread, each thread with a read connection of its own (WAL: readers never
wait for the writer), and show the changes still waiting (read-your-writes): the
API never shows an older state than the engine wrote. `close` writes what waits.

Accepting a migration (or a drain) is durable before it is acknowledged: it is
queued like any change (behind those already waiting), its transaction is flushed
(`synchronous=FULL`, which also makes everything before it durable), and the caller
waits for it (`insert_async` on the event loop; `insert` blocks).

Durability (docs/scale.md): the log is written with `synchronous=NORMAL`, so a
transition costs a write to the log but no disk flush; a daemon that crashes or is
killed loses nothing written (the operating system holds it) and no acknowledged
acceptance; transitions still queued when the process dies (the last milliseconds)
are lost, as are those of the last moments on a power loss or kernel crash (the store
stays consistent; a restart re-attaches and asks the hypervisor how those jobs ended).

A write that fails (a full disk, an I/O error) never reaches the caller: the change
is kept in memory, in order, reads show it, and the writer holds until `retry` (the
engine retries with back-off) or `flush`, then writes it, once. Meanwhile `problem`
says why the store is not healthy, and the daemon accepts no new migration (an
acceptance in a transaction that fails is refused, never kept). The same holds when
the file at the store's path is no longer the one open (deleted or replaced): the
daemon goes on recording into the file it has open, keeps a full copy of it next to
the path (`<store>.rescued`), and says how to put it back.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import errno
import fcntl
import json
import os
import shutil
import sqlite3
import tempfile
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lmwatch import records as parts
from lmwatch.logs import get_logger
from lmwatch.model import StartPlan, State
from lmwatch.records import Outcome, Placed, Progress, Restarts

if TYPE_CHECKING:
    from lmwatch.cluster.fencing import Fencing

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

_JSON_FIELDS = parts.JSON_COLUMNS
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
                f"migration; inspect it with: {_inspect_tool(path)} {path} "
                f"\"SELECT * FROM migrations WHERE id='{problem.migration_id}'\", "
                "then repair or delete the row"
                for problem in problems
            )
        )


def _inspect_tool(location: str) -> str:
    return "psql" if is_database_url(location) else "sqlite3"


def is_database_url(location: str | os.PathLike[str]) -> bool:
    """Whether a store location names a PostgreSQL database rather than a file."""
    return str(location).startswith(("postgresql://", "postgres://"))


class StoreUnwritable(StoreError):
    """The store does not take writes now (full disk, file deleted): nothing new is
    accepted until it does; what is running goes on."""


class HostDraining(StoreError):
    """A new drain of a host that another unfinished drain (perhaps recorded through
    another daemon) already moves instances off: it is not recorded."""


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
    """A migration as the store holds it. Its parts (plan, progress, outcome,
    placement, restart) are typed values; each is a TEXT column holding JSON, written
    and read by `lmwatch.records` alone."""

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
    plan: StartPlan | None = None
    blackout_budget: float | None = None
    paused: bool = False
    handed_over: bool = False
    progress: Progress | None = None  # last sample and prediction
    outcome: Outcome | None = None
    idempotency_key: str | None = None
    request_fingerprint: str | None = None
    # How the destination was placed; None for migrations accepted before placement
    # was recorded.
    placement: Placed | None = None
    # Starting the migration again (`Action.RESTART`); None when it never was.
    restart: Restarts | None = None


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


_DRAINS_ENDED = ", ".join(f"'{state.value}'" for state in DrainState if state.finished)


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
    moves: int = 0  # times this drain moved it off the host before (it was put back)

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
            "moves": self.moves,
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
            moves=int(data.get("moves", 0)),
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


_EventTuple = tuple[float, str, str, str | None, str | None, Mapping[str, Any] | None]


@dataclass(slots=True, eq=False)
class _Write:
    """One change not on disk yet, in the writer's queue: columns of a migration to
    set and/or an event, a new migration (an acceptance), or a drain (new or changed).

    Mutable in two places only: the writer sets `rowid` inside the transaction that
    writes the event (reads use it to tell a written event from a waiting one), and
    `refused` when an acceptance breaks a constraint (it alone is dropped)."""

    seq: int
    migration_id: str | None
    row: dict[str, Any] = field(default_factory=dict)
    event: _EventTuple | None = None
    insert: MigrationRecord | None = None  # a new migration; `event` is its first entry
    drain: DrainRecord | None = None
    new_drain: bool = False
    # Someone waits for it to be on disk (an acceptance before its 202).
    done: concurrent.futures.Future[None] | None = None
    rowid: int | None = None
    refused: StoreError | None = None

    @property
    def durable(self) -> bool:
        """Acknowledged to a client once written: flushed to disk with its batch."""
        return self.insert is not None or self.new_drain


# What a write can fail with: SQLite's errors (full disk, I/O error, read-only file)
# and the operating system's.
_WRITE_ERRORS = (sqlite3.Error, OSError)


class Backend(Protocol):
    """What differs between the databases a store keeps its records in (SQLite,
    PostgreSQL: lmwatch/pgstore.py); the writer thread, the read-your-writes overlay,
    batching and the barriers are the store's, the same on both.

    Connections run the store's SQL (`?` placeholders, rows read by column name)."""

    location: str  # where the records are, for logs and messages (never a password)
    schema: str  # the tables and indexes, in this database's dialect
    begin: str  # the statement opening a write transaction
    write_errors: tuple[type[BaseException], ...]  # a write that fails now: kept, retried
    constraint_errors: tuple[type[BaseException], ...]  # an acceptance refused, alone
    advice: str  # what an operator does while writes fail ("...; " or "")

    def connect_reader(self) -> Any:
        """A new read connection."""

    def durable(self, db: Any) -> AbstractContextManager[None]:
        """Around a write transaction that must be flushed before it returns."""

    def refusable(self, db: Any) -> AbstractContextManager[None]:
        """Around a statement that may break a constraint, inside a transaction: when
        it does, the statement alone is undone and the transaction goes on."""

    def insert_event(self, db: Any, values: tuple[Any, ...]) -> int:
        """Insert an event row (columns: `_EVENT_COLUMNS`); its seq."""

    def lock_host_drains(self, db: Any, host: str) -> None:
        """Inside a write transaction: until it ends, no other daemon's transaction
        records a drain of `host` (so at most one unfinished drain per host)."""

    def unwritable(self, error: BaseException) -> str:
        """Why the store cannot be written, for operators (without "retry later")."""


_EVENT_COLUMNS = "migration_id, at, kind, action, state, reason, data"
_EVENT_INSERT = f"INSERT INTO events({_EVENT_COLUMNS}) VALUES(?, ?, ?, ?, ?, ?, ?)"


class SqliteBackend:
    """A store file (WAL). The file-only parts (identity check, rescue copy, the
    `.lock` file) are the Store's and `StoreLock`'s."""

    schema = _SCHEMA
    begin = "BEGIN IMMEDIATE"
    write_errors: tuple[type[BaseException], ...] = _WRITE_ERRORS
    constraint_errors: tuple[type[BaseException], ...] = (sqlite3.IntegrityError,)
    advice = "free space on its file system (or fix the error); "

    def __init__(self, path: str) -> None:
        self.location = path

    def connect_existing(self) -> sqlite3.Connection:
        """A connection to the file at the path, which must exist: a reader must never
        create an empty store where the operator deleted the file."""
        uri = "file:" + urllib.parse.quote(os.path.abspath(self.location)) + "?mode=rw"
        return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)

    def connect_reader(self) -> sqlite3.Connection:
        try:
            connection = self.connect_existing()
        except sqlite3.Error as error:
            raise StoreError(f"cannot read store {self.location}: {error}") from error
        connection.row_factory = sqlite3.Row
        connection.execute("PRAGMA busy_timeout=5000")
        return connection

    @contextmanager
    def durable(self, db: Any) -> Iterator[None]:
        db.execute("PRAGMA synchronous=FULL")
        try:
            yield
        finally:
            db.execute("PRAGMA synchronous=NORMAL")

    def refusable(self, db: Any) -> AbstractContextManager[None]:
        return nullcontext()  # SQLite undoes the failed statement alone

    def insert_event(self, db: Any, values: tuple[Any, ...]) -> int:
        return int(db.execute(_EVENT_INSERT, values).lastrowid)

    def lock_host_drains(self, db: Any, host: str) -> None:
        """Nothing to do: one daemon writes a store file, and its transactions take
        turns."""

    def unwritable(self, error: BaseException) -> str:
        return f"the store cannot be written: {str(error) or type(error).__name__}"


_BATCH = 512  # most writes one transaction of the writer takes
_GATHER = 0.005  # seconds the writer lets changes gather before a transaction (not acceptances)


def _settle(future: concurrent.futures.Future[None], error: BaseException | None) -> None:
    """Answer whoever waits for a durable write (they may have stopped waiting)."""
    with suppress(concurrent.futures.InvalidStateError):
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


class Store:
    """The store. Reads run on the caller's thread (each thread its own read
    connection); writes are queued and committed, in order, by one writer thread that
    alone uses the write connection (`_db`), so a caller on the event loop never waits
    for the disk. Until a change is written, reads show it (read-your-writes): the
    latest record of each migration with changes waiting is kept in `_unwritten`."""

    def __init__(self, connection: Any, path: str, backend: Backend | None = None) -> None:
        self._db = connection  # the write connection: the writer thread's alone once started
        self.path = path
        self._backend: Backend = backend if backend is not None else SqliteBackend(path)
        # Everything below `_lock` is shared with the writer thread.
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[_Write] = deque()  # waiting, oldest first
        self._inflight: builtins.list[_Write] = []  # being written now (after the queue)
        self._durable = 0  # acceptances waiting in the queue (someone waits for them)
        # Callers waiting for every change up to a seq to be written (`written_soon`).
        self._barriers: builtins.list[tuple[int, concurrent.futures.Future[None]]] = []
        self._seq = 0
        # Latest record (and seq of its last waiting write) of each migration with
        # changes not written yet; the same for drains.
        self._unwritten: dict[str, tuple[MigrationRecord, int]] = {}
        self._unwritten_drains: dict[str, tuple[DrainRecord, int]] = {}
        self._write_error: str | None = None  # why the last write failed (None: writable)
        self._unwritable: str | None = None  # the same, for operators (the backend's words)
        self._unreadable: str | None = None  # why the last health check could not read
        self._held = False  # a write failed: the writer waits for `retry`/`flush`
        self._probe: float | None = None  # with nothing waiting: write a probe (its time)
        self._attempts = 0  # transactions the writer tried (ended, either way)
        self._closing = False
        self._thread: threading.Thread | None = None
        self._readers = threading.local()
        self._connections: builtins.list[Any] = []
        self._file_error: str | None = None  # the file at `path` is not the open one
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._changes = 0  # writes since open (the rescue copy is refreshed when it grows)
        self._rescued_at: int | None = None
        self._lost: str | None = None  # how the file at `path` was lost (`check_file`)
        self._rescue_source: sqlite3.Connection | None = None
        self._rescue_lock = threading.Lock()  # one copy at a time (watcher, close)
        self._rescue_error: str | None = None  # why the last rescue copy failed
        self._failure_listeners: builtins.list[Callable[[], None]] = []
        self._scratch: str | None = None  # the temporary directory of a ':memory:' store
        # Several daemons on one database: each migration's changes are written under
        # its claim (lmwatch/cluster/fencing.py); None: written as they come (SQLite,
        # or one daemon).
        self._fencing: Fencing | None = None
        self._committed = 0  # every change up to this seq is written (or was dropped)

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Store:
        """Open (creating if new) the store: a SQLite file, or the PostgreSQL database
        a `postgresql://` URL names; StoreError with a clear reason otherwise."""
        if is_database_url(path):
            try:
                from lmwatch.pgstore import open_database
            except ImportError as error:
                raise StoreError(
                    f"a PostgreSQL store needs psycopg ({error}): install lmwatch[postgres]"
                ) from None
            writer, backend = open_database(str(path))
            database = cls(writer, backend.location, backend)
            try:
                database._migrate()
                database._reader()
            except backend.write_errors as error:
                database._close_connections()
                raise StoreError(f"cannot use store {backend.location}: {error}") from error
            except BaseException:
                database._close_connections()
                raise
            database._start_writer()
            return database
        text = str(path)
        scratch: str | None = None
        if text == ":memory:":
            # Reads and writes use connections of their own, so they need one file: a
            # private temporary one, removed on close (the store is still forgotten).
            scratch = tempfile.mkdtemp(prefix="lmwatch-store-")
            text = os.path.join(scratch, "store.db")
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
            connection.execute("PRAGMA synchronous=NORMAL")  # FULL for acceptances
            connection.execute("PRAGMA foreign_keys=ON")
            connection.execute("PRAGMA busy_timeout=5000")
            store = cls(connection, text, SqliteBackend(text))
            store._scratch = scratch
            store._migrate()
            store._reader()
            # Opened now, while the file is there, and read once (SQLite opens the file
            # on first use): it copies the database to `rescue_path` should the file be
            # deleted later (`keep_rescue`).
            store._rescue_source = SqliteBackend(text).connect_existing()
            store._rescue_source.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as error:
            raise StoreError(f"cannot use store {text}: {error}") from error
        info = os.stat(text)
        store._identity = (info.st_dev, info.st_ino)
        store._start_writer()
        return store

    def _start_writer(self) -> None:
        self._thread = threading.Thread(
            target=self._run_writer, name="lmwatch-store-writer", daemon=True
        )
        self._thread.start()

    def _reader(self) -> Any:
        """This thread's read connection (opened on first use)."""
        connection: Any = getattr(self._readers, "connection", None)
        if connection is None:
            connection = self._backend.connect_reader()
            self._readers.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def _migrate(self) -> None:
        # executescript commits on its own; it runs outside an explicit transaction.
        self._db.executescript(self._backend.schema)
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
                "INSERT INTO meta(key, value) VALUES('schema_version', ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (str(SCHEMA_VERSION),),
            )

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute(self._backend.begin)
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            # A COMMIT that fails (SQLITE_FULL) leaves the transaction open: roll it
            # back too, or every later BEGIN fails ("within a transaction").
            if self._db.in_transaction:
                with suppress(*self._backend.write_errors):
                    self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Write what is waiting (retrying once if writes were failing), refresh the
        rescue copy when the file was lost, and close. What cannot be written is logged."""
        if self._thread is None:
            return
        self.flush()
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        self._thread.join()
        self._thread = None
        if self._queue:
            log.error(
                "store-writes-lost",
                path=self.path,
                pending=len(self._queue),
                migrations=len({w.migration_id for w in self._queue}),
                error=self._write_error,
                note="a restart re-attaches the running migrations and reads them from the hosts",
            )
            for write in self._queue:
                if write.done is not None:
                    _settle(write.done, StoreUnwritable("the store was closed"))
        for _, future in self._barriers:
            _settle(future, None)
        self._barriers = []
        if self._file_error is not None:
            self._rescue(force=True)
        self._close_connections()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def _close_connections(self) -> None:
        for connection in self._connections:
            connection.close()
        if self._rescue_source is not None:
            self._rescue_source.close()
        self._db.close()

    def healthy(self) -> bool:
        errors: tuple[type[BaseException], ...] = (StoreError, *self._backend.write_errors)
        try:
            self._reader().execute("SELECT 1").fetchone()
        except errors as error:
            self._unreadable = self._backend.unwritable(error)
            return False
        self._unreadable = None
        return True

    # -- the writer thread --------------------------------------------------------------

    def _run_writer(self) -> None:
        while True:
            with self._wake:
                while not self._closing and self._probe is None and (self._held or not self._queue):
                    self._wake.wait()
                if self._probe is None and (self._held or not self._queue):
                    return  # closing, and nothing it may write
                urgent = (
                    self._closing
                    or self._durable > 0
                    or self._probe is not None
                    or bool(self._barriers)
                )
            if not urgent:
                # Let the changes of this moment join one transaction: fewer commits,
                # and fewer hand-overs of the interpreter lock to and from the loop.
                time.sleep(_GATHER)
            with self._wake:
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), _BATCH))]
                self._durable -= sum(1 for write in batch if write.durable)
                self._inflight = batch
                probe = self._probe
            error: BaseException | None = None
            try:
                if batch:
                    self._commit(batch)
                else:
                    self._write_probe(probe)
            except self._backend.write_errors as failure:
                error = failure
            except BaseException as failure:  # a bug: keep the writes, say so
                log.exception("store-writer-error", path=self.path, error=repr(failure))
                error = failure
            self._written(batch, error)

    def fence(self, fencing: Fencing) -> None:
        """Write each migration's changes under its claim from now on (before the
        writer has anything to write: set once, at start)."""
        self._fencing = fencing

    def _commit(self, batch: builtins.list[_Write]) -> None:
        durable = any(write.durable for write in batch)
        fencing = self._fencing
        stale: dict[str, str] = {}
        retired: builtins.list[str] = []
        try:
            with self._backend.durable(self._db) if durable else nullcontext(), self._transaction():
                if fencing is not None:
                    claimed = {
                        w.migration_id
                        for w in batch
                        if w.migration_id is not None and w.insert is None
                    }
                    stale = fencing.admit(self._db, claimed)
                for write in batch:
                    if fencing is None:
                        self._apply(write)
                        continue
                    if write.insert is None and write.migration_id in stale:
                        continue  # written by nobody: the claim is not ours (any more)
                    self._apply(write)
                    if write.insert is not None and write.refused is None:
                        fencing.offer(self._db, write.insert.id)
                    state = write.row.get("state")
                    ends = state is not None and State(state).finished
                    if write.migration_id is not None and ends:
                        fencing.retire(self._db, write.migration_id)
                        retired.append(write.migration_id)
        except BaseException:
            for write in batch:
                write.rowid = None
                write.refused = None
            raise
        if fencing is not None:
            fencing.committed(retired, stale)

    def _apply(self, write: _Write) -> None:
        db = self._db
        if write.insert is not None:
            values = _to_row(write.insert)
            columns = ", ".join(values)
            marks = ", ".join("?" for _ in values)
            try:
                with self._backend.refusable(db):
                    db.execute(
                        f"INSERT INTO migrations({columns}) VALUES({marks})",
                        tuple(values.values()),
                    )
            except self._backend.constraint_errors as error:  # this one only; the batch goes on
                write.refused = StoreError(f"cannot record migration {write.insert.id}: {error}")
                return
        if write.row:
            assignments = ", ".join(f"{key}=?" for key in write.row)
            db.execute(
                f"UPDATE migrations SET {assignments} WHERE id=?",
                (*write.row.values(), write.migration_id),
            )
        if write.event is not None:
            assert write.migration_id is not None
            write.rowid = self._add_event(write.migration_id, *write.event)
        drain = write.drain
        if drain is not None and write.new_drain:
            # The check the daemon made before accepting saw only what was committed;
            # another daemon may have recorded a drain of the host since.
            self._backend.lock_host_drains(db, drain.host)
            other = db.execute(
                f"SELECT id FROM drains WHERE host=? AND state NOT IN ({_DRAINS_ENDED}) LIMIT 1",
                (drain.host,),
            ).fetchone()
            if other is not None:
                write.refused = HostDraining(
                    f"host {drain.host} is already draining (drain {other['id']})"
                )
                return
            db.execute(
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
        elif drain is not None:
            # A drain's state never moves back: not out of an end, and not from
            # cancelling to running (with several daemons, a cancel recorded through
            # another daemon's API stands until the daemon running the drain reads it).
            db.execute(
                "UPDATE drains SET state=?, finished_at=?, body=? WHERE id=?"
                f" AND state NOT IN ({_DRAINS_ENDED})"
                f" AND NOT (state = '{DrainState.CANCELLING}' AND ? = '{DrainState.RUNNING}')",
                (drain.state.value, drain.finished_at, drain.body(), drain.id, drain.state.value),
            )

    def _write_probe(self, at: float | None) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES('write_checked_at', ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (str(at or 0.0),),
            )

    def _written(self, batch: builtins.list[_Write], error: BaseException | None) -> None:
        """After a transaction: forget what it wrote, or keep it (in order) and hold."""
        answers: builtins.list[tuple[concurrent.futures.Future[None], BaseException | None]]
        answers = []
        first = False
        with self._wake:
            self._inflight = []
            self._attempts += 1
            self._probe = None
            if error is None:
                for write in batch:
                    self._forget(write)
                    if write.done is not None:
                        answers.append((write.done, write.refused))
                self._changes += len(batch)
                through = batch[-1].seq if batch else 0  # seqs grow along the queue
                if not self._queue:
                    through = self._seq
                self._committed = max(self._committed, through)
                reached = [b for b in self._barriers if b[0] <= through]
                self._barriers = [b for b in self._barriers if b[0] > through]
                answers += [(future, None) for _, future in reached]
                resumed = self._write_error is not None
                self._write_error = None
                self._unwritable = None
                self._unreadable = None  # it answered: whatever a read met has passed
                self._held = False
            else:
                kept: builtins.list[_Write] = []
                unwritable = self._backend.unwritable(error)
                refusal = StoreUnwritable(f"{unwritable}; retry later")
                for write in batch:
                    if write.durable:  # never acknowledged: the client is told, not kept
                        if write.done is not None:
                            answers.append((write.done, refusal))
                    else:
                        kept.append(write)
                self._queue.extendleft(reversed(kept))
                first = self._write_error is None
                self._write_error = str(error) or type(error).__name__
                self._unwritable = unwritable
                self._held = True
                resumed = False
                # Kept in memory, in order: nobody waits for the disk to come back.
                answers += [(future, None) for _, future in self._barriers]
                self._barriers = []
            pending = len(self._queue)
            self._wake.notify_all()
        for future, outcome in answers:
            _settle(future, outcome)
        if resumed:
            log.info("store-writes-resumed", path=self.path, written=len(batch))
        if error is not None:
            migration = batch[0].migration_id if batch else None
            self._failed(error, migration, pending, first=first)

    def _forget(self, write: _Write) -> None:
        """A write is on disk: reads need no longer show it from memory."""
        if write.migration_id is not None and write.row:
            latest = self._unwritten.get(write.migration_id)
            if latest is not None and latest[1] == write.seq:
                del self._unwritten[write.migration_id]
        if write.drain is not None:
            drain = self._unwritten_drains.get(write.drain.id)
            if drain is not None and drain[1] == write.seq:
                del self._unwritten_drains[write.drain.id]

    def _enqueue(self, write: _Write) -> None:
        """Queue a change for the writer (after those already waiting); the caller
        holds `_lock` and has given it its seq."""
        last = self._queue[-1] if self._queue else None
        if (
            last is not None
            and write.event is None
            and write.drain is None
            and write.insert is None
            and last.event is None
            and last.drain is None
            and last.insert is None
            and last.migration_id == write.migration_id
        ):
            # Consecutive column updates of one migration (progress) merge.
            last.row = {**last.row, **write.row}
            last.seq = write.seq
        else:
            self._queue.append(write)
            if write.durable:
                self._durable += 1
        self._wake.notify_all()

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def written_soon(self) -> concurrent.futures.Future[None]:
        """Done once every change queued so far is in the file (not flushed: a crash
        of the daemon no longer loses it), or kept in memory because writes fail.
        Intent before action: the engine waits for it before acting on a host."""
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._wake:
            if self._thread is None or self._held or not (self._queue or self._inflight):
                future.set_result(None)
                return future
            self._barriers.append((self._seq, future))
            self._wake.notify_all()
        return future

    async def written(self) -> None:
        """`written_soon` for the event loop."""
        await asyncio.wrap_future(self.written_soon())

    def last_seq(self) -> int:
        """The seq of the latest change queued (see `committed_through`)."""
        with self._lock:
            return self._seq

    def committed_through(self) -> int:
        """Every change up to this seq is written (those of a stale claim dropped)."""
        with self._lock:
            return self._committed

    def retry(self, now: float | None = None) -> None:
        """Let the writer try again (after a failure), without waiting for it; with
        nothing waiting, a small write probes the store."""
        with self._wake:
            if self._write_error is None and not self._held:
                return
            self._held = False
            if not self._queue:
                self._probe = now or 0.0
            self._wake.notify_all()

    def flush(self, now: float | None = None) -> bool:
        """Write everything waiting and wait for it; whether the store takes writes.
        After a failure this is one more attempt. Blocks: not for the event loop."""
        with self._wake:
            if self._thread is None:
                return self._write_error is None and not self._queue
            if self._write_error is None and not self._queue and not self._inflight:
                return True
            self._held = False
            if not self._queue and not self._inflight:
                self._probe = now or 0.0
            attempts = self._attempts
            self._wake.notify_all()
            while self._queue or self._inflight or self._probe is not None:
                if self._held and self._attempts > attempts:
                    break  # it failed again
                self._wake.wait()
            return self._write_error is None

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until the writer has nothing left it may write now (all written, or
        held after a failure); whether it got there in `timeout`. For tests and tools."""
        with self._wake:
            return self._wake.wait_for(
                lambda: (
                    self._thread is None
                    or (
                        not self._inflight
                        and (self._held or not self._queue)
                        and self._probe is None
                    )
                ),
                timeout,
            )

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
        unwritable = self._unwritable
        if self._write_error is not None and unwritable is not None:
            kept = self.pending()
            return (
                f"{unwritable}; "
                f"{kept} change{'s' if kept != 1 else ''} kept in memory until it can; "
                f"{self._backend.advice}retry later"
            )
        if self._unreadable is not None:
            return f"{self._unreadable}; retry later"
        return None

    def failing(self) -> bool:
        """Whether writes are failing (and `retry` is due)."""
        return self._write_error is not None

    def pending(self) -> int:
        """Changes not written yet (waiting, or being written)."""
        with self._lock:
            return len(self._queue) + len(self._inflight)

    def check_file(self) -> str | None:
        """Whether the file at the path is still the one open; `problem()` after.

        A store file deleted or replaced while the daemon runs would lose every
        later write at the next start. The daemon keeps recording into the file it
        has open (the running migrations go on), accepts nothing new, and keeps a
        copy of it at `rescue_path` (`keep_rescue`, refreshed as it changes and when
        the store closes). Cheap (one `stat`): fit for the event loop.
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
            self._lost = None
            return self.problem()
        self._lost = what
        self._say_lost()
        return self._file_error

    def file_lost(self) -> bool:
        """Whether the last `check_file` found the file at the path gone or replaced."""
        return self._lost is not None

    def keep_rescue(self) -> None:
        """While the file is lost (`check_file`), copy the open database to
        `rescue_path` when it changed since the last copy. Blocks (it copies the
        whole database): for a worker thread, not the event loop."""
        if self._lost is None:
            return
        self._rescue_error = self._rescue(force=False)
        self._say_lost()

    def _say_lost(self) -> None:
        """The operator's message for a lost file, from the last copy's outcome."""
        if self._lost is None:
            return
        if self._rescue_error is not None:
            saved = (
                f"the copy to {self.rescue_path} failed ({self._rescue_error}); do not stop "
                "lmwatch: free space, it retries"
            )
        elif self._rescued_at is None:
            saved = (
                f"lmwatch is copying everything it recorded to {self.rescue_path}; stop "
                f"lmwatch (it refreshes the copy as it stops), move {self.rescue_path} to "
                f"{self.path} and start it again"
            )
        else:
            saved = (
                f"lmwatch keeps a copy of everything it recorded in {self.rescue_path}; stop "
                f"lmwatch (it refreshes the copy as it stops), move {self.rescue_path} to "
                f"{self.path} and start it again"
            )
        message = (
            f"the store file {self.path} {self._lost} while lmwatch ran; running migrations "
            f"are still supervised, new ones are refused; {saved}"
        )
        if message != self._file_error:
            log.error("store-file-lost", path=self.path, rescue=self.rescue_path, detail=message)
        self._file_error = message

    def _rescue(self, *, force: bool) -> str | None:
        """Copy the open database to `rescue_path` (None: done, else why not)."""
        with self._rescue_lock:
            if not force and self._rescued_at == self._changes:
                return None
            return self._copy_to_rescue()

    def _copy_to_rescue(self) -> str | None:
        source = self._rescue_source
        if source is None:
            return "the store was not opened from a file"
        temporary = self.rescue_path + ".tmp"
        changes = self._changes
        try:
            target = sqlite3.connect(temporary)
            try:
                # Through its own connection: the write connection is the writer's.
                source.backup(target)
            finally:
                target.close()
            os.replace(temporary, self.rescue_path)
        except _WRITE_ERRORS as error:
            with suppress(OSError):
                os.unlink(temporary)
            log.error("store-rescue-failed", path=self.path, rescue=self.rescue_path, error=error)
            return str(error)
        self._rescued_at = changes
        log.info("store-rescued", path=self.path, rescue=self.rescue_path)
        return None

    def _failed(
        self, error: BaseException, migration_id: str | None, pending: int, *, first: bool
    ) -> None:
        for listener in self._failure_listeners:
            listener()
        (log.error if first else log.warning)(
            "store-write-failed",
            path=self.path,
            migration=migration_id,
            pending=pending,
            error=str(error) or type(error).__name__,
            note="changes are kept in memory and written when the store takes writes again",
        )

    # -- migrations -------------------------------------------------------------

    def insert_soon(self, record: MigrationRecord, reason: str) -> concurrent.futures.Future[None]:
        """Queue a newly accepted migration and its first event (one transaction,
        flushed); the future is done once it is on disk, or fails with StoreUnwritable
        (StoreError for a constraint) when it cannot be written: a migration is
        acknowledged only once it is on disk. Reads show it once it is written."""
        problem = self.problem()
        if problem is not None:
            raise StoreUnwritable(problem)
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        event = (record.created_at, "state", reason, None, record.state.value, None)
        with self._wake:
            if self._closing or self._thread is None:
                raise StoreUnwritable("the store is closed")
            write = _Write(self._next_seq(), record.id, event=event, insert=record, done=done)
            self._enqueue(write)
        return done

    async def insert_async(self, record: MigrationRecord, reason: str) -> None:
        """`insert` for the event loop: waits for the disk without blocking the loop."""
        await asyncio.wrap_future(self.insert_soon(record, reason))

    def insert(self, record: MigrationRecord, reason: str) -> None:
        """Persist a newly accepted migration and its first event, atomically and
        flushed, and wait for it (blocks: on the event loop use `insert_async`).

        Unlike the other writes this one raises (StoreUnwritable) when it cannot be
        written: a migration is acknowledged only once it is on disk."""
        self.insert_soon(record, reason).result()

    def update(
        self,
        record: MigrationRecord,
        *,
        event: tuple[str, str, str | None] | None = None,
        at: float | None = None,
        data: Mapping[str, Any] | None = None,
        **changes: Any,
    ) -> MigrationRecord:
        """Apply `changes` to a migration (and log `event` = (kind, reason, action)),
        written atomically later, in order, by the writer; returns at once.

        Never raises for a write that fails: the change is kept and written later."""
        updated = replace(record, **changes)
        row = _to_row(updated, changes)
        logged = None
        if event is not None:
            kind, reason, action = event
            when = at if at is not None else updated.created_at
            state = changes.get("state")
            logged = (when, kind, reason, action, None if state is None else str(state), data)
        if row or logged is not None:
            with self._wake:
                seq = self._next_seq()
                if row:
                    self._unwritten[record.id] = (updated, seq)
                self._enqueue(_Write(seq, record.id, row=row, event=logged))
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
        """Log an event of a migration: queued for the writer; returns at once."""
        with self._wake:
            event = (at, kind, reason, action, None, data)
            self._enqueue(_Write(self._next_seq(), migration_id, event=event))

    def _add_event(
        self,
        migration_id: str,
        at: float,
        kind: str,
        reason: str,
        action: str | None,
        state: str | None,
        data: Mapping[str, Any] | None = None,
    ) -> int | None:
        values = (migration_id, at, kind, action, state, reason, json.dumps(data or {}))
        return self._backend.insert_event(self._db, values)

    def _overlay(self) -> dict[str, MigrationRecord]:
        """The migrations with changes not written yet, as they are now.

        Taken before reading the file: a change written meanwhile is in the file or
        here, never in neither."""
        with self._lock:
            if not self._unwritten:
                return {}
            return {key: record for key, (record, _) in self._unwritten.items()}

    @staticmethod
    def _merge(
        rows: Iterable[sqlite3.Row],
        overlay: Mapping[str, MigrationRecord],
        keep: Callable[[MigrationRecord], bool],
        after: tuple[float, str] | None = None,
        limit: int | None = None,
    ) -> builtins.list[MigrationRecord]:
        """Rows read (in list order) with the changes not written yet laid over them:
        those that `keep` passes, in list order, after `after` when given; with `limit`,
        the first `limit` of them.

        With a limit, rows are read and decoded only until `limit` of them are kept:
        a migration's place in the order never changes, so any change not written yet
        that belongs before the last row kept is either one of the rows read or not
        in the file at all (laid in from the overlay below)."""
        seen: set[str] = set()
        records: builtins.list[MigrationRecord] = []
        for row in rows:
            key = row["id"]
            seen.add(key)
            record = overlay.get(key)
            if record is None:
                record = _from_row(row)
            if keep(record):
                records.append(record)
                if limit is not None and len(records) >= limit:
                    break
        extra = [
            record
            for key, record in overlay.items()
            if key not in seen
            and keep(record)
            and (after is None or (record.created_at, record.id) > after)
        ]
        if extra:
            records.extend(extra)
            records.sort(key=lambda r: (r.created_at, r.id))
        return records if limit is None else records[:limit]

    def get(self, migration_id: str) -> MigrationRecord | None:
        with self._lock:
            latest = self._unwritten.get(migration_id)
        if latest is not None:
            return latest[0]
        row = (
            self._reader()
            .execute("SELECT * FROM migrations WHERE id=?", (migration_id,))
            .fetchone()
        )
        return None if row is None else _from_row(row)

    def by_idempotency_key(self, key: str) -> MigrationRecord | None:
        overlay = self._overlay()
        row = (
            self._reader()
            .execute("SELECT * FROM migrations WHERE idempotency_key=?", (key,))
            .fetchone()
        )
        if row is None:
            return None
        return overlay.get(row["id"]) or _from_row(row)

    def list(self, state: State | None = None) -> list[MigrationRecord]:
        """Every migration (of one state), in list order; reads the whole table: on
        the event loop use `page` (or call this from a worker thread)."""
        overlay = self._overlay()
        if state is None:
            rows = self._reader().execute("SELECT * FROM migrations ORDER BY created_at, id")
        else:
            rows = self._reader().execute(
                "SELECT * FROM migrations WHERE state=? ORDER BY created_at, id", (state.value,)
            )
        return self._merge(rows, overlay, lambda r: state is None or r.state is state)

    def page(
        self, state: State | None = None, *, limit: int, after: str | None = None
    ) -> builtins.list[MigrationRecord]:
        """At most `limit` migrations in list order (created_at, id), after the migration
        `after` (a cursor: the last id of the previous page; [] when unknown)."""
        overlay = self._overlay()
        reader = self._reader()
        where: builtins.list[str] = []
        params: builtins.list[Any] = []
        if state is not None:
            where.append("state=?")
            params.append(state.value)
        cursor: tuple[float, str] | None = None
        if after is not None:
            known = overlay.get(after)
            if known is not None:
                cursor = (known.created_at, known.id)
            else:
                row = reader.execute(
                    "SELECT created_at, id FROM migrations WHERE id=?", (after,)
                ).fetchone()
                if row is None:
                    return []
                cursor = (row["created_at"], row["id"])
            where.append("(created_at, id) > (?, ?)")
            params += list(cursor)
        clause = f"WHERE {' AND '.join(where)} " if where else ""
        # Rows whose change not written yet takes them out of the page: read that many more.
        rows = reader.execute(
            f"SELECT * FROM migrations {clause}ORDER BY created_at, id LIMIT ?",
            (*params, limit + len(overlay)),
        )
        keep: Callable[[MigrationRecord], bool] = lambda r: state is None or r.state is state  # noqa: E731
        return self._merge(rows, overlay, keep, cursor, limit)

    def scan(self) -> tuple[builtins.list[MigrationRecord], builtins.list[CorruptRecord]]:
        """Every migration in list order, each row decoded once, and every row that
        cannot be decoded (with its id and why): what a start needs, in one pass."""
        overlay = self._overlay()
        records: builtins.list[MigrationRecord] = []
        problems: builtins.list[CorruptRecord] = []
        for row in self._reader().execute("SELECT * FROM migrations ORDER BY created_at, id"):
            try:
                records.append(overlay.get(row["id"]) or _from_row(row))
            except CorruptRecord as problem:
                problems.append(problem)
        return records, problems

    def unreadable(self) -> builtins.list[CorruptRecord]:
        """Every migration row that cannot be decoded, each with its id and why."""
        problems: builtins.list[CorruptRecord] = []
        for row in self._reader().execute("SELECT * FROM migrations ORDER BY created_at, id"):
            try:
                _from_row(row)
            except CorruptRecord as problem:
                problems.append(problem)
        return problems

    def unfinished(self) -> builtins.list[MigrationRecord]:
        overlay = self._overlay()
        finished = tuple(s.value for s in State if s.finished)
        rows = self._reader().execute(
            "SELECT * FROM migrations WHERE state NOT IN (?, ?, ?) ORDER BY created_at, id",
            finished,
        )
        return self._merge(rows, overlay, lambda r: not r.state.finished)

    def active_for_instance(self, instance: str) -> MigrationRecord | None:
        overlay = self._overlay()
        finished = tuple(s.value for s in State if s.finished)
        rows = self._reader().execute(
            "SELECT * FROM migrations WHERE instance=? AND state NOT IN (?, ?, ?) "
            "ORDER BY created_at, id",
            (instance, *finished),
        )
        active = self._merge(
            rows, overlay, lambda r: r.instance == instance and not r.state.finished
        )
        return active[0] if active else None

    def events(self, migration_id: str) -> builtins.list[Event]:
        """The migration's events, with those not written yet after the written ones."""
        with self._lock:  # first: an event written meanwhile is in the file or here
            waiting = [
                write
                for write in (*self._inflight, *self._queue)
                if write.migration_id == migration_id
                and write.event is not None
                and write.insert is None
            ]
        rows = (
            self._reader()
            .execute("SELECT * FROM events WHERE migration_id=? ORDER BY seq", (migration_id,))
            .fetchall()
        )
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
        read = {event.seq for event in events}
        seq = events[-1].seq if events else 0
        for write in waiting:
            rowid = write.rowid  # set in the transaction that writes it
            if rowid is not None and rowid in read:
                continue  # written since: read from the file above
            assert write.event is not None
            at, kind, reason, action, state, data = write.event
            seq += 1  # provisional: the real one is given when it is written
            events.append(
                Event(seq, migration_id, at, kind, reason, action, state, dict(data or {}))
            )
        return events

    # -- drains -----------------------------------------------------------------

    def insert_drain_soon(self, drain: DrainRecord) -> concurrent.futures.Future[None]:
        """Queue a new drain (flushed); the future is done once it is on disk, or fails
        with StoreUnwritable: a drain is acknowledged only once it is on disk."""
        problem = self.problem()
        if problem is not None:
            raise StoreUnwritable(problem)
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._wake:
            if self._closing or self._thread is None:
                raise StoreUnwritable("the store is closed")
            self._enqueue(_Write(self._next_seq(), None, drain=drain, new_drain=True, done=done))
        return done

    async def insert_drain_async(self, drain: DrainRecord) -> None:
        await asyncio.wrap_future(self.insert_drain_soon(drain))

    def insert_drain(self, drain: DrainRecord) -> None:
        """Persist a new drain (flushed) and wait for it (blocks); StoreUnwritable when
        it cannot be written: a drain is acknowledged only once it is on disk."""
        self.insert_drain_soon(drain).result()

    def update_drain(self, drain: DrainRecord) -> None:
        """Queue a drain's new state for the writer (kept, in order, while writes
        fail; reads show it meanwhile); returns at once."""
        with self._wake:
            seq = self._next_seq()
            self._unwritten_drains[drain.id] = (drain, seq)
            self._enqueue(_Write(seq, None, drain=drain))

    def _drains_overlay(self) -> dict[str, DrainRecord]:
        with self._lock:
            return {key: drain for key, (drain, _) in self._unwritten_drains.items()}

    def get_drain(self, drain_id: str) -> DrainRecord | None:
        overlay = self._drains_overlay()
        if drain_id in overlay:
            return overlay[drain_id]
        row = self._reader().execute("SELECT * FROM drains WHERE id=?", (drain_id,)).fetchone()
        return None if row is None else _drain_from_row(row)

    def drains(self) -> builtins.list[DrainRecord]:
        """Every drain, oldest first."""
        overlay = self._drains_overlay()
        rows = self._reader().execute("SELECT * FROM drains ORDER BY created_at, id").fetchall()
        return [overlay.get(row["id"]) or _drain_from_row(row) for row in rows]

    def unfinished_drains(self) -> builtins.list[DrainRecord]:
        return [drain for drain in self.drains() if not drain.state.finished]


def _to_row(record: MigrationRecord, only: Iterable[str] | None = None) -> dict[str, Any]:
    """The columns of a record (those named in `only`, when given), encoded."""
    row: dict[str, Any] = {}
    for name in MigrationRecord.__slots__ if only is None else only:
        value = getattr(record, name)
        if name in _JSON_FIELDS:
            value = parts.encode(name, value)
        elif name in _BOOL_FIELDS:
            value = int(value)
        elif name == "state":
            value = value.value
        row[name] = value
    return row


def _from_row(row: sqlite3.Row) -> MigrationRecord:
    """The record a row holds; CorruptRecord naming the row and column otherwise.

    The JSON columns hold JSON objects (TEXT); `lmwatch.records` decodes them."""
    values: dict[str, Any] = dict(row)
    column = "id"
    try:
        for column in _JSON_FIELDS:
            values[column] = parts.decode(column, values[column])
        for column in _BOOL_FIELDS:
            values[column] = bool(values[column])
        column = "state"
        values["state"] = State(values["state"])
        column = "record"
        return MigrationRecord(**values)
    except (ValueError, TypeError, KeyError) as error:
        raise CorruptRecord(str(values.get("id")), f"column {column}: {error}") from None
