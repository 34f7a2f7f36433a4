"""`decide`: what to do with a running migration, given its profile and samples.

The rules, in order (DESIGN.md section 4):

1. paused by us, and at the rate the rest now moves the pause would outlast its
   bound (the link stalled or slowed) -> stop the job, so the instance resumes on
   the source (not for the hypervisor's own final stop: it serves no command from
   stopping the guest to the end of the final copy): start again with the same plan
   when the migration may still start again (`max_restarts`) and the deadline leaves
   time for a new job to copy memory once at the rate the link gives now (a stalled
   link: the rate it gave before; the new job is tried until the link carries again,
   as after a failed job), else cancel; but when finishing at that rate takes no
   longer than a stop takes to let the instance run again (`stop_takes`), stopping
   would keep it stopped as long and lose the copy -> continue (the pause is recorded
   as over its bound); otherwise, past copying (paused, handed over, completing,
   ended) -> continue;
1b. the switch alone (stop, device state, resume) took longer than any stop the
   profile allows every time it was measured on this host pair -> cancel at once,
   unless an operator asked to finish: no completion, by a final stop, a pause or a
   handover, could stay within the profile, and copying on would only delay saying so;
2. the local disks are not in sync yet (they are copied before memory) -> only
   continue or cancel, since the guest may stop or move only once its disks are
   whole on the destination: no pause, no handover, and no change of the blackout
   budget either (a raised budget lets the hypervisor stop the guest sooner, and
   nothing is known of memory yet to size it; one above the limit is lowered once
   the disks are in sync, before memory's budget matters). Cancel when the evidence
   says the copy never gets in sync (the guest writes its disks faster than the
   link copies) or cannot before the deadline, or when the deadline came; otherwise
   continue (an operator's request to finish waits for the sync);
2a. nothing has moved for `LINK_STILL_SECONDS` (2 s) or more (the link may have
   stalled; the hypervisor's transfer-rate reading keeps its last value) -> continue, with
   no ETA: a handover, a pause or a new budget judged at a rate the link no longer
   carries could stop or strand the instance on a link that moves nothing, and the
   hypervisor ends the job if the link does not come back; at the deadline (not before:
   nothing finishes on a still link) -> cancel, so that the instance runs on where it is;
2b. an operator asked to finish now -> as force-complete, when the profile allows it;
3. the budget is above what `max_blackout` leaves after the switchover -> lower it;
3b. the first pass is over (or an operator asked to finish) and the hypervisor still
   holds the first pass's lower budget (`plan_start`) -> raise it to the plan's,
   unless a rule below acts otherwise; every rule reads the migration as if the
   plan's budget were in force, since it is from the next decision on;
4. the deadline has come, or is as close as finishing takes -> `on_deadline`
   (complete within the profile, or cancel);
5. no evidence yet (first pass, or passes not yet seen again after a restart) ->
   in the first pass, when the change rate measured before the start already
   outruns the link, hand over or pause if that fits now (a handover only with room
   for the link to slow, `first_pass_headroom` times over: it cannot be taken back,
   and waiting for the pass to end leaves only what the guest rewrote), unless the
   pass's end may leave less than half of what they would move now: then waiting
   may shorten the degraded running or the pause by more than it delays the finish,
   and lmwatch waits for the pass to end (`_first_pass_may_shrink`); cancel when
   even the first pass cannot end before the deadline and nothing else could finish it;
   otherwise continue;
5b. every window seen (the passes, with the measurement before the start) filled the
   guest's working set, so they say only that it writes at least some rate; copying
   converges at that least rate but not at a faster one, and the current pass is too
   short to fill the working set -> continue, with no ETA: its count tells which
   (converging at both, the ETA is the longer of the two readings');
5c. one pass seen and nothing measured before the start: read as a writer over all of
   memory copying converges, read as one that filled a working set of the pass's
   count it does not -> continue, with no ETA: the current pass's count tells which
   (it is shorter than the first, so a writer over all of memory leaves less);
   converging both ways, the ETA is the longer reading's. Likewise, measured before
   the start, when copying converges at the fit of the two but the pass dirtied more
   per second than any steady writer so measured could (its writing changed:
   `rose_during_pass`) -> continue, with no ETA, until the next pass is counted; and
   when the one pass filled the working set, so that its count cannot show whether the
   guest still writes as measured, and copying converges at the measured rate but not
   at `FASTER_READING` times it (`filled_after_measurement`) -> continue, with no ETA,
   until the next pass, too short to fill the working set, is counted;
6. copying converges on its own (at the current slow-down) within the blackout
   budget -> continue; but when the guest is being slowed and, near the start of a
   pass, a pause that fits `max_pause` takes less of the guest's time than the
   slowing still would (slow-down level x time to converge) -> pause;
7. the floor fits `max_blackout` after the switchover, or copying converges with
   the budget at that limit (a larger budget leaves a larger rest, which holds more
   of what the guest dirties next) -> raise the budget;
8. near the start of a pass, handover fits `max_degraded` (armed at start) -> hand over;
9. near the start of a pass, a pause fits `max_pause` -> pause;
10. the only evidence is one pass and its most hopeful reading still converges ->
    continue (one more pass decides; it is short);
10b. the guest is being slowed (armed at start), it writes faster than the start
    plan assumed, and a job started now at a higher start level (chosen as the start
    plan chooses it, for the rate seen now, counting the time to start again and the
    local disks' copy again) either finishes before the deadline where the
    hypervisor's schedule of raising the slow-down does not, or finishes in at most
    `restart_gain` of the time that schedule still needs, taking no more of the
    guest's time in slowing -> start again with that level (at most `max_restarts`
    times; never once paused or handed over);
11. slowing the guest is armed and finishes before the deadline -> continue;
12. the remainder still shrinks, the rates vary (counts that all filled the working
    set vary when the counts do), or quieter phases were seen, and the deadline
    leaves time -> continue; so does a guest whose steady readings say
    nothing would finish it, while the phase it shows may still change before the
    deadline: until the readings have been steady three times as long as the deadline
    leaves (`patience`; counted from the first pass after the first, as a first pass
    averages all phases; without a deadline, `min_patience`): workloads change phase;
13. otherwise cancel, saying why: waiting has stopped paying.

Handover and pause come before slowing because each finishes now within a bound
the operator set, while slowing degrades the guest for many passes.
"""

