"""decide(): closed-loop scenarios over synthetic workloads, tables, and properties."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmwatch.model import MIB, Action, Decision, MigrationContext, Phase, Rule, Sample
from lmwatch.policies import DEFAULT, decide
from lmwatch.policies.estimators import analyse
from lmwatch.profiles.schema import Deadline, OnDeadline, Profile

try:
    from test_policies_support import (
        SWITCHOVER,
        Workload,
        context,
        history,
        plan,
        simulate,
        stalled_after,
        workload,
    )
except ImportError:  # tests collected as a package
    from tests.test_policies_support import (  # type: ignore[no-redef]
        SWITCHOVER,
        Workload,
        context,
        history,
        plan,
        simulate,
        stalled_after,
        workload,
    )

STUCK = workload(memory_mib=2048, change_mib=150, bandwidth_mib=100, ws_mib=1024)
# What a change-rate measurement over 2s before the start reads for STUCK: 300 MiB
# written, all of it distinct (a sequential writer, under the working set).
STUCK_MEASURED = 150 * MIB


def test_idle_instance_finishes_with_no_action() -> None:
    run = simulate(decide, Profile(name="p"), workload(4096, 0, 100, 1024), plan())
    assert run.outcome == "completed"
    assert set(run.actions) == {Action.CONTINUE}
    assert run.budgets == [0.3]
    assert run.decisions[1][1].reason.startswith("first pass, 33% copied")


def test_converging_busy_instance_finishes_with_no_action() -> None:
    run = simulate(decide, Profile(name="p"), workload(2048, 30, 100, 512), plan())
    assert run.outcome == "completed"
    assert set(run.actions) == {Action.CONTINUE}
    assert any("finishes on its own" in d.reason for _, d in run.decisions)


def test_the_first_pass_budget_is_raised_to_the_plans_once_the_first_pass_is_over() -> None:
    """Rule 3b: the hypervisor holds the first pass's lower budget while it copies the
    bulk of memory; the first decision after that pass raises it to the plan's, and the
    rules read the migration as if the plan's were in force."""
    w = workload(2048, 30, 100, 512)
    held = plan(first_pass_budget=0.05)
    ctx = context(w, held, budget=held.starting_budget)
    samples = history(w, budget=0.05)
    profile = Profile(name="p")
    first = [s for s in samples if s.passes == 1]
    during = decide(profile, first, ctx, first[-1].time)
    assert during.action is Action.CONTINUE and during.rule is Rule.FIRST_PASS
    upto = samples[: len(first) + 1]
    assert upto[-1].passes == 2
    after = decide(profile, upto, ctx, upto[-1].time)
    assert after.action is Action.RAISE_BLACKOUT and after.rule is Rule.FIRST_PASS_OVER
    assert after.blackout_budget == pytest.approx(0.3)
    assert "the first pass is over" in after.reason and "300ms" in after.reason
    # the prediction is the one made with the plan's budget
    planned = decide(profile, upto, replace(ctx, blackout_budget=0.3), upto[-1].time)
    assert planned.rule is not Rule.FIRST_PASS_OVER
    assert after.prediction == planned.prediction
    assert after.reason.endswith(f"; then: {planned.reason}")
    # an operator's request to finish raises it during the first pass already
    forced = decide(profile, first, replace(ctx, force=True), first[-1].time)
    assert forced.action is Action.RAISE_BLACKOUT and forced.rule is Rule.FIRST_PASS_OVER
    assert forced.reason.startswith("finishing on request: raising the blackout budget")


def test_a_forcing_decision_is_not_delayed_by_raising_the_first_pass_budget() -> None:
    """While the first pass's budget is still held (the raise was not taken, e.g. the
    daemon was away), a rule that hands over acts at once: the budget no longer
    matters."""
    profile = Profile(name="p", handover="allowed", max_degraded=120)
    held = plan(handover=True, first_pass_budget=0.05)
    ctx = context(STUCK, held, budget=held.starting_budget, deadline_at=3600)
    samples = history(STUCK, budget=0.05)
    upto = samples[: next(i for i, s in enumerate(samples) if s.passes == 3) + 1]
    decision = decide(profile, upto, ctx, upto[-1].time)
    planned = decide(profile, upto, replace(ctx, blackout_budget=0.3), upto[-1].time)
    assert planned.action is Action.HANDOVER
    assert decision == planned


def test_budget_raised_in_steps_until_the_floor_fits() -> None:
    # Working set 100MiB at 100MiB/s: the floor needs about 1s of blackout.
    profile = Profile(name="p", max_blackout=2.0)
    run = simulate(decide, profile, workload(2048, 150, 100, 100), plan())
    assert run.outcome == "completed"
    raises = [d for _, d in run.decisions if d.action is Action.RAISE_BLACKOUT]
    assert raises and len(run.budgets) == len(raises) + 1
    limit = profile.max_blackout - SWITCHOVER
    for before, after, decision in zip(run.budgets[:-1], run.budgets[1:], raises, strict=True):
        # each raise: at least a step, at most what the floor needs (with the margin)
        assert before < after <= limit
        step = max(before * DEFAULT.blackout_step_factor, before + DEFAULT.blackout_min_step)
        assert after >= min(step, limit) - 1e-9
        p = decision.prediction
        assert p is not None and p.floor_bytes is not None
        assert after <= max(step, p.floor_bytes / p.transfer_rate * DEFAULT.budget_margin) + 1e-9
    # the final stop: the remainder's copy within the budget, plus the switchover
    assert run.blackout is not None
    assert run.blackout <= run.budgets[-1] + SWITCHOVER <= profile.max_blackout


