"""The simulated world kept on disk, so that a restarted daemon finds it as it left it.

Real hosts do not forget their instances or their running migrations when the
daemon restarts; the simulator must not either. `SqliteWorld` keeps the simulator's
state in two tables of the daemon's store file (its own connection; the store's
tables are untouched):

- `sim_world`: one row, where each instance runs, what each host has free, the
  injected faults, and the clock time the model had reached;
- `sim_jobs`: one row per migration job (its model and request), with the clock
  time its state is for.

A job is written when something changes it (started, an action, its end) and every
job at once every 30 s, so a restart replays at most that much of a job on its own
(without its link's other jobs) before it runs with them again. The rows are
pickles: the file is the daemon's own state (the same file tells it which
migrations to act on), written and read only by this code.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from lmwatch.logs import get_logger

log = get_logger("lmwatch.drivers.sim")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sim_world (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at REAL NOT NULL,
    state BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS sim_jobs (
    id TEXT PRIMARY KEY,
    at REAL NOT NULL,
    state BLOB NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class SavedWorld:
    """What was kept: the world's state at `at`, and each job's state at its own time."""

    state: bytes
    at: float
    jobs: Mapping[str, tuple[bytes, float]]


class WorldKeeper(Protocol):
    def load(self) -> SavedWorld | None: ...

    def save(
        self,
        state: bytes,
        at: float,
        jobs: Mapping[str, tuple[bytes, float]],
        *,
        drop: Iterable[str] = (),
    ) -> None:
        """Write the world (at `at`) and these jobs (each with the time its state is
        for) in one transaction; forget the jobs in `drop`."""
        ...

    def close(self) -> None: ...


class SqliteWorld:
    """`WorldKeeper` in an SQLite file (the daemon's store file)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # As the store's transitions (docs/scale.md): a daemon killed loses nothing,
        # a power loss may lose the last moments, which the store may then lose too.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def load(self) -> SavedWorld | None:
        row = self._db.execute("SELECT at, state FROM sim_world WHERE id = 1").fetchone()
        if row is None:
            return None
        jobs = {
            job_id: (bytes(state), float(at))
            for job_id, at, state in self._db.execute("SELECT id, at, state FROM sim_jobs")
        }
        return SavedWorld(state=bytes(row[1]), at=float(row[0]), jobs=jobs)

    def save(
        self,
        state: bytes,
        at: float,
        jobs: Mapping[str, tuple[bytes, float]],
        *,
        drop: Iterable[str] = (),
    ) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO sim_world(id, at, state) VALUES (1, ?, ?)",
                    (at, state),
                )
                self._db.executemany(
                    "INSERT OR REPLACE INTO sim_jobs(id, at, state) VALUES (?, ?, ?)",
                    [(job_id, time, blob) for job_id, (blob, time) in jobs.items()],
                )
                self._db.executemany(
                    "DELETE FROM sim_jobs WHERE id = ?", [(job_id,) for job_id in drop]
                )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as error:
            # The simulator goes on; a restart may then find an older world (as a
            # real host would not). Said loudly, once per failure.
            log.error("sim-world-not-saved", path=self.path, jobs=len(jobs), error=str(error))

    def close(self) -> None:
        self._db.close()


# ------------------------------------------------------------ a shared world


@dataclass(frozen=True, slots=True)
class Move:
    """Where a job's end puts its instance: from `source` to `destination` (None:
    lost), with the memory and local disk it takes along."""

    instance: str
    source: str
    destination: str | None
    memory: int
    disk: int


@dataclass(frozen=True, slots=True)
class JobRow:
    """One job as a shared world keeps it: its state at `at` (a clock time on the
    wall-clock epoch), and, for a job that has just ended, what its end moves."""

    id: str
    instance: str
    source: str
    destination: str
    state: bytes
    at: float
    ended: bool
    move: Move | None = None


class JobTaken(Exception):
    """Another job of the same instance is under way (held by another driver)."""


@runtime_checkable
class SharedWorld(Protocol):
    """A world several drivers (in several processes) change at once, row by row:
    one row per instance (its host), per host (its free memory and storage), per
    job (its state and its holder). `holder` names this keeper's driver incarnation:
    `name` (the daemon's, for people reading the rows) and a random part.
    Reads raise `DriverError` when the world cannot be read."""

    name: str
    holder: str

    def seed(
        self, instances: Mapping[str, str | None], hosts: Mapping[str, tuple[int, int | None]]
    ) -> None:
        """Add the instances and hosts the world does not know yet (as placed by the
        inventory); known ones keep their kept values."""
        ...

    def instance(self, name: str) -> tuple[str | None, list[tuple[bytes, float]]]:
        """Where the kept placement puts the instance (None: lost), and the kept
        state and time of a job of another holder that moves it and has not ended."""
        ...

    def instances_on(self, host: str) -> set[str]: ...

    def placement(self) -> dict[str, str | None]: ...

    def host(self, name: str) -> tuple[int, int | None]:
        """The host's free memory and free local storage (None: not modelled)."""
        ...

    def start_job(self, job: JobRow) -> None:
        """Keep a new job (or a job started again), held by this keeper's holder;
        `JobTaken` when another unended job moves the same instance."""
        ...

    def save_jobs(self, jobs: Iterable[JobRow]) -> set[str]:
        """Keep these jobs and apply their moves, each only while this holder holds
        it; the ids held by another holder now (nothing of theirs written)."""
        ...

    def take_job(self, job_id: str) -> tuple[bytes, float] | None:
        """Become the job's holder; its kept state and time (None: no such job)."""
        ...

    def others_jobs(self, host: str | None = None) -> list[tuple[bytes, float]]:
        """The kept state and time of the jobs not ended held by other holders (only
        those leaving or reaching `host` when one is named)."""
        ...

    def others_on(self, source: str, destination: str) -> int:
        """Jobs on this link that have not ended, held by other holders."""
        ...

    def faults(self) -> bytes | None: ...

    def save_faults(self, state: bytes) -> None: ...

    def prune(self, before: float) -> None:
        """Forget the jobs that ended before `before`."""
        ...

    def load(self) -> SavedWorld | None:
        """What is kept, for a look (tests, tools): a pickled placement and every job."""
        ...

    def close(self) -> None: ...
