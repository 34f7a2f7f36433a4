"""force_complete(): least disruptive method, refusal, accepted pause."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmwatch.model import GIB, MIB, Action, MigrationContext, Phase, Rule, Sample
from lmwatch.policies import (
    DEFAULT,
    ForceRefused,
    PolicySettings,
    decide,
    force_complete,
    restart_plan,
)
from lmwatch.policies.estimators import analyse, rate_text
from lmwatch.policies.forcing import last_look, next_look_in, pause_outlasting
from lmwatch.profiles.schema import Profile

try:
    from test_policies_support import (
        SWITCHOVER,
        context,
        history,
        plan,
        stalled_after,
        workload,
    )
except ImportError:  # tests collected as a package
    from tests.test_policies_support import (  # type: ignore[no-redef]
        SWITCHOVER,
        context,
        history,
        plan,
        stalled_after,
        workload,
    )

STUCK = workload(2048, 150, 100, 1024)  # about 10s to copy the working set
SMALL = workload(2048, 150, 100, 100)  # about 1s


@pytest.mark.parametrize(
    ("w", "profile", "arm_handover", "expected", "words"),
    [
        (SMALL, Profile(name="a", max_blackout=2.0), False, Action.RAISE_BLACKOUT, "raising"),
        (
            STUCK,
            Profile(name="b", handover="allowed", max_degraded=30),
            True,
            Action.HANDOVER,
            "limit 30.0s",
        ),
        (
            STUCK,
            Profile(name="c", may_pause=True, max_pause=30),
            False,
            Action.PAUSE,
            "limit 30.0s",
        ),
        # handover beyond max_degraded is still preferred to refusing
        (
            STUCK,
            Profile(name="d", handover="allowed", max_degraded=2),
            True,
            Action.HANDOVER,
            "above the profile's limit",
        ),
        # pause beyond max_pause is reported as such
        (
            STUCK,
            Profile(name="e", may_pause=True, max_pause=1),
            False,
            Action.PAUSE,
            "above the profile's limit 1.0s",
        ),
        # a pause that fits beats a handover that does not
        (
            STUCK,
            Profile(name="f", handover="allowed", max_degraded=2, may_pause=True, max_pause=30),
            True,
            Action.PAUSE,
            "limit 30.0s",
        ),
    ],
)
def test_least_disruptive_method(w, profile, arm_handover, expected, words) -> None:  # type: ignore[no-untyped-def]
    samples = history(w, max_passes=3)
    decision = force_complete(
        profile, samples, context(w, plan(handover=arm_handover)), samples[-1].time, False
    )
    assert decision.action is expected
    assert words in decision.reason
    assert decision.prediction is not None and decision.prediction.blackout_seconds is not None
    if expected is Action.RAISE_BLACKOUT:
        assert decision.blackout_budget is not None
        assert 0.3 < decision.blackout_budget <= profile.max_blackout


def test_refuses_when_nothing_is_allowed() -> None:
    samples = history(STUCK, max_passes=3)
    profile = Profile(name="strict", handover="allowed")
    with pytest.raises(ForceRefused) as refused:
        force_complete(profile, samples, context(STUCK, plan(handover=False)), 0.0, False)
    assert "not armed" in refused.value.reason
    assert "strict" in refused.value.reason


def test_refuses_while_the_link_carries_nothing_whatever_the_caller_accepts() -> None:
    """Nothing has moved for two seconds: a handover or a pause judged at the last
    transfer-rate reading would stop or strand the instance on a link that carries
    nothing. The request is refused with the reason (409 at the API), even with a
    pause accepted; one still second is a lull and the request is carried out."""
    samples = history(STUCK, max_passes=3)
    profile = Profile(name="b", handover="allowed", max_degraded=30)
    ctx = context(STUCK, plan(handover=True))
    lull = stalled_after(samples, (1.0,))
    assert force_complete(profile, lull, ctx, lull[-1].time, True).action is Action.HANDOVER
    still = stalled_after(samples, (1.0, 2.0))
    with pytest.raises(ForceRefused) as refused:
        force_complete(profile, still, ctx, still[-1].time, True)
    assert "nothing has moved for 2.0s" in refused.value.reason
    assert "ask again once it moves" in refused.value.reason


def test_pauses_when_the_operator_accepts_it() -> None:
    samples = history(STUCK, max_passes=3)
    decision = force_complete(Profile(name="strict"), samples, context(STUCK), 0.0, True)
    assert decision.action is Action.PAUSE
    assert "operator accepted" in decision.reason
    assert decision.prediction is not None


def test_already_paused_needs_nothing() -> None:
    samples = history(STUCK, max_passes=3)
    decision = force_complete(Profile(name="p"), samples, context(STUCK, paused=True), 0.0, False)
    assert decision.action is Action.CONTINUE


def test_budget_already_enough() -> None:
    # At the start of pass 3 the remainder (the 100 MiB working set and the rest of pass 2
    # below the threshold: under 130 MiB, 1.3s) is known: 1.5s covers it.
    samples = history(SMALL, max_passes=3)
    start = next(i for i, s in enumerate(samples) if s.passes == 3)
    ctx = context(SMALL, plan(budget=1.5))
    profile = Profile(name="p", max_blackout=2.0)
    decision = force_complete(profile, samples[: start + 1], ctx, 0.0, False)
    assert decision.action is Action.CONTINUE
    assert "already covers" in decision.reason


def test_budget_covers_what_the_guest_may_have_dirtied_since_the_pass_began() -> None:
    # Later in the pass, the guest may have dirtied more than the pass still has to
    # send: the budget is sized for that (up to twice the fastest writing seen, in
    # the part of the working set the unsent rest does not hold). A random writer
    # over 150 MiB began pass 3 with less than all of it.
    w = workload(2048, 100, 100, 150, writer="random")
    samples = history(w, max_passes=3)
    start = next(i for i, s in enumerate(samples) if s.passes == 3)
    assert samples[start].memory_remaining < 130 * MIB
    ctx = context(w, plan(budget=1.5))  # covers the <130 MiB the pass began with
    profile = Profile(name="p", max_blackout=2.0)
    at_start = force_complete(profile, samples[: start + 1], ctx, 0.0, False)
    assert at_start.action is Action.CONTINUE
    decision = force_complete(profile, samples, ctx, 0.0, False)
    assert samples[-1].passes == 3 and samples[-1].memory_remaining < 100 * MIB
    assert decision.action is Action.RAISE_BLACKOUT
    assert decision.blackout_budget is not None
    assert 1.5 < decision.blackout_budget <= profile.max_blackout - ctx.switchover
    p = decision.prediction
    assert p is not None and p.blackout_seconds is not None
    # more than the pass's unsent bytes, within the profile
    assert samples[-1].memory_remaining / w.bandwidth + SWITCHOVER < p.blackout_seconds
    assert p.blackout_seconds <= profile.max_blackout


def test_a_budget_that_holds_the_working_set_holds_all_the_pass_may_leave() -> None:
    # A sequential writer over 100 MiB began pass 3 with all of it unsent: whatever
    # it writes later in the pass lands on pages the rest still holds, which the
    # hypervisor counts once. A 1.5s budget covers the working set, so it covers the
    # pass from start to end; it used to be raised mid-pass as if every write were new.
    samples = history(SMALL, max_passes=3)
    start = next(i for i, s in enumerate(samples) if s.passes == 3)
    assert samples[start].memory_remaining > SMALL.working_set
    ctx = context(SMALL, plan(budget=1.5))
    profile = Profile(name="p", max_blackout=2.0)
    for end in range(start + 1, len(samples) + 1):
        decision = force_complete(profile, samples[:end], ctx, 0.0, False)
        assert decision.action is Action.CONTINUE, samples[end - 1].time
        p = decision.prediction
        assert p is not None and p.blackout_seconds is not None
        assert p.blackout_seconds <= 1.5 + SWITCHOVER


@settings(max_examples=200, deadline=None)
@given(st.floats(0.01, 5.0), st.booleans(), st.booleans(), st.booleans(), st.integers(1, 5))
def test_force_never_exceeds_the_profile_silently(  # type: ignore[no-untyped-def]
    max_blackout, handover, armed, accept, passes
) -> None:
    samples = history(STUCK, max_passes=passes)
    profile = Profile(
        name="p", max_blackout=max_blackout, handover="allowed" if handover else "forbidden"
    )
    try:
        decision = force_complete(
            profile, samples, context(STUCK, plan(handover=armed)), 0.0, accept
        )
    except ForceRefused as refused:
        assert not accept and not (handover and armed)
        assert refused.reason
        return
    assert decision.prediction is not None and decision.reason
    if decision.action is Action.HANDOVER:
        assert handover and armed
    if decision.action is Action.PAUSE:
        assert accept
    if decision.action is Action.RAISE_BLACKOUT:
        # the budget leaves room for the switchover; blackout = copy + switchover fits
        assert decision.blackout_budget is not None
        assert decision.blackout_budget <= max_blackout - SWITCHOVER + 1e-9
        assert decision.prediction.blackout_seconds is not None
        assert decision.prediction.blackout_seconds <= max_blackout + 1e-9


# -- a pause that would outlast its bound --------------------------------------------------


def _sample_at(t: float, moved: int, remaining: int, phase: Phase = Phase.COMPLETING) -> Sample:
    """A sample of a 2 GiB guest's fourth pass (paused: `Phase.COMPLETING`)."""
    return Sample(
        time=t,
        memory_total=2048 * MIB,
        memory_remaining=remaining,
        memory_transferred=moved,
        transfer_rate=100 * MIB,
        change_rate=150 * MIB,
        passes=4,
        phase=phase,
    )


