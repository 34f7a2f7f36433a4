"""Scoring one run against the availability profile it ran under.

A run is clean when it completed and broke none of its profile's promises. The
rules are the daemon's own (`lmwatch.policies.violations`; docs/benchmark.md):

- the final blackout of a completion counts against `max_blackout`; after a
  handover that blackout is the short switch to the destination; a final stop
  that did not complete (the link broke, or the job was cancelled, during it)
  counts too, for as long as the guest stayed stopped on the source (until the
  job ended);
- a pause counts against `max_pause` when the profile allows pausing; when it does
  not, a pause is a violation once it lasted longer than `max_blackout` (a shorter
  stop is indistinguishable from a blackout for the instance's users);
- a handover under a profile that forbids it, and a handover whose degraded running
  outlasted `max_degraded`, are violations;
- any slow-down under a profile that forbids slowing is a violation;
- a completion after the profile's deadline is a violation, and so is a run that
  had not ended when the runner stopped it ("did not finish");
- a pause of a job stopped to start again (the guest resumed on the source when
  that job ended) counts against the pause's bound like any other;
- so does a final stop of a job that failed under it and was started again;
- a cancel (the instance keeps running on the source) and a failure are not
  violations, but not clean either: the report counts them separately.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmwatch.bench.corpus import Workload
from lmwatch.bench.runner import UNFINISHED, Run
from lmwatch.policies.violations import Finish, violations
from lmwatch.profiles.schema import Profile


@dataclass(frozen=True, slots=True)
class Verdict:
    clean: bool  # completed, no violation
    violations: tuple[str, ...]  # short neutral phrases
    cancelled: bool
    failed: bool
    unfinished: bool = False
    outcome: str = ""


def judge(run: Run, profile: Profile, workload: Workload) -> Verdict:
    """The verdict on `run` under `profile` (deadline from the workload's memory), by
    the rules the daemon records violations with (`lmwatch.policies.violations`)."""
    completed = run.outcome == "completed"
    finish = Finish(
        blackout=run.pause_seconds if run.paused else run.blackout_seconds,
        paused=run.paused,
        handed_over=run.handed_over,
        degraded=run.degraded_seconds,
        slowdown=run.max_slowdown,
        total=run.total_seconds,
        deadline=profile.deadline_seconds(workload.memory),
        completed=completed,
    )
    found = [v.text for v in violations(profile, finish)]
    if run.earlier_pause_seconds is not None:  # a job stopped while paused, to start again
        earlier = Finish(blackout=run.earlier_pause_seconds, paused=True, completed=False)
        found.extend(v.text for v in violations(profile, earlier))
    if run.earlier_stop_seconds is not None:  # a final stop a failed job ended with
        earlier = Finish(blackout=run.earlier_stop_seconds, completed=False)
        found.extend(v.text for v in violations(profile, earlier))
    if run.outcome == UNFINISHED:
        found.append("did not finish")
    return Verdict(
        clean=completed and not found,
        violations=tuple(found),
        cancelled=run.outcome == "cancelled",
        failed=run.outcome == "failed",
        unfinished=run.outcome == UNFINISHED,
        outcome=run.outcome,
    )
