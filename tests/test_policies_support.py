"""Synthetic pass-by-pass migrations for the policy tests (no tests here).

The model is DESIGN.md section 4, with passes that end like the real hypervisor's
(simphysics): a pass sends in bursts of `BURST` seconds and is counted again before
the first burst that would begin below the threshold `B * budget` (or once it is all
sent); its unsent rest `c` is carried over, and the hypervisor counts a page once, so
each later pass starts with `c` and the pages dirtied outside it: of the part `c_in`
of `c` in the working set (the first pass's rest lies all over memory, `c·W/M` of it
in the working set), `R(n+1) = c + f(t)·(1 − c_in/W)` for a random writer
(`f(t) = W * (1 - exp(-D_eff * t / W))`), and `c + min(D_eff·t, W − c_in)` for a
sequential one (its stretch reaches the rest only once it wraps). A count `R <= B * budget`
completes; the blackout is then `R / B` plus the switchover cost. The change rate
reported from pass 2 on is what a hypervisor reports: distinct bytes newly dirtied
during the previous pass over its duration, `f(t) / t`, which falls below `D` once
the working set saturates. Slowing (when armed) steps
the throttle up like the hypervisor: after a few passes in a row that each
dirtied at least half of what they sent; `D_eff = D * (1 - slowdown)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from lmwatch.model import (
    MIB,
    Action,
    Decision,
    MigrationContext,
    Phase,
    Sample,
    StartPlan,
)
from lmwatch.profiles.schema import Profile


@dataclass(frozen=True)
class Workload:
    memory: int
    change: float  # bytes/s the guest rewrites when not slowed
    bandwidth: float  # bytes/s
    working_set: int  # bytes the guest keeps rewriting
    writer: str = "sequential"  # sequential: distinct bytes grow linearly to W; random: saturate

    def dirtied(self, seconds: float, slowdown: float = 0.0) -> float:
        """Distinct bytes dirtied in `seconds` of writing at `D * (1 - slowdown)`."""
        written = self.change * (1 - slowdown) * max(0.0, seconds)
        if self.working_set <= 0:
            return 0.0
        if self.writer == "random":
            return self.working_set * -math.expm1(-written / self.working_set)
        return min(float(self.working_set), written)

    def count(self, rest: float, outside: float, seconds: float, slowdown: float = 0.0) -> float:
        """The next count after `seconds` of writing: the unsent `rest` (`outside` of it
        outside the working set) and the pages dirtied outside it, each counted once."""
        working_set = float(max(self.working_set, 1))
        inside = max(0.0, rest - outside)
        dirtied = self.dirtied(seconds, slowdown)
        if self.writer == "random":
            new = dirtied * (1.0 - min(1.0, inside / working_set))
        else:
            new = min(dirtied, max(0.0, working_set - inside))
        return min(float(self.memory), rest + new)

    def outside_share(self) -> float:
        """Share of the first pass's bytes outside the working set."""
        return max(0.0, 1.0 - self.working_set / self.memory)


SWITCHOVER = 0.05  # seconds: the switchover cost the contexts carry unless told otherwise
SLOW_DOWN_BAD_RATIO = 0.5  # the hypervisor counts a pass as bad when it dirtied this share
BURST = 0.1  # seconds per burst; the remainder is checked against the threshold before each


def sends(w: Workload, size: float, budget: float) -> float:
    """Bytes a pass of `size` sends before it is counted again (at least one burst)."""
    burst = w.bandwidth * BURST
    bursts = max(1, math.ceil((size - w.bandwidth * budget) / burst - 1e-9))
    return min(size, bursts * burst)


def plan(
    handover: bool = False, slow_down: bool = False, budget: float = 0.3, **kw: float
) -> StartPlan:
    return StartPlan(arm_handover=handover, arm_slow_down=slow_down, blackout_budget=budget, **kw)


def context(
    workload: Workload,
    start_plan: StartPlan | None = None,
    budget: float | None = None,
    deadline_at: float | None = None,
    switchover: float = SWITCHOVER,
    change_rate_before_start: float | None = None,
    change_rate_window: float | None = None,
    **kw: bool,
) -> MigrationContext:
    start_plan = start_plan or plan()
    return MigrationContext(
        started_at=0.0,
        memory_bytes=workload.memory,
        plan=start_plan,
        blackout_budget=start_plan.blackout_budget if budget is None else budget,
        deadline_at=deadline_at,
        switchover=switchover,
        change_rate_before_start=change_rate_before_start,
        change_rate_window=change_rate_window,
        **kw,
    )


