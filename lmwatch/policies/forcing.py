"""Finishing a migration now: force-complete, and `on_deadline: complete`.

The least disruptive method the profile allows, in this order: a blackout that
fits `max_blackout`; a handover that fits `max_degraded`; a pause that fits
`max_pause`; then, because someone asked to finish now, a handover or a pause
longer than the profile's bound (reported as such); then a pause the operator
explicitly accepted. Otherwise `ForceRefused`; so too while nothing has moved for
`LINK_STILL_SECONDS` (whatever the caller accepts: the link may have stalled, and a
handover or a pause on it would stop or strand the instance).

While the instance's local disks are not in sync nothing may stop or move the
guest: a request to finish then is accepted and answered with `continue`, saying
that it applies once the disks are in sync (the engine keeps it until then).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from lmwatch.model import Action, Decision, MigrationContext, Phase, Prediction, Sample
from lmwatch.policies.estimators import (
    DEFAULT,
    Analysis,
    History,
    PolicySettings,
    analyse,
    disk_outlook,
    duration_text,
    rate_text,
    tracked,
)
from lmwatch.policies.track import PAUSE_WINDOW
from lmwatch.policies.violations import pause_bound, stop_bound
from lmwatch.profiles.schema import Profile
from lmwatch.units import format_size

_RATE_WINDOW = PAUSE_WINDOW  # seconds: the shortest span a paused rate is measured over
# At a pause's last look the rate is read over a shorter span, the shortest the
# hypervisor's counters say something over (it sends in bursts), so that a link that
# failed within the last second shows as such: no later look could still stop the job
# in time.
_LAST_LOOK_SPAN = 0.5
MIN_LOOK = 0.05  # seconds: the nearest a look is brought forward to


class ForceRefused(Exception):
    """The profile allows no way to finish now."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def blackout_limit(profile: Profile, ctx: MigrationContext) -> float:
    """The largest budget to hand the hypervisor: `max_blackout` less the switchover.

    The hypervisor stops the guest once the remainder's copy fits the budget; the
    switchover (stopping, moving device state, resuming) comes on top of it.
    """
    return max(0.0, profile.max_blackout - ctx.switchover)


def handover_usable(profile: Profile, ctx: MigrationContext) -> bool:
    """Handover needs the profile's permission *and* arming at start."""
    return profile.handover_allowed and ctx.plan.arm_handover


def switch_outlasts_bound(profile: Profile, ctx: MigrationContext) -> bool:
    """Every switch measured on this host pair (stopping the guest, moving its device
    state, resuming it) took longer than any stop the profile allows: no way to
    complete, by a final stop, a pause or a handover, stays within it. Never on the
    assumed default, nor when one measured switch was short enough (the longest may
    have been slowed by something else)."""
    least = ctx.switchover_least
    return least is not None and least > stop_bound(profile) + 1e-9


def handover_fits(
    profile: Profile,
    ctx: MigrationContext,
    analysis: Analysis,
    copy: float | None,
    settings: PolicySettings,
) -> bool:
    """A handover now, `copy` seconds of degraded running, fits `max_degraded`, and its
    blackout (the switch to the destination) fits the profile."""
    if copy is None or not handover_usable(profile, ctx) or switch_outlasts_bound(profile, ctx):
        return False
    return copy * analysis.margin(settings.handover_safety, settings) <= profile.max_degraded


def pause_fits(
    profile: Profile, analysis: Analysis, stop: float | None, settings: PolicySettings
) -> bool:
    """A pause now, lasting `stop` seconds, fits `max_pause`."""
    if stop is None or not profile.may_pause:
        return False
    return stop * analysis.margin(settings.pause_safety, settings) <= profile.max_pause


def link_still_text(analysis: Analysis) -> str:
    """What an operator reads when nothing has moved for a while (`Analysis.link_still`):
    the same words whether the policy waits or a request to finish is refused."""
    return (
        f"nothing has moved for {duration_text(analysis.still_for)} "
        f"({format_size(analysis.remaining)} left, pass {analysis.passes}): the link may "
        "have stalled"
    )