from __future__ import annotations

from dataclasses import replace

from lmwatch.model import Action, Decision, MigrationContext, Phase, Prediction, Rule
from lmwatch.policies.estimators import (
    DEFAULT,
    FASTER_READING,
    Analysis,
    DirtyModel,
    DiskOutlook,
    History,
    PolicySettings,
    analyse,
    disk_outlook,
    duration_text,
    project,
    rate_text,
    tracked,
)
from lmwatch.policies.forcing import (
    ForceRefused,
    OutlastingPause,
    already_finishing,
    blackout_limit,
    finish_now,
    force_complete,
    handover_fits,
    handover_usable,
    link_still_text,
    nothing_allowed,
    pause_fits,
    pause_outlasting,
    stop_takes,
    switch_outlasts_bound,
)
from lmwatch.policies.restart import (
    pause_restart_reason,
    restart_after_pause,
    restart_outlook,
    restart_reason,
)
from lmwatch.policies.violations import stop_bound
from lmwatch.profiles.schema import OnDeadline, Profile
from lmwatch.units import format_size


def decide(
    profile: Profile,
    history: History,
    ctx: MigrationContext,
    now: float,
    settings: PolicySettings = DEFAULT,
) -> Decision:
    """The next step for a running migration; pure, never raises on valid input.

    `history` is the migration's samples, as a list or already folded (`Track`)."""
    history = tracked(history, settings)
    planned = _held_budget(profile, ctx)
    if planned is None:
        return _decide(profile, history, ctx, now, settings)
    decision = _decide(profile, history, replace(ctx, blackout_budget=planned), now, settings)
    latest = history.latest
    over = latest is not None and latest.passes >= 2
    if (
        decision.action is not Action.CONTINUE
        or decision.rule in (Rule.PAST_COPYING, Rule.LINK_STILL)
        or not (over or ctx.force)
    ):
        return decision
    raising = (
        f"raising the blackout budget from {duration_text(ctx.blackout_budget)} to the "
        f"planned {duration_text(planned)}"
    )
    if over:
        why = (
            f"the first pass is over: {raising} (the first pass held the lower one, so "
            "that no stop copied a budget's worth of memory never sent; what is left "
            "now is what the guest rewrote)"
        )
    else:
        why = f"finishing on request: {raising}, held lower during the first pass"
    return Decision(
        Action.RAISE_BLACKOUT,
        f"{why}; then: {decision.reason}",
        decision.prediction,
        blackout_budget=planned,
        rule=Rule.FIRST_PASS_OVER,
    )


def _pause_outlasts(
    stretched: OutlastingPause,
    a: Analysis,
    ctx: MigrationContext,
    now: float,
    prediction: Prediction,
    settings: PolicySettings,
) -> Decision:
    """Rule 1: our pause outlasts its bound; start again when that can still finish in
    time, else cancel. Either way the job is stopped and the instance resumes; unless
    finishing takes no longer than that stop would (`OutlastingPause.finish_in`)."""
    why = stretched.why
    if stretched.finish_in is not None:
        return Decision(
            Action.CONTINUE,
            f"{why}; finishing takes about {duration_text(stretched.finish_in)}, no longer "
            f"than a stop takes to let the instance run again on the source (about "
            f"{duration_text(stop_takes(ctx, settings))}): letting it finish, which stopping "
            "would only delay (the pause is recorded as over its bound)",
            # as `_arriving` predicts a stop, at the rate the rest moves now
            replace(
                _arriving(a, ctx, prediction),
                eta_seconds=stretched.finish_in,
                blackout_seconds=stretched.finish_in,
            ),
            rule=Rule.PAUSE_OUTLASTS_BOUND,
        )
    again = restart_after_pause(a, ctx, stretched.rate, now, settings)
    if again is None:
        return Decision(
            Action.CANCEL,
            f"{why}; cancelling, so that it resumes on the source",
            prediction,
            rule=Rule.PAUSE_OUTLASTS_BOUND,
        )
    # the link may be down a while: the new job is tried until then, as after a failed job
    start_by = again.try_until(now, settings)
    stalled_for = start_by - now if stretched.rate <= 0 else None
    return Decision(
        Action.RESTART,
        f"{why}; {pause_restart_reason(again, stalled_for, settings)}",
        prediction,
        # the new job's evidence starts afresh: what its first decisions assume
        planned_rate=ctx.change_rate_before_start if a.model is None else a.model.rate,
        start_by=start_by,
        rule=Rule.PAUSE_OUTLASTS_BOUND,
    )


def _held_budget(profile: Profile, ctx: MigrationContext) -> float | None:
    """The budget the plan has for after the first pass, while the hypervisor still holds
    the first pass's lower one (rule 3b); None otherwise."""
    held = ctx.plan.first_pass_budget
    if held is None or ctx.blackout_budget > held + 1e-9:
        return None
    planned = min(ctx.plan.blackout_budget, blackout_limit(profile, ctx))
    return planned if planned > ctx.blackout_budget + 1e-9 else None


