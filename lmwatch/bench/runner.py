"""Running one workload under one profile and one controller, in virtual time.

`Simulation` wraps the simulator's migration model (`simphysics.Migration`) for one
workload: it applies the workload's link events on time, carries out controller
commands (a command the model refuses is a no-op, counted in `refused`), and keeps
what the judge needs. It can be copied, so a search (the hindsight bound) can branch.

`run()` is the loop: the controller plans the start, then sees a sample every
`poll_interval` seconds and answers with commands, until the migration ends or the
time limit comes (then the run is "unfinished").
"""

from __future__ import annotations

import copy as copylib
import multiprocessing
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from lmwatch.bench.controller import (
    Cancel,
    Command,
    Controller,
    ControllerFactory,
    Handover,
    Pause,
    Restart,
    SetBudget,
    SetCap,
    Setting,
)
from lmwatch.bench.corpus import LinkEvent, Workload
from lmwatch.drivers.base import CHANGE_RATE_WINDOW, ActionRefused
from lmwatch.drivers.simphysics import (
    Counting,
    Migration,
    Side,
    Tuning,
    Writer,
    change_rate_reading,
)
from lmwatch.model import JobResult, Phase, Sample, StartPlan
from lmwatch.profiles.loader import load_profiles, load_profiles_text
from lmwatch.profiles.schema import Profile

# The change-rate measurement before start covers as long as the daemon's does.
MEASURE_SECONDS = float(CHANGE_RATE_WINDOW)
NO_DEADLINE_LIMIT = 2 * 3600.0  # seconds a run may take when its profile has no deadline
HARD_LIMIT = 4 * 3600.0  # seconds no run goes past, whatever the caller asks
LIMIT_MARGIN = 1.1  # a run is stopped at its deadline plus 10 %
UNFINISHED = "unfinished"
OUTCOMES = ("completed", "cancelled", "failed", UNFINISHED)
_EPS = 1e-9
WAKE_MARGIN = 1e-3  # seconds past a pass boundary a woken controller samples (as the driver)
MIN_WAKE = 0.05  # seconds: the shortest sleep between two samples of a woken controller
# Seconds from a job's end (after a cancel) to the new job's start when a controller
# starts again: the engine sees the end at its next poll, then starts the new job.
RESTART_GAP = 1.0


def bench_profiles(path: str | Path | None = None) -> list[Profile]:
    """The profiles to benchmark: a profiles file, or the shipped benchmark profiles
    (lmwatch/bench/profiles.yaml). Raises `ProfileError` with line and column."""
    if path is not None:
        return list(load_profiles(path).profiles)
    text = resources.files("lmwatch.bench").joinpath("profiles.yaml").read_text("utf-8")
    return list(load_profiles_text(text, source="lmwatch/bench/profiles.yaml").profiles)


def default_limit(profile: Profile, workload: Workload) -> float:
    """When a run is stopped: the profile's deadline plus 10 %, or 2 h without one."""
    deadline = profile.deadline_seconds(workload.memory)
    limit = NO_DEADLINE_LIMIT if deadline is None else deadline * LIMIT_MARGIN
    return min(limit, HARD_LIMIT)


def setting_for(workload: Workload, profile: Profile, switchover: float | None = None) -> Setting:
    """What a controller may know before the start: no hidden workload parameter.

    The switchover cost is the one thing learned from earlier migrations: lmwatch
    measures it on every completed migration between two hosts, so a host pair that
    has seen migrations before is known. By default the bench assumes every pair has
    (`switchover=None`: the workload's own cost); a number tells every controller that
    value instead, e.g. 50ms for pairs never seen.

    The change rate is what a measurement over the run's first `MEASURE_SECONDS`
    reports; a controller that uses it waits for it (its `started_at`: lmwatch's time
    counts the measurement, as the daemon's start waits for it).
    """
    measured = change_rate_reading(
        workload.change_rate,
        workload.working_set,
        Writer(workload.writer),
        workload.memory,
        MEASURE_SECONDS,
        seed=f"{workload.name}:measurement",
    )
    return Setting(
        workload=workload.name,
        memory=workload.memory,
        bandwidth=workload.bandwidth,
        change_rate=measured,
        change_rate_window=MEASURE_SECONDS,
        profile=profile,
        switchover=workload.switchover if switchover is None else switchover,
        switchover_measured=switchover is None,
    )