def _paused_history(moved_last: int, left: int) -> list[Sample]:
    """Copying, then paused at t=10 with 200MiB left; one second later `moved_last`
    bytes more have arrived and `left` remain."""
    return [
        _sample_at(9.0, 3000 * MIB, 300 * MIB, Phase.COPYING),
        _sample_at(10.2, 3100 * MIB, 200 * MIB, Phase.COMPLETING),
        _sample_at(11.2, 3100 * MIB + moved_last, left, Phase.COMPLETING),
    ]


PAUSING = Profile(name="p", max_blackout=0.3, may_pause=True, max_pause=5.0)
RESUME_2S = PolicySettings(cancel_resume=2.0)  # a stopped job resumes the instance 2 s later


def _paused_context(**fields: object) -> MigrationContext:
    return replace(context(STUCK, plan()), paused=True, paused_at=10.0, **fields)  # type: ignore[arg-type]


def test_a_stalled_pause_is_stopped_and_started_again_once_the_link_carries() -> None:
    """A link that carries nothing cannot finish the pause: the job is stopped so that
    the instance resumes on the source. As after a job the broken link failed, a new
    job is started once the link carries again, judged at the rate it carried before
    and tried until the deadline no longer leaves time for it (for 10 minutes at most);
    it used to end the migration cancelled, even with hours left."""
    history = _paused_history(0, 200 * MIB)
    stretched = pause_outlasting(PAUSING, history, _paused_context())
    assert stretched is not None and stretched.rate == 0
    assert "nothing has moved" in stretched.why and "5.0s" in stretched.why
    before = analyse(history, _paused_context()).transfer_rate
    assert before is not None and before > 0  # the hypervisor's last reading
    # no deadline: tried for `restart_wait_seconds`
    decision = decide(PAUSING, history, _paused_context(), now=11.2)
    assert decision.action is Action.RESTART and decision.rule is Rule.PAUSE_OUTLASTS_BOUND
    assert decision.start_by == pytest.approx(11.2 + DEFAULT.restart_wait_seconds)
    assert decision.reason.startswith(
        f"{stretched.why}; stopping the job, so that the instance resumes on the source, "
        "and starting again once the link carries, trying every 5.0s (for 10.0m): "
        "no deadline, time for about 10.0s to start again, at least "
    )
    assert f"to copy memory at {rate_text(before)}" in decision.reason
    again = restart_plan(_paused_context(), decision)
    assert "pause outlasted" in again.reason
    # a deadline: tried while a new job still fits before it
    least = DEFAULT.restart_seconds + 2 * GIB / before
    ctx = _paused_context(deadline_at=11.2 + least + 60.0)
    timed = decide(PAUSING, history, ctx, now=11.2)
    assert timed.action is Action.RESTART
    assert timed.start_by == pytest.approx(11.2 + 60.0)
    # no time left for a new job, or started again already: cancelled, as before
    for ended in (_paused_context(deadline_at=11.2 + least - 1.0), _paused_context(restarts=1)):
        cancel = decide(PAUSING, history, ended, now=11.2)
        assert cancel.action is Action.CANCEL and cancel.rule is Rule.PAUSE_OUTLASTS_BOUND
        assert cancel.reason == f"{stretched.why}; cancelling, so that it resumes on the source"


