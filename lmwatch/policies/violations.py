"""How a finished migration measured up to its profile, and what it taught about the hosts.

Pure functions over what was measured: the engine records each violation (timeline,
metric) and the benchmark's judge scores runs with the same rules.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lmwatch.policies.estimators import duration_text
from lmwatch.profiles.schema import Profile

_TOLERANCE = 1e-6  # seconds; measurements equal to a bound are within it


@dataclass(frozen=True, slots=True)
class Finish:
    """What was measured about a migration that completed."""

    blackout: float | None  # measured final stop (a pause's whole length when paused)
    paused: bool = False
    handed_over: bool = False
    degraded: float | None = None  # seconds run on the destination while memory arrived
    slowdown: float = 0.0  # highest share of guest CPU taken away
    total: float = 0.0  # seconds from start to end
    deadline: float | None = None  # seconds the profile allowed, None = no deadline


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str  # blackout | pause | handover | slow-down | deadline
    text: str  # a short phrase an operator understands


def violations(profile: Profile, finish: Finish) -> tuple[Violation, ...]:
    """Every way a completed migration exceeded what its profile allows."""
    found: list[Violation] = []
    blackout = finish.blackout
    if finish.paused:
        if not profile.may_pause:
            found.append(Violation("pause", "paused though the profile does not allow it"))
        elif blackout is not None and blackout > profile.max_pause + _TOLERANCE:
            found.append(
                Violation(
                    "pause",
                    f"paused {duration_text(blackout)}, over the profile's "
                    f"{duration_text(profile.max_pause)}",
                )
            )
    elif blackout is not None and blackout > profile.max_blackout + _TOLERANCE:
        found.append(
            Violation(
                "blackout",
                f"blackout {duration_text(blackout)}, over the profile's "
                f"{duration_text(profile.max_blackout)}",
            )
        )
    if finish.handed_over:
        if not profile.handover_allowed:
            found.append(Violation("handover", "handed over though the profile forbids it"))
        elif finish.degraded is not None and finish.degraded > profile.max_degraded + _TOLERANCE:
            found.append(
                Violation(
                    "handover",
                    f"ran degraded {duration_text(finish.degraded)}, over the profile's "
                    f"{duration_text(profile.max_degraded)}",
                )
            )
    if finish.slowdown > 0 and not profile.may_slow_down:
        found.append(Violation("slow-down", "slowed though the profile does not allow it"))
    if finish.deadline is not None and finish.total > finish.deadline + _TOLERANCE:
        found.append(
            Violation(
                "deadline",
                f"finished after {duration_text(finish.total)}, past the deadline of "
                f"{duration_text(finish.deadline)}",
            )
        )
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


def learned_switchover(measured: Iterable[float], default: float) -> float:
    """The switchover cost to plan with: the default until measured, then the largest seen."""
    values = list(measured)
    return max(values) if values else default