@dataclass(frozen=True, slots=True)
class Run:
    """What happened in one run; everything the judge and the report need."""

    workload: str
    profile: str
    controller: str
    outcome: str  # completed | cancelled | failed | unfinished
    # the run's beginning (a measurement before the start included) to its end (to the
    # limit when unfinished)
    total_seconds: float
    # measured final stop (also one that ended without completing: the guest was
    # stopped on the source until the job ended); a pause's length when paused
    blackout_seconds: float | None
    paused: bool
    pause_seconds: float | None
    handed_over: bool
    degraded_seconds: float | None  # handover to end
    max_slowdown: float
    passes: int = 0
    decisions: int = 0  # samples the controller answered
    commands: int = 0  # commands it gave
    refused: int = 0  # commands the migration refused (no-ops)
    lost: bool = False  # the instance ended up on neither host
    note: str | None = None  # why it failed, when it did
    eta_at: float | None = None  # when the ETA used for accuracy was made
    eta_predicted: float | None = None  # seconds to completion it predicted
    eta_actual: float | None = None  # seconds it actually took from then (completed runs)
    restarts: int = 0  # times the controller started the migration again
    # the longest pause of a job stopped to start again (the guest was stopped until
    # that job ended); judged as the daemon judges it, apart from the final job
    earlier_pause_seconds: float | None = None
    # the longest final stop of a job that failed under it and was started again (the
    # guest was stopped on the source until that job ended)
    earlier_stop_seconds: float | None = None
    # what the controller did and why, for controllers that say (lmwatch does): one
    # (seconds since start, action, reason) per sample it answered with an action
    actions: tuple[tuple[float, str, str], ...] = ()

    @property
    def eta_ratio(self) -> float | None:
        """Actual over predicted time to completion (1 is perfect), when both are known."""
        if self.eta_predicted is None or self.eta_actual is None or self.eta_predicted <= 0:
            return None
        return self.eta_actual / self.eta_predicted

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Run:
        fields = {key: data[key] for key in cls.__dataclass_fields__ if key in data}
        if "actions" in fields:  # lists once read back from JSON
            fields["actions"] = tuple((float(t), str(a), str(r)) for t, a, r in fields["actions"])
        return cls(**fields)


