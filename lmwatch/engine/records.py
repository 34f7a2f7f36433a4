"""What the engine holds about each migration it supervises, and conversions of records."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from lmwatch.engine.machine import Status
from lmwatch.logs import get_logger
from lmwatch.metrics import MigrationGauges
from lmwatch.model import (
    Action,
    ChangeRate,
    JobResult,
    Method,
    MigrationRequest,
    Phase,
    Prediction,
    StartPlan,
)
from lmwatch.policies.placement import How
from lmwatch.policies.track import Track
from lmwatch.profiles.schema import Profile
from lmwatch.store import MigrationRecord

# Every module of the engine logs under one name, as the single module did.
log = get_logger("lmwatch.engine")


@dataclass
class Supervision:
    """Runtime state of one migration (owned by the engine, mutated in place)."""

    record: MigrationRecord
    profile: Profile
    generation: int
    track: Track  # its samples, folded in as they come (what the estimators keep)
    # Operator commands waiting for the supervision task, oldest first (see `Command`).
    inbox: deque[Command] = field(default_factory=deque)
    mail: asyncio.Event = field(default_factory=asyncio.Event)  # set when the inbox fills
    task: asyncio.Task[None] | None = None
    last_logged: tuple[Action, str, float] | None = None
    last_prediction: Prediction | None = None
    first_error_at: float | None = None  # start of the current run of driver errors
    failures: int = 0
    progress_saved_at: float = 0.0
    rate_saved: bool = False  # a stored progress shows the rate the link carries
    # Clock time the hypervisor took a cancel (the operator's or the policy's): the
    # state machine then waits for the job to end and decides nothing more.
    cancel_sent_at: float | None = None
    change_rate: ChangeRate | None = None  # measured (or reused) before start
    handed_over_at: float | None = None  # clock time the instance resumed on the destination
    paused_at: float | None = None  # clock time we paused it (None after a restart)
    # An operator's force-complete paused it: the pause is theirs, not held to the
    # profile's bound (the policy never cancels it for running long).
    pause_by_operator: bool = False
    # An operator asked to finish while the local disks were not in sync: applied once
    # they are (the value: whether a pause beyond the profile was accepted). Kept on
    # the timeline (`FORCE_PENDING` in an entry's data), so a restart restores it.
    force_pending: bool | None = None
    gauges: MigrationGauges | None = None  # its per-migration series, looked up once
    beat: float | None = None  # clock time its supervision last came round (watchdog)


def status_of(supervision: Supervision) -> Status:
    """What the state machine needs to know of a supervised migration, now."""
    record = supervision.record
    return Status(
        id=record.id,
        state=record.state,
        paused=record.paused,
        handed_over=record.handed_over,
        cancelling=supervision.cancel_sent_at is not None,
        restarting=restart_pending(supervision.record),
    )


def restart_pending(record: MigrationRecord) -> bool:
    """Whether the migration's job is being stopped to start again (the intent was
    recorded; the new job has not started yet)."""
    return record.restart is not None and record.restart.pending


# The answer to a command that needs a running job, while the migration starts again.
WAITING_TO_START = (
    "the migration waits to start again (its job has ended or is being stopped); "
    "nothing runs to finish yet"
)
FORCE_PENDING = "force_pending"  # timeline data key: a pending force-complete, or None
# Timeline data key: seconds a job lmwatch or an operator stopped took to end (on the
# pause's end, the new job's start, or the cancelled end), read back at start.
STOP_SECONDS = "stop_seconds"


@dataclass(frozen=True, slots=True)
class Cancel:
    """An operator's cancel."""


@dataclass(frozen=True, slots=True)
class Force:
    """An operator's force-complete."""

    accept_pause: bool = False


@dataclass(eq=False)
class Command:
    """An operator's command in a migration's inbox, with the future its caller awaits:
    the supervision task alone carries it out and answers (a result or the error)."""

    what: Cancel | Force
    answer: asyncio.Future[Any]

    def reply(self, value: Any) -> None:
        if not self.answer.done():
            self.answer.set_result(value)

    def fail(self, error: BaseException) -> None:
        if not self.answer.done():
            self.answer.set_exception(error)


def post(supervision: Supervision, what: Cancel | Force) -> asyncio.Future[Any]:
    """Put an operator's command in the migration's inbox; its answer comes later."""
    answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    # A caller that went away (shielded) leaves nobody to read a refusal: read it here.
    answer.add_done_callback(lambda done: done.cancelled() or done.exception())
    supervision.inbox.append(Command(what, answer))
    supervision.mail.set()
    return answer


def plan_from(record: MigrationRecord) -> StartPlan:
    assert record.plan is not None
    return record.plan


def request_of(record: MigrationRecord) -> MigrationRequest:
    return MigrationRequest(
        instance=record.instance,
        source=record.source,
        destination=record.destination,
        labels=dict(record.labels),
        profile=record.requested_profile,
        force=record.placement is not None and record.placement.how is How.FORCED,
    )


def metric_labels(record: MigrationRecord) -> tuple[str, str, str, str]:
    return (record.id, record.instance, record.source, record.destination)


def log_context(record: MigrationRecord) -> dict[str, str]:
    """The key=value context every log line about a migration carries."""
    return {
        "migration": record.id,
        "instance": record.instance,
        "source": record.source,
        "destination": record.destination,
    }


def method_of(result: JobResult, record: MigrationRecord) -> Method:
    """How an ended migration finished, for its outcome and the metrics."""
    if result.phase is Phase.FAILED:
        return Method.FAILED
    if result.phase is Phase.CANCELLED:
        return Method.CANCELLED
    if result.handed_over or record.handed_over:
        return Method.HANDOVER
    if result.paused or record.paused:
        return Method.PAUSED
    if result.slowdown > 0:
        return Method.SLOWED
    initial = None if record.plan is None else record.plan.blackout_budget
    if initial is not None and (record.blackout_budget or 0) > initial + 1e-9:
        return Method.BLACKOUT_RAISED
    return Method.CONVERGED