def test_a_slowed_pause_far_from_the_deadline_starts_again_with_the_same_plan() -> None:
    """The job is stopped either way (the instance resumes on the source); with time
    left for a new job to copy memory once at the rate the link gives now, the
    migration starts again instead of ending cancelled."""
    history = _paused_history(20 * MIB, 180 * MIB)  # 20 MiB/s: 9s more, over 5s
    stretched = pause_outlasting(PAUSING, history, _paused_context())
    assert stretched is not None and stretched.rate == pytest.approx(20 * MIB)
    # 2 GiB at 20 MiB/s: 102.4s, after 10s to start again
    ctx = _paused_context(deadline_at=11.2 + 113.0)
    decision = decide(PAUSING, history, ctx, now=11.2)
    assert decision.action is Action.RESTART
    assert decision.rule is Rule.PAUSE_OUTLASTS_BOUND
    assert decision.reason.startswith(f"{stretched.why}; stopping the job, so that the instance")
    assert "the deadline is 113.0s away" in decision.reason
    assert "10.0s to start again" in decision.reason
    assert "102.4s to copy memory at 20.0MiB/s" in decision.reason
    again = restart_plan(ctx, decision)
    assert again.slow_down_initial == ctx.plan.slow_down_initial
    assert again.arm_handover == ctx.plan.arm_handover
    assert again.blackout_budget == ctx.blackout_budget
    assert "pause outlasted" in again.reason
    # a deadline too close for that, or a migration started again already: cancelled
    late = decide(PAUSING, history, _paused_context(deadline_at=11.2 + 110.0), now=11.2)
    assert late.action is Action.CANCEL and late.rule is Rule.PAUSE_OUTLASTS_BOUND
    again_once = decide(PAUSING, history, replace(ctx, restarts=1), now=11.2)
    assert again_once.action is Action.CANCEL
    # without a deadline, it starts again
    free = decide(PAUSING, history, _paused_context(), now=11.2)
    assert free.action is Action.RESTART and "no deadline" in free.reason