def test_no_raise_when_the_floor_needs_more_than_max_blackout() -> None:
    profile = Profile(name="p", max_blackout=0.5, may_pause=True, max_pause=30)
    run = simulate(decide, profile, STUCK, plan())
    assert Action.RAISE_BLACKOUT not in run.actions
    assert run.outcome == "pause"


def test_never_converging_is_handed_over_when_allowed() -> None:
    # The change rate measured before the start (150 MiB/s) outruns the link, so
    # copying cannot converge; handing over all 2 GiB (20s) would not fit 15s of
    # degraded running, the working set left after the first pass (10s) does.
    profile = Profile(name="p", handover="allowed", max_degraded=15)
    run = simulate(decide, profile, STUCK, plan(handover=True), measured=STUCK_MEASURED)
    assert run.outcome == "handover"
    _, decision = run.decisions[-1]
    assert "degraded" in decision.reason and decision.prediction is not None
    # right after the first pass, at the start of the second (where what is left is known)
    assert run.samples[-1].passes == 2
    # the working set, and the rest of pass 1 below the threshold (0.3 s at 100 MiB/s)
    assert STUCK.working_set < run.samples[-1].memory_remaining <= STUCK.working_set + 30 * MIB
    assert run.degraded is not None and run.degraded <= profile.max_degraded


def test_handed_over_at_once_when_the_prestart_rate_outruns_the_link_and_it_fits() -> None:
    # All 2 GiB at 100 MiB/s: about 21s of degraded running, within 60s with room to spare.
    profile = Profile(name="p", handover="allowed", max_degraded=60)
    run = simulate(decide, profile, STUCK, plan(handover=True), measured=STUCK_MEASURED)
    assert run.outcome == "handover"
    assert len(run.samples) == 1  # at the first sample
    assert "before the start" in run.decisions[-1][1].reason
    assert run.degraded is not None and run.degraded <= profile.max_degraded


def test_a_first_pass_handover_waits_when_the_pass_end_may_leave_much_less() -> None:
    # All 2 GiB at 100 MiB/s: about 21s of degraded running, within 60s with room to
    # spare. But the measurement before the start counted only 300 MiB in its 2s: the
    # first pass's end may leave as little as that (3s to move), so waiting may shorten
    # the degraded running by far more than it delays the finish. It leaves the 1 GiB
    # working set: 10s of degraded running instead of 21s, for 10s more in all.
    profile = Profile(name="p", handover="allowed", max_degraded=60)
    run = simulate(decide, profile, STUCK, plan(handover=True), measured=STUCK_MEASURED, window=2.0)
    first = run.decisions[0][1]
    assert first.action is Action.CONTINUE
    assert "about 20.5s of degraded running, while the pass's end may leave as little as 3.0s" in (
        first.reason
    ), first.reason
    assert run.outcome == "handover"
    assert run.samples[-1].passes == 2  # at the start of pass 2
    assert run.degraded is not None and run.degraded <= 11.0


def test_a_first_pass_pause_waits_when_the_pass_end_may_leave_much_less() -> None:
    # As above, with a pause allowed for 60s instead of a handover: pausing now would
    # stop the instance for all of memory's copy; the pass's end leaves the working set.
    profile = Profile(name="p", may_pause=True, max_pause=60)
    run = simulate(decide, profile, STUCK, plan(), measured=STUCK_MEASURED, window=2.0)
    first = run.decisions[0][1]
    assert first.action is Action.CONTINUE
    assert "a pause now would stop the instance for about 20.5s, while" in first.reason
    assert run.outcome == "pause"
    assert run.samples[-1].passes == 2


def test_a_first_pass_handover_comes_at_once_when_the_pass_end_leaves_as_much() -> None:
    # 512 MiB, every page of it rewritten at 150 MiB/s, over a 100 MiB/s link: the 5s
    # measurement counted all of memory, so the first pass (5.1s) leaves all of it as
    # well. Waiting would not shorten the degraded running: hand over at once.
    guest = workload(memory_mib=512, change_mib=150, bandwidth_mib=100, ws_mib=512)
    profile = Profile(name="p", handover="allowed", max_degraded=60)
    measured = 512 * MIB / 5.0  # distinct pages over the window: all of memory
    run = simulate(decide, profile, guest, plan(handover=True), measured=measured, window=5.0)
    assert run.outcome == "handover"
    assert len(run.samples) == 1, [d.reason for _, d in run.decisions]


def test_a_first_pass_handover_that_fits_without_room_to_spare_waits_for_the_pass_end() -> None:
    # About 21s of degraded running fits 30s, but not 1.5 times over: a link that slowed
    # under it would break the limit, and a handover cannot be taken back. After the
    # first pass only the rewritten working set (1 GiB, about 10s) is left.
    profile = Profile(name="p", handover="allowed", max_degraded=30)
    run = simulate(decide, profile, STUCK, plan(handover=True), measured=STUCK_MEASURED)
    first = run.decisions[0][1]
    assert first.action is Action.CONTINUE
    assert (
        "about 20.5s of degraded running, within the 30.0s limit but not 1.5 times" in first.reason
    )
    assert run.outcome == "handover"
    assert run.samples[-1].passes == 2  # at the start of pass 2
    assert run.degraded is not None and run.degraded <= profile.max_degraded / 2


def test_without_a_prestart_measurement_exactly_one_more_pass_decides() -> None:
    # Pass 1 alone reads as 50 MiB/s over all memory (it could converge); pass 2 lasts
    # half as long and leaves as much behind: saturated. The handover comes then, not
    # after a fixed count of passes.
    profile = Profile(name="p", handover="allowed", max_degraded=30)
    run = simulate(decide, profile, STUCK, plan(handover=True))
    assert run.outcome == "handover"
    assert run.samples[-1].passes == 3
    assert run.samples[-2].passes == 2  # decided at the first sample of pass 3


