"""lmwatch's own policy as a benchmark controller.

It does what the engine does for one migration, without the I/O: `plan_start`
with the hosts' capabilities, the pre-start change-rate measurement and the
switchover cost learned for the host pair, then `decide` on every sample, with
decisions turned into commands exactly as the engine applies them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from lmwatch import policies
from lmwatch.bench.controller import (
    Cancel,
    Command,
    Controller,
    ControllerBase,
    Handover,
    Pause,
    Restart,
    SetBudget,
    Setting,
)
from lmwatch.model import (
    Action,
    Capabilities,
    Decision,
    InstanceInfo,
    JobResult,
    MigrationContext,
    Sample,
    StartPlan,
)

SOURCE = "source"  # the simulated source host's name (`simphysics.Migration`)


class LmwatchController(ControllerBase):
    """Plans with `policies.plan_start` and decides with `policies.decide`."""

    name = "lmwatch"
    poll_interval = 1.0  # the engine's default
    wake_on_pass = True  # the engine's driver wakes it when a new pass begins

    def __init__(self, setting: Setting, settings: policies.PolicySettings | None = None) -> None:
        self.setting = setting
        self.settings = settings or policies.DEFAULT
        self.track = policies.tracked((), self.settings)  # the samples, as the engine folds them
        self.ctx: MigrationContext | None = None
        self.predictions: list[tuple[float, float | None]] = []
        self.reasons: list[tuple[float, str, str]] = []
        self._pending: tuple[Command, MigrationContext] | None = None  # awaiting `applied`
        # a new job to try until it starts (after a failed job, or a pause stopped on a
        # link that slowed or stalled): plan, start-by
        self._again: tuple[StartPlan, float] | None = None
        self.started_at = 0.0  # when the job begins (after a measurement before it)
        self.cancelling = False  # a cancel was taken: like the engine, decide nothing more
        self.retry_interval = self.settings.restart_retry_seconds

    def start(self) -> StartPlan:
        """The start plan. The engine measures the change rate first where that pays
        (`policies.measuring_pays`): the job then begins once the measurement's window
        has passed (`started_at`), and the run's time counts the measurement."""
        s = self.setting
        info = InstanceInfo(name=s.workload, uuid=s.workload, host="a", memory_bytes=s.memory)
        window = s.change_rate_window
        measures = (
            s.change_rate is not None
            and window is not None
            and policies.measuring_pays(s.memory, s.bandwidth, window, self.settings)
        )
        measured = s.change_rate if measures else None
        self.started_at = float(window or 0.0) if measures else 0.0
        capabilities = Capabilities(handover=True, slow_down=True, bandwidth=s.bandwidth)
        plan = policies.plan_start(
            s.profile,
            info,
            capabilities,
            measured,
            s.bandwidth,
            self.settings,
            switchover=s.switchover,
        )
        self.ctx = MigrationContext(
            started_at=self.started_at,
            memory_bytes=s.memory,
            plan=plan,
            blackout_budget=plan.starting_budget,
            deadline_at=policies.deadline_at(s.profile, s.memory, self.started_at),
            switchover=s.switchover,
            switchover_least=s.switchover if s.switchover_measured else None,
            change_rate_before_start=measured,
            change_rate_window=window if measures else None,
        )
        return plan

    def next_poll(self, now: float) -> float:
        """As the engine: the poll interval, or sooner for a pause's last look."""
        assert self.ctx is not None, "start() first"
        return policies.next_look_in(
            self.setting.profile, self.ctx, now, self.poll_interval, self.settings
        )

    def step(self, sample: Sample, now: float) -> Sequence[Command]:
        assert self.ctx is not None, "start() first"
        self.track.add(sample)
        if self.cancelling:
            return []
        decision = policies.decide(self.setting.profile, self.track, self.ctx, now, self.settings)
        prediction = decision.prediction
        if prediction is not None and sample.passes >= 2:
            self.predictions.append((now, prediction.eta_seconds))
        action = decision.action
        if action is not Action.CONTINUE:
            self.reasons.append((now, action.value, decision.reason))
        if action is Action.RAISE_BLACKOUT:
            assert decision.blackout_budget is not None
            budget = decision.blackout_budget
            return self._proposing(SetBudget(budget), replace(self.ctx, blackout_budget=budget))
        if action is Action.PAUSE:
            return self._proposing(Pause(), replace(self.ctx, paused=True, paused_at=now))
        if action is Action.HANDOVER:
            return self._proposing(Handover(), replace(self.ctx, handed_over=True))
        if action is Action.CANCEL:
            return [Cancel()]
        if action is Action.RESTART:
            plan = self._restarting(decision, now)
            if decision.start_by is not None:  # tried until then if it cannot start now
                self._again = (plan, decision.start_by)
            return [Restart(plan)]
        return []

    def _restarting(self, decision: Decision, now: float) -> StartPlan:
        """The new job's plan; the context it starts in, as the engine records it."""
        assert self.ctx is not None
        plan = policies.restart_plan(self.ctx, decision)
        # The new job's samples start from pass 1 again; the deadline stays. Its
        # start plan was made for the rate seen now (no measurement window). A
        # pause ends with the job stopped: the instance resumes on the source.
        self.track = policies.tracked((), self.settings)
        self.ctx = replace(
            self.ctx,
            plan=plan,
            blackout_budget=plan.starting_budget,
            restarts=self.ctx.restarts + 1,
            job_started_at=now,
            change_rate_before_start=decision.planned_rate,
            change_rate_window=None,
            paused=False,
            paused_at=None,
        )
        return plan

    def after_failure(self, result: JobResult, now: float) -> Command | None:
        """The job failed: a new job to try now (`policies.restart_after_failure`, then
        every `retry_interval` until its start-by time), or None."""
        assert self.ctx is not None
        if self._again is None:
            decision = policies.restart_after_failure(
                self.track, self.ctx, result, SOURCE, now, self.settings
            )
            if decision is None or decision.start_by is None:
                return None
            self.reasons.append((now, decision.action.value, decision.reason))
            self._again = (self._restarting(decision, now), decision.start_by)
        plan, start_by = self._again
        return Restart(plan) if now <= start_by else None

    def _proposing(self, command: Command, then: MigrationContext) -> list[Command]:
        """`command`, and the context that holds once the migration has taken it."""
        self._pending = (command, then)
        return [command]

    def applied(self, command: Command, accepted: bool) -> None:
        """Like the engine, record a new budget, a pause or a handover only once the
        migration took it: a refused one (a handover while the link is down) changes
        nothing, and the policy decides again at the next sample. Once a cancel was
        taken, nothing more is decided: the job is ending."""
        pending, self._pending = self._pending, None
        if accepted and pending is not None and pending[0] is command:
            self.ctx = pending[1]
        if accepted and isinstance(command, Cancel):
            self.cancelling = True

    def restarted(self, at: float) -> None:
        """The runner started the new job at `at` (as the engine knows when its start
        returned)."""
        assert self.ctx is not None
        self.ctx = replace(self.ctx, job_started_at=at)
        self._again = None  # started: a later failure is judged afresh, as the engine does


def lmwatch_factory(setting: Setting) -> Controller:
    return LmwatchController(setting)