def _decide(
    profile: Profile,
    history: History,
    ctx: MigrationContext,
    now: float,
    settings: PolicySettings,
) -> Decision:
    a = analyse(history, ctx, settings)
    disks = disk_outlook(history, settings)
    prediction = a.prediction() if disks is None else disk_prediction(a, disks, ctx)

    stalled = pause_outlasting(profile, history, ctx, settings)
    if stalled is not None:
        return _pause_outlasts(stalled, a, ctx, now, prediction, settings)
    done = already_finishing(history, ctx)
    if done is not None:
        return Decision(
            Action.CONTINUE,
            f"nothing to do: {done}",
            _arriving(a, ctx, prediction),
            rule=Rule.PAST_COPYING,
        )

    if not ctx.force and switch_outlasts_bound(profile, ctx):
        return Decision(
            Action.CANCEL,
            "the switch to the destination alone took at least "
            f"{duration_text(ctx.switchover_least or 0.0)} each time it was measured between "
            f"these hosts, longer than the {duration_text(stop_bound(profile))} the profile "
            "allows the instance to be stopped: no way to finish stays within the profile; "
            "cancelling",
            prediction,
            rule=Rule.SWITCH_OUTLASTS_BOUND,
        )

    if disks is not None:
        rule, action, why = _disk_phase(profile, disks, ctx, now)
        return Decision(action, why, prediction, rule=rule)

    if a.link_still:
        return replace(_link_still(a, ctx, now), rule=Rule.LINK_STILL)

    if ctx.force:
        try:
            forced = force_complete(profile, history, ctx, now, ctx.accept_pause, settings)
            return replace(forced, rule=Rule.OPERATOR_FINISH)
        except ForceRefused:
            pass  # the refusal was reported to the caller; keep supervising

    limit = blackout_limit(profile, ctx)
    if ctx.blackout_budget > limit + 1e-9:
        return Decision(
            Action.RAISE_BLACKOUT,
            f"the profile allows at most {duration_text(profile.max_blackout)} of blackout, "
            f"{duration_text(ctx.switchover)} of which the switchover takes; lowering the "
            f"budget from {duration_text(ctx.blackout_budget)} to {duration_text(limit)}",
            prediction,
            blackout_budget=limit,
            rule=Rule.BUDGET_OVER_LIMIT,
        )

    if ctx.deadline_at is not None and now >= ctx.deadline_at - _deadline_lead(
        profile, a, ctx, settings
    ):
        return replace(_on_deadline(profile, a, ctx, now, prediction, settings), rule=Rule.DEADLINE)

    if a.latest is None:
        return Decision(
            Action.CONTINUE,
            "waiting for the first progress report",
            prediction,
            rule=Rule.NO_PROGRESS_YET,
        )

    rate = a.transfer_rate
    if a.model is None or not rate or a.floor is None:
        early = _early_finish(profile, a, ctx, prediction, settings)
        if early is not None:
            return replace(early, rule=Rule.FIRST_PASS)
        hopeless = _first_pass_too_long(profile, a, ctx, now, settings)
        if hopeless is not None:
            return Decision(Action.CANCEL, hopeless, prediction, rule=Rule.FIRST_PASS)
        return Decision(Action.CONTINUE, _gathering(a), prediction, rule=Rule.FIRST_PASS)

    if a.saturated:
        return Decision(Action.CONTINUE, _saturated(a), prediction, rule=Rule.WINDOWS_FILLED)
    if a.either_way:
        return Decision(
            Action.CONTINUE, _either_way(a, ctx), prediction, rule=Rule.ONE_PASS_EITHER_WAY
        )

    if a.converges:
        cheaper = _pause_cheaper_than_slowing(profile, a, ctx, prediction, settings)
        if cheaper is not None:
            return replace(cheaper, rule=Rule.PAUSE_CHEAPER_THAN_SLOWING)
        return Decision(Action.CONTINUE, _converging(a, ctx, now), prediction, rule=Rule.CONVERGES)

    rates = _rates_text(a)
    raised = _raise_step(profile, a, ctx, limit, rates, prediction, settings)
    if raised is not None:
        return replace(raised, rule=Rule.RAISE_BUDGET)

    head = f"copying cannot converge: {rates}"
    finishing = _finish_within(profile, a, ctx, head, prediction, settings)
    if finishing is not None:
        return replace(finishing, rule=Rule.FINISH_WITHIN_BOUNDS)

    if a.pairs < 2 and _hopeful_reading_converges(a, ctx, limit, settings):
        return Decision(
            Action.CONTINUE,
            f"after one pass copying looks unlikely to converge ({rates}), but one pass is "
            "not enough to tell a saturated working set from a steady writer; the next pass "
            f"(about {duration_text(a.seconds_for(a.remaining))}) decides",
            prediction,
            rule=Rule.ONE_PASS_HOPEFUL,
        )

    return _beyond_blackout(profile, a, ctx, now, head, prediction, settings)


def disk_prediction(a: Analysis, disks: DiskOutlook, ctx: MigrationContext) -> Prediction:
    """The prediction while the disks are copied: the time until they are in sync, then
    a first pass of memory (at the link less the mirrored disk writes), then the stop."""
    base = a.prediction()
    eta: float | None = None
    if disks.seconds is not None and not disks.never and disks.rate:
        memory_rate = disks.rate - (disks.writes or 0.0)
        if memory_rate > 0:
            eta = disks.seconds + a.memory / memory_rate + ctx.switchover
    return replace(base, eta_seconds=eta, converges=False if disks.never else None)