class Simulation:
    """One workload's migration in virtual time, started with `plan`."""

    def __init__(self, workload: Workload, plan: StartPlan, start: float = 0.0) -> None:
        """`start`: seconds after the run began that the job begins (a controller that
        measured the guest first); the link events due by then have happened."""
        self.workload = workload
        self.plan = plan
        self.migration = Migration(
            memory=workload.memory,
            working_set=workload.working_set,
            change_rate=workload.change_rate,
            bandwidth=workload.bandwidth,
            plan=plan,
            tuning=Tuning(device_state=workload.switchover),
            writer=Writer(workload.writer),
            jitter=workload.jitter,
            jitter_seed=zlib.crc32(workload.name.encode()),
            start=start,
            counting=Counting(workload.counting),
        )
        self._events: tuple[LinkEvent, ...] = tuple(workload.link_events)
        self._next_event = 0
        self.commands = 0  # commands applied or tried
        self.refused = 0  # commands the model refused
        self.paused_at: float | None = None
        self.handed_over_at: float | None = None
        self.cancelled_at: float | None = None
        self.restarts = 0  # jobs started again (`Restart`)
        self._earlier_slowdown = 0.0  # highest slow-down of the jobs before the current
        self._earlier_passes = 0
        self._earlier_pause: float | None = None
        self._earlier_stop: float | None = None
        # when a controller that tried to start again after a failed job gave up: the
        # migration ends then (None: it ended with the job)
        self.gave_up_at: float | None = None
        # A job stopped to start again (`Restart`) ended while the link was down: the new
        # one waits until the link carries, tried like one after a failed job. What the
        # ended job did is kept for the judge already (`_keep_ended_job`).
        self.to_start_again = False
        if start > 0:
            self.advance_to(start)  # the link as it is when the job begins

    # -- state -------------------------------------------------------------------------

    @property
    def now(self) -> float:
        """Seconds since the run began (the job may have begun later: `start`)."""
        return self.migration.elapsed

    @property
    def finished(self) -> bool:
        return self.migration.phase.finished

    @property
    def phase(self) -> Phase:
        return self.migration.phase

    @property
    def ended_at(self) -> float | None:
        return self.migration.finished_at

    @property
    def max_slowdown(self) -> float:
        return max(self._earlier_slowdown, self.migration.max_slowdown)

    @property
    def paused(self) -> bool:
        return self.migration.paused

    @property
    def handed_over(self) -> bool:
        return self.migration.handed_over

    @property
    def blackout(self) -> float | None:
        """The measured final stop (a pause's whole length when paused), once completed."""
        return self.migration.blackout if self.phase is Phase.COMPLETED else None

    def sample(self) -> Sample:
        return self.migration.snapshot(self.now)

    def result(self) -> JobResult:
        return self.migration.result()

    # -- time ----------------------------------------------------------------------------

    def advance_to(self, t: float) -> None:
        """Move to `t` seconds since the run began, applying link events due on the way."""
        migration = self.migration
        if self._next_event >= len(self._events):  # the common case: no event left
            if t > migration.elapsed:
                migration.advance(t - migration.elapsed)
            return
        while self._next_event < len(self._events) and self._events[self._next_event].at <= t:
            event = self._events[self._next_event]
            if event.at > migration.elapsed:
                migration.advance(event.at - migration.elapsed)
            # after the job ended too: a job started again takes the link as it is then
            self._apply_event(event)
            self._next_event += 1
        if t > migration.elapsed:
            migration.advance(t - migration.elapsed)

    @property
    def next_link_event_at(self) -> float | None:
        """When the next link event is due (seconds since the run began), None when none is."""
        if self._next_event >= len(self._events):
            return None
        return self._events[self._next_event].at

    def _apply_event(self, event: LinkEvent) -> None:
        if event.kind == "bandwidth":
            assert event.value is not None
            self.migration.set_link_bandwidth(event.value * self.workload.bandwidth)
        elif event.kind == "break":
            self.migration.break_link()
        elif event.kind == "restore":
            self.migration.restore_link()

    # -- commands --------------------------------------------------------------------------

    def apply(self, command: Command) -> bool:
        """Carry out one command; False (and counted in `refused`) when the model refuses."""
        migration = self.migration
        self.commands += 1
        try:
            if isinstance(command, SetBudget):
                migration.set_budget(command.seconds)
            elif isinstance(command, SetCap):
                migration.set_cap(command.bytes_per_second)
            elif isinstance(command, Pause):
                was = migration.paused
                migration.pause()
                if not was and migration.paused:
                    self.paused_at = migration.elapsed
            elif isinstance(command, Handover):
                was = migration.handed_over
                migration.handover()
                if not was and migration.handed_over:
                    self.handed_over_at = migration.elapsed
            elif isinstance(command, Cancel):
                migration.cancel()
                if self.cancelled_at is None:
                    self.cancelled_at = migration.elapsed
            elif isinstance(command, Restart):
                if migration.phase.finished:
                    self._start_again(command.plan)
                else:
                    self._restart(command.plan)
            else:  # pragma: no cover - the Command union is closed
                raise TypeError(f"not a command: {command!r}")
        except ActionRefused:
            self.refused += 1
            return False
        return True

    def _restart(self, plan: StartPlan) -> None:
        """Cancel the job, wait until it has ended, and start a new one with `plan`
        `RESTART_GAP` seconds later (link events on the way apply). A paused guest
        resumes on the source when the job ends: that pause is kept for the judge."""
        migration = self.migration
        if migration.handed_over:
            raise ActionRefused("the instance is already handed over")
        migration.cancel()
        while not migration.phase.finished:
            step = migration.next_event_in()
            self.advance_to(migration.elapsed + (0.1 if step is None else max(step, 1e-3)))
        if migration.phase is not Phase.CANCELLED:
            return  # it ended otherwise meanwhile (failed): nothing to start again
        if not migration.link_up:
            # the hypervisor's start would fail: tried again as after a failed job
            self._keep_ended_job()
            self.to_start_again = True
            return
        self._new_job(plan, migration.elapsed + RESTART_GAP)

    def _start_again(self, plan: StartPlan) -> None:
        """Start a new job with `plan` now, after the job failed with the instance still
        on the source, or was stopped to start again while the link was down; refused
        while the link is down (the hypervisor's start fails)."""
        migration = self.migration
        if not (migration.phase is Phase.FAILED or self.to_start_again) or (
            migration.running_on is not Side.SOURCE
        ):
            raise ActionRefused("the job did not fail with the instance on the source")
        if not migration.link_up:
            raise ActionRefused("the link to the destination is down")
        self._new_job(plan, migration.elapsed)

    def _new_job(self, plan: StartPlan, at: float) -> None:
        """Keep what the ended job did for the judge, and start the next one at `at`."""
        if not self.to_start_again:  # kept when it ended
            self._keep_ended_job()
        self.plan = plan
        self.migration = self.migration.again(plan, at)
        self.to_start_again = False
        self.restarts += 1
        self.advance_to(at)  # the link events due by the new start

    def _keep_ended_job(self) -> None:
        """Keep what the ended job did for the judge: its slow-down, its passes, and how
        long it stopped the instance (a pause ends with the job: the instance resumes on
        the source)."""
        migration = self.migration
        self._earlier_slowdown = max(self._earlier_slowdown, migration.max_slowdown)
        self._earlier_passes += migration.passes
        if migration.paused and self.paused_at is not None:
            ended = migration.finished_at if migration.finished_at is not None else self.now
            self._earlier_pause = max(self._earlier_pause or 0.0, ended - self.paused_at)
            self.paused_at = None
        elif migration.stopped_seconds is not None:
            self._earlier_stop = max(self._earlier_stop or 0.0, migration.stopped_seconds)

    # -- branching -------------------------------------------------------------------------

    def copy(self) -> Simulation:
        """An independent copy (the immutable workload, plan and pattern are shared)."""
        migration = self.migration
        memo: dict[int, Any] = {
            id(self.workload): self.workload,
            id(self.plan): self.plan,
            id(migration.plan): migration.plan,
            id(migration.pattern): migration.pattern,
            id(migration.tuning): migration.tuning,
            id(self._events): self._events,
        }
        return copylib.deepcopy(self, memo)

    # -- the record ------------------------------------------------------------------------

    def record(
        self,
        *,
        profile: str,
        controller: str,
        decisions: int = 0,
        eta: tuple[float, float] | None = None,
        actions: tuple[tuple[float, str, str], ...] = (),
    ) -> Run:
        """This simulation as a `Run` (at its end, or now when it has not finished)."""
        migration = self.migration
        finished = self.finished
        end = migration.finished_at if finished and migration.finished_at is not None else self.now
        if finished and self.gave_up_at is not None:
            end = max(end, self.gave_up_at)
        outcome = migration.phase.value if finished else UNFINISHED
        # The job was stopped to start again and no new job started: what it did is kept
        # already (its pause in `earlier_pause_seconds`), and the migration ends failed,
        # the instance on the source, as the engine's does.
        kept = self.to_start_again
        if finished and kept:
            outcome = Phase.FAILED.value
        paused = migration.paused and not kept
        completed = migration.phase is Phase.COMPLETED
        blackout = migration.blackout if completed else None
        if not completed and not migration.paused and not kept:
            blackout = migration.stopped_seconds  # a final copy that failed: stopped until then
        pause_seconds: float | None = None
        if paused:
            if completed and blackout is not None:
                pause_seconds = blackout
            elif self.paused_at is not None:
                pause_seconds = end - self.paused_at
        degraded: float | None = None
        if migration.handed_over and self.handed_over_at is not None:
            degraded = end - self.handed_over_at
        eta_at, eta_predicted = eta if eta is not None else (None, None)
        eta_actual = end - eta_at if completed and eta_at is not None else None
        return Run(
            workload=self.workload.name,
            profile=profile,
            controller=controller,
            outcome=outcome,
            total_seconds=end,
            blackout_seconds=blackout,
            paused=paused,
            pause_seconds=pause_seconds,
            handed_over=migration.handed_over,
            degraded_seconds=degraded,
            max_slowdown=self.max_slowdown,
            passes=self._earlier_passes + (0 if kept else migration.passes),
            decisions=decisions,
            commands=self.commands,
            refused=self.refused,
            lost=finished and migration.running_on is Side.NOWHERE,
            note=migration.error,
            eta_at=eta_at,
            eta_predicted=eta_predicted,
            eta_actual=eta_actual,
            restarts=self.restarts,
            earlier_pause_seconds=self._earlier_pause,
            earlier_stop_seconds=self._earlier_stop,
            actions=actions,
        )