@pytest.mark.parametrize(
    ("moved", "left", "outlasts"),
    [
        (100 * MIB, 100 * MIB, False),  # 100MiB/s: done 2.2s after the pause began
        (20 * MIB, 180 * MIB, True),  # the link fell to 20MiB/s: 9s more, over 5s
        (40 * MIB, 100 * MIB, False),  # 40MiB/s: 1.2 + 2.5 + switchover, within 5s
    ],
)
def test_a_slowed_pause_is_cancelled_only_when_it_would_outlast_max_pause(
    moved: int, left: int, outlasts: bool
) -> None:
    stretched = pause_outlasting(PAUSING, _paused_history(moved, left), _paused_context())
    assert (stretched is not None) is outlasts
    if stretched is not None:
        assert "would last about" in stretched.why and "limit 5.0s" in stretched.why


@pytest.mark.parametrize(("stop", "stopped"), [(3.0, False), (1.0, True)])
def test_a_pause_past_its_bound_that_finishes_before_a_stop_would_resume_it_is_let_finish(
    stop: float, stopped: bool
) -> None:
    """Paused at 10 s for at most 5 s, the link fell to 20 MiB/s after the last look:
    at 14.2 s, 20 MiB left, the pause ends about 1.05 s later (5.25 s, over its bound
    either way). A stop takes 3 s to let the instance run again on the source: stopping
    would keep it stopped longer and throw the copy away, so the pause is let finish
    (`s1-0226` in the benchmark, under jitter: stopped at 7 s of a 7.5 s pause, the
    instance ran again 1.8 s later instead of 1.6 s, and the migration started over).
    A stop of 1 s would end it sooner: then the job is stopped, as before."""
    history = [
        _sample_at(9.0, 3000 * MIB, 300 * MIB, Phase.COPYING),
        _sample_at(10.2, 3100 * MIB, 200 * MIB),
        _sample_at(13.2, 3260 * MIB, 40 * MIB),
        _sample_at(14.2, 3280 * MIB, 20 * MIB),
    ]
    settings = PolicySettings(cancel_resume=stop)
    ctx = _paused_context()
    stretched = pause_outlasting(PAUSING, history, ctx, settings)
    assert stretched is not None and stretched.rate == pytest.approx(20 * MIB)
    assert "would last about 5.2s" in stretched.why
    decision = decide(PAUSING, history, ctx, now=14.2, settings=settings)
    assert decision.rule is Rule.PAUSE_OUTLASTS_BOUND
    if stopped:
        assert decision.action in (Action.RESTART, Action.CANCEL), decision.reason
    else:
        assert decision.action is Action.CONTINUE, decision.reason
        assert "letting it finish" in decision.reason and "about 3.0s" in decision.reason
        assert "finishing takes about 1.1s" in decision.reason
        assert decision.prediction is not None
        assert decision.prediction.eta_seconds == pytest.approx(1.0 + ctx.switchover)