def test_handover_waits_when_degraded_time_would_be_too_long() -> None:
    profile = Profile(name="p", handover="allowed", max_degraded=5)
    run = simulate(decide, profile, STUCK, plan(handover=True))
    assert run.outcome == "cancel"  # 10s of degraded running > 5s; nothing else allowed
    assert Action.HANDOVER not in run.actions


def test_a_switch_measured_longer_than_any_stop_allowed_cancels_at_once() -> None:
    # The switch alone (stop, device state, resume) took 250 ms each time it was measured
    # between these hosts; the profile allows the instance 200 ms stopped. A handover's
    # blackout is that switch: it could not stay within the profile, nor a final stop.
    profile = Profile(name="p", max_blackout=0.2, handover="allowed", max_degraded=30)
    samples = history(STUCK, max_passes=2, budget=0.0, polls_per_pass=1)
    now = samples[-1].time
    ctx = context(STUCK, plan(handover=True, budget=0.0), switchover=0.25)
    measured = replace(ctx, switchover_least=0.25)
    decision = decide(profile, samples, measured, now)
    assert decision.action is Action.CANCEL and decision.rule is Rule.SWITCH_OUTLASTS_BOUND
    assert "at least 250ms" in decision.reason and "the 200ms" in decision.reason
    # not measured (the default assumed for the pair): no such verdict
    assert decide(profile, samples, ctx, now).action is Action.HANDOVER
    # one switch measured short enough (the longest may have been slowed): no verdict
    assert decide(profile, samples, replace(ctx, switchover_least=0.15), now).action is (
        Action.HANDOVER
    )
    # where pausing is allowed a stop may last max_pause, which the switch fits
    pausing = profile.model_copy(update={"may_pause": True, "max_pause": 5.0})
    assert decide(pausing, samples, measured, now).rule is not Rule.SWITCH_OUTLASTS_BOUND
    # an operator who asked to finish is not answered by a cancel
    forced = decide(profile, samples, replace(measured, force=True, accept_pause=True), now)
    assert forced.rule is Rule.OPERATOR_FINISH and forced.action is not Action.CANCEL


def test_never_converging_is_paused_when_the_pause_fits() -> None:
    profile = Profile(name="p", may_pause=True, max_pause=15)
    run = simulate(decide, profile, STUCK, plan())
    assert run.outcome == "pause"
    _, decision = run.decisions[-1]
    assert "pausing" in decision.reason


def test_pause_that_does_not_fit_is_not_chosen() -> None:
    profile = Profile(name="p", may_pause=True, max_pause=5)
    run = simulate(decide, profile, STUCK, plan())
    assert run.outcome == "cancel"
    assert Action.PAUSE not in run.actions


def test_a_handover_that_fits_comes_before_waiting_for_the_throttle() -> None:
    profile = Profile(name="p", may_slow_down=True, handover="allowed", max_degraded=60)
    run = simulate(decide, profile, STUCK, plan(handover=True, slow_down=True), max_passes=200)
    assert run.outcome == "handover"
    # within the first passes: at most the hypervisor's first throttle step was taken
    assert run.samples[-1].passes <= 3
    assert run.slowdown <= DEFAULT.slow_down_initial
    assert run.degraded is not None and run.degraded <= profile.max_degraded


def test_slowed_guest_is_paused_once_a_pause_costs_it_less_than_the_slowing() -> None:
    # At 70% slowed, 300MiB/s becomes 90MiB/s over a 100MiB/s link: copying converges,
    # in minutes, with the guest losing 70% of each of them; an 8s pause fits sooner.
    w = workload(memory_mib=8192, change_mib=300, bandwidth_mib=100, ws_mib=8192)
    start = plan(slow_down=True, slow_down_initial=0.7)
    profile = Profile(name="p", may_slow_down=True, may_pause=True, max_pause=8)
    paused = simulate(decide, profile, w, start, max_passes=200)
    assert paused.outcome == "pause"
    assert paused.blackout is not None and paused.blackout <= 8
    rules = [d.rule for _, d in paused.decisions if d.action is not Action.CONTINUE]
    assert rules == [Rule.PAUSE_CHEAPER_THAN_SLOWING]
    last = paused.decisions[-1][1]
    assert "converges only with the guest slowed by" in last.reason
    assert "pausing now" in last.reason
    # Without pausing allowed it converges slowed, as before.
    alone = simulate(
        decide, profile.model_copy(update={"may_pause": False}), w, start, max_passes=200
    )
    assert alone.outcome == "completed"
    assert paused.ended_at is not None and alone.ended_at is not None
    assert paused.ended_at < alone.ended_at


def test_converging_unslowed_guest_is_not_paused() -> None:
    profile = Profile(name="p", may_slow_down=True, may_pause=True, max_pause=8)
    run = simulate(decide, profile, workload(2048, 30, 100, 512), plan(slow_down=True))
    assert run.outcome == "completed"
    assert set(run.actions) == {Action.CONTINUE}


def decide_without_restarts(
    profile: Profile, history: Sequence[Sample], ctx: MigrationContext, now: float
) -> Decision:
    """`decide` for a migration that was started again already (`max_restarts`)."""
    return decide(profile, history, ctx, now, replace(DEFAULT, max_restarts=0))


