"""decide(): closed-loop scenarios over synthetic workloads, tables, and properties."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmwatch.model import MIB, Action, Phase, Sample
from lmwatch.policies import DEFAULT, decide
from lmwatch.profiles.schema import Deadline, OnDeadline, Profile

try:
    from test_policies_support import Workload, context, history, plan, simulate, workload
except ImportError:  # tests collected as a package
    from tests.test_policies_support import (  # type: ignore[no-redef]
        Workload,
        context,
        history,
        plan,
        simulate,
        workload,
    )

STUCK = workload(memory_mib=2048, change_mib=150, bandwidth_mib=100, ws_mib=1024)


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


def test_budget_raised_in_steps_until_the_floor_fits() -> None:
    # Working set 100MiB at 100MiB/s: the floor needs about 1s of blackout.
    profile = Profile(name="p", max_blackout=2.0)
    run = simulate(decide, profile, workload(2048, 150, 100, 100), plan())
    assert run.outcome == "completed"
    assert len(run.budgets) >= 3  # at least two raises
    for before, after in zip(run.budgets, run.budgets[1:], strict=False):
        assert before < after <= profile.max_blackout
        assert after <= max(
            before * DEFAULT.blackout_step_factor, before + DEFAULT.blackout_min_step
        )
    assert run.blackout is not None and run.blackout <= run.budgets[-1]


def test_no_raise_when_the_floor_needs_more_than_max_blackout() -> None:
    profile = Profile(name="p", max_blackout=0.5, may_pause=True, max_pause=30)
    run = simulate(decide, profile, STUCK, plan())
    assert Action.RAISE_BLACKOUT not in run.actions
    assert run.outcome == "pause"


def test_never_converging_is_handed_over_when_allowed() -> None:
    profile = Profile(name="p", handover="allowed", max_degraded=30)
    run = simulate(decide, profile, STUCK, plan(handover=True))
    assert run.outcome == "handover"
    _, decision = run.decisions[-1]
    assert "degraded" in decision.reason and decision.prediction is not None
    # not before two full passes of evidence
    assert run.samples[-1].passes - 1 >= DEFAULT.min_passes_for_verdict


def test_handover_waits_when_degraded_time_would_be_too_long() -> None:
    profile = Profile(name="p", handover="allowed", max_degraded=5)
    run = simulate(decide, profile, STUCK, plan(handover=True))
    assert run.outcome == "cancel"  # 10s of degraded running > 5s; nothing else allowed
    assert Action.HANDOVER not in run.actions


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


def test_slowed_first_when_allowed_and_enough() -> None:
    profile = Profile(name="p", may_slow_down=True, handover="allowed", max_degraded=60)
    run = simulate(decide, profile, STUCK, plan(handover=True, slow_down=True), max_passes=200)
    assert run.outcome == "completed"
    assert Action.HANDOVER not in run.actions
    assert any("slowed" in d.reason for _, d in run.decisions)


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


def test_cancelled_early_with_the_reason_when_nothing_allowed_can_finish() -> None:
    deadline = 3600.0
    profile = Profile(name="p", deadline=Deadline(fixed=deadline))
    run = simulate(decide, profile, STUCK, plan(), deadline_at=deadline)
    assert run.outcome == "cancel"
    assert run.ended_at is not None and run.ended_at < deadline / 10
    reason = run.decisions[-1][1].reason
    assert "nothing this profile allows can finish it" in reason
    assert "150.0MiB/s" in reason and "100.0MiB/s" in reason


def test_handover_never_chosen_when_not_armed_at_start() -> None:
    # The profile allows it (e.g. edited after start) but it was not armed.
    profile = Profile(name="p", handover="allowed", max_degraded=300)
    run = simulate(decide, profile, STUCK, plan(handover=False))
    assert Action.HANDOVER not in run.actions
    assert "not armed" in run.decisions[-1][1].reason


@pytest.mark.parametrize(
    ("profile", "arm_handover", "expected", "words"),
    [
        (
            Profile(name="c", on_deadline=OnDeadline.CANCEL, may_pause=True, max_pause=60),
            False,
            Action.CANCEL,
            "says cancel",
        ),
        (
            Profile(name="h", on_deadline=OnDeadline.COMPLETE, handover="allowed"),
            True,
            Action.HANDOVER,
            "deadline reached",
        ),
        (
            Profile(name="q", on_deadline=OnDeadline.COMPLETE, may_pause=True, max_pause=2),
            False,
            Action.PAUSE,
            "above the profile's limit",
        ),
        (
            Profile(name="r", on_deadline=OnDeadline.COMPLETE, max_blackout=30),
            False,
            Action.RAISE_BLACKOUT,
            "raising the blackout budget",
        ),
        (
            Profile(name="n", on_deadline=OnDeadline.COMPLETE, handover="allowed"),
            False,
            Action.CANCEL,
            "nothing it allows",
        ),
    ],
)
def test_on_deadline_is_honoured(
    profile: Profile, arm_handover: bool, expected: Action, words: str
) -> None:
    # Still in the first pass: a deadline forces a decision even then.
    samples = history(STUCK, max_passes=1)
    ctx = context(STUCK, plan(handover=arm_handover), deadline_at=5.0)
    decision = decide(profile, samples, ctx, now=6.0)
    assert decision.action is expected
    assert words in decision.reason
    assert decision.prediction is not None
    if expected is Action.RAISE_BLACKOUT:
        assert decision.blackout_budget is not None
        assert decision.blackout_budget <= profile.max_blackout
    # one second earlier, nothing is forced
    assert decide(profile, samples, ctx, now=4.0).action is Action.CONTINUE


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
    assert decision.blackout_budget == pytest.approx(0.2)


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
    """Pass-start samples with given remainders; transfer 100MiB/s, change as given."""
    samples = []
    t = 0.0
    for n, start in enumerate(starts_mib, 1):
        rate = 100 * MIB * ((0.4 if n % 2 else 1.6) if noisy else 1.0)
        samples.append(
            replace(
                history(STUCK, max_passes=1, polls_per_pass=1)[0],
                time=t,
                passes=n,
                memory_remaining=int(start * MIB),
                transfer_rate=rate,
                change_rate=change_mib * MIB if n >= 2 else 0.0,
            )
        )
        t += start / 100
    return samples


def test_waits_while_the_remainder_still_shrinks() -> None:
    samples = _with_pass_starts([2048, 1500, 1000, 600], change_mib=120)
    decision = decide(Profile(name="p"), samples, context(STUCK), now=samples[-1].time)
    assert decision.action is Action.CONTINUE
    assert "still shrinking" in decision.reason
    plateau = _with_pass_starts([2048, 1000, 1000, 1000], change_mib=120)
    decision = decide(Profile(name="p"), plateau, context(STUCK), now=plateau[-1].time)
    assert decision.action is Action.CANCEL


def test_unsteady_rates_leave_hope_for_a_while() -> None:
    samples = _with_pass_starts([2048, *[1000] * 3], change_mib=300, noisy=True)
    decision = decide(Profile(name="p"), samples, context(STUCK), now=samples[-1].time)
    assert decision.action is Action.CONTINUE
    assert "unsteady" in decision.reason
    longer = _with_pass_starts([2048, *[1000] * (DEFAULT.max_hope_passes + 1)], 300, noisy=True)
    decision = decide(Profile(name="p"), longer, context(STUCK), now=longer[-1].time)
    assert decision.action is Action.CANCEL


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
    if decision.action is Action.RAISE_BLACKOUT:
        assert decision.blackout_budget is not None
        assert 0 < decision.blackout_budget <= profile.max_blackout
    if decision.action is Action.HANDOVER:
        assert arm_h and profile.handover_allowed
    if decision.action is Action.PAUSE:
        assert profile.may_pause


@PROPS
@given(cases)
def test_raises_go_up_one_step_and_never_past_max(case) -> None:  # type: ignore[no-untyped-def]
    profile, w, passes, _, slowdown, arm_h, arm_s, report, polls = case
    samples = history(
        w, max_passes=passes, slowdown=slowdown, polls_per_pass=polls, report_change=report
    )
    budget = min(DEFAULT.initial_blackout, profile.max_blackout)
    for cut in range(1, len(samples) + 1):
        ctx = context(w, plan(handover=arm_h, slow_down=arm_s), budget=budget)
        decision = decide(profile, samples[:cut], ctx, samples[cut - 1].time)
        if decision.action is Action.RAISE_BLACKOUT:
            new = decision.blackout_budget
            assert new is not None
            assert budget < new <= profile.max_blackout
            assert (
                new
                <= max(budget * DEFAULT.blackout_step_factor, budget + DEFAULT.blackout_min_step)
                + 1e-9
            )
            budget = new


@PROPS
@given(cases, st.one_of(st.none(), st.floats(0.0, 1e5)))
def test_nothing_forced_before_the_first_full_pass(case, deadline) -> None:  # type: ignore[no-untyped-def]
    profile, w, _, budget, slowdown, arm_h, arm_s, report, polls = case
    budget = min(budget, profile.max_blackout)
    samples = history(
        w, max_passes=1, slowdown=slowdown, polls_per_pass=polls, report_change=report
    )
    samples = [s for s in samples if s.passes < 2]
    for sample in samples:
        ctx = context(w, plan(handover=arm_h, slow_down=arm_s, budget=budget), deadline_at=deadline)
        decision = decide(profile, samples[: samples.index(sample) + 1], ctx, sample.time)
        if deadline is None or sample.time < deadline:
            assert decision.action is Action.CONTINUE


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


def test_slowing_reason_never_asks_for_less_than_the_current_level() -> None:
    """Readings capped by what a pass sees can say "enough" while copying still stalls."""
    profile = Profile(name="p", may_slow_down=True)
    w = workload(1024, 400, 100, 512)
    samples = history(w, max_passes=4, slowdown=0.4)
    capped = [replace(s, change_rate=min(s.change_rate, 30 * MIB)) for s in samples]
    ctx = context(w, plan(slow_down=True), deadline_at=10_000.0)
    decision = decide(profile, capped, ctx, capped[-1].time)
    assert decision.action is Action.CONTINUE
    levels = [int(x) for x in re.findall(r"reaches about (-?\d+)%", decision.reason)]
    assert levels and all(level > 40 for level in levels), decision.reason
