"""The effect runner: the one place that calls the driver, writes the store and
updates the metrics and the event hub.

Everything else in the engine decides what should happen; this carries it out,
records it (intent before action, so a crash still leaves a trace) and publishes it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from collections.abc import Callable
from typing import Any

from lmwatch import policies
from lmwatch.clock import Clock, outside
from lmwatch.drivers.base import ActionRefused, Driver, DriverError
from lmwatch.engine.learned import Learned
from lmwatch.engine.records import (
    STOP_SECONDS,
    Supervision,
    log,
    log_context,
    method_of,
    metric_labels,
    plan_from,
    request_of,
)
from lmwatch.engine.settings import EngineSettings
from lmwatch.errors import Conflict, StoreUnavailable
from lmwatch.events import EventHub
from lmwatch.metrics import Metrics
from lmwatch.model import (
    Action,
    Capabilities,
    ChangeRate,
    Decision,
    HostInfo,
    InstanceInfo,
    JobResult,
    MigrationRequest,
    Phase,
    Prediction,
    Sample,
    StartPlan,
    State,
)
from lmwatch.records import Outcome, Progress, Restarts, outcome_json, prediction_json
from lmwatch.store import MigrationRecord, Store, StoreUnwritable


class NotOwner(Exception):
    """This daemon may no longer act on the migration: its lease is running out, or
    the migration's claim went to another member (several daemons, docs/cluster.md).
    Its supervision stops here without acting and without writing an outcome."""


class Effects:
    def __init__(
        self,
        *,
        driver: Driver,
        store: Store,
        metrics: Metrics,
        hub: EventHub,
        clock: Clock,
        settings: EngineSettings,
        learned: Learned,
    ) -> None:
        self.driver = driver
        self.store = store
        self.metrics = metrics
        self.hub = hub
        self.clock = clock
        self.settings = settings
        self.learned = learned
        # Several daemons on one database: whether this one may act on a migration
        # now (its lease runs and it holds the migration's claim). None: always.
        self.may_act: Callable[[str], bool] | None = None

    # -- the record and the timeline ---------------------------------------------------

    def update(
        self,
        supervision: Supervision,
        kind: str | None,
        reason: str,
        *,
        action: str | None = None,
        data: dict[str, Any] | None = None,
        **changes: Any,
    ) -> None:
        """Write changes to the record, with a timeline entry unless `kind` is None."""
        event = None if kind is None else (kind, reason, action)
        now = self.clock.now()
        supervision.record = self.store.update(
            supervision.record, event=event, at=now, data=data, **changes
        )
        if kind is not None:
            self.hub.timeline(supervision.record, now, kind, reason, action, data)

    def event(
        self,
        supervision: Supervision,
        kind: str,
        reason: str,
        *,
        action: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        """Add a timeline entry without changing the record."""
        now = self.clock.now()
        self.store.add_event(supervision.record.id, now, kind, reason, action, data)
        self.hub.timeline(supervision.record, now, kind, reason, action, data)
        if kind in ("note", "error"):
            record = supervision.record
            log.info(kind, **log_context(record), reason=reason)

    def accept_soon(self, record: MigrationRecord, reason: str) -> concurrent.futures.Future[None]:
        """Queue an accepted migration for the writer thread (behind what waits);
        StoreUnavailable at once when the store takes no new work. Done once it is on
        disk (see `accepted`)."""
        self.refuse_unless_writable()
        try:
            return self.store.insert_soon(record, reason)
        except StoreUnwritable as error:
            raise StoreUnavailable(str(error)) from error

    async def accepted(self, done: concurrent.futures.Future[None]) -> None:
        """Wait (off the loop) until a queued acceptance is on disk; StoreUnavailable
        when its transaction failed (it is then not recorded)."""
        try:
            await outside(self.clock, asyncio.wrap_future(done))
        except StoreUnwritable as error:
            raise StoreUnavailable(str(error)) from error

    def announce(self, record: MigrationRecord, reason: str) -> None:
        """Tell the timeline and the log that a migration was accepted."""
        self.hub.timeline(record, record.created_at, "state", reason)
        log.info("accepted", **log_context(record), profile=record.profile_name)

    def refuse_unless_writable(self) -> None:
        """New work only while the store takes it (and its file is still there)."""
        problem = self.store.check_file()
        if problem is not None:
            raise StoreUnavailable(problem)

    def publish(
        self, supervision: Supervision, sample: Sample, prediction: Prediction | None
    ) -> None:
        """Show a sample's progress: on the record, the event hub and the gauges."""
        seen = sample.memory_remaining
        last = supervision.record.progress
        if sample.phase is not Phase.COPYING and last is not None:
            seen = last.memory_remaining_seen or seen
        progress = Progress(
            time=sample.time,
            memory_remaining_seen=seen,
            memory_total=sample.memory_total,
            memory_remaining=sample.memory_remaining,
            memory_transferred=sample.memory_transferred,
            transfer_rate=sample.transfer_rate,
            change_rate=sample.change_rate,
            passes=sample.passes,
            blackout_budget=sample.blackout_budget,
            slowdown=sample.slowdown,
            disk_total=sample.disk_total,
            disk_remaining=sample.disk_remaining,
            disk_rate=sample.disk_rate,
            prediction=prediction,
        )
        supervision.record = dataclasses.replace(supervision.record, progress=progress)
        self.hub.progress(supervision.record, sample.time)
        # Progress is persisted at most every few seconds; it is cheap to lose. But the
        # first one that shows the link's rate is kept at once: a job that fails while
        # no daemon watches is judged on it after a restart (`last_seen`).
        first_rate = sample.transfer_rate > 0 and not supervision.rate_saved
        if first_rate or sample.time - supervision.progress_saved_at >= 5.0:
            supervision.progress_saved_at = sample.time
            supervision.rate_saved = supervision.rate_saved or sample.transfer_rate > 0
            self.update(supervision, None, "", progress=progress)
        gauges = supervision.gauges
        if gauges is None:
            gauges = self.metrics.migration_gauges(metric_labels(supervision.record))
            supervision.gauges = gauges
        gauges.remaining.set(sample.memory_remaining)
        gauges.transfer_rate.set(sample.transfer_rate)
        gauges.change_rate.set(sample.change_rate)
        gauges.disk_remaining.set(sample.disk_remaining)
        gauges.disk_rate.set(sample.disk_rate)
        if prediction is not None:
            eta = prediction.eta_seconds
            gauges.eta.set(float("nan") if eta is None else eta)
            blackout = prediction.blackout_seconds
            gauges.predicted_blackout.set(float("nan") if blackout is None else blackout)

    # -- metrics ------------------------------------------------------------------------

    def hypervisor_error(self, operation: str) -> None:
        self.metrics.hypervisor_errors.labels(operation).inc()

    def poll_lag(self, lag: float) -> None:
        self.metrics.poll_lag.observe(max(0.0, lag))

    def started(self, supervision: Supervision) -> None:
        self.metrics.started.labels(supervision.record.profile_name).inc()

    def queue_sizes(self, active: int, queued: int) -> None:
        self.metrics.active.set(active)
        self.metrics.queued.set(queued)

    def forget(self, record: MigrationRecord) -> None:
        """Drop an ended migration's gauges."""
        self.metrics.forget(metric_labels(record))

    # -- asking the driver --------------------------------------------------------------

    async def preflight(self, request: MigrationRequest) -> InstanceInfo:
        return await self.driver.preflight(request)

    async def hosts(self) -> list[str]:
        return list(await self.driver.hosts())

    async def host_info(self, host: str) -> HostInfo:
        return await self.driver.host_info(host)

    async def describe_instance(self, instance: str, host: str | None = None) -> InstanceInfo:
        return await self.driver.describe(instance, host)

    async def capabilities_between(self, source: str, destination: str) -> Capabilities:
        return await self.driver.capabilities(source, destination)

    async def sample(self, supervision: Supervision) -> Sample:
        return await self.driver.sample(supervision.record.id)

    async def result(self, supervision: Supervision) -> JobResult:
        return await self.driver.result(supervision.record.id)

    async def wait_event(self, supervision: Supervision, timeout: float) -> None:
        await self.driver.wait_event(supervision.record.id, timeout)

    async def reattach(self, supervision: Supervision) -> JobResult | None:
        record = supervision.record
        return await self.driver.reattach(
            record.id, request_of(record), plan_from(record), paused=record.paused
        )

    async def capabilities(self, supervision: Supervision) -> Capabilities:
        record = supervision.record
        return await self.driver.capabilities(record.source, record.destination)

    async def describe(self, supervision: Supervision) -> InstanceInfo:
        record = supervision.record
        return await self.driver.describe(record.instance, record.source)

    async def recorded(self, supervision: Supervision) -> None:
        """Wait until what was recorded is in the store's file (the writer thread
        writes it; the loop goes on): intent before action, so a crash after acting
        still leaves a trace. Returns at once while writes fail (they are kept).

        With several daemons the intent must be written under the migration's claim
        and the daemon must still hold it, or NotOwner: no action without both. Writes
        that fail are waited for (checked again every quarter poll) while it may act."""
        gate = self.may_act
        if gate is None:
            await outside(self.clock, self.store.written())
            return
        migration_id = supervision.record.id
        target = self.store.last_seq()
        while True:
            await outside(self.clock, self.store.written())
            if self.store.committed_through() >= target or not gate(migration_id):
                break
            await self.clock.sleep(self.settings.poll_interval / 4)
        if not gate(migration_id):
            raise NotOwner(
                f"migration {migration_id}: this daemon's lease or its claim on the "
                "migration is gone; another daemon takes it over"
            )

    async def start_job(self, supervision: Supervision, plan: StartPlan) -> None:
        record = supervision.record
        await self.recorded(supervision)
        await self.driver.start(record.id, request_of(record), plan)

    async def stop_job(self, supervision: Supervision) -> None:
        """Ask the hypervisor to stop a job lmwatch gives up on (not an operator cancel)."""
        await self.recorded(supervision)
        await self.driver.cancel(supervision.record.id)

    async def measure_change_rate(self, supervision: Supervision) -> ChangeRate | None:
        """The guest's change rate before start; a failed measurement is not fatal."""
        record = supervision.record
        try:
            return await self.driver.measure_change_rate(record.instance, record.source)
        except DriverError as error:
            self.hypervisor_error("measure")
            self.event(
                supervision,
                "note",
                f"the change rate could not be measured before start ({error}); "
                "deciding from the first passes instead",
            )
            return None

    # -- decisions ------------------------------------------------------------------------

    async def apply(self, supervision: Supervision, decision: Decision, *, origin: str) -> None:
        """Carry out a decision of the policy or of an operator (`origin`), and record it.

        An operator's action the hypervisor refuses raises (Conflict, DriverError);
        the policy's is recorded as an error and tried again at its next decision.
        """
        record = supervision.record
        action = decision.action
        mlog = log.bind(**log_context(record), origin=origin)
        self.metrics.decisions.labels(action.value).inc()
        if action is Action.CONTINUE:
            self._log_continue(supervision, decision)
            return
        data = {
            "origin": origin,
            "rule": None if decision.rule is None else decision.rule.value,
            "prediction": prediction_json(decision.prediction),
        }
        # Record the intent first: a crash after acting still leaves a trace.
        changes: dict[str, Any] = {}
        if action is Action.RAISE_BLACKOUT:
            changes["blackout_budget"] = decision.blackout_budget
        elif action is Action.PAUSE:
            changes["paused"] = True
        elif action is Action.HANDOVER:
            changes["handed_over"] = True
        self.update(supervision, "decision", decision.reason, action=action.value, data=data)
        mlog.info("decision", action=action.value, reason=decision.reason)
        await self.recorded(supervision)
        try:
            if action is Action.RAISE_BLACKOUT:
                assert decision.blackout_budget is not None
                await self.driver.set_blackout_budget(record.id, decision.blackout_budget)
            elif action is Action.PAUSE:
                supervision.paused_at = self.clock.now()
                supervision.pause_by_operator = origin == "operator"
                await self.driver.pause(record.id)
            elif action is Action.HANDOVER:
                await self.driver.handover(record.id)
                supervision.handed_over_at = self.clock.now()
            elif action is Action.CANCEL:
                await self.driver.cancel(record.id)
                supervision.cancel_sent_at = self.clock.now()
        except ActionRefused as refused:
            self.hypervisor_error(action.value)
            self.event(supervision, "error", f"{action.value} refused: {refused}")
            if origin == "operator":
                raise Conflict(str(refused)) from refused
            return
        except DriverError as error:
            self.hypervisor_error(action.value)
            self.event(supervision, "error", f"{action.value} failed: {error}")
            if origin == "operator":
                raise
            return
        if changes:
            self.update(supervision, None, "", **changes)
        if decision.note:
            self.event(supervision, "note", decision.note)

    def intend_restart(
        self, supervision: Supervision, decision: Decision, intent: Restarts
    ) -> None:
        """Record the policy's decision to start again, with the new plan, before the
        job is stopped (a daemon restarted in between then starts the new job)."""
        record = supervision.record
        self.metrics.decisions.labels(Action.RESTART.value).inc()
        data = {
            "origin": "policy",
            "rule": None if decision.rule is None else decision.rule.value,
            "prediction": prediction_json(decision.prediction),
            "slow_down_initial": decision.slow_down_initial,
        }
        self.update(
            supervision,
            "decision",
            decision.reason,
            action=Action.RESTART.value,
            data=data,
            restart=intent,
        )
        log.info(
            "decision",
            **log_context(record),
            origin="policy",
            action=Action.RESTART.value,
            reason=decision.reason,
        )

    def started_again(
        self,
        supervision: Supervision,
        plan: StartPlan,
        restart: Restarts,
        stopped: float | None = None,
    ) -> None:
        """The new job of a restart started: its plan is the migration's plan now.
        `stopped`: seconds the stopped job took to end (`learn_stop`), when it was ours."""
        record = supervision.record
        self.metrics.restarts.labels(record.profile_name).inc()
        self.update(
            supervision,
            "state",
            f"copying started again: {plan.reason}" if plan.reason else "copying started again",
            state=State.COPYING,
            plan=plan,
            blackout_budget=plan.starting_budget,
            restart=restart,
            data={"restarts": restart.count}
            | ({STOP_SECONDS: stopped} if stopped is not None else {}),
        )
        log.info(
            "started-again",
            **log_context(record),
            restarts=restart.count,
            slow_down_initial=plan.slow_down_initial,
        )

    def waiting_to_start(self, supervision: Supervision, reason: str) -> None:
        """The hosts refused the new job of a restart, and it is tried again later: no
        job runs meanwhile, so the migration is starting again, and the ended job's
        progress (its rates, its ETA) and gauges go, as they would not say what
        happens now."""
        self.update(supervision, "note", reason, state=State.STARTING, progress=None)
        supervision.rate_saved = False  # the new job's first rate is stored at once
        self.forget(supervision.record)
        supervision.gauges = None  # made again at the new job's first sample

    def _log_continue(self, supervision: Supervision, decision: Decision) -> None:
        """Record 'continue' when the rule behind it changes, or every so often."""
        now = self.clock.now()
        gist = decision.rule.value if decision.rule is not None else decision.reason
        last = supervision.last_logged
        if (
            last is not None
            and last[0] is Action.CONTINUE
            and last[1] == gist
            and now - last[2] < self.settings.continue_log_interval
        ):
            return
        supervision.last_logged = (Action.CONTINUE, gist, now)
        self.event(
            supervision,
            "decision",
            decision.reason,
            action=Action.CONTINUE.value,
            data={
                "rule": None if decision.rule is None else decision.rule.value,
                "prediction": prediction_json(decision.prediction),
            },
        )

    # -- the end ---------------------------------------------------------------------------

    async def finish(
        self, supervision: Supervision, result: JobResult, reason: str | None = None
    ) -> None:
        """Record how a migration ended, check it against its profile, count it."""
        self.end(supervision, result, reason)

    def end(self, supervision: Supervision, result: JobResult, reason: str | None = None) -> None:
        """`finish` without awaiting: a queued migration's cancel checks and ends it in
        one step, so no start can come in between."""
        record = supervision.record
        now = self.clock.now()
        method = method_of(result, record)
        state = {
            Phase.COMPLETED: State.COMPLETED,
            Phase.CANCELLED: State.CANCELLED,
        }.get(result.phase, State.FAILED)
        # A stop's time is on the timeline too, so that a restarted daemon learns it again.
        took = self.learn_stop(supervision) if state is State.CANCELLED else None
        started = record.started_at or record.created_at
        total = now - started
        outcome = Outcome(
            method=method,
            total_seconds=total,
            blackout_seconds=result.blackout_seconds,
            passes=result.passes,
            transferred_bytes=result.transferred,
            error=result.error,
            running_on=result.running_on,
        )
        progress = record.progress
        if progress is not None and state is State.COMPLETED:
            progress = dataclasses.replace(
                progress,
                memory_remaining=0,
                memory_transferred=max(result.transferred, progress.memory_transferred),
            )
        text = (
            reason
            or {
                State.COMPLETED: f"completed ({method.value})",
                State.CANCELLED: "cancelled; the instance keeps running on the source",
                State.FAILED: f"failed: {result.error}",
            }[state]
        )
        self.update(
            supervision,
            "state",
            text,
            state=state,
            finished_at=now,
            outcome=outcome,
            progress=progress,
            data=outcome_json(outcome) | ({STOP_SECONDS: took} if took is not None else {}),
        )
        if result.note:
            self.event(supervision, "note", result.note)
        self._check_profile(supervision, result, total, completed=state is State.COMPLETED)
        if state is State.COMPLETED:
            self.learned.learn(supervision.record)
        self.metrics.finished.labels(state.value, method.value).inc()
        self.metrics.duration.labels(method.value).observe(total)
        if result.blackout_seconds is not None:
            self.metrics.blackout.labels(method.value).observe(result.blackout_seconds)
        log.info(
            "finished",
            **log_context(record),
            state=state.value,
            method=method.value,
            blackout=result.blackout_seconds,
        )

    def _check_profile(
        self, supervision: Supervision, result: JobResult, total: float, *, completed: bool
    ) -> None:
        """Record every way the ended migration exceeded its profile (a pause or a
        handover counts even when it then failed or was cancelled)."""
        record = supervision.record
        profile = supervision.profile
        degraded = None
        if supervision.handed_over_at is not None and record.finished_at is not None:
            degraded = max(0.0, record.finished_at - supervision.handed_over_at)
        stopped = result.blackout_seconds  # the driver's: a stop that did not complete too
        if stopped is None and supervision.paused_at is not None and record.finished_at:
            stopped = max(0.0, record.finished_at - supervision.paused_at)  # until it resumed
        finish = policies.Finish(
            blackout=stopped,
            paused=result.paused or record.paused,
            handed_over=result.handed_over or record.handed_over,
            degraded=degraded,
            slowdown=result.slowdown,
            total=total,
            deadline=profile.deadline_seconds(record.memory_bytes),
            completed=completed,
        )
        self._record_violations(supervision, finish)

    def pause_ended(
        self, supervision: Supervision, result: JobResult | None, took: float | None
    ) -> None:
        """The job of a paused migration ended without completing and the migration
        starts again: the instance runs on the source again. Record how long it was
        stopped, check that against the profile now (the new job is judged on its
        own), and forget the pause. `result`: the ended job's, when it could be read;
        `took`: seconds from the stop lmwatch asked to the job's end (`learn_stop`),
        None when the job ended without one."""
        record = supervision.record
        stopped = None if result is None else result.blackout_seconds
        if stopped is None and supervision.paused_at is not None:
            stopped = max(0.0, self.clock.now() - supervision.paused_at)
        length = "for an unknown time" if stopped is None else f"for {stopped:.2f}s"
        after = "" if took is None else f", {took:.2f}s after the job was stopped"
        self.update(
            supervision,
            "note",
            f"the pause ended: the instance was stopped {length} and runs on "
            f"{record.source} again{after}",
            paused=False,
            data={"paused_seconds": stopped, STOP_SECONDS: took},
        )
        self._record_violations(
            supervision, policies.Finish(blackout=stopped, paused=True, completed=False)
        )
        supervision.paused_at = None
        supervision.pause_by_operator = False

    def learn_stop(self, supervision: Supervision) -> float | None:
        """Seconds from the stop asked of this job to its end, learned for the host pair
        (the instance runs on the source again only then); None when none was asked."""
        asked = supervision.cancel_sent_at
        if asked is None:
            return None
        seconds = max(0.0, self.clock.now() - asked)
        record = supervision.record
        self.learned.remember_stop(record.source, record.destination, seconds)
        return seconds

    def handover_undone(self, supervision: Supervision) -> None:
        """A handover was asked but the job failed before the hosts switched: the
        instance runs on the source as before, and the migration is no longer handed
        over (the new job may hand over, be cancelled or forced like any other)."""
        record = supervision.record
        self.update(
            supervision,
            "note",
            "the handover was asked, but the job failed before the hosts switched: "
            f"the instance still runs on {record.source}",
            handed_over=False,
        )
        supervision.handed_over_at = None

    def stop_ended(self, supervision: Supervision, result: JobResult) -> None:
        """The failed job had stopped the instance for its final copy, and the migration
        starts again: record how long it was stopped and check that against the
        profile now (the new job is judged on its own)."""
        stopped = result.blackout_seconds
        if stopped is None:
            return
        self.event(
            supervision,
            "note",
            f"the final stop did not complete: the instance was stopped for {stopped:.2f}s "
            f"and runs on {supervision.record.source} again",
            data={"stopped_seconds": stopped},
        )
        self._record_violations(
            supervision, policies.Finish(blackout=stopped, paused=False, completed=False)
        )

    def _record_violations(self, supervision: Supervision, finish: policies.Finish) -> None:
        record = supervision.record
        profile = supervision.profile
        for violation in policies.violations(profile, finish):
            self.metrics.violations.labels(profile.name, violation.kind).inc()
            self.event(
                supervision,
                "violation",
                f"profile {profile.name!r} exceeded: {violation.text}",
                data={"kind": violation.kind},
            )
            log.warning(
                "profile-violation",
                **log_context(record),
                kind=violation.kind,
                reason=violation.text,
            )
