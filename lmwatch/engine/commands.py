"""Operator commands between daemons on one PostgreSQL store (lmwatch.cluster.commands).

- `CommandTaker`, the owner's side: on a notification, or every `command_poll`
  seconds, it takes the pending commands of the migrations this engine supervises
  (`Engine.supervised`, what "owned" means here) and applies each through the engine
  method the local API uses (`cancel`, `force_complete`), then records the outcome
  once the migration's timeline entries are written, so that whoever reads the store
  after the outcome sees them. It also answers the pending commands of migrations
  that ended before their owner took them (no daemon supervises those any more):
  with the refusal one daemon gives, recorded as the outcome only.
- `Relay`, the side of a daemon asked to act on a migration it does not supervise:
  post a command and wait, up to `command_wait` seconds, for the owner's outcome.

Nothing of this runs (nor is imported) with a SQLite store: one daemon supervises every unfinished
migration itself. The module docstring of lmwatch.cluster.commands says why a command
whose owner stopped between taking and recording it is never carried out twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg

from lmwatch.clock import outside
from lmwatch.cluster import commands
from lmwatch.cluster.commands import Command, Kind, Outcome
from lmwatch.cluster.pg import Connection, connect
from lmwatch.cluster.schema import ensure_schema
from lmwatch.drivers.base import DriverError
from lmwatch.engine.records import FORCE_PENDING
from lmwatch.errors import ProblemError, StoreUnavailable
from lmwatch.logs import get_logger
from lmwatch.model import Decision
from lmwatch.store import Event

if TYPE_CHECKING:
    from lmwatch.engine.core import Engine

log = get_logger("lmwatch.commands")
T = TypeVar("T")

COMMAND = "command"  # timeline data key: the id of the command an entry is about


def daemon_name() -> str:
    """Who this daemon is, as the timeline and the command table show it."""
    return f"{socket.gethostname()} pid {os.getpid()}"


def decision_json(decision: Decision) -> dict[str, Any]:
    """A force-complete's decision as its API answer shows it (`DecisionOut`)."""
    blackout = None if decision.prediction is None else decision.prediction.blackout_seconds
    return {
        "action": decision.action.value,
        "reason": decision.reason,
        "predicted_blackout_seconds": blackout,
    }


def outcome_json(outcome: Outcome) -> dict[str, Any]:
    return {
        "outcome": outcome.outcome,
        "status": outcome.status,
        "applied_by": outcome.applied_by,
        "problem": outcome.problem,
        "detail": outcome.detail,
        "result": outcome.result,
    }


def earlier_outcome(events: Sequence[Event], command: Command) -> Outcome | None:
    """What a command taken again had already done, read from its migration's timeline
    (the earlier owner's entries): the outcome it wrote there, or an operator's
    decision after its intent entry (the engine records a decision before acting, so
    an action that may have reached the hypervisor always shows); None: it was never
    carried out, and may be now."""
    intent: int | None = None
    for index, event in enumerate(events):
        if event.data.get(COMMAND) != command.id:
            continue
        if "outcome" in event.data:
            data = event.data
            return Outcome(
                outcome=data["outcome"],
                status=int(data["status"]),
                applied_by=str(data["applied_by"]),
                problem=data.get("problem"),
                detail=data.get("detail"),
                result=data.get("result"),
            )
        intent = index
    if intent is None:
        return None
    for event in events[intent + 1 :]:
        if FORCE_PENDING in event.data or (
            event.kind == "decision" and event.data.get("origin") == "operator"
        ):
            prediction = event.data.get("prediction") or {}
            result = None
            if command.kind == "force-complete":
                result = {
                    "action": event.action,
                    "reason": event.reason,
                    "predicted_blackout_seconds": prediction.get("blackout_seconds"),
                }
            return Outcome.accepted(str(command.taken_by), result)
    return None


