"""Starting a migration again: a slowed one at a higher slow-down start level, and
one whose pause the link stretched.

The hypervisor raises its slow-down by a fixed step every few passes from the level
it started at, and neither can be changed while the job runs. When the guest's
writing grew beyond what the start plan was made for (a measurement before the
start saw a quieter guest), that schedule can run past the deadline, or take far
longer than a job started now at a higher level, chosen as the start plan chooses
it but for the rate seen now. Starting again loses what was copied (and the local
disks' copy) and costs the time to stop the job and start the new one; the
projection counts all of it from now.

`restart_outlook` is the one calculation: the reason text, the prediction and the
decision all read its figures.

A migration also starts again, with the same plan, when a pause of ours outlasts its
bound because the link slowed or stalled under it (`restart_after_pause`): the job is
stopped either way so that the instance resumes on the source, and ending the migration
there would give up while the deadline may leave time for a new job. And when its job
failed while the instance kept running on the source (the link broke for longer than
the hypervisor waits, say: `restart_after_failure`). In every case the new job is
started as soon as the hosts take it, tried again every `restart_retry_seconds` until
the deadline no longer leaves time for it (`try_until`), for `restart_wait_seconds` at
most: a link down now may be back in a minute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from lmwatch.model import (
    Action,
    Decision,
    JobResult,
    MigrationContext,
    Phase,
    Rule,
    Sample,
    StartPlan,
)
from lmwatch.policies.estimators import (
    Analysis,
    History,
    PolicySettings,
    analyse,
    duration_text,
    project,
    rate_text,
    tracked,
)
from lmwatch.policies.start import choose_slowdown, finish_budget
from lmwatch.profiles.schema import Profile


@dataclass(frozen=True, slots=True)
class RestartOutlook:
    """The current job at the hypervisor's schedule against a job started again now."""

    rate: float  # bytes/s the guest writes now (unslowed), as the passes show
    assumed: float | None  # bytes/s the start plan was made for (None: not measured)
    level_now: float  # the slow-down in force now
    current: float | None  # seconds until the current job finishes; None: never
    level: float  # the new job's start level
    seconds: float  # from now until the new job finishes: cost, disks again, memory
    cost: float  # of `seconds`, stopping this job and starting the new one
    disks: float  # of `seconds`, copying the local disks again
    left: float  # seconds until the deadline (infinite without one)
    # guest-seconds taken by slowing until the current job finishes (infinite: never),
    # and until the new one does
    slowed_now: float = math.inf
    slowed: float = 0.0

    @property
    def in_time(self) -> bool:
        """The current job finishes before the deadline: starting again is for speed."""
        return self.current is not None and self.current <= self.left

    def try_until(self, now: float, settings: PolicySettings) -> float:
        """The last clock time to try starting the new job, should the hosts refuse it:
        while it still finishes before the deadline, `restart_wait_seconds` at most."""
        return _try_until(now, self.left, self.seconds, settings)


def restart_outlook(
    profile: Profile,
    a: Analysis,
    ctx: MigrationContext,
    now: float,
    settings: PolicySettings,
) -> RestartOutlook | None:
    """The case for starting again now, or None when there is none.

    There is one when the guest is being slowed (armed at start), this migration was
    not started again already (`max_restarts`), it is still copying, there is
    evidence (a pass seen from its start to its end), the guest writes faster than
    the start plan assumed, and a job started now at a level above the one in force
    (the cost of starting again and the disks' copy included) either

    - finishes before the deadline, where the current job at the hypervisor's own
      schedule does not; or
    - finishes within `restart_gain` of the time the current job still needs, with
      no more of the guest's time taken by slowing (sooner, and no dearer for the
      guest), deadline or not.

    The new job's projection is the start plan's (`start.choose_slowdown`), fed with
    the write rate and the working set the passes show.
    """
    plan = ctx.plan
    latest = a.latest
    if not (plan.arm_slow_down and profile.may_slow_down):
        return None
    if ctx.restarts >= settings.max_restarts or ctx.paused or ctx.handed_over:
        return None
    if latest is None or a.model is None or not a.transfer_rate or a.pairs < 1:
        return None  # no evidence yet: not a pass seen from its start to its end
    rate = a.model.rate
    assumed = ctx.change_rate_before_start
    if assumed is not None and rate <= assumed:
        return None  # the start plan was made for this rate already
    left = math.inf if ctx.deadline_at is None else ctx.deadline_at - now
    finish = finish_budget(profile, ctx.blackout_budget, ctx.switchover, settings)
    current = project(
        a.model,
        a.transfer_rate,
        finish,
        unsent=float(a.remaining),
        elapsed_in_pass=a.in_pass,
        overhead=a.overhead,
        switchover=ctx.switchover,
        slowdown=latest.slowdown,
        slow_step=plan.slow_down_step,
        slow_initial=plan.slow_down_initial,
        slow_armed=True,
        outside=a.outside(a.model),
        settings=settings,
    )
    disks = _disk_bytes(latest) / a.transfer_rate
    cost = settings.restart_seconds + disks
    finishes = current.seconds
    if finishes is not None and finishes <= left:
        # sooner: the new job within the gain of what the current one still needs
        available = finishes * settings.restart_gain - cost
        target = available
        slowed_now = current.slowed
    else:
        # Of the levels that finish within the share of what is left the start plan
        # keeps (the guest may still be growing), the one that takes the least of the
        # guest's time; none does: the highest, if it finishes.
        available = left - cost
        target = available * settings.slowdown_deadline_share
        slowed_now = math.inf
    if available < a.memory / a.transfer_rate:
        return None  # a new job sends all of memory at least once: it cannot be quicker
    choice = choose_slowdown(
        profile,
        a.memory,
        rate,
        a.transfer_rate,
        ctx.blackout_budget,
        ctx.switchover,
        target,
        settings,
        working_set=a.model.working_set,
    )
    if choice.seconds is None or choice.seconds > available:
        return None
    if choice.slowed > slowed_now:
        return None  # sooner, but dearer for the guest (never so when late: infinite)
    level_now = max(latest.slowdown, plan.slow_down_initial)
    if choice.level <= level_now + 1e-9:
        return None  # no higher level than the one in force: starting again gains nothing
    return RestartOutlook(
        rate=rate,
        assumed=assumed,
        level_now=latest.slowdown,
        current=finishes,
        level=choice.level,
        seconds=cost + choice.seconds,
        cost=settings.restart_seconds,
        disks=disks,
        left=left,
        slowed_now=slowed_now,
        slowed=choice.slowed,
    )