def _disk_phase(
    profile: Profile, disks: DiskOutlook, ctx: MigrationContext, now: float
) -> tuple[Rule, Action, str]:
    """While the disks are not in sync: continue, or cancel (never anything that forces)."""
    left = f"{format_size(disks.remaining)} of {format_size(disks.total)}"
    if disks.evidence and disks.never:
        return (
            Rule.DISKS_NEVER_SYNC,
            Action.CANCEL,
            f"the disks cannot get in sync: the guest writes them at about "
            f"{rate_text(disks.writes)}, the link copies {rate_text(disks.rate)}, so "
            f"rewritten blocks keep {left} to copy; the instance may not stop or move "
            "before its disks are in sync; cancelling",
        )
    if ctx.deadline_at is not None and now >= ctx.deadline_at:
        took = duration_text(max(0.0, now - ctx.started_at))
        return (
            Rule.DEADLINE,
            Action.CANCEL,
            f"deadline reached after {took} with the disks not in sync ({left} left); "
            "the instance may not stop or move before they are; cancelling",
        )
    if (
        ctx.deadline_at is not None
        and disks.evidence
        and disks.seconds is not None
        and now + disks.seconds > ctx.deadline_at
    ):
        return (
            Rule.DISKS_MISS_DEADLINE,
            Action.CANCEL,
            f"the disks need about {duration_text(disks.seconds)} more to get in sync "
            f"({left} left at {rate_text(disks.rate)}, the guest writing them at about "
            f"{rate_text(disks.writes)}), past the deadline in "
            f"{duration_text(ctx.deadline_at - now)}, and nothing may finish the "
            "migration before they are in sync; cancelling now rather than at the deadline",
        )
    text = f"copying the disks first: {left} left"
    if disks.rate:
        text += f" at {rate_text(disks.rate)}"
    if disks.seconds is not None and not disks.never:
        text += f", in sync in about {duration_text(disks.seconds)}"
    elif disks.never:
        text += ", not yet converging"
    text += "; memory is copied once they are"
    if ctx.force:
        text += "; the request to finish applies once the disks are in sync"
    return Rule.DISK_COPY, Action.CONTINUE, text


def _deadline_lead(
    profile: Profile,
    a: Analysis,
    ctx: MigrationContext,
    settings: PolicySettings,
) -> float:
    """How long before the deadline `on_deadline: complete` must act to finish in time."""
    if profile.on_deadline is not OnDeadline.COMPLETE:
        return 0.0
    if not (handover_usable(profile, ctx) or profile.may_pause):
        return 0.0  # only copying itself can finish it: nothing to start early
    poll = a.poll
    stop = (a.stop_seconds() or 0.0) * a.margin(
        max(settings.pause_safety, settings.handover_safety), settings
    )
    # Starting early helps only a finish that fits its bound: no longer than the longest
    # degraded running or pause the profile allows.
    longest = max(
        profile.max_degraded if handover_usable(profile, ctx) else 0.0,
        profile.max_pause if profile.may_pause else 0.0,
    )
    return min(stop, longest) + 2 * max(poll, 0.0)


def _link_still(a: Analysis, ctx: MigrationContext, now: float) -> Decision:
    """Rule 2a: nothing has moved for a while. Wait for the link, or cancel at the
    deadline; the prediction says the link carries nothing and gives no time to go."""
    still = link_still_text(a)
    prediction = replace(a.prediction(), transfer_rate=0.0, eta_seconds=None, blackout_seconds=None)
    if ctx.deadline_at is not None and now >= ctx.deadline_at:
        took = duration_text(max(0.0, now - ctx.started_at))
        return Decision(
            Action.CANCEL,
            f"deadline reached after {took} and {still}; nothing can finish the migration "
            "on a link that carries nothing; cancelling, so that the instance runs on "
            "where it is",
            prediction,
        )
    return Decision(
        Action.CONTINUE,
        f"{still}; no handover, pause or new blackout budget is judged on a link that "
        "carries nothing: waiting for it to move again (the hypervisor ends the job if "
        "it does not)",
        prediction,
    )


def _gathering(a: Analysis) -> str:
    if a.passes <= 1:
        copied = 0.0 if a.memory <= 0 else 100.0 * (1 - a.remaining / a.memory)
        left = a.seconds_for(a.remaining)
        tail = "" if left is None else f", about {duration_text(left)} to go"
        return f"first pass, {copied:.0f}% copied{tail}; nothing to decide before it ends"
    return (
        f"pass {a.passes}: gathering evidence (a full pass must be seen from its start to "
        "its end, e.g. after lmwatch restarted) before deciding"
    )


def _rates_text(a: Analysis) -> str:
    assert a.model is not None and a.floor is not None
    return (
        f"the guest writes about {rate_text(a.model.rate)} over a working set of about "
        f"{format_size(a.model.working_set)}, the link moves {rate_text(a.transfer_rate)}, "
        f"the remainder settles near {format_size(a.floor)}"
    )


def _saturated(a: Analysis) -> str:
    assert a.model is not None and a.floor is not None and a.transfer_rate
    this_pass = a.in_pass + a.remaining / a.transfer_rate
    return (
        f"every window seen filled the working set of about "
        f"{format_size(a.model.working_set)}: the guest writes at least "
        f"{rate_text(a.model.rate)}, maybe far more; copying converges at that rate, "
        f"while faster writing leaves about {format_size(a.floor)} at every count; this "
        f"pass (about {duration_text(this_pass)}) is too short to fill the working set, "
        "so its count tells which"
    )


