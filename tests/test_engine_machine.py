"""A migration's state machine: `step(status, event) -> (status, effects)`."""

from __future__ import annotations

import pytest

from lmwatch.engine.machine import (
    CancelBeforeStart,
    CancelJob,
    CancelRequested,
    Decide,
    EnterState,
    Finish,
    ForceRequested,
    Refusal,
    Refuse,
    Sampled,
    StartAgain,
    Status,
    step,
)
from lmwatch.model import Phase, State


def status(state: State = State.COPYING, **flags: bool) -> Status:
    return Status(id="m1", state=state, **flags)


# -- samples -------------------------------------------------------------------------


def test_a_job_stopped_to_start_again_starts_the_new_one_when_it_ends_cancelled() -> None:
    restarting = status(restarting=True)
    assert step(restarting, Sampled(Phase.CANCELLED)) == (restarting, (StartAgain(),))
    assert step(restarting, Sampled(Phase.COPYING)) == (restarting, ())  # nothing decided
    # It completed or failed before the cancel took: that is how the migration ended.
    assert step(restarting, Sampled(Phase.COMPLETED)) == (restarting, (Finish(),))
    assert step(restarting, Sampled(Phase.FAILED)) == (restarting, (Finish(),))
    assert step(status(), Sampled(Phase.CANCELLED)) == (status(), (Finish(),))


def test_a_sample_in_the_same_phase_asks_the_policy() -> None:
    assert step(status(), Sampled(Phase.COPYING)) == (status(), (Decide(),))


def test_the_job_moving_on_is_recorded_before_the_policy_is_asked() -> None:
    after, effects = step(status(), Sampled(Phase.COMPLETING))
    assert after == status(State.COMPLETING)
    assert effects == (EnterState(State.COMPLETING, handed_over=False), Decide())


def test_a_handover_seen_in_a_sample_marks_it_handed_over() -> None:
    after, effects = step(status(), Sampled(Phase.HANDOVER))
    assert after == status(State.HANDOVER, handed_over=True)
    assert effects == (EnterState(State.HANDOVER, handed_over=True), Decide())


def test_the_first_sample_after_the_start_moves_it_to_copying() -> None:
    after, effects = step(status(State.STARTING), Sampled(Phase.COPYING))
    assert after.state is State.COPYING
    assert effects[0] == EnterState(State.COPYING, handed_over=False)


@pytest.mark.parametrize("phase", [Phase.COMPLETED, Phase.CANCELLED, Phase.FAILED])
def test_an_ended_job_is_finished_and_nothing_else(phase: Phase) -> None:
    assert step(status(), Sampled(phase)) == (status(), (Finish(),))


def test_nothing_is_decided_once_the_hypervisor_took_a_cancel() -> None:
    """The effect runner used to skip decisions on a flag; the machine says it now."""
    assert step(status(cancelling=True), Sampled(Phase.COPYING)) == (status(cancelling=True), ())
    after, effects = step(status(cancelling=True), Sampled(Phase.COMPLETING))
    assert after.state is State.COMPLETING
    assert effects == (EnterState(State.COMPLETING, handed_over=False),)
    assert step(status(cancelling=True), Sampled(Phase.CANCELLED))[1] == (Finish(),)


# -- cancel ----------------------------------------------------------------------------


def test_cancel_while_copying_stops_the_job() -> None:
    assert step(status(), CancelRequested()) == (status(), (CancelJob(),))


def test_cancel_while_queued_ends_it_without_touching_a_host() -> None:
    after, effects = step(status(State.QUEUED), CancelRequested())
    assert after.state is State.CANCELLED
    assert effects == (CancelBeforeStart(),)


def test_a_second_cancel_does_nothing() -> None:
    assert step(status(cancelling=True), CancelRequested()) == (status(cancelling=True), ())


@pytest.mark.parametrize("state", [State.COMPLETED, State.CANCELLED, State.FAILED])
def test_cancel_after_the_end_is_refused(state: State) -> None:
    _, (effect,) = step(status(state), CancelRequested())
    assert effect == Refuse(Refusal.FINISHED, f"migration m1 has already {state.value}")


@pytest.mark.parametrize(
    "before", [status(State.HANDOVER), status(State.COMPLETING, handed_over=True)]
)
def test_cancel_after_a_handover_is_refused(before: Status) -> None:
    after, (effect,) = step(before, CancelRequested())
    assert after == before
    assert isinstance(effect, Refuse) and effect.rule is Refusal.HANDED_OVER


# -- force-complete ----------------------------------------------------------------------


def test_force_while_copying_asks_the_policy_for_a_forced_decision() -> None:
    assert step(status(), ForceRequested()) == (status(), (Decide(forced=True),))


@pytest.mark.parametrize(
    ("before", "rule"),
    [
        (status(State.FAILED), Refusal.FINISHED),
        (status(cancelling=True), Refusal.CANCELLING),
        (status(paused=True), Refusal.COMPLETING),
        (status(handed_over=True), Refusal.COMPLETING),
        (status(State.COMPLETING), Refusal.COMPLETING),
    ],
)
def test_force_is_refused_when_it_cannot_apply(before: Status, rule: Refusal) -> None:
    after, (effect,) = step(before, ForceRequested())
    assert after == before
    assert isinstance(effect, Refuse) and effect.rule is rule and "m1" in effect.text
