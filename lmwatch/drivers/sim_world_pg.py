"""The simulated world kept in PostgreSQL: `WorldKeeper` as `SqliteWorld`, in a
database that several daemons can reach (docs/cluster.md).

The same two tables and the same semantics as `lmwatch.drivers.sim_world`: one
row for the world, one per job, each save one transaction, a failed save logged
and the simulator going on. A save or load that finds the database gone (a
restart, a cut connection) tries once more on a new connection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

import psycopg

from lmwatch.cluster.pg import Connection, Unreachable, connect
from lmwatch.drivers.sim_world import SavedWorld
from lmwatch.logs import get_logger

log = get_logger("lmwatch.drivers.sim")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS sim_world ("
    " id integer PRIMARY KEY CHECK (id = 1),"
    " at double precision NOT NULL,"
    " state bytea NOT NULL)",
    "CREATE TABLE IF NOT EXISTS sim_jobs ("
    " id text PRIMARY KEY,"
    " at double precision NOT NULL,"
    " state bytea NOT NULL)",
)
# Held while creating the tables, so that daemons starting at once do not race.
_SCHEMA_LOCK = 0x6C6D_7761_7463_6802

T = TypeVar("T")


class PostgresWorld:
    """`WorldKeeper` in a PostgreSQL database, given by its URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._db: Connection | None = None
        self._connection()

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
        """`work` on the connection; once more on a new one if the database was away."""
        try:
            return work(self._connection())
        except Unreachable:
            self._drop()
            return work(self._connection())

    def _drop(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def load(self) -> SavedWorld | None:
        def read(db: Connection) -> SavedWorld | None:
            with db.transaction():  # the world and its jobs as of one moment
                row = db.execute("SELECT at, state FROM sim_world WHERE id = 1").fetchone()
                if row is None:
                    return None
                jobs = {
                    str(job_id): (bytes(state), float(at))
                    for job_id, at, state in db.execute("SELECT id, at, state FROM sim_jobs")
                }
            return SavedWorld(state=bytes(row[1]), at=float(row[0]), jobs=jobs)

        return self._retrying(read)

    def save(
        self,
        state: bytes,
        at: float,
        jobs: Mapping[str, tuple[bytes, float]],
        *,
        drop: Iterable[str] = (),
    ) -> None:
        dropped = list(drop)

        def write(db: Connection) -> None:
            with db.transaction(), db.cursor() as cursor:
                cursor.execute(
                    "INSERT INTO sim_world (id, at, state) VALUES (1, %s, %s)"
                    " ON CONFLICT (id) DO UPDATE SET at = excluded.at, state = excluded.state",
                    (at, state),
                )
                cursor.executemany(
                    "INSERT INTO sim_jobs (id, at, state) VALUES (%s, %s, %s)"
                    " ON CONFLICT (id) DO UPDATE SET at = excluded.at, state = excluded.state",
                    [(job_id, time, blob) for job_id, (blob, time) in jobs.items()],
                )
                if dropped:
                    cursor.execute("DELETE FROM sim_jobs WHERE id = ANY(%s)", (dropped,))

        try:
            self._retrying(write)
        except psycopg.Error as error:
            # As SqliteWorld: the simulator goes on; a restart may find an older world.
            self._drop()
            log.error("sim-world-not-saved", url=_safe(self.url), jobs=len(jobs), error=str(error))

    def close(self) -> None:
        self._drop()


def _safe(url: str) -> str:
    """The URL without a password, for the log."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparsable url>"
    info.pop("password", None)
    return " ".join(f"{k}={v}" for k, v in sorted(info.items()))