def _either_way(a: Analysis, ctx: MigrationContext) -> str:
    assert a.model is not None and a.floor is not None and a.transfer_rate
    this_pass = a.in_pass + a.remaining / a.transfer_rate
    measured = ctx.change_rate_before_start
    if a.pass_filled and measured:
        first = next((r.duration for r in a.records if r.number == 1), None)
        return (
            f"after one pass copying would converge at the {rate_text(measured)} measured "
            "before the start, but the pass "
            + (f"(about {duration_text(first)}) " if first else "")
            + f"filled the working set of about {format_size(a.model.working_set)}, so "
            "its count cannot show whether the guest still writes that fast (a growing "
            f"guest counts the same); writing {FASTER_READING:g} times as fast it would "
            "leave about "
            f"{format_size(a.floor)} at every count; the next pass (about "
            f"{duration_text(this_pass)}) is too short to fill it and decides"
        )
    if a.rose_to is not None and measured:
        return (
            f"after one pass copying would converge at the rate fitted to it, but the guest "
            f"dirtied {rate_text(a.rose_to)} on average during the pass, more than any "
            f"steady writer measured at {rate_text(measured)} before "
            "the start could: its writing changed, and one pass cannot tell how fast it "
            f"writes now; the next (about {duration_text(this_pass)}) decides"
        )
    return (
        f"after one pass copying would converge if the guest writes steadily over all of "
        f"its memory (about {rate_text(a.model.rate)}), but not if the pass filled a "
        f"working set of what it left, which every pass would leave again (about "
        f"{format_size(a.floor)}); one pass cannot tell which, the next (about "
        f"{duration_text(this_pass)}) decides"
    )


def _converging(a: Analysis, ctx: MigrationContext, now: float) -> str:
    text = (
        f"copying finishes on its own: the remainder ({format_size(a.remaining)} now) "
        f"shrinks to fit the {duration_text(ctx.blackout_budget)} blackout budget at "
        f"{rate_text(a.transfer_rate)}; expected to finish in {duration_text(a.eta)}"
    )
    if ctx.deadline_at is not None and a.eta is not None and now + a.eta > ctx.deadline_at:
        text += f", after the deadline in {duration_text(ctx.deadline_at - now)}"
    return text


def _pause_cheaper_than_slowing(
    profile: Profile,
    a: Analysis,
    ctx: MigrationContext,
    prediction: Prediction,
    settings: PolicySettings,
) -> Decision | None:
    """Pause now when copying converges only with the guest slowed, and the pause
    costs the guest less time than the slowing still will.

    A guest slowed by a fraction `level` loses `level` of every second until copying
    converges; a pause loses every second it lasts. Both are within the profile, so
    take the one that takes less of the guest. Only near the start of a pass, where
    the remainder is known (as for every pause).
    """
    assert a.transfer_rate
    level = a.latest.slowdown if a.latest is not None else 0.0
    if level <= 0 or a.eta is None or not a.fresh:
        return None
    stop = _copy_now(a) + ctx.switchover
    if not pause_fits(profile, a, stop, settings):
        return None
    slowed = level * a.eta
    if stop >= slowed:
        return None
    return Decision(
        Action.PAUSE,
        f"copying converges only with the guest slowed by {level:.0%}: about "
        f"{duration_text(a.eta)} more, {duration_text(slowed)} of its time; pausing now "
        f"takes about {duration_text(stop)} (limit {duration_text(profile.max_pause)})",
        replace(prediction, eta_seconds=stop),
    )


def _early_finish(
    profile: Profile,
    a: Analysis,
    ctx: MigrationContext,
    prediction: Prediction,
    settings: PolicySettings,
) -> Decision | None:
    """In the first pass: hand over or pause now when the change rate measured before
    the start already says copying cannot converge and what is left fits the bound
    `first_pass_headroom` times over; when it fits only once, wait for the pass to end.

    The measured rate counts distinct pages over a short window, so it is at most
    the guest's real write rate: if even it outruns the link, waiting cannot help
    copying converge. It does shrink what a handover or pause must move: the rest of
    the first pass is all of memory not yet sent, the passes after it only what the
    guest rewrote. Committing to the larger move leaves no room for the link to slow
    under it.
    """
    measured = ctx.change_rate_before_start
    rate = a.transfer_rate
    if a.passes > 1 or not measured or not rate or a.latest is None:
        return None
    if measured < rate * (1 - settings.convergence_margin):
        return None
    head = (
        f"copying cannot converge: before the start the guest changed at least "
        f"{rate_text(measured)}, the link moves {rate_text(rate)}"
    )
    headroom = settings.first_pass_headroom
    copy = _copy_now(a)
    handover = f"a handover now would mean about {duration_text(copy)} of degraded running"
    shrink = _first_pass_may_shrink(a, ctx, copy)
    if shrink is None:
        finish = _finish_within(profile, a, ctx, head, prediction, settings, headroom=headroom)
        if finish is not None or not a.fresh:
            return finish
        if not handover_fits(profile, ctx, a, copy, settings):
            return None
        why = (
            f"{handover}, within the {duration_text(profile.max_degraded)} limit but not "
            f"{headroom:g} times over, and it cannot be taken back if the link slows"
        )
    elif handover_fits(profile, ctx, a, copy, settings):
        why = f"{handover}, {shrink}"
    elif pause_fits(profile, a, copy + ctx.switchover, settings):
        why = f"a pause now would stop the instance for about {duration_text(copy)}, {shrink}"
    else:
        return None
    return Decision(
        Action.CONTINUE,
        f"{head}; {why}: waiting for the first pass to end, which leaves only what the "
        "guest rewrote",
        prediction,
    )


def _first_pass_may_shrink(a: Analysis, ctx: MigrationContext, copy: float) -> str | None:
    """Why the first pass's end may leave less than half of what a handover or pause
    would move now (`copy` seconds of it), or None when it cannot.

    What the pass leaves is what the guest wrote during it, at least as much as the
    measurement before the start counted (the guest's count over a longer time is no
    smaller; over a shorter one, no smaller than its share). When that least is half
    or more of the move now, waiting delays the finish by at least as long as it
    could shorten the degraded running or the pause, and may not shorten it at all.
    """
    measured, window, rate = ctx.change_rate_before_start, ctx.change_rate_window, a.transfer_rate
    if not measured or not window or not rate:
        return None
    length = a.in_pass + a.remaining / rate  # the whole first pass
    least = min(float(a.memory), measured * min(length, window)) / rate
    if least >= copy / 2:
        return None
    return (
        f"while the pass's end may leave as little as {duration_text(least)} of it "
        f"(the guest changed {rate_text(measured)} over the {duration_text(window)} "
        "measured before the start)"
    )