def restart_reason(outlook: RestartOutlook, settings: PolicySettings) -> str:
    """What an operator reads: the evidence and the two projections."""
    o = outlook
    assumed = "" if o.assumed is None else f" (the start plan was made for {rate_text(o.assumed)})"
    if o.current is None:
        current = "copying would not finish"
    elif o.in_time:
        current = (
            f"copying would finish in about {duration_text(o.current)}, "
            f"{duration_text(o.slowed_now)} of the guest's time taken by slowing"
        )
    else:
        current = (
            f"copying would finish in about {duration_text(o.current)}, "
            f"past the deadline in {duration_text(o.left)}"
        )
    again = f"about {duration_text(o.cost)} to start again"
    if o.disks > 0:
        again += f" and {duration_text(o.disks)} to copy the local disks again"
    taken = f", {duration_text(o.slowed)} of the guest's time" if o.in_time else ""
    return (
        f"the guest now writes about {rate_text(o.rate)}{assumed}; slowed by "
        f"{o.level_now:.0%} now and raised by {settings.slow_down_step:.0%} every "
        f"{settings.slow_down_passes_per_step} passes, {current}; starting again with the "
        f"slow-down from {o.level:.0%} finishes in about {duration_text(o.seconds)} "
        f"({again}){taken}; starting again"
    )


def _disk_bytes(sample: Sample) -> int:
    return sample.disk_total


@dataclass(frozen=True, slots=True)
class NewJob:
    """The least a job started again takes, against the time left: after a pause of
    ours that a slowed link stretched (rule 1; the job is stopped either way, so that
    the instance resumes on the source), or after the job failed with the instance
    still on the source."""

    cost: float  # seconds to stop the job and start the new one
    disks: float  # seconds to copy the local disks again
    copy: float  # seconds to send memory once at the rate the link gives now
    rate: float  # that rate, bytes/s
    left: float  # seconds until the deadline (infinite without one)

    @property
    def seconds(self) -> float:
        """The least a new job takes from now: it sends all of memory at least once."""
        return self.cost + self.disks + self.copy

    @property
    def fits(self) -> bool:
        return self.seconds <= self.left

    def try_until(self, now: float, settings: PolicySettings) -> float:
        """The last clock time to try starting the new job: while it still fits before
        the deadline, and for `restart_wait_seconds` at most (a link down that long, or
        a destination that keeps refusing, is not waited out)."""
        return _try_until(now, self.left, self.seconds, settings)


def _try_until(now: float, left: float, seconds: float, settings: PolicySettings) -> float:
    """The last clock time to try starting a new job that takes `seconds`, with the
    deadline `left` seconds away: while it still fits, `restart_wait_seconds` at most."""
    return now + max(0.0, min(left - seconds, settings.restart_wait_seconds))


def restart_after_pause(
    a: Analysis, ctx: MigrationContext, rate: float, now: float, settings: PolicySettings
) -> NewJob | None:
    """The case for starting again once our pause outlasts its bound, or None.

    `rate`: bytes/s the pause's copy moves at now; 0 when the link stalled, and then
    the new job is judged at the rate the link carried before (the hypervisor's last
    transfer-rate reading, as after a failed job: `restart_after_failure`) and started
    once the link carries again. There is a case when this migration may still start
    again (`max_restarts`) and the deadline leaves time for the least a new job takes
    at that rate: starting again, the local disks' copy again and one copy of memory.
    The new job is judged from its first pass on like any other; a link that comes
    back to speed makes it quicker than that.
    """
    if ctx.restarts >= settings.max_restarts:
        return None
    if rate <= 0:
        rate = a.transfer_rate or 0.0
        if rate <= 0:
            return None  # the link never moved anything: nothing says a new job could
    outlook = new_job(a, ctx, rate, now, settings)
    return outlook if outlook.fits else None