def test_slowed_when_nothing_quicker_fits() -> None:
    profile = Profile(name="p", may_slow_down=True)
    # Two passes that both filled STUCK's working set tell its rate only from below
    # (713 MiB/s read for 150 MiB/s): a job started again from 80 % is projected at
    # about half the time the hypervisor's schedule still needs, and lmwatch starts
    # again (rule 10b). Once that was done, the schedule is what is left:
    restarted = simulate(decide, profile, STUCK, plan(slow_down=True), max_passes=200)
    assert restarted.outcome == "restart"
    _, last = restarted.decisions[-1]
    assert last.rule is Rule.START_AGAIN
    run = simulate(decide_without_restarts, profile, STUCK, plan(slow_down=True), max_passes=200)
    assert run.outcome == "completed"
    assert run.slowdown > 0  # the hypervisor slowed the guest; lmwatch waited for it
    assert run.blackout is not None and run.blackout <= profile.max_blackout
    # One pass (nothing measured before the start) cannot tell a steady writer over
    # all of memory, at which copying would converge, from one that filled a working
    # set of its count (rule 5c): no ETA. The next count tells; from then the ETA
    # counts the throttle the hypervisor will add.
    second = next(d for t, d in run.decisions if t >= 20.0)
    assert second.rule is Rule.ONE_PASS_EITHER_WAY
    assert second.prediction is not None and second.prediction.eta_seconds is None
    third = next(d for t, d in run.decisions if d.rule is not Rule.ONE_PASS_EITHER_WAY and t > 20)
    assert third.rule is Rule.SLOWING
    assert third.prediction is not None and third.prediction.eta_seconds is not None
    assert Action.CANCEL not in run.actions


def test_slowed_while_a_handover_does_not_fit() -> None:
    # 5s of degraded running is too little for the working set (10s): the throttle rises,
    # the passes shrink, and it finishes on its own or by a handover that now fits.
    profile = Profile(name="p", may_slow_down=True, handover="allowed", max_degraded=5)
    start = plan(handover=True, slow_down=True)
    run = simulate(decide_without_restarts, profile, STUCK, start, max_passes=200)
    assert run.outcome in ("handover", "completed")
    assert run.slowdown > 0
    if run.outcome == "handover":
        assert run.degraded is not None and run.degraded <= profile.max_degraded
    else:
        assert run.blackout is not None and run.blackout <= profile.max_blackout


def test_slowing_too_slow_for_the_deadline_falls_back_to_handover() -> None:
    profile = Profile(name="p", may_slow_down=True, handover="allowed", max_degraded=60)
    run = simulate(decide, profile, STUCK, plan(handover=True, slow_down=True), deadline_at=40.0)
    assert run.outcome == "handover"
    assert run.ended_at is not None and run.ended_at < 40.0


def test_slowing_not_armed_is_not_relied_upon() -> None:
    profile = Profile(name="p", may_slow_down=True)
    run = simulate(decide, profile, STUCK, plan(slow_down=False))
    assert run.outcome == "cancel"
    assert "not armed" in run.decisions[-1][1].reason


def test_cancelled_before_the_deadline_once_waiting_stopped_paying() -> None:
    # Steady, hopeless, nothing allowed: not cancelled after a fixed count of passes,
    # but once patience (a share of the deadline window) has run out, well before the
    # deadline itself.
    deadline = 3600.0
    profile = Profile(name="p", deadline=Deadline(fixed=deadline))
    run = simulate(decide, profile, STUCK, plan(), deadline_at=deadline, max_passes=400)
    assert run.outcome == "cancel"
    assert run.ended_at is not None
    pass_seconds = STUCK.working_set / STUCK.bandwidth
    assert DEFAULT.patience * deadline - pass_seconds <= run.ended_at
    assert run.ended_at <= DEFAULT.patience * deadline + pass_seconds < deadline
    reason = run.decisions[-1][1].reason
    assert "nothing this profile allows can finish it" in reason
    assert "100.0MiB/s" in reason and "1.0GiB" in reason  # the link, the working set
    assert "steady" in reason
    # until then it said why it kept waiting
    waiting = [d.reason for _, d in run.decisions[:-1] if d.reason.startswith("copying cannot")]
    assert waiting and all("waiting" in reason for reason in waiting)


def test_handover_never_chosen_when_not_armed_at_start() -> None:
    # The profile allows it (e.g. edited after start) but it was not armed.
    profile = Profile(name="p", handover="allowed", max_degraded=300)
    run = simulate(decide, profile, STUCK, plan(handover=False))
    assert Action.HANDOVER not in run.actions
    assert "not armed" in run.decisions[-1][1].reason


