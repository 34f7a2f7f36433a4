"""Scoring one run against the availability profile it ran under.

A run is clean when it completed and broke none of its profile's promises. The
rules (docs/benchmark.md):

- the final blackout of a completion counts against `max_blackout`; after a
  handover that blackout is the short switch to the destination;
- a pause counts against `max_pause` when the profile allows pausing; when it does
  not, a pause is a violation once it lasted longer than `max_blackout` (a shorter
  stop is indistinguishable from a blackout for the instance's users);
- a handover under a profile that forbids it, and a handover whose degraded running
  outlasted `max_degraded`, are violations;
- any slow-down under a profile that forbids slowing is a violation;
- a completion after the profile's deadline is a violation, and so is a run that
  had not ended when the runner stopped it ("did not finish");
- a cancel (the instance keeps running on the source) and a failure are not
  violations, but not clean either: the report counts them separately.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmwatch.bench.corpus import Workload
from lmwatch.bench.runner import UNFINISHED, Run
from lmwatch.profiles.schema import Profile

TOLERANCE = 1e-6  # seconds: float noise is not a violation


@dataclass(frozen=True, slots=True)
class Verdict:
    clean: bool  # completed, no violation
    violations: tuple[str, ...]  # short neutral phrases
    cancelled: bool
    failed: bool
    unfinished: bool = False
    outcome: str = ""


def _measured(seconds: float) -> str:
    return f"{seconds:.2f}s" if seconds < 1 else f"{seconds:.1f}s"


def _limit(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.4g}ms"
    return f"{seconds:.4g}s"


def _over(value: float | None, limit: float) -> bool:
    return value is not None and value > limit + TOLERANCE


def judge(run: Run, profile: Profile, workload: Workload) -> Verdict:
    """The verdict on `run` under `profile` (deadline from the workload's memory)."""
    violations: list[str] = []
    completed = run.outcome == "completed"
    if run.paused:
        if not profile.may_pause:
            if _over(run.pause_seconds, profile.max_blackout):
                violations.append("paused though not allowed")
        elif _over(run.pause_seconds, profile.max_pause):
            assert run.pause_seconds is not None
            violations.append(
                f"pause {_measured(run.pause_seconds)} over {_limit(profile.max_pause)}"
            )
    elif completed and _over(run.blackout_seconds, profile.max_blackout):
        assert run.blackout_seconds is not None
        violations.append(
            f"blackout {_measured(run.blackout_seconds)} over {_limit(profile.max_blackout)}"
        )
    if run.handed_over:
        if not profile.handover_allowed:
            violations.append("handed over though forbidden")
        elif _over(run.degraded_seconds, profile.max_degraded):
            assert run.degraded_seconds is not None
            violations.append(
                f"degraded {_measured(run.degraded_seconds)} over {_limit(profile.max_degraded)}"
            )
    if run.max_slowdown > 0 and not profile.may_slow_down:
        violations.append("slowed though not allowed")
    deadline = profile.deadline_seconds(workload.memory)
    if completed and deadline is not None and _over(run.total_seconds, deadline):
        violations.append("finished after the deadline")
    if run.outcome == UNFINISHED:
        violations.append("did not finish")
    return Verdict(
        clean=completed and not violations,
        violations=tuple(violations),
        cancelled=run.outcome == "cancelled",
        failed=run.outcome == "failed",
        unfinished=run.outcome == UNFINISHED,
        outcome=run.outcome,
    )
