"""`decide`: what to do with a running migration, given its profile and samples.

The rules, in order (DESIGN.md section 4):

1. past copying (paused, handed over, completing, ended) -> continue;
2. an operator asked to finish now -> as force-complete, when the profile allows it;
3. the deadline has passed -> `on_deadline` (complete the least disruptive way, or cancel);
4. before the first full pass ends -> continue;
5. converging within the blackout budget -> continue;
6. the remainder's floor fits `max_blackout` -> raise the budget one step;
7. slowing the guest is armed and will be enough in time -> continue;
8. handover fits `max_degraded` (armed at start) -> hand over;
9. a pause fits `max_pause` -> pause;
10. still shrinking, or rates too unsteady to judge -> continue;
11. otherwise cancel now, saying why: waiting cannot help.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmwatch.model import Action, Decision, MigrationContext, Prediction, Sample
from lmwatch.policies.estimators import (
    DEFAULT,
    Analysis,
    PolicySettings,
    analyse,
    duration_text,
    eta_seconds,
    rate_text,
)
from lmwatch.policies.forcing import (
    ForceRefused,
    already_finishing,
    finish_now,
    force_complete,
    handover_usable,
    nothing_allowed,
)
from lmwatch.profiles.schema import OnDeadline, Profile
from lmwatch.units import format_size


def decide(
    profile: Profile,
    history: Sequence[Sample],
    ctx: MigrationContext,
    now: float,
    settings: PolicySettings = DEFAULT,
) -> Decision:
    """The next step for a running migration; pure, never raises on valid input."""
    a = analyse(history, ctx, settings)
    prediction = a.prediction(settings.device_state_seconds)

    done = already_finishing(history, ctx)
    if done is not None:
        return Decision(Action.CONTINUE, f"nothing to do: {done}", prediction)

    if ctx.force:
        try:
            return force_complete(profile, history, ctx, now, ctx.accept_pause, settings)
        except ForceRefused:
            pass  # the refusal was reported to the caller; keep supervising

    if ctx.deadline_at is not None and now >= ctx.deadline_at:
        return _on_deadline(profile, a, ctx, now, prediction, settings)

    if ctx.blackout_budget > profile.max_blackout:
        return Decision(
            Action.RAISE_BLACKOUT,
            f"the profile now allows at most {duration_text(profile.max_blackout)} of blackout; "
            f"lowering the budget from {duration_text(ctx.blackout_budget)}",
            prediction,
            blackout_budget=profile.max_blackout,
        )

    if a.latest is None:
        return Decision(Action.CONTINUE, "waiting for the first progress report", prediction)

    if a.passes < 2:
        return Decision(Action.CONTINUE, _first_pass(a), prediction)

    rate, change, floor = a.transfer_rate, a.change_rate, a.floor
    if not rate or change is None or floor is None:
        return Decision(
            Action.CONTINUE,
            f"pass {a.passes}: still measuring the transfer and change rates",
            prediction,
        )

    if a.converges:
        return Decision(Action.CONTINUE, _converging(a, ctx, now, settings), prediction)

    rates = (
        f"the guest changes {rate_text(change)}, the link moves {rate_text(rate)}, "
        f"the remainder settles near {format_size(floor)}"
    )

    raised = _raise_step(profile, a, ctx, rates, prediction, settings)
    if raised is not None:
        return raised

    slowing = _slowing(profile, a, ctx, now, settings)
    if slowing is not None:
        return Decision(Action.CONTINUE, slowing, prediction)

    if a.passes_done < settings.min_passes_for_verdict:
        return Decision(
            Action.CONTINUE,
            f"copying is not converging yet ({rates}); pass {a.passes}, "
            f"waiting for {settings.min_passes_for_verdict} full passes before judging",
            prediction,
        )

    return _beyond_blackout(profile, a, ctx, rates, prediction, settings)


def _first_pass(a: Analysis) -> str:
    copied = 0.0 if a.memory <= 0 else 100.0 * (1 - a.remaining / a.memory)
    left = a.seconds_for(a.remaining)
    tail = "" if left is None else f", about {duration_text(left)} to go"
    return f"first pass, {copied:.0f}% copied{tail}; nothing to decide before it ends"


def _converging(a: Analysis, ctx: MigrationContext, now: float, settings: PolicySettings) -> str:
    text = (
        f"copying finishes on its own: the remainder ({format_size(a.remaining)} now, "
        f"settling near {format_size(a.floor)}) fits the {duration_text(ctx.blackout_budget)} "
        f"blackout budget at {rate_text(a.transfer_rate)}; expected to finish in "
        f"{duration_text(a.eta)}"
    )
    if ctx.deadline_at is not None and a.eta is not None and now + a.eta > ctx.deadline_at:
        text += f", after the deadline in {duration_text(ctx.deadline_at - now)}"
    return text


def _raise_step(
    profile: Profile,
    a: Analysis,
    ctx: MigrationContext,
    rates: str,
    prediction: Prediction,
    settings: PolicySettings,
) -> Decision | None:
    """One step up the blackout budget, when the floor fits `max_blackout`."""
    assert a.floor is not None and a.transfer_rate
    need = a.floor / a.transfer_rate
    blackout = need + settings.device_state_seconds
    current = ctx.blackout_budget
    if blackout > profile.max_blackout or current >= profile.max_blackout:
        return None
    step = max(current * settings.blackout_step_factor, current + settings.blackout_min_step)
    target = max(min(profile.max_blackout, need * settings.budget_margin), current)
    new = min(profile.max_blackout, step, max(target, current + settings.blackout_min_step))
    if new <= current:
        return None
    return Decision(
        Action.RAISE_BLACKOUT,
        f"{rates}, about {duration_text(blackout)} of blackout, above the current budget of "
        f"{duration_text(current)}; raising the budget to {duration_text(new)} "
        f"(limit {duration_text(profile.max_blackout)})",
        prediction,
        blackout_budget=new,
    )


def _slowing(
    profile: Profile,
    a: Analysis,
    ctx: MigrationContext,
    now: float,
    settings: PolicySettings,
) -> str | None:
    """Why waiting for the guest to be slowed will finish it, or None when it will not."""
    plan = ctx.plan
    if not (plan.arm_slow_down and profile.may_slow_down) or a.latest is None:
        return None
    level = min(max(a.latest.slowdown, 0.0), 1.0)
    rate, change = a.transfer_rate, a.change_rate
    if level >= settings.max_slowdown or not rate or not change or level >= 1.0:
        return None
    unslowed = change / (1 - level)
    target_change = rate * (1 - settings.convergence_margin)
    needed = 1 - target_change / unslowed
    if needed <= level:
        # The readings say the current level should do, yet copying does not converge: a
        # pass only sees the pages it can re-send, so the change rate reads low. Expect
        # at least one more step.
        needed = level + (plan.slow_down_step or settings.slow_down_initial)
    if needed > settings.max_slowdown:
        return None
    steps = 0
    reached = level
    while reached < needed:
        if reached < plan.slow_down_initial:
            reached = plan.slow_down_initial
        elif plan.slow_down_step > 0:
            reached += plan.slow_down_step
        else:
            return None
        steps += 1
    pass_time = a.finish_remaining / rate
    slowed_change = unslowed * (1 - needed)
    seconds = steps * settings.slow_down_passes_per_step * pass_time + eta_seconds(
        a.finish_remaining,
        rate,
        slowed_change,
        max(ctx.blackout_budget, 1e-6),
        slowed_change * settings.min_pass_seconds,
        settings.device_state_seconds,
    )
    if ctx.deadline_at is not None and now + seconds > ctx.deadline_at:
        return None
    return (
        f"the guest is being slowed ({level:.0%} now): it changes {rate_text(change)} "
        f"while the link moves {rate_text(rate)}; copying should converge once the "
        f"slow-down reaches about {needed:.0%}, in about {duration_text(seconds)}"
    )


def _beyond_blackout(
    profile: Profile,
    a: Analysis,
    ctx: MigrationContext,
    rates: str,
    prediction: Prediction,
    settings: PolicySettings,
) -> Decision:
    """Raising the blackout cannot finish it: handover, pause, wait, or cancel."""
    assert a.transfer_rate
    size = a.finish_remaining
    copy = size / a.transfer_rate
    degraded = copy * settings.handover_safety
    pause = (copy + settings.device_state_seconds) * settings.pause_safety
    head = f"copying cannot converge: {rates}"

    if handover_usable(profile, ctx) and degraded <= profile.max_degraded:
        return Decision(
            Action.HANDOVER,
            f"{head}; handing over now, about {duration_text(copy)} of degraded running "
            f"(limit {duration_text(profile.max_degraded)})",
            prediction,
        )
    if profile.may_pause and pause <= profile.max_pause:
        return Decision(
            Action.PAUSE,
            f"{head}; pausing now, about "
            f"{duration_text(copy + settings.device_state_seconds)} paused "
            f"(limit {duration_text(profile.max_pause)})",
            prediction,
        )
    if a.shrinking:
        starts = a.pass_starts
        return Decision(
            Action.CONTINUE,
            f"{head}, but the remainder is still shrinking "
            f"({format_size(starts[-2])} -> {format_size(starts[-1])} a pass); waiting",
            prediction,
        )
    if a.confidence < settings.hope_confidence and a.passes_done < settings.max_hope_passes:
        return Decision(
            Action.CONTINUE,
            f"{head}, but the rates are still unsteady (confidence {a.confidence:.0%}); "
            "waiting for steadier readings before giving up",
            prediction,
        )
    return Decision(Action.CANCEL, _cancel_reason(profile, ctx, head, copy, settings), prediction)


def _cancel_reason(
    profile: Profile,
    ctx: MigrationContext,
    head: str,
    copy: float,
    settings: PolicySettings,
) -> str:
    blackout = copy + settings.device_state_seconds
    parts = [
        f"a blackout would last about {duration_text(blackout)} "
        f"(limit {duration_text(profile.max_blackout)})"
    ]
    if handover_usable(profile, ctx):
        parts.append(
            f"handover would mean about {duration_text(copy)} of degraded running "
            f"(limit {duration_text(profile.max_degraded)})"
        )
    elif profile.handover_allowed:
        parts.append("handover was not armed when this migration started")
    else:
        parts.append("handover is forbidden")
    if profile.may_pause:
        parts.append(
            f"a pause would last about {duration_text(blackout)} "
            f"(limit {duration_text(profile.max_pause)})"
        )
    else:
        parts.append("pausing is not allowed")
    if not profile.may_slow_down:
        parts.append("slowing the guest is not allowed")
    elif not ctx.plan.arm_slow_down:
        parts.append("slowing the guest was not armed at start")
    else:
        parts.append("slowing the guest cannot bring it down in time")
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
    why = f"deadline reached after {took}"
    if profile.on_deadline is OnDeadline.CANCEL:
        return Decision(
            Action.CANCEL,
            f"{why}; the profile says cancel at the deadline "
            f"({format_size(a.remaining)} still to copy)",
            prediction,
        )
    decision = finish_now(profile, a, ctx, False, why, settings)
    if decision is not None:
        return decision
    return Decision(
        Action.CANCEL,
        f"{why}; the profile says complete, but nothing it allows can finish it now "
        f"({nothing_allowed(profile, ctx)}); cancelling",
        prediction,
    )