def _after_failure(controller: Controller, simulation: Simulation, end: float) -> bool:
    """The job ended: a controller that starts again after a failed job, or after one
    it stopped to start again while the link was down (`Simulation.to_start_again`),
    (`after_failure(result, now) -> Restart | None`) tries a new job every
    `retry_interval` seconds, as the engine does, while it says so. True when a new
    job started."""
    migration = simulation.migration
    if migration.phase is not Phase.FAILED and not simulation.to_start_again:
        return False
    retry = float(controller.retry_interval)
    tried = False
    while True:
        command = controller.after_failure(migration.result(), simulation.now)
        if command is None:
            break
        if simulation.apply(command):
            return True
        tried = True
        if simulation.now + retry >= end - _EPS:
            break
        simulation.advance_to(simulation.now + retry)
    if tried:  # the migration ends when the controller gives up, as the engine's does
        simulation.gave_up_at = simulation.now
    return False


def _wake(migration: Migration, sampled: float, target: float) -> float:
    """The next sample of a woken controller: at `target`, or just past the next pass
    boundary or phase change if that comes first (at least `MIN_WAKE` after the sample
    taken at `sampled`)."""
    upcoming = migration.next_event_in()
    if upcoming is None:
        return target
    return min(target, max(migration.elapsed + upcoming + WAKE_MARGIN, sampled + MIN_WAKE))