def already_finishing(history: History, ctx: MigrationContext) -> str | None:
    """Why there is nothing to do, when the migration is past copying."""
    if ctx.handed_over:
        return "it has been handed over; the rest of its memory is arriving"
    if ctx.paused:
        return "it is paused; the rest of its memory is being copied"
    latest = tracked(history).latest
    if latest is not None and latest.phase is not Phase.COPYING:
        return f"it is {latest.phase.value}"
    return None


@dataclass(frozen=True, slots=True)
class OutlastingPause:
    """Our pause will outlast its bound: the evidence (the caller says what is done)."""

    why: str  # as an operator reads it
    rate: float  # bytes/s the rest moves at now; 0 when the link stalled
    # Seconds finishing takes at that rate (the rest and the switch), when that is no
    # longer than a stop takes (`stop_takes`): stopping the job would keep the instance
    # stopped as long or longer and lose the copy, so the pause is let finish. None
    # when stopping ends the pause sooner.
    finish_in: float | None = None


def last_look(
    profile: Profile, ctx: MigrationContext, settings: PolicySettings = DEFAULT
) -> float | None:
    """The last clock time at which a look at our pause can still stop the job soon
    enough for the instance to run again within the pause's bound: the bound's end less
    the time a stop takes (`cancel_resume`, or longer where stops between these hosts
    were measured to take longer). None when no pause of ours runs (or the operator
    accepted one beyond the profile)."""
    if not ctx.paused or ctx.handed_over or ctx.accept_pause or ctx.paused_at is None:
        return None
    return ctx.paused_at + pause_bound(profile) - stop_takes(ctx, settings)


def stop_takes(ctx: MigrationContext, settings: PolicySettings = DEFAULT) -> float:
    """Seconds from stopping a job to the instance running on the source again:
    `cancel_resume`, or longer where stops between these hosts were measured to take
    longer."""
    return max(settings.cancel_resume, ctx.cancel_resume or 0.0)


def next_look_in(
    profile: Profile,
    ctx: MigrationContext,
    now: float,
    interval: float,
    settings: PolicySettings = DEFAULT,
) -> float:
    """Seconds until the migration is sampled again: `interval`, or sooner so that our
    pause is sampled at its `last_look` (a look after it could no longer keep the pause
    within its bound, whatever it saw) and half a second before it (the span its rate
    is then read over)."""
    last = last_look(profile, ctx, settings)
    if last is None:
        return interval
    for look in (last - _LAST_LOOK_SPAN, last):
        if now + MIN_LOOK <= look < now + interval:
            return look - now
    return interval