def test_samples_closer_than_a_second_say_nothing_about_a_stall() -> None:
    history = _paused_history(0, 200 * MIB)
    close = [*history[:2], replace(history[2], time=history[1].time + 0.05)]
    assert pause_outlasting(PAUSING, close, _paused_context()) is None


def test_a_pause_gets_a_look_when_a_stop_can_last_resume_it_within_its_bound() -> None:
    """Stopping a job resumes the instance only `cancel_resume` later (here 2 s),
    so the last look that can keep a pause within `max_pause` comes that long before its
    end: paused at 10 s for at most 5 s, the last look is at 13 s, with one half a second
    before it to read the rate over; the look due after 12.2 s comes at 12.5 s, then
    13 s, instead of at 13.2 s."""
    ctx = _paused_context()
    assert last_look(PAUSING, ctx, RESUME_2S) == pytest.approx(13.0)
    assert next_look_in(PAUSING, ctx, 12.2, 1.0, RESUME_2S) == pytest.approx(0.3)
    assert next_look_in(PAUSING, ctx, 12.5, 1.0, RESUME_2S) == pytest.approx(0.5)
    assert next_look_in(PAUSING, ctx, 11.2, 1.0, RESUME_2S) == 1.0  # next look at 12.2 anyway
    assert next_look_in(PAUSING, ctx, 13.0, 1.0, RESUME_2S) == 1.0  # past it: nothing to keep
    assert next_look_in(PAUSING, ctx, 12.97, 1.0, RESUME_2S) == 1.0  # never closer than 50 ms
    for free in (replace(ctx, paused=False), replace(ctx, accept_pause=True)):
        assert last_look(PAUSING, free, RESUME_2S) is None
        assert next_look_in(PAUSING, free, 12.2, 1.0, RESUME_2S) == 1.0
    # stops measured longer between these hosts bring it forward; shorter ones do not
    # move it later than the allowance
    assert last_look(PAUSING, replace(ctx, cancel_resume=3.0), RESUME_2S) == pytest.approx(12.0)
    assert last_look(PAUSING, replace(ctx, cancel_resume=1.0), RESUME_2S) == pytest.approx(13.0)
    # by default the policy allows a stop 3 s, more than the rig's 1.5-2.1 s
    assert last_look(PAUSING, ctx) == pytest.approx(15.0 - DEFAULT.cancel_resume) == 12.0