def history(
    w: Workload,
    max_passes: int = 6,
    budget: float = 0.3,
    slowdown: float = 0.0,
    polls_per_pass: int = 3,
    report_change: bool = True,
    start: float = 0.0,
    changes: Sequence[float] | None = None,
) -> list[Sample]:
    """Open loop: samples of `max_passes` passes (or fewer if it completes).

    `changes` (bytes/s) overrides the write rate pass by pass (the last one holds
    for the passes after it), for phased or unsteady guests.
    """
    samples: list[Sample] = []
    state = _State(time=start, remaining=w.memory, budget=budget, slowdown=slowdown)
    state.outside = w.outside_share()
    for n in range(1, max_passes + 1):
        for sample in _pass_samples(w, state, n, polls_per_pass, report_change):
            samples.append(sample)
        writing = w if not changes else replace(w, change=changes[min(n, len(changes)) - 1])
        if _end_pass(writing, state, n):
            samples.append(_sample(w, state, n + 1, Phase.COMPLETING, report_change))
            break
    return samples


@dataclass
class _State:
    time: float
    remaining: float
    budget: float
    slowdown: float
    transferred: float = 0.0
    pass_start: float = 0.0
    pass_size: float = 0.0  # seconds the pass just ended took
    reported: float = 0.0  # change rate reported for that pass (distinct bytes / seconds)
    bad_passes: int = 0  # passes in a row that dirtied half of what they sent or more
    outside: float = 0.0  # share of the pass's count outside the working set (never rewritten)


def _sample(w: Workload, state: _State, n: int, phase: Phase, report_change: bool) -> Sample:
    return Sample(
        time=state.time,
        memory_total=w.memory,
        memory_remaining=int(state.remaining),
        memory_transferred=int(state.transferred),
        transfer_rate=w.bandwidth,
        change_rate=state.reported if (n >= 2 and report_change) else 0.0,
        passes=n,
        phase=phase,
        blackout_budget=state.budget,
        slowdown=state.slowdown,
    )


def _pass_samples(
    w: Workload, state: _State, n: int, polls: int, report_change: bool
) -> list[Sample]:
    """Samples within pass `n`; leaves the state at the end of the pass."""
    size = state.remaining
    sent = sends(w, size, state.budget)
    duration = sent / w.bandwidth
    base = state.transferred
    state.pass_start = state.time
    samples = []
    for k in range(polls):
        moved = sent * k / polls
        state.remaining = size - moved
        state.time = state.pass_start + duration * k / polls
        state.transferred = base + moved
        samples.append(_sample(w, state, n, Phase.COPYING, report_change))
    state.transferred = base + sent
    state.time = state.pass_start + duration
    state.remaining = size - sent
    state.pass_size = duration
    return samples


def _end_pass(w: Workload, state: _State, n: int) -> bool:
    """Start the next pass; True when the hypervisor completes instead."""
    duration = state.pass_size
    rest = state.remaining
    outside = rest * state.outside
    state.remaining = w.count(rest, outside, duration, state.slowdown)
    state.outside = outside / state.remaining if state.remaining > 0 else 0.0
    dirtied = state.remaining - rest  # newly dirty at the count
    state.reported = dirtied / duration if duration > 0 else 0.0
    bad = dirtied >= SLOW_DOWN_BAD_RATIO * duration * w.bandwidth  # of what it sent
    state.bad_passes = state.bad_passes + 1 if bad else 0
    return state.remaining <= w.bandwidth * state.budget


@dataclass
class Run:
    samples: list[Sample] = field(default_factory=list)
    decisions: list[tuple[float, Decision]] = field(default_factory=list)
    budgets: list[float] = field(default_factory=list)
    outcome: str = "running"  # completed | handover | pause | cancel | running
    blackout: float | None = None  # completed or paused: the final stop, switchover included
    degraded: float | None = None  # handed over: seconds running while memory arrives
    ended_at: float | None = None
    slowdown: float = 0.0  # highest slow-down level applied

    @property
    def actions(self) -> list[Action]:
        return [d.action for _, d in self.decisions]

    def first(self, action: Action) -> tuple[float, Decision] | None:
        return next(((t, d) for t, d in self.decisions if d.action is action), None)


