"""The simulated world kept in PostgreSQL, shared by several drivers (docs/cluster.md).

Several daemons (separate processes) drive one simulated world, so it is kept row by
row and every change is its own transaction on the rows it concerns, never a
whole-world overwrite:

- `sim_instances`: one row per instance, its host (NULL: lost). A job's end moves it
  with `UPDATE … SET host = destination WHERE name = … AND host = source`;
- `sim_hosts`: one row per host, its free memory and free local storage (NULL: not
  modelled), changed by `free = free ± memory` in the same transaction as the move;
- `sim_shared_jobs`: one row per job: its pickled model, the clock time that state
  is for, whether it ended, and its `holder`, the driver incarnation simulating it.
  A save writes only `WHERE holder = me`: a driver whose job was taken over writes
  nothing of it (and hears which jobs it lost). At most one job that has not ended
  per instance (a partial unique index), so two drivers cannot start one instance
  twice;
- `sim_faults`: one row, the injected faults every driver reads.

Times are clock readings, on the wall-clock epoch (`WallClock`), which every
process shares. Rows of different transactions touch hosts and instances in name
order; a deadlock or serialization failure is tried again. A save or read that
finds the database gone (a restart, a cut connection) tries once more on a new
connection; a failed save of jobs is logged and the simulator goes on (as
`SqliteWorld`); a failed read or start is a `DriverError`.
"""

from __future__ import annotations

import os
import pickle
import socket
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

import psycopg
from psycopg import errors as pgerrors

from lmwatch.cluster.pg import Connection, Unreachable, connect
from lmwatch.drivers.base import DriverError
from lmwatch.drivers.sim_world import JobRow, JobTaken, Move, SavedWorld
from lmwatch.logs import get_logger

log = get_logger("lmwatch.drivers.sim")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS sim_instances (name text PRIMARY KEY, host text)",
    "CREATE TABLE IF NOT EXISTS sim_hosts ("
    " name text PRIMARY KEY, free bigint NOT NULL, storage bigint)",
    "CREATE TABLE IF NOT EXISTS sim_shared_jobs ("
    " id text PRIMARY KEY,"
    " instance text NOT NULL,"
    " source text NOT NULL,"
    " destination text NOT NULL,"
    " holder text NOT NULL,"
    " at double precision NOT NULL,"
    " ended boolean NOT NULL,"
    " state bytea NOT NULL)",
    "CREATE UNIQUE INDEX IF NOT EXISTS sim_shared_jobs_moving"
    " ON sim_shared_jobs (instance) WHERE NOT ended",
    "CREATE INDEX IF NOT EXISTS sim_shared_jobs_link"
    " ON sim_shared_jobs (source, destination) WHERE NOT ended",
    "CREATE TABLE IF NOT EXISTS sim_faults ("
    " id integer PRIMARY KEY CHECK (id = 1), state bytea NOT NULL)",
)
# Held while creating the tables, so that daemons starting at once do not race.
_SCHEMA_LOCK = 0x6C6D_7761_7463_6802
_CONFLICT_TRIES = 5  # a deadlock between two drivers' saves is tried again this often

T = TypeVar("T")