def test_at_its_last_look_a_pause_whose_link_failed_half_a_second_ago_is_stopped() -> None:
    """Paused at 10 s (at most 5 s): at 13 s, its last look, nothing has moved since
    12.5 s. Read over the last second the rest still arrives in time (50 MiB/s: 3 s +
    1.2 s + the switchover), but no later look could stop the job in time: the rate is
    read over the last half second, the link has stalled, and the job is stopped, so
    that the instance runs again at 15 s, within its bound."""
    paused = [
        _sample_at(10.2, 3100 * MIB, 260 * MIB),
        _sample_at(11.2, 3200 * MIB, 160 * MIB),
        _sample_at(12.0, 3250 * MIB, 110 * MIB),
        _sample_at(12.5, 3300 * MIB, 60 * MIB),
    ]
    ctx = _paused_context()
    before_last = [*paused, _sample_at(12.9, 3300 * MIB, 60 * MIB)]  # not yet the last look
    assert pause_outlasting(PAUSING, before_last, ctx, RESUME_2S) is None
    last = [*paused, _sample_at(13.0, 3300 * MIB, 60 * MIB)]
    stretched = pause_outlasting(PAUSING, last, ctx, RESUME_2S)
    assert stretched is not None and stretched.rate == 0
    assert "nothing has moved for 500ms" in stretched.why
    decision = decide(PAUSING, last, ctx, now=13.0, settings=RESUME_2S)
    assert decision.action is Action.RESTART and decision.rule is Rule.PAUSE_OUTLASTS_BOUND
    assert "once the link carries" in decision.reason
    # the link still moving at the last look: the pause goes on
    moving = [*paused, _sample_at(13.0, 3350 * MIB, 10 * MIB)]
    assert pause_outlasting(PAUSING, moving, ctx, RESUME_2S) is None


def test_a_pause_whose_link_slowed_then_stopped_starts_again_once_the_link_carries() -> None:
    """Paused at 10 s (at most 5 s; stops take 1.5 s, so the last look is at 13.5 s and
    the look before it at 13 s). Over the second before 13 s the rest moved slowly
    enough to outlast the bound, but all of that before 12.2 s: nothing has moved for
    the last 0.8 s. The pause is ended either way; a link that has stopped cannot carry
    a new job now, so the new job waits until it carries again."""
    ctx = _paused_context()
    resume = PolicySettings(cancel_resume=1.5)
    history = [
        _sample_at(10.2, 3100 * MIB, 200 * MIB),
        _sample_at(11.2, 3120 * MIB, 180 * MIB),
        _sample_at(12.2, 3130 * MIB, 170 * MIB),
        _sample_at(13.0, 3130 * MIB, 170 * MIB),
    ]
    assert next_look_in(PAUSING, ctx, 12.2, 1.0, resume) == pytest.approx(0.8)
    stretched = pause_outlasting(PAUSING, history, ctx, resume)
    assert stretched is not None and stretched.rate == 0
    assert "nothing has moved for 800ms" in stretched.why
    decision = decide(PAUSING, history, ctx, now=13.0, settings=resume)
    assert decision.action is Action.RESTART and decision.rule is Rule.PAUSE_OUTLASTS_BOUND
    assert "starting again once the link carries" in decision.reason
    # still moving, slowly: started again at once (no deadline)
    slow = [*history[:3], _sample_at(13.0, 3136 * MIB, 164 * MIB)]
    moving = decide(PAUSING, slow, ctx, now=13.0, settings=resume)
    assert moving.action is Action.RESTART and "once the link carries" not in moving.reason
    assert (
        "; stopping the job, so that the instance resumes on the source, and starting "
        "again: no deadline" in moving.reason
    )