def pause_outlasting(
    profile: Profile,
    history: History,
    ctx: MigrationContext,
    settings: PolicySettings = DEFAULT,
) -> OutlastingPause | None:
    """Why our pause will outlast its bound at the rate the rest now moves, or None.

    A pause is chosen because its copy was predicted to fit; if the link then stalls
    or slows, waiting keeps the guest stopped for as long as the link takes to fail.
    The bound is `max_pause` (`max_blackout` when the profile does not allow pausing:
    such a pause came from finishing within the profile). Not for a pause the operator
    accepted beyond the profile. The rate is measured over the last second or more of
    the pause (samples taken closer together say little about a stall), and from the
    pause's last look on (`last_look`) over its last half second or more: no later look
    could stop the job in time, so a link that failed within the last second must show.
    A pause that outlasts its bound on a link that has moved nothing for the last half
    second or more is reported stalled (rate 0: no new job is started on it). One that
    finishes, at the rate the rest moves now, no later than a stop would let the
    instance run again carries `finish_in`: stopping would not shorten it.
    """
    if not ctx.paused or ctx.handed_over or ctx.accept_pause:
        return None
    track = tracked(history)
    stopped = track.stopped  # the latest samples taken while it was stopped
    if track.stopped_count < 2 or track.first_stopped is None:
        return None
    start = ctx.paused_at if ctx.paused_at is not None else track.first_stopped.time
    last = stopped[-1]
    final = last_look(profile, ctx, settings)
    span = _LAST_LOOK_SPAN if final is not None and last.time >= final - MIN_LOOK else _RATE_WINDOW
    before = next((s for s in reversed(stopped) if s.time <= last.time - span), None)
    if before is None:
        return None
    interval = last.time - before.time
    left = last.memory_remaining
    if interval <= 0 or left <= 0:
        return None
    bound = pause_bound(profile)
    moved = max(0, last.memory_transferred - before.memory_transferred)
    so_far = max(0.0, last.time - start)

    def stalled(still: float) -> OutlastingPause:
        return OutlastingPause(
            f"paused {duration_text(so_far)} ago and nothing has moved for "
            f"{duration_text(still)} ({format_size(left)} left): the link has stalled, and "
            f"waiting would keep the instance stopped past {duration_text(bound)}",
            0.0,
        )

    if moved == 0:
        return stalled(interval)
    rate = moved / interval
    finish_in = left / rate + ctx.switchover  # the rest and the switch, at that rate
    total = so_far + finish_in
    if total <= bound:
        return None
    # The pause outlasts its bound either way; whether the link still moves decides
    # between starting again and cancelling: read from the last half second or more, so
    # that a link that broke within the span above is not taken for a slow one.
    still = _still_for(stopped)
    if still >= _LAST_LOOK_SPAN:
        return stalled(still)
    return OutlastingPause(
        f"paused {duration_text(so_far)} ago; the rest ({format_size(left)}) now moves at "
        f"{format_size(rate)}/s, so the pause would last about {duration_text(total)} "
        f"(limit {duration_text(bound)})",
        rate,
        finish_in if finish_in <= stop_takes(ctx, settings) else None,
    )


def _still_for(stopped: Sequence[Sample]) -> float:
    """Seconds over which the latest stopped samples moved nothing."""
    last = stopped[-1]
    since = last.time
    for sample in reversed(stopped):
        if sample.memory_transferred != last.memory_transferred:
            break
        since = sample.time
    return last.time - since


def finish_now(
    profile: Profile,
    analysis: Analysis,
    ctx: MigrationContext,
    accept_pause: bool,
    why: str,
    settings: PolicySettings = DEFAULT,
    *,
    within_only: bool = False,
) -> Decision | None:
    """The least disruptive way to finish now, or None when the profile allows none.

    `why` opens each reason, e.g. "finishing on request" or "deadline reached".
    `within_only` keeps to the profile's bounds (no handover or pause beyond them).
    """
    prediction = analysis.prediction()
    size = analysis.finish_bound
    copy = analysis.seconds_for(size)
    blackout = None if copy is None else copy + ctx.switchover
    left = f"{format_size(size)} left"
    limit = blackout_limit(profile, ctx)

    if copy is not None and blackout is not None and blackout <= profile.max_blackout:
        budget = min(limit, copy * settings.budget_margin)
        if budget > ctx.blackout_budget:
            return Decision(
                Action.RAISE_BLACKOUT,
                f"{why}: raising the blackout budget to {duration_text(budget)} finishes it, "
                f"about {duration_text(blackout)} of blackout for the {left} "
                f"(limit {duration_text(profile.max_blackout)})",
                prediction,
                blackout_budget=budget,
            )
        if not within_only:  # at a deadline the budget has evidently not finished it
            return Decision(
                Action.CONTINUE,
                f"{why}: the current blackout budget of {duration_text(ctx.blackout_budget)} "
                f"already covers the {left}; it completes at the end of this pass "
                f"with about {duration_text(blackout)} of blackout",
                prediction,
            )

    usable = handover_usable(profile, ctx)
    if handover_fits(profile, ctx, analysis, copy, settings):
        return _handover(why, left, copy, profile, prediction, within=True)
    pause = blackout
    if pause_fits(profile, analysis, pause, settings):
        return _pause(why, left, pause, profile, prediction, within=True)
    if within_only:
        return None
    if usable:
        return _handover(why, left, copy, profile, prediction, within=False)
    if profile.may_pause:
        return _pause(why, left, pause, profile, prediction, within=False)
    if accept_pause:
        return Decision(
            Action.PAUSE,
            f"{why}: the profile allows no way to finish now, but the operator accepted a "
            f"pause; pausing for about {duration_text(pause)} to copy the {left}",
            prediction,
        )
    return None