# A known defect of the policy (reported to its owner): the row marked with it states
# the intended behaviour and is expected to fail until the defect is fixed.
@pytest.mark.parametrize(
    ("profile", "arm_handover", "expected", "words", "early", "early_words"),
    [
        pytest.param(
            Profile(name="c", on_deadline=OnDeadline.CANCEL, may_pause=True, max_pause=60),
            False,
            Action.CANCEL,
            "says cancel",
            Action.CONTINUE,  # cancel waits for the deadline itself
            "first pass",
            id="cancel",
        ),
        pytest.param(
            Profile(name="h", on_deadline=OnDeadline.COMPLETE, handover="allowed"),
            True,
            Action.HANDOVER,
            "limit 30.0s",
            Action.HANDOVER,  # finishing takes longer than the second left: act now
            "the deadline is 1.0s away",
            id="handover",
        ),
        # complete within the profile: a pause that fits...
        pytest.param(
            Profile(name="q", on_deadline=OnDeadline.COMPLETE, may_pause=True, max_pause=30),
            False,
            Action.PAUSE,
            "limit 30.0s",
            Action.PAUSE,
            "the deadline is 1.0s away",
            id="pause",
        ),
        # ...but one that would exceed max_pause is not taken: it cancels instead
        pytest.param(
            Profile(name="q2", on_deadline=OnDeadline.COMPLETE, may_pause=True, max_pause=2),
            False,
            Action.CANCEL,
            "nothing it allows",
            Action.CANCEL,
            "the deadline is 1.0s away",
            id="pause-too-long",
        ),
        pytest.param(
            Profile(name="r", on_deadline=OnDeadline.COMPLETE, max_blackout=30),
            False,
            Action.RAISE_BLACKOUT,
            "raising the blackout budget",
            Action.CONTINUE,  # only copying can finish it: nothing to start early
            "first pass",
            id="raise",
        ),
        pytest.param(
            Profile(name="n", on_deadline=OnDeadline.COMPLETE, handover="allowed"),
            False,
            Action.CANCEL,
            "nothing it allows",
            # the first pass cannot end in time and nothing could finish it: now
            Action.CANCEL,
            "the first pass alone needs",
            id="nothing",
        ),
    ],
)
def test_on_deadline_is_honoured(
    profile: Profile,
    arm_handover: bool,
    expected: Action,
    words: str,
    early: Action,
    early_words: str,
) -> None:
    # Still in the first pass: a deadline forces a decision even then.
    samples = history(STUCK, max_passes=1)
    now = samples[-1].time
    start_plan = plan(handover=arm_handover)

    def at(deadline: float):  # type: ignore[no-untyped-def]
        return decide(profile, samples, context(STUCK, start_plan, deadline_at=deadline), now)

    decision = at(now - 1.0)
    assert decision.action is expected
    assert words in decision.reason
    assert decision.reason.startswith("deadline reached")
    assert decision.prediction is not None
    if expected is Action.RAISE_BLACKOUT:
        assert decision.blackout_budget is not None
        assert decision.blackout_budget <= profile.max_blackout - SWITCHOVER
    # A second before the deadline: `complete` acts already when a handover or a pause
    # must start early to finish in time; `cancel` waits for the deadline.
    decision = at(now + 1.0)
    assert decision.action is early
    assert early_words in decision.reason
    # Long before it, nothing is forced.
    assert at(now + 120.0).action is Action.CONTINUE


def test_deadline_cancel_even_when_converging() -> None:
    w = workload(2048, 30, 100, 512)
    samples = history(w, max_passes=2)
    ctx = context(w, deadline_at=1.0)
    decision = decide(Profile(name="p"), samples, ctx, now=samples[-1].time)
    assert decision.action is Action.CANCEL


@pytest.mark.parametrize(
    ("kw", "phase"),
    [
        ({"paused": True}, Phase.COPYING),
        ({"handed_over": True}, Phase.COPYING),
        ({}, Phase.COMPLETING),
        ({}, Phase.HANDOVER),
        ({}, Phase.COMPLETED),
    ],
)
def test_nothing_to_do_past_copying(kw: dict[str, bool], phase: Phase) -> None:
    samples = history(STUCK, max_passes=4)
    samples[-1] = replace(samples[-1], phase=phase)
    ctx = context(STUCK, deadline_at=1.0, **kw)  # even past the deadline
    decision = decide(Profile(name="p", on_deadline=OnDeadline.CANCEL), samples, ctx, now=1e6)
    assert decision.action is Action.CONTINUE


def test_edited_profile_lowers_a_budget_above_its_max() -> None:
    samples = history(STUCK, max_passes=3)
    ctx = context(STUCK, plan(budget=1.0))
    decision = decide(Profile(name="p", max_blackout=0.2), samples, ctx, now=samples[-1].time)
    assert decision.action is Action.RAISE_BLACKOUT
    # lowered to what 200ms leaves after the switchover
    assert decision.blackout_budget == pytest.approx(0.2 - SWITCHOVER)
    assert "switchover" in decision.reason


def test_force_flag_finishes_now_through_decide() -> None:
    samples = history(STUCK, max_passes=2)
    ctx = context(STUCK, plan(handover=True), force=True)
    decision = decide(Profile(name="p", handover="allowed"), samples, ctx, now=samples[-1].time)
    assert decision.action is Action.HANDOVER
    refused = decide(Profile(name="p"), samples, ctx, now=samples[-1].time)
    assert refused.action is Action.CONTINUE  # refused force: keep supervising


def _with_pass_starts(
    starts_mib: list[float], change_mib: float, noisy: bool = False
) -> list[Sample]:
    """Pass-start samples with given remainders; transfer 100MiB/s, change as given.

    Each pass is sent to its end (what was rewritten is then the whole next remainder).
    """
    samples = []
    t = 0.0
    sent = 0.0
    for n, start in enumerate(starts_mib, 1):
        rate = 100 * MIB * ((0.4 if n % 2 else 1.6) if noisy else 1.0)
        samples.append(
            replace(
                history(STUCK, max_passes=1, polls_per_pass=1)[0],
                time=t,
                passes=n,
                memory_remaining=int(start * MIB),
                memory_transferred=int(sent * MIB),
                transfer_rate=rate,
                change_rate=change_mib * MIB if n >= 2 else 0.0,
            )
        )
        t += start / 100
        sent += start
    return samples


def test_waits_while_the_remainder_still_shrinks() -> None:
    samples = _with_pass_starts([2048, 1500, 1000, 600], change_mib=120)
    decision = decide(Profile(name="p"), samples, context(STUCK), now=samples[-1].time)
    assert decision.action is Action.CONTINUE
    # Passes shrinking by a steady factor are copying that converges (the fitted model
    # says so); otherwise the shrinking, or the quieter passes, are the hope.
    assert any(
        words in decision.reason
        for words in ("still shrinking", "quieter phase", "finishes on its own")
    )
    # A plateau is not enough by itself: a few passes in, it still waits...
    plateau = _with_pass_starts([2048, 1000, 1000, 1000], change_mib=120)
    decision = decide(Profile(name="p"), plateau, context(STUCK), now=plateau[-1].time)
    assert decision.action is Action.CONTINUE
    # ...and once the rates have been steady and patience (no deadline: min_patience)
    # has run out, it cancels.
    passes = int(DEFAULT.min_patience / 10) + 2  # 10s a pass
    plateau = _with_pass_starts([2048, *[1000] * passes], change_mib=120)
    assert plateau[-1].time > DEFAULT.min_patience
    decision = decide(Profile(name="p"), plateau, context(STUCK), now=plateau[-1].time)
    assert decision.action is Action.CANCEL