class CommandTaker:
    """The owner's loop (one per engine on a PostgreSQL store)."""

    def __init__(self, engine: Engine, url: str, *, name: str | None = None) -> None:
        self.engine = engine
        self.url = url
        self.name = name or daemon_name()
        # One incarnation of this daemon (a restarted daemon is another taker).
        self.taker = f"{self.name} #{uuid.uuid4().hex[:8]}"
        self._conn: Connection | None = None  # takes and records
        self._listener: Connection | None = None  # LISTEN, waited on in its own thread
        self._work = ThreadPoolExecutor(1, thread_name_prefix="commands")
        self._listening = ThreadPoolExecutor(1, thread_name_prefix="commands-listen")
        self.applied = 0  # commands carried out (or found carried out) and recorded

    async def run(self) -> None:
        settings = self.engine.settings
        try:
            while True:
                try:
                    await self.round()
                except (psycopg.Error, OSError) as error:
                    log.warning("commands-unreachable", where=self.url_where, error=str(error))
                    await self._in(self._work, self._drop)
                await self._in(self._listening, self._wait, settings.command_poll)
        finally:
            self._work.submit(self._drop)
            self._listening.submit(self._drop_listener)
            self._work.shutdown(wait=False)
            self._listening.shutdown(wait=False)

    @property
    def url_where(self) -> str:
        return self.url.rsplit("@", 1)[-1]

    async def round(self) -> int:
        """Take and carry out the pending commands of the supervised migrations; how
        many were recorded."""
        ids = self.engine.supervised()
        retake = self.engine.settings.command_retake_after
        taken = await self._in(self._work, self._take, ids, retake) if ids else []
        ended = await self._in(self._work, self._take_ended, retake)
        done = 0
        for command, apply in [
            *((c, self.apply) for c in taken),
            *((c, self.answer) for c in ended),
        ]:
            try:
                done += await apply(command)
            except (psycopg.Error, OSError):
                raise
            except Exception:  # a bug, or the store: taken again after `retake_after`
                log.exception("command-failed", migration=command.migration_id, command=command.id)
        return done

    async def answer(self, command: Command) -> bool:
        """A command for a migration that ended before any owner took it: the answer
        one daemon gives (the engine refuses it, acting on nothing), or, taken again,
        what its earlier taker did. Nothing goes on the ended migration's timeline."""
        outcome = None
        if command.takes > 1:
            outcome = earlier_outcome(self.engine.store.events(command.migration_id), command)
        if outcome is None:
            outcome = await self._carry_out(command)
        log.info(
            "command-answered",
            migration=command.migration_id,
            command=command.id,
            kind=command.kind,
            outcome=outcome.outcome,
            detail=outcome.detail,
        )
        return await self._record_outcome(command, outcome)

    async def apply(self, command: Command) -> bool:
        engine = self.engine
        clog = log.bind(
            migration=command.migration_id,
            command=command.id,
            kind=command.kind,
            posted_by=command.posted_by,
            takes=command.takes,
        )
        outcome = None
        if command.takes > 1:
            outcome = earlier_outcome(engine.store.events(command.migration_id), command)
            if outcome is not None:
                clog.info("command-found-done", outcome=outcome.outcome)
        if outcome is None:
            engine.note(
                command.migration_id,
                f"{command.kind} asked through {command.posted_by} (command {command.id}); "
                f"carried out by {self.name}",
                {COMMAND: command.id, "posted_by": command.posted_by, "kind": command.kind},
            )
            await outside(engine.clock, engine.store.written())  # the intent, before acting
            outcome = await self._carry_out(command)
            said = "accepted" if outcome.outcome == "accepted" else f"refused: {outcome.detail}"
            engine.note(
                command.migration_id,
                f"{command.kind} (command {command.id}) {said}",
                {COMMAND: command.id, **outcome_json(outcome)},
            )
            clog.info("command-applied", outcome=outcome.outcome, detail=outcome.detail)
        await outside(engine.clock, engine.store.written())
        return await self._record_outcome(command, outcome)

    async def _record_outcome(self, command: Command, outcome: Outcome) -> bool:
        recorded = await self._in(self._work, self._record, command, outcome)
        if not recorded:
            log.warning(
                "command-outcome-not-recorded",
                migration=command.migration_id,
                command=command.id,
                why="taken again by another daemon",
            )
            return False
        self.applied += 1
        return True

    async def _carry_out(self, command: Command) -> Outcome:
        engine = self.engine
        try:
            if command.kind == "cancel":
                await engine.cancel(command.migration_id)
                return Outcome.accepted(self.name)
            accept_pause = bool(command.params.get("accept_pause", False))
            decision = await engine.force_complete(command.migration_id, accept_pause)
            return Outcome.accepted(self.name, decision_json(decision))
        except ProblemError as error:
            return Outcome.refused(self.name, error.status, error.kind, error.message)
        except DriverError as error:
            return Outcome.refused(
                self.name, 503, "hypervisor-error", f"the hypervisor failed: {error}"
            )

    # -- the database, on the worker threads ------------------------------------------

    async def _in(self, pool: ThreadPoolExecutor, work: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, work, *args)

    def _connection(self) -> Connection:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.url)
            ensure_schema(self._conn)
        return self._conn

    def _take(self, ids: list[str], retake_after: float) -> list[Command]:
        return commands.take(self._connection(), ids, self.taker, retake_after=retake_after)

    def _take_ended(self, retake_after: float) -> list[Command]:
        return commands.take_ended(self._connection(), self.taker, retake_after=retake_after)

    def _record(self, command: Command, outcome: Outcome) -> bool:
        return commands.record(self._connection(), command, self.taker, outcome)

    def _wait(self, timeout: float) -> None:
        try:
            if self._listener is None or self._listener.closed:
                self._listener = connect(self.url)
                commands.listen(self._listener, commands.CHANNEL_POSTED)
            commands.wait_notified(self._listener, timeout)
        except (psycopg.Error, OSError) as error:
            log.warning("commands-not-listening", where=self.url_where, error=str(error))
            self._drop_listener()
            time.sleep(timeout)

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _drop_listener(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                self._listener.close()
            self._listener = None


class Relay:
    """Posts commands for migrations another daemon supervises, and waits for their
    outcome (a connection per command, on threads of its own: a wait does not hold
    the threads the store's reads use)."""

    def __init__(self, url: str, *, name: str | None = None, wait: float, poll: float) -> None:
        self.url = url
        self.name = name or daemon_name()
        self.wait = wait
        self.poll = poll
        self._pool = ThreadPoolExecutor(16, thread_name_prefix="relay")

    async def ask(
        self, migration_id: str, kind: Kind, params: dict[str, Any]
    ) -> tuple[Command, Outcome | None]:
        """Post the command; it and the owner's outcome, or None if none came in time
        (the command stays recorded and is carried out when a daemon supervises the
        migration). StoreUnavailable when the database cannot be reached."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._ask, migration_id, kind, params)

    def _ask(
        self, migration_id: str, kind: Kind, params: dict[str, Any]
    ) -> tuple[Command, Outcome | None]:
        try:
            conn = connect(self.url)
        except psycopg.Error as error:
            raise self._unreachable(migration_id, kind, error) from None
        with conn:
            try:
                ensure_schema(conn)
                commands.listen(conn, commands.CHANNEL_DONE)  # before posting: hear every outcome
                command = commands.post(conn, migration_id, kind, params, self.name)
            except psycopg.Error as error:
                raise self._unreachable(migration_id, kind, error) from None
            log.info("command-posted", migration=migration_id, command=command.id, kind=kind)
            try:
                return command, commands.wait_outcome(conn, command, self.wait, poll=self.poll)
            except psycopg.Error as error:  # posted: it stands, its outcome is not known yet
                log.warning("command-outcome-unknown", command=command.id, error=str(error))
                return command, None

    def _unreachable(self, migration_id: str, kind: Kind, error: Exception) -> StoreUnavailable:
        where = self.url.rsplit("@", 1)[-1]
        return StoreUnavailable(
            f"the database at {where} cannot be reached to pass the {kind} on to the "
            f"daemon supervising migration {migration_id}: {error}; nothing was recorded; "
            "retry later"
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False)