def _handover(
    why: str,
    left: str,
    copy: float | None,
    profile: Profile,
    prediction: Prediction,
    within: bool,
) -> Decision:
    limit = f"limit {duration_text(profile.max_degraded)}"
    bound = limit if within else f"above the profile's {limit}"
    return Decision(
        Action.HANDOVER,
        f"{why}: handing over with {left}, about {duration_text(copy)} of degraded "
        f"running on the destination ({bound})",
        replace(prediction, eta_seconds=copy),
    )


def _pause(
    why: str,
    left: str,
    pause: float | None,
    profile: Profile,
    prediction: Prediction,
    within: bool,
) -> Decision:
    limit = f"limit {duration_text(profile.max_pause)}"
    bound = limit if within else f"above the profile's {limit}"
    return Decision(
        Action.PAUSE,
        f"{why}: pausing the instance for about {duration_text(pause)} to copy the {left} "
        f"({bound})",
        replace(prediction, eta_seconds=pause),
    )


def nothing_allowed(profile: Profile, ctx: MigrationContext) -> str:
    """Which permissions are missing, as a phrase."""
    parts = [f"a blackout of at most {duration_text(profile.max_blackout)} is too short"]
    if profile.handover_allowed and not ctx.plan.arm_handover:
        parts.append("handover was not armed when this migration started")
    elif not profile.handover_allowed:
        parts.append("handover is forbidden")
    if not profile.may_pause:
        parts.append("pausing is not allowed")
    return ", ".join(parts)


def force_complete(
    profile: Profile,
    history: History,
    ctx: MigrationContext,
    now: float,
    accept_pause: bool,
    settings: PolicySettings = DEFAULT,
) -> Decision:
    """Finish now with the least disruptive method the profile allows.

    Raises `ForceRefused` when the profile allows none and `accept_pause` is False.
    """
    track = tracked(history, settings)
    analysis = analyse(track, ctx, settings)
    done = already_finishing(track, ctx)
    if done is not None:
        return Decision(
            Action.CONTINUE,
            f"nothing to force: {done}",
            analysis.prediction(),
        )
    if analysis.link_still:
        raise ForceRefused(
            f"{link_still_text(analysis)}, and a handover or a pause now would stop or "
            "strand the instance on a link that carries nothing; ask again once it moves"
        )
    disks = disk_outlook(track, settings)
    if disks is not None:
        when = (
            f"in about {duration_text(disks.seconds)}"
            if disks.seconds is not None and not disks.never
            else "when they are"
        )
        speed = f" at {rate_text(disks.rate)}" if disks.rate else ""
        return Decision(
            Action.CONTINUE,
            f"finishing on request once the disks are in sync ({format_size(disks.remaining)} "
            f"of {format_size(disks.total)} left{speed}, {when}): the instance may not stop "
            "or move before its disks are whole on the destination",
            analysis.prediction(),
        )
    decision = finish_now(profile, analysis, ctx, accept_pause, "finishing on request", settings)
    if decision is None:
        size = format_size(analysis.finish_bound)
        raise ForceRefused(
            f"profile {profile.name!r} allows no way to finish now with {size} left: "
            f"{nothing_allowed(profile, ctx)}; accept a pause to force it"
        )
    return decision