def test_unsteady_rates_leave_hope_for_a_while() -> None:
    samples = _with_pass_starts([2048, *[1000] * 3], change_mib=300, noisy=True)
    decision = decide(Profile(name="p"), samples, context(STUCK), now=samples[-1].time)
    assert decision.action is Action.CONTINUE
    assert "rates still vary" in decision.reason
    # Noisy transfer readings do not keep it waiting for ever: the passes themselves
    # (what each left behind, and when) become steady evidence.
    passes = int(DEFAULT.min_patience / 10) + 10
    longer = _with_pass_starts([2048, *[1000] * passes], 300, noisy=True)
    decision = decide(Profile(name="p"), longer, context(STUCK), now=longer[-1].time)
    assert decision.action is Action.CANCEL
    assert "steady" in decision.reason


def test_empty_history_continues() -> None:
    decision = decide(Profile(name="p"), [], context(STUCK), now=0.0)
    assert decision.action is Action.CONTINUE and decision.prediction is not None


# --- properties ---------------------------------------------------------------------

profiles = st.builds(
    lambda blackout, slow, handover, degraded, pause, extra, on_deadline: Profile(
        name="p",
        max_blackout=blackout,
        may_slow_down=slow,
        handover="allowed" if handover else "forbidden",
        max_degraded=degraded,
        may_pause=pause,
        max_pause=blackout + extra if pause else 0.0,
        on_deadline=on_deadline,
    ),
    st.floats(0.01, 5.0),
    st.booleans(),
    st.booleans(),
    st.floats(0.0, 120.0),
    st.booleans(),
    st.floats(0.0, 60.0),
    st.sampled_from(list(OnDeadline)),
)
workloads = st.builds(
    lambda memory, change, bandwidth, ws: Workload(
        memory=memory * MIB,
        change=change * MIB,
        bandwidth=bandwidth * MIB,
        working_set=min(ws, memory) * MIB,
    ),
    st.integers(64, 16384),
    st.floats(0.0, 2000.0),
    st.floats(1.0, 2000.0),
    st.integers(1, 16384),
)
cases = st.tuples(
    profiles,
    workloads,
    st.integers(1, 8),  # passes
    st.floats(0.001, 5.0),  # budget
    st.floats(0.0, 0.99),  # slowdown
    st.booleans(),  # arm handover
    st.booleans(),  # arm slow-down
    st.booleans(),  # change rate reported
    st.integers(1, 4),  # polls per pass
)
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(cases, st.data())
def test_decide_never_raises_and_explains_every_action(case, data) -> None:  # type: ignore[no-untyped-def]
    profile, w, passes, budget, slowdown, arm_h, arm_s, report, polls = case
    samples = history(
        w,
        max_passes=passes,
        budget=budget,
        slowdown=slowdown,
        polls_per_pass=polls,
        report_change=report,
    )
    cut = data.draw(st.integers(0, len(samples)))
    deadline = data.draw(st.one_of(st.none(), st.floats(0.0, 1e5)))
    now = samples[cut - 1].time if cut else 0.0
    ctx = context(w, plan(handover=arm_h, slow_down=arm_s, budget=budget), deadline_at=deadline)
    decision = decide(profile, samples[:cut], ctx, now)
    assert decision.prediction is not None
    assert decision.reason.strip()
    assert decision.rule is not None  # the engine compares rules, never the reason's text
    if decision.action is Action.RAISE_BLACKOUT:
        # never more than max_blackout leaves after the switchover (0 when it leaves nothing)
        assert decision.blackout_budget is not None
        assert 0 <= decision.blackout_budget <= max(0.0, profile.max_blackout - SWITCHOVER)
    if decision.action is Action.HANDOVER:
        assert arm_h and profile.handover_allowed
    if decision.action is Action.PAUSE:
        assert profile.may_pause


@PROPS
@given(cases)
def test_raises_go_toward_the_floor_and_never_past_what_max_blackout_leaves(case) -> None:  # type: ignore[no-untyped-def]
    """Each raise is at least one step (or up to the limit) and at most what the floor
    needs with the margin; never above max_blackout less the switchover."""
    profile, w, passes, _, slowdown, arm_h, arm_s, report, polls = case
    samples = history(
        w, max_passes=passes, slowdown=slowdown, polls_per_pass=polls, report_change=report
    )
    limit = max(0.0, profile.max_blackout - SWITCHOVER)
    budget = min(DEFAULT.initial_blackout, limit)  # as plan_start picks it
    for cut in range(1, len(samples) + 1):
        ctx = context(w, plan(handover=arm_h, slow_down=arm_s), budget=budget)
        decision = decide(profile, samples[:cut], ctx, samples[cut - 1].time)
        if decision.action is Action.RAISE_BLACKOUT:
            new = decision.blackout_budget
            assert new is not None
            assert budget < new <= limit
            step = max(budget * DEFAULT.blackout_step_factor, budget + DEFAULT.blackout_min_step)
            assert new >= min(step, limit) - 1e-9
            prediction = decision.prediction
            assert prediction is not None and prediction.floor_bytes is not None
            need = prediction.floor_bytes / prediction.transfer_rate
            assert new <= max(step, need * DEFAULT.budget_margin) + 1e-9
            budget = new