DecideFn = Callable[[Profile, Sequence[Sample], MigrationContext, float], Decision]


def simulate(
    decide: DecideFn,
    profile: Profile,
    w: Workload,
    start_plan: StartPlan,
    deadline_at: float | None = None,
    polls_per_pass: int = 3,
    max_passes: int = 60,
    slow_down_passes_per_step: int = 2,
    switchover: float = SWITCHOVER,
    measured: float | None = None,
    window: float | None = None,
) -> Run:
    """Closed loop: poll, decide, apply, until it ends or `max_passes` passes.

    `measured` is the change rate measured before the start (bytes/s), when there was one,
    over `window` seconds (None: not said).

    A pause's blackout is what the guest really had left when it stopped (the pass's
    unsent bytes and what it dirtied since the pass began) over `B`, plus the
    switchover; a handover's `degraded` is the same bytes over `B`.
    """
    run = Run()
    ctx = context(
        w,
        start_plan,
        deadline_at=deadline_at,
        switchover=switchover,
        change_rate_before_start=measured,
        change_rate_window=window,
    )
    state = _State(time=0.0, remaining=w.memory, budget=ctx.blackout_budget, slowdown=0.0)
    state.outside = w.outside_share()
    run.budgets.append(state.budget)
    for n in range(1, max_passes + 1):
        size = state.remaining
        sent = sends(w, size, state.budget)
        duration = sent / w.bandwidth
        state.pass_start = state.time
        base = state.transferred
        for k in range(polls_per_pass):
            state.time = state.pass_start + duration * k / polls_per_pass
            state.remaining = size - sent * k / polls_per_pass
            state.transferred = base + sent * k / polls_per_pass
            sample = _sample(w, state, n, Phase.COPYING, True)
            run.samples.append(sample)
            ctx = replace(ctx, blackout_budget=state.budget)
            decision = decide(profile, run.samples, ctx, state.time)
            run.decisions.append((state.time, decision))
            if decision.action is Action.RAISE_BLACKOUT:
                assert decision.blackout_budget is not None
                state.budget = decision.blackout_budget
                run.budgets.append(state.budget)
            elif decision.action is not Action.CONTINUE:
                run.outcome = decision.action.value
                run.ended_at = state.time
                left = w.count(
                    state.remaining,
                    state.remaining * state.outside,
                    state.time - state.pass_start,
                    state.slowdown,
                )
                if decision.action is Action.PAUSE:
                    run.blackout = left / w.bandwidth + switchover
                elif decision.action is Action.HANDOVER:
                    run.degraded = left / w.bandwidth
                return run
        state.time = state.pass_start + duration
        state.transferred = base + sent
        state.remaining = size - sent
        state.pass_size = duration
        if _end_pass(w, state, n):
            run.outcome = "completed"
            run.blackout = state.remaining / w.bandwidth + switchover
            run.ended_at = state.time
            return run
        if start_plan.arm_slow_down and state.bad_passes >= slow_down_passes_per_step:
            state.bad_passes = 0
            if state.slowdown <= 0:
                state.slowdown = start_plan.slow_down_initial
            else:
                state.slowdown = min(0.99, state.slowdown + start_plan.slow_down_step)
            run.slowdown = max(run.slowdown, state.slowdown)
    return run


def stalled_after(samples: list[Sample], seconds: tuple[float, ...]) -> list[Sample]:
    """`samples` and then the last one again `seconds` later each: the link carries
    nothing, and the hypervisor's readings (the transfer rate among them) stay as they
    were."""
    last = samples[-1]
    return [*samples, *(replace(last, time=last.time + t) for t in seconds)]


def workload(
    memory_mib: float,
    change_mib: float,
    bandwidth_mib: float,
    ws_mib: float,
    writer: str = "sequential",
) -> Workload:
    return Workload(
        memory=int(memory_mib * MIB),
        change=change_mib * MIB,
        bandwidth=bandwidth_mib * MIB,
        working_set=int(ws_mib * MIB),
        writer=writer,
    )