def _first_eta(controller: Controller, after: float | None) -> tuple[float, float] | None:
    """The controller's first ETA made once the first pass had ended (if it predicts)."""
    if after is None:
        return None
    for at, seconds in controller.predictions:
        if at >= after - _EPS and seconds is not None:
            return float(at), float(seconds)
    return None


def _actions(controller: Controller) -> tuple[tuple[float, str, str], ...]:
    """What the controller did and why, when it keeps a record (`reasons`)."""
    return tuple(
        (round(float(at), 3), str(action), str(why)) for at, action, why in controller.reasons
    )


def run(
    workload: Workload,
    profile: Profile,
    factory: ControllerFactory,
    *,
    switchover: float | None = None,
    limit: float | None = None,
    name: str | None = None,
) -> Run:
    """One migration of `workload` decided by the controller `factory` builds.

    The run is recorded under `name`, or the controller's own name."""
    controller = factory(setting_for(workload, profile, switchover))
    poll = float(controller.poll_interval)
    if not poll > 0:
        raise ValueError(f"controller {controller.name!r} has poll_interval {poll!r}")
    next_poll = controller.next_poll
    plan = controller.start()
    # A controller that measures the guest before the start (lmwatch, where that pays)
    # begins the job that much later: its time counts the measurement.
    simulation = Simulation(workload, plan, start=float(controller.started_at))
    end = default_limit(profile, workload) if limit is None else limit
    decisions = 0
    first_pass_ended: float | None = None
    step = controller.step
    apply = simulation.apply
    migration = simulation.migration
    # lmwatch's engine wakes early when the hypervisor reports a new pass (the driver's
    # `wait_event`), so it samples each pass at its start; a controller that says so
    # (`wake_on_pass`) is woken the same way, at most every `MIN_WAKE` seconds.
    wake = bool(controller.wake_on_pass)
    # The first poll is at the start, as the engine's ("the first poll is now") and the
    # monitor loops of the systems the baselines re-implement: it shows the first pass
    # begun, so its end is known when the next sample shows the second.
    first = True
    while True:
        sampled = migration.elapsed
        target = sampled if first else min(sampled + next_poll(sampled), end)
        if wake and not first:
            target = _wake(migration, sampled, target)
            # A link event changes when the next pass or stop comes: the driver's event
            # wakes the engine then, whatever moved it.
            following = simulation.next_link_event_at
            while following is not None and following < target - _EPS:
                simulation.advance_to(following)
                if migration.finished_at is not None:
                    break
                target = _wake(migration, sampled, target)
                following = simulation.next_link_event_at
        simulation.advance_to(target)
        first = False
        if migration.elapsed >= end - _EPS:
            break
        restarts = simulation.restarts
        if migration.finished_at is not None:
            if not _after_failure(controller, simulation, end):
                break
        else:
            sample = simulation.sample()
            now = migration.elapsed
            if first_pass_ended is None and sample.passes >= 2:
                first_pass_ended = now
            decisions += 1
            for command in step(sample, now):
                controller.applied(command, apply(command))
        if simulation.restarts != restarts:  # a new job: the controller learns when it began
            migration = simulation.migration
            controller.restarted(migration.started)
    if simulation.finished:
        controller.finished(simulation.result())
    return simulation.record(
        profile=profile.name,
        controller=controller.name if name is None else name,
        decisions=decisions,
        eta=_first_eta(controller, first_pass_ended),
        actions=_actions(controller),
    )