def test_no_cancel_for_an_accepted_pause_a_finished_copy_or_one_sample() -> None:
    stalled = _paused_history(0, 200 * MIB)
    assert pause_outlasting(PAUSING, stalled, _paused_context(accept_pause=True)) is None
    assert pause_outlasting(PAUSING, _paused_history(200 * MIB, 0), _paused_context()) is None
    assert pause_outlasting(PAUSING, stalled[:2], _paused_context()) is None
    assert pause_outlasting(PAUSING, stalled, replace(_paused_context(), paused=False)) is None


def test_once_paused_or_handed_over_the_eta_is_the_rest_at_the_links_rate() -> None:
    """Stopped or handed over, the guest writes nothing the source sends again: the ETA
    an operator (and a host drain's ETA) reads is the rest at the link's rate, with the
    switch for a pause; not the projection of passes over a guest still writing."""
    history = _paused_history(100 * MIB, 100 * MIB)  # 100 MiB left at 100 MiB/s
    paused = decide(PAUSING, history, _paused_context(), now=11.2)
    assert paused.action is Action.CONTINUE and paused.rule is Rule.PAST_COPYING
    assert paused.prediction is not None
    assert paused.prediction.eta_seconds == pytest.approx(1.0 + SWITCHOVER)
    assert paused.prediction.blackout_seconds == pytest.approx(1.0 + SWITCHOVER)
    handed = replace(context(STUCK, plan(handover=True)), handed_over=True)
    over = decide(Profile(name="p", handover="allowed"), history, handed, now=11.2)
    assert over.rule is Rule.PAST_COPYING and over.prediction is not None
    assert over.prediction.eta_seconds == pytest.approx(1.0)
    assert over.prediction.converges is True
    # the hypervisor's own final stop, not ours: the same rest, and the switch
    final = decide(PAUSING, history, context(STUCK, plan()), now=11.2)
    assert final.rule is Rule.PAST_COPYING and final.prediction is not None
    assert final.prediction.eta_seconds == pytest.approx(1.0 + SWITCHOVER)


def test_no_eta_once_handed_over_while_the_link_moves_nothing() -> None:
    """Handed over, with nothing moved for 2 s and more: the last transfer-rate reading
    says nothing of when the rest arrives, so there is no ETA."""

    def at(t: float, moved: int) -> Sample:
        return Sample(
            time=t,
            memory_total=2048 * MIB,
            memory_remaining=4000 * MIB - moved,
            memory_transferred=moved,
            transfer_rate=100 * MIB,
            change_rate=150 * MIB,
            passes=4,
            phase=Phase.HANDOVER,
        )

    handed = replace(context(STUCK, plan(handover=True)), handed_over=True)
    profile = Profile(name="p", handover="allowed")
    moving = [at(9.0, 3000 * MIB), at(10.0, 3100 * MIB), at(11.0, 3200 * MIB)]
    assert decide(profile, moving, handed, now=11.0).prediction.eta_seconds is not None
    still = [at(9.0, 3000 * MIB), at(10.0, 3000 * MIB), at(11.5, 3000 * MIB)]
    decision = decide(profile, still, handed, now=11.5)
    assert decision.rule is Rule.PAST_COPYING
    assert decision.prediction is not None and decision.prediction.eta_seconds is None