def _first_pass_too_long(
    profile: Profile, a: Analysis, ctx: MigrationContext, now: float, settings: PolicySettings
) -> str | None:
    """Why even the current pass ends after the deadline with nothing else to finish it."""
    if ctx.deadline_at is None or not a.transfer_rate or a.passes > 1:
        return None
    copied = a.memory - a.remaining
    if copied < 0.05 * a.memory or now - ctx.started_at < 5.0:
        return None  # the transfer rate of the first moments is no evidence yet
    left = ctx.deadline_at - now
    rest = a.remaining / a.transfer_rate
    if rest <= left:
        return None
    # At the deadline the pass still has this much to send, plus what the guest dirtied.
    behind = a.remaining - a.transfer_rate * max(left, 0.0)
    copy = behind / a.transfer_rate
    if copy + ctx.switchover <= profile.max_blackout:
        return None  # a raised blackout budget could still finish it
    if handover_fits(profile, ctx, a, copy, settings):
        return None
    stop = copy + ctx.switchover
    if pause_fits(profile, a, stop, settings):
        return None
    return (
        f"the first pass alone needs {duration_text(rest)} more, past the deadline in "
        f"{duration_text(left)}, and nothing the profile allows could finish it by then "
        f"({nothing_allowed(profile, ctx)}); cancelling now rather than at the deadline"
    )


def _raise_step(
    profile: Profile,
    a: Analysis,
    ctx: MigrationContext,
    limit: float,
    rates: str,
    prediction: Prediction,
    settings: PolicySettings,
) -> Decision | None:
    """Raise the budget toward what the floor needs, when that fits after the switchover.

    The floor moves with the budget: a larger budget leaves a larger rest at each pass's
    end, which holds more of what the guest dirties next (a page is counted once). So a
    floor above the limit does not rule raising out: copying may still converge with
    the budget at the limit, as the projection with it says.
    """
    assert a.floor is not None and a.transfer_rate
    need = a.floor / a.transfer_rate
    blackout = need + ctx.switchover
    current = ctx.blackout_budget
    if current >= limit:
        return None
    why = (
        f"about {duration_text(blackout)} of blackout with the switchover, above the "
        f"current budget of {duration_text(current)}"
    )
    if need > limit:
        at_limit = a.project_with(ctx, limit, settings, slowing=False)
        if at_limit is None or not at_limit.converges:
            return None
        why = (
            f"about {duration_text(blackout)} of blackout with the switchover at the current "
            f"budget of {duration_text(current)}, but with a budget of "
            f"{duration_text(limit)} each pass carries more of what the guest rewrites "
            "and copying converges"
        )
        need = limit
    step = max(current * settings.blackout_step_factor, current + settings.blackout_min_step)
    target = min(limit, need * settings.budget_margin)
    new = min(limit, max(target, min(step, limit)))
    if new <= current:
        return None
    outlook = a.project_with(ctx, new, settings)
    if outlook is not None:
        prediction = replace(prediction, eta_seconds=outlook.seconds)
    return Decision(
        Action.RAISE_BLACKOUT,
        f"{rates}: {why}; raising the budget to {duration_text(new)} (limit "
        f"{duration_text(profile.max_blackout)} including {duration_text(ctx.switchover)} "
        "of switchover)",
        prediction,
        blackout_budget=new,
    )


def _hopeful_reading_converges(
    a: Analysis, ctx: MigrationContext, limit: float, settings: PolicySettings
) -> bool:
    """Would a straight-line (unsaturated) reading of the one pair seen converge?"""
    assert a.transfer_rate and a.latest is not None
    first = next((r for r in a.records if r.duration is not None), None)
    if first is None or first.duration is None:
        return False
    nxt = next((r for r in a.records if r.number == first.number + 1), None)
    if nxt is None:
        return False
    hopeful = DirtyModel(max(0.0, nxt.size - nxt.carried) / first.duration, float(a.memory))
    in_pass = max(0.0, a.latest.time - a.records[-1].started)
    return project(
        hopeful,
        a.transfer_rate,
        limit,
        unsent=float(a.remaining),
        elapsed_in_pass=in_pass,
        overhead=a.overhead,
        switchover=ctx.switchover,
        outside=a.outside(hopeful),
        settings=settings,
    ).converges


def _slowing(
    profile: Profile,
    a: Analysis,
    ctx: MigrationContext,
    now: float,
    settings: PolicySettings,
) -> str | None:
    """Why waiting for the guest to be slowed will finish it in time, or None."""
    plan = ctx.plan
    if not (plan.arm_slow_down and profile.may_slow_down) or a.latest is None:
        return None
    if a.model is None or not a.transfer_rate or a.eta is None:
        return None
    if ctx.deadline_at is not None and now + a.eta > ctx.deadline_at:
        return None
    level = min(max(a.latest.slowdown, 0.0), 1.0)
    return (
        f"the guest is being slowed ({level:.0%} now): it writes about "
        f"{rate_text(a.model.rate * (1 - level))} while the link moves "
        f"{rate_text(a.transfer_rate)}; as the slow-down rises copying should converge, "
        f"in about {duration_text(a.eta)}"
    )