# -- many runs -------------------------------------------------------------------------------

_JOB: dict[str, Any] = {}  # what the forked workers read (set before the pool forks)


def _chunk(task: tuple[int, int]) -> list[Run]:
    workload_index, profile_index = task
    workload = _JOB["workloads"][workload_index]
    profile = _JOB["profiles"][profile_index]
    runs = []
    for name, factory in _JOB["factories"]:
        try:
            runs.append(
                run(
                    workload,
                    profile,
                    factory,
                    switchover=_JOB["switchover"],
                    limit=_JOB["limit"],
                    name=name,
                )
            )
        except Exception as error:
            raise RuntimeError(
                f"run of {workload.name!r} under {profile.name!r} with "
                f"{getattr(factory, '__name__', factory)!r} failed: {error!r}"
            ) from error
    return runs


def run_many(
    workloads: Sequence[Workload],
    profiles: Sequence[Profile],
    factories: Sequence[ControllerFactory] | Mapping[str, ControllerFactory],
    processes: int = 2,
    *,
    switchover: float | None = None,
    limit: float | None = None,
) -> list[Run]:
    """Every (workload, profile, controller) run, in that nesting order.

    Work is split into (workload, profile) chunks over `processes` forked workers;
    the result order does not depend on how many there are. Runs are recorded
    under the factories' keys when given a mapping, else under the controllers' names.
    """
    named: list[tuple[str | None, ControllerFactory]] = (
        list(factories.items())
        if isinstance(factories, Mapping)
        else [(None, factory) for factory in factories]
    )
    tasks = [(w, p) for w in range(len(workloads)) for p in range(len(profiles))]
    _JOB.update(
        workloads=list(workloads),
        profiles=list(profiles),
        factories=named,
        switchover=switchover,
        limit=limit,
    )
    try:
        if processes <= 1 or len(tasks) <= 1:
            chunks = [_chunk(task) for task in tasks]
        else:
            context = multiprocessing.get_context("fork")
            with context.Pool(processes) as pool:
                chunks = list(pool.imap(_chunk, tasks, chunksize=1))
    finally:
        _JOB.clear()
    return [result for chunk in chunks for result in chunk]
