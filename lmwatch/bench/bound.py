"""The hindsight bound: the best any controller could have done, knowing the future.

For one (workload, profile) the bound searches the sequences of actions the profile
allows, with full knowledge of the workload (its hidden parameters, its link events,
its true switchover cost), by branching copies of the simulation (`Simulation.copy`).
The best outcome is a clean completion (per `judge`) with the smallest total time;
when none exists, the bound cancels at once (not clean: it counts as cancelled).

The search:

- start plans: handover armed when the profile allows it; without slow-down, and,
  when the profile allows slowing, with slow-down armed at initial levels 0.2, 0.4,
  0.6 and 0.8 (step 0.1, as the hypervisor raises it);
- the blackout budget is set once, at the start, to `max_blackout` minus the
  workload's true switchover cost: the largest budget whose blackout still fits.
  A larger budget hardly ever completes later, so no other budget is searched. (Not
  never: passes end once below bandwidth × budget, so the budget moves the counts of
  what is left, and a count that fits can come a little sooner under a budget raised
  later, as a controller raising it step by step does: by a few ms on the generated
  corpora, under one burst of the hypervisor's);
- one forward simulation per plan ("keep waiting"), branching at every point of a
  time grid (every 0.5 s, coarser for long horizons so that a plan has at most
  `MAX_GRID_POINTS` of them) and at every pass boundary (where the remainder is at a
  local extreme): from each, a copy pauses now and another hands over now (when the
  profile allows it), and each copy runs to its end;
- a job that fails with the instance still on the source (the link broke for longer
  than the hypervisor waits) is started again with the same plan the moment the link
  carries again, once, as lmwatch may (`policies.restart_after_failure`);
- pruning: nothing that ends after the best clean finish found so far (or after the
  deadline, or the runner's time limit) is explored; a pause or handover is not
  simulated when even at the link's nominal bandwidth it could not stay within the
  profile's limit or beat the best time. A pause is tried under every profile: the
  judge accepts one no longer than `max_blackout` even where pausing is not allowed.

Actions a controller has besides these (a transfer cap, a budget below the largest,
cancelling) cannot make a completion both clean and earlier in this model.
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from lmwatch.bench.controller import Cancel, Handover, Pause, Restart
from lmwatch.bench.corpus import Workload
from lmwatch.bench.judge import judge
from lmwatch.bench.runner import Run, Simulation, default_limit
from lmwatch.model import Phase, StartPlan
from lmwatch.policies.violations import TOLERANCE
from lmwatch.profiles.schema import Profile

BOUND = "hindsight bound"
SLOW_LEVELS = (0.8, 0.6, 0.4, 0.2)  # initial slow-down levels tried (higher first: prunes more)
SLOW_STEP = 0.1
GRID = 0.5  # seconds: the finest branching grid (a controller's poll)
MAX_GRID_POINTS = 2000  # per plan: the grid is coarsened for long horizons
BOUNDARY_GAP = 0.25  # of a grid step: pass boundaries closer than this to a branch are skipped
NO_CLEAN = "no sequence of the profile's actions completes cleanly: cancelled at once"


@dataclass(frozen=True, slots=True)
class SearchStats:
    """What a search did (for tests and for tuning)."""

    plans: int = 0
    branch_points: int = 0
    branches: int = 0  # copies simulated to their end
    pruned: int = 0  # actions skipped by the bounds without simulating


def start_plans(workload: Workload, profile: Profile) -> list[StartPlan]:
    """The start plans the search tries, in the order it tries them."""
    budget = max(0.0, profile.max_blackout - workload.switchover)
    handover = profile.handover_allowed
    plans = [
        StartPlan(
            arm_handover=handover,
            arm_slow_down=False,
            blackout_budget=budget,
            reason="hindsight: no slow-down",
        )
    ]
    if profile.may_slow_down:
        plans += [
            StartPlan(
                arm_handover=handover,
                arm_slow_down=True,
                blackout_budget=budget,
                slow_down_initial=level,
                slow_down_step=SLOW_STEP,
                reason=f"hindsight: slow-down from {level:g}",
            )
            for level in SLOW_LEVELS
        ]
    return plans


class _Search:
    """The branch-and-bound over one (workload, profile)."""

    def __init__(self, workload: Workload, profile: Profile, limit: float | None) -> None:
        self.workload = workload
        self.profile = profile
        self.limit = default_limit(profile, workload) if limit is None else limit
        deadline = profile.deadline_seconds(workload.memory)
        horizon = self.limit if deadline is None else min(self.limit, deadline + TOLERANCE)
        self.horizon = horizon  # nothing ending later can be clean
        self.best: Run | None = None
        self.grid = max(GRID, GRID * math.ceil(horizon / GRID / MAX_GRID_POINTS))
        self.nominal = float(workload.bandwidth)
        self.pause_limit = profile.max_pause if profile.may_pause else profile.max_blackout
        self.handover_useful = (
            profile.handover_allowed and workload.switchover <= profile.max_blackout + TOLERANCE
        )
        self.stats = SearchStats()

    # -- bookkeeping ------------------------------------------------------------------------

    @property
    def cutoff(self) -> float:
        """A branch must end before this to be of any use."""
        if self.best is None:
            return self.horizon
        return min(self.horizon, self.best.total_seconds)

    def _count(self, **more: int) -> None:
        self.stats = replace(
            self.stats, **{key: getattr(self.stats, key) + value for key, value in more.items()}
        )

    def _consider(self, simulation: Simulation) -> None:
        """Judge a finished simulation; keep it when clean and better than the best."""
        if not simulation.finished:
            return
        record = simulation.record(profile=self.profile.name, controller=BOUND)
        if record.total_seconds >= self.cutoff - TOLERANCE and self.best is not None:
            return
        if judge(record, self.profile, self.workload).clean and (
            self.best is None or record.total_seconds < self.best.total_seconds
        ):
            self.best = record

    def _finish(self, branch: Simulation) -> None:
        branch.advance_to(min(self.limit, self.cutoff))
        self._count(branches=1)
        self._consider(branch)

    # -- branching ----------------------------------------------------------------------------

    def _branch(self, simulation: Simulation) -> None:
        """From this moment: pause now, hand over now (each simulated to its end)."""
        migration = simulation.migration
        if simulation.finished or migration.phase is not Phase.COPYING or migration.cancelling:
            return
        self._count(branch_points=1)
        now = simulation.now
        least = migration.remaining / self.nominal  # the rest at the best possible rate
        if (
            least + self.workload.switchover <= self.pause_limit + TOLERANCE
            and now + least + self.workload.switchover < self.cutoff
        ):
            branch = simulation.copy()
            if branch.apply(Pause()):
                self._finish(branch)
        else:
            self._count(pruned=1)
        if self.handover_useful:
            if least <= self.profile.max_degraded + TOLERANCE and now + least < self.cutoff:
                branch = simulation.copy()
                if branch.apply(Handover()):
                    self._finish(branch)
            else:
                self._count(pruned=1)

    def explore(self, plan: StartPlan) -> None:
        """One forward simulation under `plan`, branching on the grid and at pass ends."""
        self._count(plans=1)
        simulation = Simulation(self.workload, plan)
        migration = simulation.migration
        next_grid = 0.0
        last_branch = -math.inf
        while simulation.now < self.cutoff:
            if simulation.finished and not self._start_again(simulation, plan):
                break
            now = simulation.now
            if now >= next_grid - 1e-9 or now - last_branch >= BOUNDARY_GAP * self.grid:
                self._branch(simulation)
                last_branch = now
            while next_grid <= now + 1e-9:
                next_grid += self.grid
            target = min(next_grid, self.cutoff, self.limit)
            upcoming = migration.next_event_in()
            if upcoming is not None and upcoming > 0:
                boundary = now + upcoming
                if boundary < target and boundary - last_branch >= BOUNDARY_GAP * self.grid:
                    target = boundary
            if target <= now:
                break
            simulation.advance_to(target)
        self._consider(simulation)

    def _start_again(self, simulation: Simulation, plan: StartPlan) -> bool:
        """After the job failed with the instance on the source: start again with the
        same plan the moment the link carries again (once, as lmwatch may)."""
        migration = simulation.migration
        if simulation.restarts >= 1 or migration.phase is not Phase.FAILED:
            return False
        while not migration.link_up:
            following = simulation.next_link_event_at
            if following is None or following >= self.cutoff:
                return False
            simulation.advance_to(following)
        return simulation.apply(Restart(plan))

    def run(self) -> Run:
        for plan in start_plans(self.workload, self.profile):
            self.explore(plan)
        if self.best is not None:
            return self.best
        return self._cancelled()

    def _cancelled(self) -> Run:
        simulation = Simulation(self.workload, start_plans(self.workload, self.profile)[0])
        simulation.apply(Cancel())
        simulation.advance_to(self.limit)
        return replace(
            simulation.record(profile=self.profile.name, controller=BOUND), note=NO_CLEAN
        )


def search(
    workload: Workload, profile: Profile, *, limit: float | None = None
) -> tuple[Run, SearchStats]:
    """The bound's run and what the search did."""
    searcher = _Search(workload, profile, limit)
    result = searcher.run()
    return result, searcher.stats


