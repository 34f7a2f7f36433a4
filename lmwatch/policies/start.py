"""`plan_start`: how to start a migration, and `deadline_at`.

Handover and slow-down can only be used later when armed at start, so arm them
whenever the profile allows them and the hosts can do them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmwatch.model import Capabilities, InstanceInfo, StartPlan
from lmwatch.policies.estimators import (
    DEFAULT,
    DirtyModel,
    PolicySettings,
    Projection,
    duration_text,
    project,
    rate_text,
)
from lmwatch.profiles.schema import Profile
from lmwatch.units import format_size


def measuring_pays(
    memory_bytes: int, bandwidth: float | None, window: float, settings: PolicySettings = DEFAULT
) -> bool:
    """Whether measuring the guest's change rate before the start is worth the `window`
    seconds the start waits for it.

    The measurement lets the start plan act before the first pass ends (hand over at
    once, slow down from the start) where the guest writes faster than the link
    carries. When one pass of all memory takes less than `measure_min_pass_windows`
    windows, the first pass itself tells as much (and what it left) in about the
    time the measurement would take, and the migration is under way meanwhile.
    Unknown bandwidth: measure."""
    return measurement_skipped(memory_bytes, bandwidth, window, settings) is None


def measurement_skipped(
    memory_bytes: int, bandwidth: float | None, window: float, settings: PolicySettings = DEFAULT
) -> str | None:
    """Why the change rate is not measured before the start (`measuring_pays`), for
    the timeline; None when it is measured."""
    if bandwidth is None or bandwidth <= 0:
        return None
    one_pass = memory_bytes / bandwidth
    if one_pass >= settings.measure_min_pass_windows * window:
        return None
    return (
        f"the change rate is not measured before the start: one pass of "
        f"{format_size(memory_bytes)} takes about {duration_text(one_pass)}, and the "
        "first pass tells as much in about the time a measurement takes"
    )


def deadline_at(
    profile: Profile, memory_bytes: int, started_at: float, disk_bytes: int = 0
) -> float | None:
    """Absolute clock time of the profile's deadline, or None when it has none.

    A deadline per GiB counts every byte that moves: memory and local disks."""
    seconds = profile.deadline_seconds(memory_bytes + disk_bytes)
    return None if seconds is None else started_at + seconds


def plan_start(
    profile: Profile,
    info: InstanceInfo,
    capabilities: Capabilities,
    change_rate: float | None,
    bandwidth: float | None,
    settings: PolicySettings = DEFAULT,
    switchover: float | None = None,
) -> StartPlan:
    """Arm what the profile allows and the hosts support; pick the budgets.

    The budget leaves room for the switchover cost (learned for the host pair, or
    the conservative default), so that the blackout stays within `max_blackout`.
    During the first pass a lower one is held (`first_pass_blackout`): the hypervisor
    may stop the guest whenever what it has not sent yet fits the budget, and in the
    first pass that is the tail of memory, a whole budget's worth however little the
    guest rewrites, copied while the guest is stopped and exposed to the link slowing
    or breaking under it. The decision after the first pass raises it.
    """
    arm_handover = profile.handover_allowed and capabilities.handover
    arm_slow_down = profile.may_slow_down and capabilities.slow_down
    switch = settings.switchover_seconds if switchover is None else switchover
    budget = min(settings.initial_blackout, max(0.0, profile.max_blackout - switch))
    first_pass = settings.first_pass_blackout if settings.first_pass_blackout < budget else None
    held = (
        ""
        if first_pass is None
        else f"{duration_text(first_pass)} blackout budget during the first pass and a "
    )
    parts = [
        f"{info.name} ({format_size(info.memory_bytes)}) starts with a {held}"
        f"{duration_text(budget)} blackout budget{' after it' if held else ''} (limit "
        f"{duration_text(profile.max_blackout)}, {duration_text(switch)} of it for the "
        "switchover)"
    ]

    if arm_handover:
        parts.append("handover armed")
    elif profile.handover_allowed:
        parts.append("handover allowed but not supported between these hosts")

    stuck = (
        change_rate is not None
        and bandwidth is not None
        and bandwidth > 0
        and change_rate >= bandwidth * (1 - settings.convergence_margin)
    )
    initial = settings.slow_down_initial
    if arm_slow_down:
        if stuck:
            assert change_rate is not None and bandwidth is not None
            initial, why = initial_slowdown(
                profile,
                info.memory_bytes,
                change_rate,
                bandwidth,
                budget,
                switch,
                settings,
                disk_bytes=info.local_disk_bytes,
            )
            parts.append(
                f"slow-down armed at {initial:.0%} from the start because the guest changes "
                f"{rate_text(change_rate)} and the link moves {rate_text(bandwidth)}{why}"
            )
        else:
            parts.append("slow-down armed")
    elif profile.may_slow_down:
        parts.append("slow-down allowed but not supported between these hosts")
    elif stuck:
        parts.append(
            f"copying is not expected to converge on its own (the guest changes "
            f"{rate_text(change_rate)}, the link moves {rate_text(bandwidth)})"
        )

    return StartPlan(
        arm_handover=arm_handover,
        arm_slow_down=arm_slow_down,
        blackout_budget=budget,
        slow_down_initial=initial,
        slow_down_step=settings.slow_down_step,
        reason="; ".join(parts),
        first_pass_budget=first_pass,
    )


def initial_slowdown(
    profile: Profile,
    memory: int,
    change_rate: float,
    bandwidth: float,
    budget: float,
    switchover: float,
    settings: PolicySettings = DEFAULT,
    *,
    disk_bytes: int = 0,
) -> tuple[float, str]:
    """The level slowing starts at, when the hypervisor finds copying does not converge,
    and what the plan says about it (text to append).

    The level that barely brings the change rate under the link's is the least that
    can converge; but the hypervisor raises the level only every few passes, and a
    pass over a large guest lasts minutes, so a level that converges slowly slows the
    guest for longer, takes more of its time in all, and can run into the deadline.
    So: of the levels from that one up to `max_initial_slowdown`, in steps of
    `slow_down_step`, whose projection (the guest rewriting at the measured rate over
    all of its memory, the hypervisor's throttle schedule, finishing by a pause where
    the profile allows one) finishes within `slowdown_deadline_share` of what the
    deadline leaves after the local disks are copied (at the link's bandwidth, before
    memory), the one that takes the least of the guest's time (`choose_slowdown`).
    None finishing: the highest.
    """
    base = least_slowdown(change_rate, bandwidth, settings)
    deadline = profile.deadline_seconds(memory + disk_bytes)
    target = (
        math.inf
        if deadline is None
        else max(0.0, deadline - disk_bytes / bandwidth) * settings.slowdown_deadline_share
    )
    choice = choose_slowdown(
        profile, memory, change_rate, bandwidth, budget, switchover, target, settings
    )
    within = (
        ""
        if deadline is None
        else f" within {duration_text(target)} (of the {duration_text(deadline)} deadline)"
    )
    if choice.fits:
        if choice.level <= base:
            return base, ""
        return choice.level, (
            f"; of the levels from {base:.0%} that finish{within}, it takes the least of the "
            f"guest's time (about {duration_text(choice.taken)} slowed or stopped, finishing "
            f"in about {duration_text(choice.seconds)})"
        )
    return choice.level, f"; no level finishes{within} on that measurement"


@dataclass(frozen=True, slots=True)
class SlowdownChoice:
    """A slow-down start level and what its projection says."""

    level: float
    seconds: float | None  # from the start to the end of the job at that level; None: never
    fits: bool  # `seconds` is within the target the level was chosen for
    slowed: float = 0.0  # guest-seconds the slowing takes until then (`Projection.slowed`)
    taken: float = 0.0  # the same and the final stop (`Projection.taken`)


def least_slowdown(change_rate: float, bandwidth: float, settings: PolicySettings) -> float:
    """The level that barely brings `change_rate` under the link's (at least the default
    start level, at most `max_initial_slowdown`)."""
    least = 1 - bandwidth * (1 - settings.convergence_margin) / change_rate
    return round(min(settings.max_initial_slowdown, max(settings.slow_down_initial, least)), 2)


def start_projection(
    profile: Profile,
    memory: int,
    change_rate: float,
    bandwidth: float,
    budget: float,
    switchover: float,
    level: float,
    settings: PolicySettings = DEFAULT,
    *,
    working_set: float | None = None,
) -> Projection:
    """A job started now with slowing from `level`, the guest rewriting at
    `change_rate` over `working_set` (unknown before the start: all of its memory) and
    the hypervisor raising the level on its schedule; it finishes once what is left
    fits the budget, or a pause where the profile allows one."""
    written = float(memory) if working_set is None else min(float(memory), working_set)
    model = DirtyModel(rate=change_rate, working_set=written)
    return project(
        model,
        bandwidth,
        finish_budget(profile, budget, switchover, settings),
        unsent=float(memory),
        elapsed_in_pass=0.0,
        overhead=0.0,
        switchover=switchover,
        slow_step=settings.slow_down_step,
        slow_initial=level,
        slow_armed=True,
        outside=model.outside(memory, memory),  # the first pass sends all of memory
        settings=settings,
    )


def finish_budget(
    profile: Profile, budget: float, switchover: float, settings: PolicySettings
) -> float:
    """Seconds of copy the final stop may take: the blackout budget, or a pause where
    the profile allows one."""
    if profile.may_pause:
        return max(budget, (profile.max_pause - switchover) / settings.pause_safety)
    return budget


def choose_slowdown(
    profile: Profile,
    memory: int,
    change_rate: float,
    bandwidth: float,
    budget: float,
    switchover: float,
    target: float,
    settings: PolicySettings = DEFAULT,
    *,
    working_set: float | None = None,
) -> SlowdownChoice:
    """Of the start levels from `least_slowdown` up to `max_initial_slowdown`, in steps
    of `slow_down_step`, whose `start_projection` finishes within `target` seconds,
    the one that takes the least of the guest's time (`Projection.taken`: the slowing,
    level x time, and the final stop); of equal ones the higher, which finishes
    sooner. None finishing: the highest, with `fits` false.

    The least level is often not the least for the guest: the hypervisor raises the
    level only every two passes that rewrite half of what they sent, so a low one that
    converges slowly slows the guest through many more passes (and on to the levels
    the schedule raises it to) than a higher one; where it converges quickly, it is."""
    level = least_slowdown(change_rate, bandwidth, settings)
    best: SlowdownChoice | None = None
    while True:
        projection = start_projection(
            profile,
            memory,
            change_rate,
            bandwidth,
            budget,
            switchover,
            level,
            settings,
            working_set=working_set,
        )
        seconds = projection.seconds
        fits = seconds is not None and seconds <= target
        if fits and (best is None or projection.taken <= best.taken):
            best = SlowdownChoice(level, seconds, True, projection.slowed, projection.taken)
        if level >= settings.max_initial_slowdown - 1e-9:
            if best is not None:
                return best
            return SlowdownChoice(level, seconds, False, projection.slowed, projection.taken)
        level = round(min(settings.max_initial_slowdown, level + settings.slow_down_step), 2)
