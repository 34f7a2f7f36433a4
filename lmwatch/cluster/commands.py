"""Operator commands (cancel, force-complete) that reach a migration's owner through
the database: a row of `cluster_commands` each.

A daemon whose API is asked to act on a migration it does not supervise `post`s a
command and waits (`wait_outcome`) for the owner's answer. The owner `take`s the
pending commands of the migrations it supervises, applies each through the engine
method its own API uses, and `record`s the outcome (accepted, or refused with the
state machine's text and the status its API would answer). Posting notifies
`CHANNEL_POSTED` (payload: the migration id) and recording notifies `CHANNEL_DONE`
(payload: the command id), in the transaction of the change, so a listener hears of
it once it is visible. A notification is lost while the listener's connection is
down, so every waiter also polls.

Exactly once. A take is a row-level claim (`FOR UPDATE SKIP LOCKED`): of two takers
at once, each gets other rows. A taken command carries its taker (`taken_by`, one
incarnation of one daemon) and is not offered again while that taker may still be
applying it, i.e. for `retake_after` seconds after the take; an outcome is recorded
only by the current taker and only once. If the taker dies between taking
and recording, the next owner takes the command again (`takes` > 1). Applying it
again would be harmful where the first application reached the hypervisor (a second
cancel or pause sent to a job), and the new owner cannot ask the dead one. So the
owner writes an intent entry on the migration's timeline before applying (`data`
`{"command": id}`), waits for it to be on disk, and the engine itself records an
operator's decision before it acts. A command taken again whose intent entry is on
the timeline followed by an operator's decision is not applied again: its outcome is
recorded as accepted from that decision. One whose intent entry is missing, or not
followed by a decision, was never carried out (the first owner stopped before, or
the state machine refused it): it is applied, which cannot act twice. This is the
one-daemon semantics: a decision recorded before a crash is not taken again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from psycopg.types.json import Jsonb

from lmwatch.cluster.pg import ENDED, Connection

CHANNEL_POSTED = "lmwatch_commands"
CHANNEL_DONE = "lmwatch_command_outcomes"

Kind = Literal["cancel", "force-complete"]
KINDS: tuple[Kind, ...] = ("cancel", "force-complete")
Result = Literal["accepted", "refused"]


@dataclass(frozen=True, slots=True)
class Command:
    id: int
    migration_id: str
    kind: Kind
    params: dict[str, Any]
    posted_by: str
    posted_at: datetime  # the database's clock
    taken_by: str | None = None
    takes: int = 0  # how many times it was taken (more than one: its taker stopped)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The owner's answer: `status` is what its API answers (202, or the refusal's
    status with `problem` its kind and `detail` its text); `result` the body's extra
    (a force-complete's decision)."""

    outcome: Result
    status: int
    applied_by: str
    problem: str | None = None
    detail: str | None = None
    result: dict[str, Any] | None = None

    @classmethod
    def accepted(cls, applied_by: str, result: dict[str, Any] | None = None) -> Outcome:
        return cls("accepted", 202, applied_by, result=result)

    @classmethod
    def refused(cls, applied_by: str, status: int, problem: str, detail: str) -> Outcome:
        return cls("refused", status, applied_by, problem=problem, detail=detail)


_COLUMNS = "id, migration_id, kind, params, posted_by, posted_at, taken_by, takes"
_TAKEN = ", ".join(f"c.{name}" for name in _COLUMNS.split(", "))


def _command(row: Any) -> Command:
    return Command(
        id=int(row[0]),
        migration_id=str(row[1]),
        kind=row[2],
        params=dict(row[3] or {}),
        posted_by=str(row[4]),
        posted_at=row[5],
        taken_by=row[6],
        takes=int(row[7]),
    )


def post(
    conn: Connection,
    migration_id: str,
    kind: Kind,
    params: dict[str, Any],
    posted_by: str,
) -> Command:
    """Record a command for the owner of `migration_id` and notify the owners."""
    if kind not in KINDS:
        raise ValueError(f"unknown command {kind!r}")
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO cluster_commands (migration_id, kind, params, posted_by)"
            f" VALUES (%s, %s, %s, %s) RETURNING {_COLUMNS}",
            (migration_id, kind, Jsonb(params), posted_by),
        ).fetchone()
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL_POSTED, migration_id))
    assert row is not None
    return _command(row)