def bound_run(workload: Workload, profile: Profile, *, limit: float | None = None) -> Run:
    """The hindsight bound for one workload under one profile (controller "hindsight bound").

    `limit` is the runner's time limit (by default the same as for controllers).
    """
    return search(workload, profile, limit=limit)[0]


# -- many -------------------------------------------------------------------------------------

_JOB: dict[str, Any] = {}  # what the forked workers read (set before the pool forks)


def _one(task: tuple[int, int]) -> Run:
    workload = _JOB["workloads"][task[0]]
    profile = _JOB["profiles"][task[1]]
    try:
        return bound_run(workload, profile, limit=_JOB["limit"])
    except Exception as error:
        raise RuntimeError(
            f"hindsight bound of {workload.name!r} under {profile.name!r} failed: {error!r}"
        ) from error


def bound_runs(
    workloads: Sequence[Workload],
    profiles: Sequence[Profile],
    processes: int = 2,
    *,
    switchover: float | None = None,
    limit: float | None = None,
) -> list[Run]:
    """The bound for every (workload, profile), workloads outer, over forked workers.

    `switchover` is what controllers are told of a host pair; the bound ignores it
    and uses each workload's true switchover cost (it knows the future).
    """
    del switchover
    tasks = [(w, p) for w in range(len(workloads)) for p in range(len(profiles))]
    _JOB.update(workloads=list(workloads), profiles=list(profiles), limit=limit)
    try:
        if processes <= 1 or len(tasks) <= 1:
            return [_one(task) for task in tasks]
        context = multiprocessing.get_context("fork")
        with context.Pool(processes) as pool:
            return list(pool.imap(_one, tasks, chunksize=1))
    finally:
        _JOB.clear()
