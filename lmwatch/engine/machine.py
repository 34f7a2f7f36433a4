"""A migration's state machine: `step(status, event) -> (status, effects)`, pure.

The supervision loop and the operator commands feed it events (a sample came, an
operator asks to cancel or to force completion) and carry out the effects it
returns. Refusals carry a rule (`Refusal`), with the text shown to the operator.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from lmwatch.model import Phase, State

_STATE_OF_PHASE = {
    Phase.COPYING: State.COPYING,
    Phase.COMPLETING: State.COMPLETING,
    Phase.HANDOVER: State.HANDOVER,
}


@dataclass(frozen=True, slots=True)
class Status:
    """What the machine knows of one migration."""

    id: str
    state: State
    paused: bool = False
    handed_over: bool = False
    cancelling: bool = False  # a cancel reached the hypervisor; wait for it to end
    # The job is being stopped to start again with a new plan (`Action.RESTART`): its
    # end as cancelled starts the new job instead of ending the migration.
    restarting: bool = False


# -- events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sampled:
    """The driver reported the job in this phase."""

    phase: Phase


@dataclass(frozen=True, slots=True)
class CancelRequested:
    """An operator asks to cancel."""


@dataclass(frozen=True, slots=True)
class ForceRequested:
    """An operator asks to complete now."""


Event = Sampled | CancelRequested | ForceRequested


# -- effects ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnterState:
    """Record that the job moved on (to completing, handover)."""

    state: State
    handed_over: bool


@dataclass(frozen=True, slots=True)
class Decide:
    """Ask the policy what to do now (`forced`: an operator's force-complete)."""

    forced: bool = False


@dataclass(frozen=True, slots=True)
class Finish:
    """The job ended: fetch its result and record the end."""


@dataclass(frozen=True, slots=True)
class StartAgain:
    """The job stopped for a restart has ended as cancelled: start the new one."""


@dataclass(frozen=True, slots=True)
class CancelBeforeStart:
    """Record a queued migration as cancelled; nothing runs on a host yet."""


@dataclass(frozen=True, slots=True)
class CancelJob:
    """Ask the hypervisor to stop the job; it ends as cancelled later."""


class Refusal(StrEnum):
    FINISHED = "finished"
    HANDED_OVER = "handed-over"
    CANCELLING = "cancelling"
    COMPLETING = "completing"


@dataclass(frozen=True, slots=True)
class Refuse:
    """Refuse an operator's command (a conflict with the migration's state)."""

    rule: Refusal
    text: str


Effect = EnterState | Decide | Finish | StartAgain | CancelBeforeStart | CancelJob | Refuse


def step(status: Status, event: Event) -> tuple[Status, tuple[Effect, ...]]:
    """The migration's next status and what to do about the event."""
    match event:
        case Sampled(phase=phase):
            return _sampled(status, phase)
        case CancelRequested():
            return _cancel(status)
        case ForceRequested():
            return _force(status)


def _sampled(status: Status, phase: Phase) -> tuple[Status, tuple[Effect, ...]]:
    if phase is Phase.CANCELLED and status.restarting:
        return status, (StartAgain(),)
    if phase.finished:
        return status, (Finish(),)
    if status.restarting:
        return status, ()  # the job is being stopped: nothing to decide
    state = _STATE_OF_PHASE[phase]
    # Once the hypervisor took a cancel, nothing is decided: the job is ending.
    decide: tuple[Effect, ...] = () if status.cancelling else (Decide(),)
    if state is status.state:
        return status, decide
    handed_over = status.handed_over or state is State.HANDOVER
    entered = EnterState(state, handed_over=state is State.HANDOVER)
    return replace(status, state=state, handed_over=handed_over), (entered, *decide)


def _cancel(status: Status) -> tuple[Status, tuple[Effect, ...]]:
    if status.state.finished:
        text = f"migration {status.id} has already {status.state.value}"
        return status, (Refuse(Refusal.FINISHED, text),)
    if status.handed_over or status.state is State.HANDOVER:
        text = (
            "the instance already runs on the destination (handover); it can no longer be cancelled"
        )
        return status, (Refuse(Refusal.HANDED_OVER, text),)
    if status.state is State.QUEUED:
        return replace(status, state=State.CANCELLED), (CancelBeforeStart(),)
    if status.cancelling:
        return status, ()  # already being cancelled
    # `cancelling` holds once the hypervisor took the cancel (the effect runner knows).
    return status, (CancelJob(),)


def _force(status: Status) -> tuple[Status, tuple[Effect, ...]]:
    if status.state.finished:
        text = f"cannot force-complete: migration {status.id} has {status.state.value}"
        return status, (Refuse(Refusal.FINISHED, text),)
    if status.cancelling:
        return status, (Refuse(Refusal.CANCELLING, f"migration {status.id} is being cancelled"),)
    if status.paused or status.handed_over or status.state is State.COMPLETING:
        text = f"migration {status.id} is already completing"
        return status, (Refuse(Refusal.COMPLETING, text),)
    return status, (Decide(forced=True),)