@PROPS
@given(cases, st.one_of(st.none(), st.floats(0.0, 1e5)))
def test_nothing_forced_before_the_first_full_pass(case, deadline) -> None:  # type: ignore[no-untyped-def]
    """Without a deadline nothing is forced in pass 1; with one, only when it is close
    enough to matter: finishing (or the first pass itself) would take longer."""
    profile, w, _, budget, slowdown, arm_h, arm_s, report, polls = case
    budget = min(budget, max(0.0, profile.max_blackout - SWITCHOVER))
    samples = history(
        w, max_passes=1, slowdown=slowdown, polls_per_pass=polls, report_change=report
    )
    samples = [s for s in samples if s.passes < 2]
    first_pass = w.memory / w.bandwidth
    for sample in samples:
        ctx = context(w, plan(handover=arm_h, slow_down=arm_s, budget=budget), deadline_at=deadline)
        decision = decide(profile, samples[: samples.index(sample) + 1], ctx, sample.time)
        # finishing from anywhere in pass 1 takes at most a whole copy of memory (with
        # margins), the first pass ends within one more, and the policy keeps two polls
        # in hand (a poll is taken as 1s until two samples tell)
        poll = max(first_pass / polls, 1.0)
        far = deadline is None or deadline - sample.time > 3 * first_pass + 2 * poll + 1.0
        if far:
            assert decision.action is Action.CONTINUE, decision.reason
        elif decision.action is Action.CANCEL and (deadline is None or sample.time < deadline):
            assert "deadline" in decision.reason


@PROPS
@given(cases)
def test_handover_never_without_arming(case) -> None:  # type: ignore[no-untyped-def]
    profile, w, passes, budget, slowdown, _, arm_s, report, polls = case
    samples = history(
        w,
        max_passes=passes,
        budget=budget,
        slowdown=slowdown,
        polls_per_pass=polls,
        report_change=report,
    )
    ctx = context(w, plan(handover=False, slow_down=arm_s, budget=budget), deadline_at=0.0)
    for cut in range(1, len(samples) + 1):
        for now in (samples[cut - 1].time, -1.0):
            decision = decide(profile, samples[:cut], ctx, now)
            assert decision.action is not Action.HANDOVER


def test_capped_change_rate_readings_do_not_make_the_current_slowdown_look_enough() -> None:
    """Readings capped by what a pass sees (30 MiB/s) can say "enough" while copying still
    stalls: the model reads the writing from what the passes leave behind instead, and
    the ETA counts the throttle steps still to come."""
    profile = Profile(name="p", may_slow_down=True)
    w = workload(1024, 400, 100, 512)
    samples = history(w, max_passes=4, slowdown=0.4)
    capped = [replace(s, change_rate=min(s.change_rate, 30 * MIB)) for s in samples]
    ctx = context(w, plan(slow_down=True), deadline_at=10_000.0)
    decision = decide(profile, capped, ctx, capped[-1].time)
    assert decision.action is Action.CONTINUE
    a = analyse(capped, ctx)
    assert a.model is not None
    assert a.model.rate * (1 - 0.4) > w.bandwidth  # still faster than the link at 40 %
    # expected to finish (slowed further), after at least two more throttle steps of
    # two passes of the working set each
    assert decision.prediction is not None
    assert decision.prediction.eta_seconds is not None
    assert decision.prediction.eta_seconds >= 4 * w.working_set / w.bandwidth


@pytest.mark.parametrize("change_mib", [3500, 4000])
def test_budget_raised_where_the_larger_rest_lets_copying_converge(change_mib: int) -> None:
    """A random writer over 632 MiB hovering at a 300 ms budget with a remainder whose
    copy needs more than the limit (472 ms after the switchover). The floor moves with
    the budget: the larger rest a larger budget leaves holds more of what the guest
    dirties next, and with the budget at the limit copying converges (the history at
    that budget does). The budget is raised to the limit, not given up on."""
    strict = Profile(
        name="strict",
        max_blackout=0.5,
        may_slow_down=False,
        handover="forbidden",
        may_pause=False,
        max_pause=0.0,
    )
    w = workload(5376, change_mib, 1181, 632, "random")
    limit = 0.5 - 0.028
    at_limit = history(w, max_passes=40, polls_per_pass=2, budget=limit)
    assert at_limit[-1].phase is Phase.COMPLETING
    samples = history(w, max_passes=12, polls_per_pass=2, budget=0.3)
    assert samples[-1].passes == 12  # it does not converge at 300 ms
    ctx = context(w, budget=0.3, switchover=0.028)
    first = next(i for i, s in enumerate(samples) if s.passes == 5)
    a = analyse(samples[: first + 1], ctx)
    assert a.floor is not None and a.transfer_rate
    assert a.floor / a.transfer_rate > limit  # the floor at 300 ms needs more than the limit
    decision = decide(strict, samples[: first + 1], ctx, samples[first].time)
    assert decision.action is Action.RAISE_BLACKOUT
    assert decision.blackout_budget == pytest.approx(limit)


def test_a_cancel_says_why_a_handover_just_under_its_limit_does_not_fit() -> None:
    """A handover whose estimate is under `max_degraded` but not with the margin the
    link's variation asks for is not taken; the cancel's reason shows both figures."""
    deadline = 3600.0

    def cancelled_with(max_degraded: float) -> tuple[str, str]:
        profile = Profile(
            name="p",
            handover="allowed",
            max_degraded=max_degraded,
            deadline=Deadline(fixed=deadline),
        )
        run = simulate(
            decide, profile, STUCK, plan(handover=True), deadline_at=deadline, max_passes=400
        )
        return run.outcome, run.decisions[-1][1].reason

    outcome, reason = cancelled_with(1.0)
    assert outcome == "cancel"
    found = re.search(r"handover would mean about ([0-9.]+)s of degraded running", reason)
    assert found is not None, reason
    copy = float(found.group(1))
    assert "margin" not in reason  # far over the limit: nothing more to say
    outcome, reason = cancelled_with(copy * 1.01)
    assert outcome == "cancel", reason
    margin = re.search(r"; ([0-9.]+)s with the ([0-9]+)% margin the link's variation", reason)
    assert margin is not None, reason
    assert float(margin.group(1)) > copy * 1.01 and int(margin.group(2)) >= 3
    outcome, _ = cancelled_with(copy * 1.2)
    assert outcome == "handover"