def _claim(
    conn: Connection,
    which: str,
    params: dict[str, Any],
    taker: str,
    retake_after: float,
    limit: int,
    *,
    with_migration: bool = False,
) -> list[Command]:
    """Claim for `taker`, oldest first, the pending commands `which` picks (a condition
    on `c`, the command, and with `with_migration` on `m`, its migration): those
    nobody took, and those taken over `retake_after` seconds ago without an outcome.
    Rows another taker is claiming now are skipped."""
    joined = " JOIN migrations m ON m.id = c.migration_id" if with_migration else ""
    rows = conn.execute(
        "WITH free AS ("
        f"  SELECT c.id FROM cluster_commands c{joined}"
        f"  WHERE c.outcome IS NULL AND {which}"
        "    AND (c.taken_by IS NULL"
        "      OR c.taken_at < clock_timestamp() - make_interval(secs => %(retake)s))"
        "  ORDER BY c.id LIMIT %(limit)s"
        "  FOR UPDATE OF c SKIP LOCKED"
        ") "
        "UPDATE cluster_commands c SET taken_by = %(me)s, taken_at = clock_timestamp(),"
        " takes = c.takes + 1"
        " FROM free WHERE c.id = free.id RETURNING " + _TAKEN,
        {**params, "me": taker, "retake": retake_after, "limit": limit},
    ).fetchall()
    return sorted((_command(r) for r in rows), key=lambda c: c.id)


def take(
    conn: Connection,
    migration_ids: Iterable[str],
    taker: str,
    *,
    retake_after: float,
    limit: int = 100,
) -> list[Command]:
    """Claim the pending commands of these migrations for `taker`, oldest first: those
    nobody took, and those taken over `retake_after` seconds ago without an outcome
    (their taker stopped, or failed to carry them out; it may be this one, which takes
    one command at a time). Rows another taker is claiming now are skipped."""
    ids = list(migration_ids)
    if not ids:
        return []
    which = "c.migration_id = ANY(%(ids)s::text[])"
    return _claim(conn, which, {"ids": ids}, taker, retake_after, limit)


def take_ended(
    conn: Connection, taker: str, *, retake_after: float, limit: int = 100
) -> list[Command]:
    """Claim, as `take` does, the pending commands of migrations that have ended: no
    daemon supervises them any more, so any may answer them (with the refusal one
    daemon gives a command for an ended migration)."""
    which = "m.state = ANY(%(ended)s::text[])"
    params = {"ended": list(ENDED)}
    return _claim(conn, which, params, taker, retake_after, limit, with_migration=True)


def record(conn: Connection, command: Command, taker: str, outcome: Outcome) -> bool:
    """Record the outcome of a command `taker` holds and notify the waiters; False
    (nothing written) when it already has one or another taker holds it now."""
    with conn.transaction():
        row = conn.execute(
            "UPDATE cluster_commands SET outcome = %s, status = %s, problem = %s,"
            " detail = %s, result = %s, applied_by = %s, decided_at = clock_timestamp()"
            " WHERE id = %s AND outcome IS NULL AND taken_by = %s RETURNING id",
            (
                outcome.outcome,
                outcome.status,
                outcome.problem,
                outcome.detail,
                None if outcome.result is None else Jsonb(outcome.result),
                outcome.applied_by,
                command.id,
                taker,
            ),
        ).fetchone()
        if row is None:
            return False
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL_DONE, str(command.id)))
    return True


def outcome_of(conn: Connection, command_id: int) -> Outcome | None:
    row = conn.execute(
        "SELECT outcome, status, applied_by, problem, detail, result FROM cluster_commands"
        " WHERE id = %s AND outcome IS NOT NULL",
        (command_id,),
    ).fetchone()
    if row is None:
        return None
    return Outcome(
        outcome=row[0],
        status=int(row[1]),
        applied_by=str(row[2]),
        problem=row[3],
        detail=row[4],
        result=None if row[5] is None else dict(row[5]),
    )


def pending(conn: Connection, migration_id: str) -> list[Command]:
    """The commands of a migration without an outcome, oldest first."""
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM cluster_commands"
        " WHERE migration_id = %s AND outcome IS NULL ORDER BY id",
        (migration_id,),
    ).fetchall()
    return [_command(r) for r in rows]


def listen(conn: Connection, channel: str) -> None:
    conn.execute(f"LISTEN {channel}")


def wait_notified(conn: Connection, timeout: float, payload: str | None = None) -> bool:
    """Wait up to `timeout` seconds for a notification on a channel `conn` listens to
    (with `payload`, one carrying it); whether one came."""
    for notice in conn.notifies(timeout=max(timeout, 0.0)):
        if payload is None or notice.payload == payload:
            return True
    return False


def wait_outcome(
    conn: Connection, command: Command, timeout: float, *, poll: float = 1.0
) -> Outcome | None:
    """The command's outcome once recorded, waiting up to `timeout` seconds: woken by
    its notification, and reading it again every `poll` seconds (a notification is
    lost while a connection is down); None when none came in time."""
    listen(conn, CHANNEL_DONE)
    deadline = time.monotonic() + timeout
    while True:
        found = outcome_of(conn, command.id)
        if found is not None:
            return found
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        wait_notified(conn, min(poll, left), str(command.id))