class PostgresWorld:
    """`SharedWorld` in a PostgreSQL database, given by its URL. `name` is the
    daemon's (by default this process's, host:pid); `holder`, the driver incarnation
    it keeps jobs for, is the name and a new random part."""

    def __init__(self, url: str, *, name: str | None = None) -> None:
        self.url = url
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.holder = f"{self.name}/{uuid.uuid4().hex[:8]}"
        self._db: Connection | None = None
        self._connection()

    # ------------------------------------------------------------ connection

    def _connection(self) -> Connection:
        if self._db is None or self._db.closed:
            db = connect(self.url)
            with db.transaction():
                db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                for statement in _SCHEMA:
                    db.execute(statement)
            self._db = db
        return self._db

    def _retrying(self, work: Callable[[Connection], T]) -> T:
        """`work` on the connection; once more on a new one if the database was away,
        again on a deadlock with another driver's transaction."""
        for attempt in range(_CONFLICT_TRIES):
            try:
                try:
                    return work(self._connection())
                except Unreachable:
                    self._drop()
                    return work(self._connection())
            except (pgerrors.DeadlockDetected, pgerrors.SerializationFailure):
                if attempt == _CONFLICT_TRIES - 1:
                    raise
        raise AssertionError("unreachable")

    def _read(self, work: Callable[[Connection], T]) -> T:
        try:
            return self._retrying(work)
        except psycopg.Error as error:
            self._drop()
            raise DriverError(
                f"the simulated world cannot be read ({_safe(self.url)}): {error}"
            ) from None

    def _drop(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def close(self) -> None:
        self._drop()

    # ------------------------------------------------------------ placement

    def seed(
        self, instances: Mapping[str, str | None], hosts: Mapping[str, tuple[int, int | None]]
    ) -> None:
        def write(db: Connection) -> None:
            with db.transaction(), db.cursor() as cursor:
                cursor.execute(
                    "INSERT INTO sim_hosts (name, free, storage)"
                    " SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[])"
                    " ON CONFLICT (name) DO NOTHING",
                    (
                        sorted(hosts),
                        [hosts[h][0] for h in sorted(hosts)],
                        [hosts[h][1] for h in sorted(hosts)],
                    ),
                )
                cursor.execute(
                    "INSERT INTO sim_instances (name, host)"
                    " SELECT * FROM unnest(%s::text[], %s::text[])"
                    " ON CONFLICT (name) DO NOTHING",
                    (sorted(instances), [instances[i] for i in sorted(instances)]),
                )

        self._read(write)

    def instance(self, name: str) -> tuple[str | None, list[tuple[bytes, float]]]:
        def read(db: Connection) -> tuple[str | None, list[tuple[bytes, float]]]:
            rows = db.execute(
                "SELECT i.host, j.state, j.at FROM sim_instances i"
                " LEFT JOIN sim_shared_jobs j"
                "  ON j.instance = i.name AND NOT j.ended AND j.holder <> %s"
                " WHERE i.name = %s",
                (self.holder, name),
            ).fetchall()
            if not rows:
                return None, []
            jobs = [(bytes(state), float(at)) for _, state, at in rows if state is not None]
            return rows[0][0], jobs

        return self._read(read)

    def instances_on(self, host: str) -> set[str]:
        def read(db: Connection) -> set[str]:
            rows = db.execute("SELECT name FROM sim_instances WHERE host = %s", (host,))
            return {str(name) for (name,) in rows}

        return self._read(read)

    def placement(self) -> dict[str, str | None]:
        def read(db: Connection) -> dict[str, str | None]:
            return {str(n): h for n, h in db.execute("SELECT name, host FROM sim_instances")}

        return self._read(read)

    def host(self, name: str) -> tuple[int, int | None]:
        def read(db: Connection) -> tuple[int, int | None]:
            row = db.execute(
                "SELECT free, storage FROM sim_hosts WHERE name = %s", (name,)
            ).fetchone()
            if row is None:
                raise DriverError(f"the simulated world does not know host {name!r}")
            return int(row[0]), None if row[1] is None else int(row[1])

        return self._read(read)

    # ------------------------------------------------------------ jobs

    def start_job(self, job: JobRow) -> None:
        def write(db: Connection) -> None:
            try:
                self._insert(db, job)
            except pgerrors.UniqueViolation:
                raise JobTaken(f"instance {job.instance!r} is already migrating") from None

        self._read(write)

    def _insert(self, db: Connection, job: JobRow) -> None:
        with db.transaction():
            db.execute(
                "INSERT INTO sim_shared_jobs"
                " (id, instance, source, destination, holder, at, ended, state)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (id) DO UPDATE SET instance = excluded.instance,"
                " source = excluded.source, destination = excluded.destination,"
                " holder = excluded.holder, at = excluded.at, ended = excluded.ended,"
                " state = excluded.state",
                (
                    job.id,
                    job.instance,
                    job.source,
                    job.destination,
                    self.holder,
                    job.at,
                    job.ended,
                    job.state,
                ),
            )

    def save_jobs(self, jobs: Iterable[JobRow]) -> set[str]:
        rows = sorted(jobs, key=lambda job: job.id)
        if not rows:
            return set()

        def write(db: Connection) -> set[str]:
            with db.transaction(), db.cursor() as cursor:
                cursor.execute(
                    "UPDATE sim_shared_jobs AS j SET state = v.state, at = v.at,"
                    " ended = v.ended"
                    " FROM unnest(%s::text[], %s::bytea[], %s::float8[], %s::bool[])"
                    "  AS v(id, state, at, ended)"
                    " WHERE j.id = v.id AND j.holder = %s RETURNING j.id",
                    (
                        [job.id for job in rows],
                        [job.state for job in rows],
                        [job.at for job in rows],
                        [job.ended for job in rows],
                        self.holder,
                    ),
                )
                saved = {str(job_id) for (job_id,) in cursor.fetchall()}
                moves = [job.move for job in rows if job.id in saved and job.move is not None]
                for move in sorted(moves, key=lambda m: m.instance):
                    self._move(cursor, move)
            return {job.id for job in rows} - saved

        try:
            return self._retrying(write)
        except psycopg.Error as error:
            # As SqliteWorld: the simulator goes on; a takeover may find an older job.
            self._drop()
            log.error("sim-world-not-saved", url=_safe(self.url), jobs=len(rows), error=str(error))
            return set()

    def _move(self, cursor: psycopg.Cursor[tuple[object, ...]], move: Move) -> None:
        cursor.execute(
            "UPDATE sim_instances SET host = %s WHERE name = %s AND host = %s",
            (move.destination, move.instance, move.source),
        )
        if cursor.rowcount != 1:
            log.warning(
                "sim-move-skipped",
                instance=move.instance,
                source=move.source,
                destination=move.destination,
                reason="not on its source in the kept world",
            )
            return
        if move.destination is None:
            return  # lost: its memory is not given back (as a single driver does)
        changes = {move.source: 1, move.destination: -1}
        for host in sorted(changes):
            sign = changes[host]
            cursor.execute(
                "UPDATE sim_hosts SET free = free + %s,"
                " storage = CASE WHEN %s = 0 THEN storage ELSE storage + %s END"
                " WHERE name = %s",
                (sign * move.memory, move.disk, sign * move.disk, host),
            )

    def take_job(self, job_id: str) -> tuple[bytes, float] | None:
        def write(db: Connection) -> tuple[bytes, float] | None:
            with db.transaction():
                row = db.execute(
                    "UPDATE sim_shared_jobs SET holder = %s WHERE id = %s RETURNING state, at",
                    (self.holder, job_id),
                ).fetchone()
            return None if row is None else (bytes(row[0]), float(row[1]))

        return self._read(write)

    def others_jobs(self, host: str | None = None) -> list[tuple[bytes, float]]:
        def read(db: Connection) -> list[tuple[bytes, float]]:
            rows = db.execute(
                "SELECT state, at FROM sim_shared_jobs WHERE NOT ended AND holder <> %s"
                " AND (%s::text IS NULL OR source = %s OR destination = %s)",
                (self.holder, host, host, host),
            )
            return [(bytes(state), float(at)) for state, at in rows]

        return self._read(read)

    def others_on(self, source: str, destination: str) -> int:
        def read(db: Connection) -> int:
            row = db.execute(
                "SELECT count(*) FROM sim_shared_jobs WHERE source = %s AND destination = %s"
                " AND NOT ended AND holder <> %s",
                (source, destination, self.holder),
            ).fetchone()
            return int(row[0]) if row else 0

        return self._read(read)

    def prune(self, before: float) -> None:
        def write(db: Connection) -> None:
            db.execute("DELETE FROM sim_shared_jobs WHERE ended AND at < %s", (before,))

        try:
            self._retrying(write)
        except psycopg.Error as error:
            self._drop()
            log.error("sim-world-not-pruned", url=_safe(self.url), error=str(error))

    # ------------------------------------------------------------ faults

    def faults(self) -> bytes | None:
        def read(db: Connection) -> bytes | None:
            row = db.execute("SELECT state FROM sim_faults WHERE id = 1").fetchone()
            return None if row is None else bytes(row[0])

        return self._read(read)

    def save_faults(self, state: bytes) -> None:
        def write(db: Connection) -> None:
            db.execute(
                "INSERT INTO sim_faults (id, state) VALUES (1, %s)"
                " ON CONFLICT (id) DO UPDATE SET state = excluded.state",
                (state,),
            )

        self._read(write)

    # ------------------------------------------------------------ a look

    def load(self) -> SavedWorld | None:
        def read(db: Connection) -> SavedWorld | None:
            with db.transaction():  # one moment
                where = {str(n): h for n, h in db.execute("SELECT name, host FROM sim_instances")}
                hosts = {
                    str(n): (int(f), s)
                    for n, f, s in db.execute("SELECT name, free, storage FROM sim_hosts")
                }
                jobs = {
                    str(job_id): (bytes(state), float(at))
                    for job_id, at, state in db.execute("SELECT id, at, state FROM sim_shared_jobs")
                }
            if not where and not jobs:
                return None
            at = max((time for _, time in jobs.values()), default=0.0)
            state = pickle.dumps({"where": where, "hosts": hosts})
            return SavedWorld(state=state, at=at, jobs=jobs)

        return self._read(read)


def _safe(url: str) -> str:
    """The URL without a password, for the log."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparsable url>"
    info.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in sorted(info.items()))
