"""How a finished migration measured up to its profile, and what it taught about the hosts.

Pure functions over what was measured: the engine records each violation (timeline,
metric) and the benchmark's judge scores runs with the same rules.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass

from lmwatch.profiles.schema import Profile

TOLERANCE = 1e-6  # seconds; measurements equal to a bound are within it


@dataclass(frozen=True, slots=True)
class Finish:
    """What was measured about a migration that ended (completed or not)."""

    # measured final stop (a pause's whole length when paused; for a job that did not
    # complete, a final stop until the guest resumed on the source, when measured)
    blackout: float | None
    paused: bool = False
    handed_over: bool = False
    degraded: float | None = None  # seconds run on the destination while memory arrived
    slowdown: float = 0.0  # highest share of guest CPU taken away
    total: float = 0.0  # seconds from start to end
    deadline: float | None = None  # seconds the profile allowed, None = no deadline
    completed: bool = True  # False: cancelled or failed (what happened before still counts)


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str  # blackout | pause | handover | slow-down | deadline
    text: str  # a short phrase an operator understands


def _seconds(value: float) -> str:
    return f"{value:.2f}s" if value < 1 else f"{value:.1f}s"


def _limit(seconds: float) -> str:
    return f"{seconds * 1000:.4g}ms" if seconds < 1 else f"{seconds:.4g}s"


def _over(value: float | None, limit: float) -> bool:
    return value is not None and value > limit + TOLERANCE


def pause_bound(profile: Profile) -> float:
    """How long a pause may last: `max_pause` where pausing is allowed; elsewhere
    `max_blackout` (a stop no longer than that looks like a blackout to the users)."""
    return profile.max_pause if profile.may_pause else profile.max_blackout


def stop_bound(profile: Profile) -> float:
    """How long a final stop may last: `max_blackout`, or `max_pause` where pausing is
    allowed and longer (the profile then accepts the guest stopped that long to
    finish, whether lmwatch chose to pause or the final stop ran long)."""
    return (
        max(profile.max_blackout, profile.max_pause) if profile.may_pause else profile.max_blackout
    )


def violations(profile: Profile, finish: Finish) -> tuple[Violation, ...]:
    """Every way a migration broke what its profile allows; the benchmark's judge and
    the engine's timeline and metric both come from here.

    - the final blackout of a completion counts against `max_blackout` (after a
      handover it is the short switch to the destination), and so does a final stop
      that ended without completing (the link broke, or the job was cancelled,
      during it: the guest resumed on the source only when the job ended), when one
      was measured; where pausing is allowed, against `max_pause` if that is longer:
      the instance's users see a stop either way, and the profile accepts one that
      long (a final stop that ran long because the link slowed during it is such a
      stop, not a broken promise);
    - a pause counts against `max_pause` where pausing is allowed; where it is not,
      a pause longer than `max_blackout` is a violation (a shorter stop looks like a
      blackout to the instance's users);
    - a handover where it is forbidden, or degraded running over `max_degraded`;
    - any slow-down where slowing is not allowed;
    - a completion after the deadline.
    Pause, handover and slow-down count on a cancelled or failed migration too.
    """
    found: list[Violation] = []
    blackout = finish.blackout
    if finish.paused:
        if _over(blackout, pause_bound(profile)):
            assert blackout is not None
            text = (
                f"pause {_seconds(blackout)} over {_limit(profile.max_pause)}"
                if profile.may_pause
                else "paused though not allowed"
            )
            found.append(Violation("pause", text))
    elif _over(blackout, stop_bound(profile)):
        assert blackout is not None
        found.append(
            Violation(
                "blackout", f"blackout {_seconds(blackout)} over {_limit(stop_bound(profile))}"
            )
        )
    if finish.handed_over:
        if not profile.handover_allowed:
            found.append(Violation("handover", "handed over though forbidden"))
        elif _over(finish.degraded, profile.max_degraded):
            assert finish.degraded is not None
            found.append(
                Violation(
                    "handover",
                    f"degraded {_seconds(finish.degraded)} over {_limit(profile.max_degraded)}",
                )
            )
    if finish.slowdown > 0 and not profile.may_slow_down:
        found.append(Violation("slow-down", "slowed though not allowed"))
    if finish.completed and finish.deadline is not None and _over(finish.total, finish.deadline):
        found.append(Violation("deadline", "finished after the deadline"))
    return tuple(found)


def measured_switchover(
    blackout: float,
    *,
    handed_over: bool,
    budget: float,
    remaining: float,
    rate: float,
    burst: float = 0.0,
) -> float:
    """The switchover cost a completed migration shows, never underestimated on purpose.

    A handover's blackout is the switchover itself. A completion within the budget
    copied at most `min(budget, remaining / rate)` seconds' worth in its final stop
    (the last remainder seen, at the last rate seen); the rest was switchover. But the
    hypervisor stops the guest at a count of what is left that the samples rarely see
    (it comes once the pass is below the threshold and stops at once when the count is
    too): that count holds the rest of the pass, known only to within one `burst` of
    the threshold. The copy is taken that much shorter, so that the cost is not
    underestimated (too high a cost only leaves a smaller budget; too low a one breaks
    the blackout limit on the next migration).
    """
    if handed_over:
        return max(0.0, blackout)
    copy = budget if rate <= 0 else min(budget, remaining / rate)
    return max(0.0, blackout - max(0.0, copy - burst))


# A measured switchover this many times the typical one (the median) had another
# cause: the final stop ran slow because the link was shared or slowed under it.
DISTURBED_SWITCHOVER = 3.0


def learned_switchover(measured: Iterable[float], default: float) -> float:
    """The switchover cost to plan with: the default until measured, then the largest
    seen, so that the next blackout is not underestimated.

    From three measurements on, one over `DISTURBED_SWITCHOVER` times their median
    is left out: the cost of a host pair's switchover is steady, and such a figure
    was a final stop slowed by something else (the link shared or slowed during it;
    `measured_switchover` cannot tell). Kept, it would be planned with for every
    later migration between the pair and, once above a profile's `max_blackout`,
    leave that profile no budget at all, so no migration could complete and correct
    it."""
    values = sorted(measured)
    if not values:
        return default
    if len(values) >= 3:
        median = statistics.median(values)
        steady = [v for v in values if v <= DISTURBED_SWITCHOVER * median]
        return max(steady)
    return values[-1]