def _hope(
    profile: Profile, a: Analysis, ctx: MigrationContext, now: float, settings: PolicySettings
) -> tuple[Rule, str] | None:
    """Why waiting may still pay (its rule and reason), or None when it has stopped."""
    assert a.transfer_rate
    if ctx.deadline_at is None and now - ctx.started_at >= settings.max_wait:
        return None  # without a deadline, quiet phases that never finish it stop counting
    limit = blackout_limit(profile, ctx)
    before = ctx.change_rate_before_start
    # Measured over a short window, the rate before the start is close to the write
    # rate at the time, unless that window could have filled the working set (then it
    # only says the working set is small): a guest that was that quiet may be again.
    if (
        before is not None
        and a.model is not None
        and before < a.model.rate
        and before * settings.measure_window < 0.5 * a.model.working_set
        and _would_finish(a.model.with_rate(before), profile, a, ctx, limit, settings)
    ):
        return (
            Rule.QUIETER_PHASE_SEEN,
            f"before the start the guest changed only {rate_text(before)}, at which "
            "copying would finish: waiting for a quieter phase",
        )
    if (
        a.best_model is not None
        and a.latest is not None
        and a.best_model != a.model
        and _would_finish(a.best_model, profile, a, ctx, limit, settings)
    ):
        return (
            Rule.QUIETER_PHASE_SEEN,
            f"passes have been seen with the guest writing only "
            f"{rate_text(a.best_model.rate)}, at which copying would finish: "
            "waiting for a quieter phase",
        )
    if a.shrinking:
        starts = a.pass_starts
        return (
            Rule.STILL_SHRINKING,
            f"the remainder is still shrinking ({format_size(starts[-2])} -> "
            f"{format_size(starts[-1])} a pass); waiting",
        )
    if not a.steady:
        return (
            Rule.RATES_VARY,
            "the rates still vary from pass to pass; waiting for steadier readings",
        )
    elapsed = now - ctx.started_at
    if ctx.deadline_at is not None:
        wait = _patience_left(a, ctx, now, settings)
        if wait > 0:
            return (
                Rule.PATIENCE,
                f"nothing seen so far would finish it, but the deadline is "
                f"{duration_text(ctx.deadline_at - now)} away and workloads change phase; "
                f"waiting {duration_text(wait)} more before giving up",
            )
    elif elapsed < settings.min_patience:
        return (
            Rule.PATIENCE,
            "nothing seen so far would finish it; waiting a little longer for a change",
        )
    return None


def _patience_left(
    a: Analysis, ctx: MigrationContext, now: float, settings: PolicySettings
) -> float:
    """Seconds to keep waiting for a phase change before giving up (0: give up now).

    Readings steady for T seconds say a phase lasts about that long, so it changes within
    the S seconds left with a chance of about S / (T + S); waiting stops paying once that
    falls under 1 − `patience` (T > 3 S: three quarters of the deadline window when the
    readings began with the migration). T counts from the first pass after the first:
    a first pass averages the guest's rate over all of its phases, so a long one says
    nothing of how long the phase now seen lasts.
    """
    assert ctx.deadline_at is not None
    left = max(0.0, ctx.deadline_at - now)
    if settings.patience >= 1.0:
        return left
    since = ctx.started_at if a.passes_since is None else max(ctx.started_at, a.passes_since)
    steady = max(0.0, now - since)
    ratio = settings.patience / (1.0 - settings.patience)  # T / S at which to give up
    return max(0.0, (ratio * left - steady) / (1.0 + ratio))


def _would_finish(
    model: DirtyModel,
    profile: Profile,
    a: Analysis,
    ctx: MigrationContext,
    limit: float,
    settings: PolicySettings,
) -> bool:
    """Whether copying would finish (alone, or by a handover or pause in bounds) if the
    guest wrote as `model` says, from the start of a pass with what is left now."""
    assert a.transfer_rate
    outlook = project(
        model,
        a.transfer_rate,
        limit,
        unsent=float(a.remaining),
        elapsed_in_pass=0.0,
        overhead=a.overhead,
        switchover=ctx.switchover,
        outside=a.outside(model),
        settings=settings,
    )
    return outlook.converges or _fits_somehow(profile, ctx, outlook.floor, a, settings)


def _fits_somehow(
    profile: Profile, ctx: MigrationContext, size: float, a: Analysis, settings: PolicySettings
) -> bool:
    """Whether a remainder of `size` could be finished by handover or a pause in bounds."""
    assert a.transfer_rate
    copy = size / a.transfer_rate
    if handover_fits(profile, ctx, a, copy, settings):
        return True
    stop = copy + ctx.switchover
    return pause_fits(profile, a, stop, settings)


def _finish_within(
    profile: Profile,
    a: Analysis,
    ctx: MigrationContext,
    head: str,
    prediction: Prediction,
    settings: PolicySettings,
    headroom: float = 1.0,
) -> Decision | None:
    """Hand over or pause now, when either fits the profile's bound (a handover
    `headroom` times over: unlike a pause, it cannot be taken back if the link slows).

    Only near the start of a pass: what the guest dirtied since is reported only when
    the pass ends, so later in a pass the remainder is a guess.
    """
    if not a.fresh:
        return None
    copy = _copy_now(a)
    stop = copy + ctx.switchover
    if handover_fits(profile, ctx, a, copy * headroom, settings):
        return Decision(
            Action.HANDOVER,
            f"{head}; handing over now, about {duration_text(copy)} of degraded running "
            f"(limit {duration_text(profile.max_degraded)})",
            replace(prediction, eta_seconds=copy),
        )
    if pause_fits(profile, a, stop, settings):
        return Decision(
            Action.PAUSE,
            f"{head}; pausing now, about {duration_text(stop)} paused "
            f"(limit {duration_text(profile.max_pause)})",
            replace(prediction, eta_seconds=stop),
        )
    return None