def test_a_first_pass_whose_link_carries_nothing_says_so_not_a_time_to_go() -> None:
    """The hypervisor's transfer-rate reading keeps its last value while the link
    carries nothing (`s1-0007`: 20 s of "about 123ms to go" during a break); the bytes
    moved show it, and once they have not grown for `LINK_STILL_SECONDS` the decision
    says so (rule 2a), with no time to go and the link carrying nothing."""
    w = workload(memory_mib=2048, change_mib=10, bandwidth_mib=100, ws_mib=256)
    rate = 100 * MIB

    def sample(t: float, moved_mib: float) -> Sample:
        moved = int(moved_mib * MIB)
        return Sample(
            time=t,
            memory_total=2048 * MIB,
            memory_remaining=2048 * MIB - moved,
            memory_transferred=moved,
            transfer_rate=rate,
            change_rate=0.0,
            passes=1,
            phase=Phase.COPYING,
        )

    moving = [sample(t, 100 * t) for t in (0.0, 1.0, 2.0, 3.0)]
    ctx = context(w)
    profile = Profile(name="p")
    decision = decide(profile, moving, ctx, 3.0)
    assert decision.rule is Rule.FIRST_PASS and "to go" in decision.reason
    briefly = [*moving, sample(4.0, 300)]
    assert "to go" in decide(profile, briefly, ctx, 4.0).reason  # one still second: a lull
    stalled = [*briefly, sample(5.0, 300), sample(6.5, 300)]
    decision = decide(profile, stalled, ctx, 6.5)
    assert decision.rule is Rule.LINK_STILL and decision.action is Action.CONTINUE
    assert "nothing has moved for 3.5s" in decision.reason
    assert "the link may have stalled" in decision.reason and "to go" not in decision.reason
    assert decision.prediction is not None
    assert decision.prediction.eta_seconds is None and decision.prediction.transfer_rate == 0
    assert analyse(stalled, ctx).still_for == pytest.approx(3.5)
    assert analyse(moving, ctx).still_for == 0.0


def test_nothing_is_forced_on_a_link_that_has_carried_nothing_for_two_seconds() -> None:
    """Rule 2a: the reading a pause (or a handover) is judged at keeps its last value
    while the link carries nothing; a pause chosen then would stop the instance until
    the link times out. Where the same samples with the link moving lead to a pause,
    a still link leads to waiting, then to cancelling at the deadline."""
    profile = Profile(name="p", may_pause=True, max_pause=15)
    run = simulate(decide, profile, STUCK, plan())
    assert run.outcome == "pause"
    paused = run.decisions[-1][1]
    assert paused.rule is Rule.FINISH_WITHIN_BOUNDS and run.samples[-1].passes >= 2
    ctx = context(STUCK, plan())
    # the link stops as that pass begins: one still second is a lull, and the same
    # pause comes; after two, what the pause would move is as "known" as it was (the
    # pass began moments ago, at the reading), but the link moves none of it
    lull = stalled_after(run.samples, (1.0,))
    assert decide(profile, lull, ctx, lull[-1].time).action is Action.PAUSE
    still = stalled_after(run.samples, (1.0, 2.5))
    decision = decide(profile, still, ctx, still[-1].time)
    assert decision.action is Action.CONTINUE and decision.rule is Rule.LINK_STILL
    assert "no handover, pause or new blackout budget" in decision.reason
    # the same stall with a handover allowed and armed: no handover either
    handing = Profile(name="p", handover="allowed", max_degraded=60)
    armed = context(STUCK, plan(handover=True))
    assert decide(handing, still, armed, still[-1].time).rule is Rule.LINK_STILL
    # at the deadline nothing can finish it on that link: cancel (whatever on_deadline says)
    due = replace(ctx, deadline_at=still[-1].time)
    for on_deadline in (OnDeadline.COMPLETE, OnDeadline.CANCEL):
        edited = profile.model_copy(update={"on_deadline": on_deadline})
        decision = decide(edited, still, due, still[-1].time)
        assert decision.action is Action.CANCEL and decision.rule is Rule.LINK_STILL
        assert "deadline reached" in decision.reason and "stalled" in decision.reason


def test_a_still_link_is_not_read_while_the_disks_are_copied() -> None:
    """Memory does not move while the local disks are copied: a first pass of memory
    that has just begun after a long disk copy is not a still link."""
    w = workload(memory_mib=2048, change_mib=10, bandwidth_mib=100, ws_mib=256)

    def sample(t: float, disk_left_mib: float) -> Sample:
        return Sample(
            time=t,
            memory_total=2048 * MIB,
            memory_remaining=2048 * MIB,
            memory_transferred=0,
            transfer_rate=100 * MIB,
            change_rate=0.0,
            passes=1,
            phase=Phase.COPYING,
            disk_total=4096 * MIB,
            disk_remaining=int(disk_left_mib * MIB),
            disk_rate=100 * MIB,
        )

    samples = [sample(float(t), 4096 - 100 * t) for t in range(41)] + [sample(41.0, 0)]
    ctx = context(w)
    assert analyse(samples, ctx).still_for == 0.0
    assert decide(Profile(name="p"), samples, ctx, 41.0).rule is Rule.FIRST_PASS