def new_job(
    a: Analysis, ctx: MigrationContext, rate: float, now: float, settings: PolicySettings
) -> NewJob:
    """The least a job started now takes at `rate` (bytes/s, > 0), and the time left."""
    latest = a.latest
    return NewJob(
        cost=settings.restart_seconds,
        disks=0.0 if latest is None else _disk_bytes(latest) / rate,
        copy=a.memory / rate,
        rate=rate,
        left=math.inf if ctx.deadline_at is None else ctx.deadline_at - now,
    )


def pause_restart_reason(outlook: NewJob, waiting: float | None, settings: PolicySettings) -> str:
    """What an operator reads after the evidence that the pause outlasts its bound.
    `waiting`: on a stalled link, seconds the new job is tried for (None: it starts at
    once)."""
    if waiting is None:
        when = "starting again"
    else:
        when = (
            "starting again once the link carries, trying every "
            f"{duration_text(settings.restart_retry_seconds)} (for {duration_text(waiting)})"
        )
    resumes = "stopping the job, so that the instance resumes on the source"
    return f"{resumes}, and {when}: {_room(outlook)}"


def _room(outlook: NewJob) -> str:
    o = outlook
    parts = [f"about {duration_text(o.cost)} to start again"]
    if o.disks > 0:
        parts.append(f"{duration_text(o.disks)} to copy the local disks again")
    parts.append(f"at least {duration_text(o.copy)} to copy memory at {rate_text(o.rate)}")
    room = "no deadline" if math.isinf(o.left) else f"the deadline is {duration_text(o.left)} away"
    return f"{room}, time for {', '.join(parts)}"


def restart_after_failure(
    history: History,
    ctx: MigrationContext,
    ended: JobResult,
    source: str,
    now: float,
    settings: PolicySettings,
) -> Decision | None:
    """Start again once the job failed, or None (the migration ends failed).

    The job must have failed with the instance running on `source` as before (not
    handed over, not lost: intact where it was); the migration must not have started
    again already (`max_restarts`, shared with the other restarts); and the deadline
    must leave time for the least a new job takes at the rate the link carried before
    the failure (`new_job`). The new job is tried until the last moment it still fits
    before the deadline, and for `restart_wait_seconds` at most (a link down that long,
    or a destination that keeps refusing, is not waited out). The decision's
    `start_by` is the last clock time to try.
    """
    # `ended.handed_over` says whether the hosts switched; a handover asked
    # (`ctx.handed_over`) that the failure came before left the instance intact.
    if ended.phase is not Phase.FAILED or ended.running_on != source or ended.handed_over:
        return None
    if ctx.restarts >= settings.max_restarts:
        return None
    a = analyse(tracked(history, settings), ctx, settings)
    rate = a.transfer_rate
    if not rate or rate <= 0:
        return None  # the link never moved anything: nothing says a new job could
    outlook = new_job(a, ctx, rate, now, settings)
    if not outlook.fits:
        return None
    start_by = outlook.try_until(now, settings)
    until = f"trying for {duration_text(start_by - now)}"
    failed = ended.error or "no cause given"
    return Decision(
        Action.RESTART,
        f"the job failed ({failed}) and the instance still runs on {source}; starting "
        f"again as soon as the hosts take a new job, every "
        f"{duration_text(settings.restart_retry_seconds)} ({until}): {_room(outlook)}",
        planned_rate=ctx.change_rate_before_start if a.model is None else a.model.rate,
        start_by=start_by,
        rule=Rule.JOB_FAILED,
    )


def restart_plan(ctx: MigrationContext, decision: Decision) -> StartPlan:
    """The plan a migration is started again with, after `decision` (an
    `Action.RESTART`): the same as before, with the blackout budget in force now
    (after the new job's first pass, as at the start) and the new slow-down start
    level; after a pause that outlasted its bound, with the same level."""
    plan = ctx.plan
    level = decision.slow_down_initial
    if level is None:
        if decision.rule is Rule.PAUSE_OUTLASTS_BOUND:
            why = (
                "the job before was stopped when its pause outlasted the profile's bound "
                "(the link slowed or stalled under it)"
            )
        elif decision.rule is Rule.JOB_FAILED:
            why = "the job before failed with the instance still on the source"
        else:
            raise ValueError("a restart decision carries its slow-down start level")
        return replace(
            plan,
            blackout_budget=ctx.blackout_budget,
            reason=f"started again with the same plan: {why}",
        )
    rate = decision.planned_rate
    wrote = "" if rate is None else f" for a guest writing about {rate_text(rate)}"
    return replace(
        plan,
        slow_down_initial=level,
        blackout_budget=ctx.blackout_budget,
        reason=(
            f"started again with the slow-down armed at {level:.0%} from the start "
            f"(was {plan.slow_down_initial:.0%}){wrote}"
        ),
    )