def _arriving(a: Analysis, ctx: MigrationContext, prediction: Prediction) -> Prediction:
    """The prediction once the guest is stopped (our pause, or the hypervisor's final
    stop) or handed over: nothing it writes is sent from the source again, so what is
    left moves at the link's rate, and a stop ends with the switch to the destination.
    The projection of passes over a writing guest no longer applies (it said a paused
    guest had minutes to go, and a guest handed over would never finish). On a link
    that has moved nothing for a while there is no ETA (the hypervisor's transfer-rate
    reading keeps its last value)."""
    phase = a.latest.phase if a.latest is not None else Phase.COPYING
    handed = ctx.handed_over or phase is Phase.HANDOVER
    stopped = ctx.paused or phase is Phase.COMPLETING
    rest = a.seconds_for(a.remaining)
    if not (handed or stopped) or rest is None:
        return prediction
    if a.link_still:
        return replace(prediction, eta_seconds=None)
    if handed:
        return replace(
            prediction, eta_seconds=rest, blackout_seconds=None, converges=True, floor_bytes=0
        )
    stop = rest + ctx.switchover
    return replace(
        prediction, eta_seconds=stop, blackout_seconds=stop, converges=True, floor_bytes=0
    )


def _copy_now(a: Analysis) -> float:
    """Seconds to copy what is left now, assuming the fastest writing seen: a handover's
    degraded running, or a pause's copy before the switchover."""
    assert a.transfer_rate
    return a.finish_bound / a.transfer_rate


def _beyond_blackout(
    profile: Profile,
    a: Analysis,
    ctx: MigrationContext,
    now: float,
    head: str,
    prediction: Prediction,
    settings: PolicySettings,
) -> Decision:
    """Neither blackout, handover nor pause finishes it now: slow, wait, or cancel."""
    copy = _copy_now(a)
    stop = copy + ctx.switchover
    again = restart_outlook(profile, a, ctx, now, settings)
    if again is not None:
        return Decision(
            Action.RESTART,
            f"{head}; {restart_reason(again, settings)}",
            replace(prediction, eta_seconds=again.seconds),
            slow_down_initial=again.level,
            planned_rate=again.rate,
            start_by=again.try_until(now, settings),  # the hosts may refuse it a while
            rule=Rule.START_AGAIN,
        )
    slowing = _slowing(profile, a, ctx, now, settings)
    if slowing is not None:
        return Decision(Action.CONTINUE, slowing, prediction, rule=Rule.SLOWING)
    hope = _hope(profile, a, ctx, now, settings)
    if hope is not None:
        rule, why = hope
        return Decision(Action.CONTINUE, f"{head}; {why}", prediction, rule=rule)
    return Decision(
        Action.CANCEL,
        _cancel_reason(profile, a, ctx, head, copy, stop, settings),
        prediction,
        rule=Rule.WAITING_STOPPED_PAYING,
    )


def _limit_text(seconds: float, limit: float, margin: float) -> str:
    """`(limit …)`, and why an estimate under the limit does not fit: the margin
    `handover_fits`/`pause_fits` hold it to."""
    text = f"limit {duration_text(limit)}"
    if seconds <= limit < seconds * margin:
        text += (
            f"; {duration_text(seconds * margin)} with the {margin - 1:.0%} margin "
            "the link's variation asks for"
        )
    return f"({text})"


def _cancel_reason(
    profile: Profile,
    a: Analysis,
    ctx: MigrationContext,
    head: str,
    copy: float,
    stop: float,
    settings: PolicySettings,
) -> str:
    parts = [
        f"a blackout would last about {duration_text(stop)} "
        f"(limit {duration_text(profile.max_blackout)})"
    ]
    if handover_usable(profile, ctx):
        margin = a.margin(settings.handover_safety, settings)
        parts.append(
            f"handover would mean about {duration_text(copy)} of degraded running "
            f"{_limit_text(copy, profile.max_degraded, margin)}"
        )
    elif profile.handover_allowed:
        parts.append("handover was not armed when this migration started")
    else:
        parts.append("handover is forbidden")
    if profile.may_pause:
        margin = a.margin(settings.pause_safety, settings)
        parts.append(
            f"a pause would last about {duration_text(stop)} "
            f"{_limit_text(stop, profile.max_pause, margin)}"
        )
    else:
        parts.append("pausing is not allowed")
    if not profile.may_slow_down:
        parts.append("slowing the guest is not allowed")
    elif not ctx.plan.arm_slow_down:
        parts.append("slowing the guest was not armed at start")
    else:
        parts.append("slowing the guest cannot bring it down in time")
    parts.append("the rates have been steady long enough that waiting will not change this")
    return f"{head}; nothing this profile allows can finish it: {'; '.join(parts)}; cancelling"


def _on_deadline(
    profile: Profile,
    a: Analysis,
    ctx: MigrationContext,
    now: float,
    prediction: Prediction,
    settings: PolicySettings,
) -> Decision:
    assert ctx.deadline_at is not None
    took = duration_text(max(0.0, now - ctx.started_at))
    if now >= ctx.deadline_at:
        why = f"deadline reached after {took}"
    else:
        why = (
            f"the deadline is {duration_text(ctx.deadline_at - now)} away, about as long as "
            "finishing takes"
        )
    if profile.on_deadline is OnDeadline.CANCEL:
        return Decision(
            Action.CANCEL,
            f"{why}; the profile says cancel at the deadline "
            f"({format_size(a.remaining)} still to copy)",
            prediction,
        )
    if a.converges and a.eta is not None and now + a.eta <= ctx.deadline_at:
        return Decision(
            Action.CONTINUE,
            f"{why}, but copying finishes on its own in {duration_text(a.eta)}, in time",
            prediction,
        )
    decision = finish_now(profile, a, ctx, False, why, settings, within_only=True)
    if decision is not None:
        return decision
    return Decision(
        Action.CANCEL,
        f"{why}; the profile says complete, but nothing it allows can finish it now "
        f"({nothing_allowed(profile, ctx)}); cancelling",
        prediction,
    )
