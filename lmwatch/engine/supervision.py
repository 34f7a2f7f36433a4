"""The per-migration loop: start (or re-attach), then sample, decide, apply, until it ends.

Deciding is left to `policies`; doing to the effect runner; outages and re-attaching
to recovery. What remains here is the order of things for one migration.

The supervision task is the only one that acts on its migration. Operator commands
(cancel, force-complete) arrive in its inbox (`records.post`); the task takes them
right after the start returns and between polls (a command wakes it at once), runs
them through the state machine, applies the effects and answers the caller. So a
command never interleaves with the start or with a decision, without any lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

from lmwatch import policies
from lmwatch.clock import Clock
from lmwatch.drivers.base import CHANGE_RATE_WINDOW, ActionRefused, DriverError, Refused
from lmwatch.engine import machine
from lmwatch.engine.effects import Effects, NotOwner
from lmwatch.engine.learned import Learned
from lmwatch.engine.records import (
    FORCE_PENDING,
    WAITING_TO_START,
    Cancel,
    Supervision,
    log,
    log_context,
    plan_from,
    request_of,
    restart_pending,
    status_of,
)
from lmwatch.engine.recovery import Recovery, end_asked, last_seen, restarted_after_failure
from lmwatch.engine.settings import EngineSettings
from lmwatch.errors import Conflict
from lmwatch.model import (
    Action,
    Capabilities,
    ChangeRate,
    Decision,
    JobResult,
    MigrationContext,
    Phase,
    Rule,
    Sample,
    State,
)
from lmwatch.policies import sharing
from lmwatch.profiles import NoProfile, ProfileRegistry, UnknownProfile
from lmwatch.records import Restarts

# At most this many waits for a finishing move on the link before a start goes ahead
# (each wait is as long as that finish should still take; a finish that overruns them
# all is stuck, and the start is not held back by it for ever).
_JOIN_CHECKS = 8
_STOPPING = "lmwatch is stopping; the command was not carried out: send it again once it is back"


def _refuse(effects: tuple[machine.Effect, ...]) -> None:
    """Raise the state machine's refusal of an operator's command, if it refused."""
    for effect in effects:
        if isinstance(effect, machine.Refuse):
            raise Conflict(effect.text)


async def _unless_mail(work: Awaitable[None], mail: asyncio.Event) -> bool:
    """Wait for `work`, or until `mail` is set, whichever comes first. True when the
    work ran its course (its error raised), False when mail cut it short."""
    working = asyncio.ensure_future(work)
    letter = asyncio.ensure_future(mail.wait())
    try:
        await asyncio.wait((working, letter), return_when=asyncio.FIRST_COMPLETED)
    finally:
        working.cancel()
        letter.cancel()
    if working.done() and not working.cancelled():
        working.result()
        return True
    return False


def poll_phase(key: str, interval: float) -> float:
    """A stable offset in [0, interval) for the polls of the migration `key`."""
    return zlib.crc32(key.encode()) / 2**32 * interval


class Supervisor:
    def __init__(
        self,
        *,
        effects: Effects,
        recovery: Recovery,
        profiles: ProfileRegistry,
        learned: Learned,
        clock: Clock,
        settings: EngineSettings,
        link_peers: Callable[[Supervision], list[Supervision]] = lambda _: [],
    ) -> None:
        self.effects = effects
        self.link_peers = link_peers  # the other migrations under way over the same link
        self.recovery = recovery
        self.profiles = profiles
        self.learned = learned
        self.clock = clock
        self.settings = settings

    async def run(self, supervision: Supervision, *, reattach: bool) -> None:
        """Supervise one migration to its end; a crash here is recorded as its failure."""
        record = supervision.record
        mlog = log.bind(**log_context(record))
        supervision.beat = self.clock.now()
        try:
            if reattach and record.plan is not None:
                result = await self.recovery.reattach(supervision)
                if supervision.record.state.finished:
                    return  # the hypervisor stayed away too long; recorded as failed
                if restart_pending(supervision.record):
                    if not await self._resume_restart(supervision, result):
                        return
                elif result is not None and not await self._ended_unwatched(supervision, result):
                    return
                self.effects.event(supervision, "note", "supervision resumed after a restart")
            else:
                if not await self._start(supervision):
                    return
            await self._supervise(supervision)
        except asyncio.CancelledError:
            raise
        except NotOwner as lost:  # another daemon takes it over: no action, no outcome
            mlog.warning("supervision-given-up", why=str(lost))
        except Exception as error:  # a bug must not leave the migration unaccounted for
            mlog.exception("supervisor-crashed", error=repr(error))
            if not supervision.record.state.finished:
                kind = type(error).__name__
                try:
                    await self.effects.finish(
                        supervision,
                        JobResult(phase=Phase.FAILED, error=f"internal error ({kind})"),
                        reason=f"lmwatch failed internally ({kind}); see the daemon log",
                    )
                except Exception as second:  # e.g. the store is full: a restart re-attaches
                    mlog.exception("cannot-record-failure", error=repr(second))

    # -- the start ------------------------------------------------------------------------

    async def _start(self, supervision: Supervision) -> bool:
        """Start the job; False when it did not start. Commands that arrive meanwhile
        wait in the inbox and are taken as soon as it has started."""
        if supervision.record.state.finished:  # cancelled while queued
            return False
        self.refresh_profile(supervision)  # plan with the profile in force now
        record = supervision.record
        now = self.clock.now()
        self.effects.update(supervision, "state", "starting", state=State.STARTING, started_at=now)
        try:
            # Pre-flight again: a queued migration may have waited while the instance or
            # its destination changed (moved, name taken, room gone); refuse it in the
            # pre-flight's words, before the hypervisor is asked to move anything.
            info = await self.effects.preflight(request_of(record))
            capabilities = await self.effects.capabilities(supervision)
            bandwidth = capabilities.bandwidth or self.learned.link_rate(
                record.source, record.destination
            )
            change_rate = await self._change_rate_for_start(supervision, capabilities, bandwidth)
            supervision.change_rate = change_rate
            await self._join_link(supervision)
            plan = policies.plan_start(
                supervision.profile,
                info,
                capabilities,
                None if change_rate is None else change_rate.bytes_per_second,
                bandwidth,
                self.settings.policy,
                switchover=self.learned.switchover(record.source, record.destination),
            )
            started_at = self.clock.now()
            deadline = policies.deadline_at(
                supervision.profile,
                record.memory_bytes,
                started_at,
                disk_bytes=info.local_disk_bytes,
            )
            self.effects.update(
                supervision,
                "decision",
                plan.reason or "start planned",
                action="start",
                plan=plan,
                blackout_budget=plan.starting_budget,
                deadline_at=deadline,
                started_at=started_at,
                data={"change_rate": None if change_rate is None else change_rate.bytes_per_second},
            )
            await self.effects.start_job(supervision, plan)
        except (DriverError, Refused) as error:
            self.effects.hypervisor_error("start")
            await self.effects.finish(
                supervision,
                JobResult(phase=Phase.FAILED, error=str(error)),
                reason=f"could not start: {error}",
            )
            return False
        self.effects.started(supervision)
        self.effects.update(supervision, "state", "copying started", state=State.COPYING)
        await self.take_commands(supervision)
        return True

    async def _join_link(self, supervision: Supervision) -> None:
        """Wait until no other move over the same link is finishing (stopped for its
        final copy, or handed over): a move started meanwhile would take part of the
        bandwidth that finish was sized with (`policies.sharing`). An operator's
        command cuts the wait short: it is carried out once the job has started."""
        record = supervision.record
        switchover = self.learned.switchover(record.source, record.destination)
        for _ in range(_JOIN_CHECKS):
            supervision.mail.clear()
            if supervision.inbox:
                return
            samples = []
            for peer in self.link_peers(supervision):
                try:
                    samples.append(await self.effects.sample(peer))
                except DriverError:
                    continue  # its own supervision deals with it
            wait = sharing.join_wait(samples, switchover)
            if wait <= 0:
                return
            log.info("link-join-wait", **log_context(record), seconds=round(wait, 3))
            await _unless_mail(self.clock.sleep(wait), supervision.mail)

    async def _change_rate_for_start(
        self, supervision: Supervision, capabilities: Capabilities, bandwidth: float | None
    ) -> ChangeRate | None:
        """The change rate before start: reused when recent, measured otherwise.
        `bandwidth`: the link's, configured or learned from completed migrations.

        It sets the first slow-down level, tells a saturated first pass from a steady
        writer, and shows whether the guest had quieter phases; but measuring takes
        seconds on real hosts, so one measurement serves an instance for a while
        (a round trip does not measure twice), and none is made where the first pass
        tells as much in about the same time (`policies.measuring_pays`).
        """
        record = supervision.record
        if not (self.settings.measure_change_rate and capabilities.measure_change_rate):
            return None
        recent = self.learned.recent_change_rate(
            record.instance, self.clock.now(), self.settings.change_rate_max_age
        )
        if recent is not None:
            return recent
        skipped = policies.measurement_skipped(
            record.memory_bytes, bandwidth, CHANGE_RATE_WINDOW, self.settings.policy
        )
        if skipped is not None:
            self.effects.event(supervision, "note", skipped)
            return None
        rate = await self.effects.measure_change_rate(supervision)
        if rate is not None:
            self.learned.remember_change_rate(record.instance, self.clock.now(), rate)
        return rate

    # -- the loop -------------------------------------------------------------------------

    async def _supervise(self, supervision: Supervision) -> None:
        settings = self.settings
        interval = settings.poll_interval
        # The first poll is now; the next ones keep to this migration's own phase of
        # the interval, so that migrations started together do not poll in one burst.
        wait = poll_phase(supervision.record.id, interval) or interval
        while True:
            scheduled = self.clock.now()
            supervision.beat = scheduled
            try:
                sample = await self.sample(supervision)
            except DriverError as error:
                # Commands are carried out through an outage too (with what was seen
                # so far), as they were when the operator's call acted itself.
                if await self.recovery.tolerate(supervision, error, wake=supervision.mail):
                    await self.take_commands(supervision)
                    continue
                return
            supervision.track.add(sample)
            event = machine.Sampled(sample.phase)
            _, todo = machine.step(status_of(supervision), event)
            for effect in todo:
                match effect:
                    case machine.Finish():
                        result = await self.effects.result(supervision)
                        if await self._restart_after_failure(supervision, result):
                            break  # the new job runs: supervise it
                        if not supervision.record.state.finished:
                            await self.effects.finish(supervision, result)
                        return
                    case machine.EnterState(state=state, handed_over=handed_over):
                        self._enter(supervision, state, handed_over=handed_over)
                    case machine.Decide():
                        await self._decide(supervision, sample)
            # due one interval (the first time: the phase) after this poll began, however
            # long the poll took; sooner to give a pause of ours its last look
            if supervision.record.paused:
                wait = policies.next_look_in(
                    supervision.profile,
                    self.context(supervision),
                    scheduled,
                    wait,
                    settings.policy,
                )
            due = scheduled + wait
            if await self._wait(supervision, max(0.0, due - self.clock.now())):
                self.effects.poll_lag(self.clock.now() - due)
            wait = interval
            await self.take_commands(supervision)

    async def _wait(self, supervision: Supervision, timeout: float) -> bool:
        """Wait for the next poll (or a driver event), or until a command arrives.
        True when the wait ran its course, False when a command cut it short."""
        if supervision.inbox:
            return False
        supervision.mail.clear()
        # a driver error surfaces as it did before
        return await _unless_mail(self.effects.wait_event(supervision, timeout), supervision.mail)

    # -- operator commands ----------------------------------------------------------------

    async def take_commands(self, supervision: Supervision) -> None:
        """Carry out the commands in the inbox in arrival order, answering each."""
        while supervision.inbox:
            command = supervision.inbox.popleft()
            mlog = log.bind(migration=supervision.record.id, command=type(command.what).__name__)
            try:
                if isinstance(command.what, Cancel):
                    command.reply(await self._cancel(supervision))
                else:
                    command.reply(await self._force(supervision, command.what.accept_pause))
            except asyncio.CancelledError:
                command.fail(Conflict(_STOPPING))
                raise
            except Exception as error:  # the caller's answer (409, a hypervisor error)
                mlog.info("command-refused", error=str(error))
                command.fail(error)
        supervision.mail.clear()

    def refuse_waiting(self, supervision: Supervision) -> None:
        """Answer the commands still waiting once the supervision task has ended."""
        while supervision.inbox:
            command = supervision.inbox.popleft()
            event: machine.Event = (
                machine.CancelRequested()
                if isinstance(command.what, Cancel)
                else machine.ForceRequested()
            )
            _, todo = machine.step(status_of(supervision), event)
            refusals = [e.text for e in todo if isinstance(e, machine.Refuse)]
            command.fail(Conflict(refusals[0] if refusals else _STOPPING))

    async def _cancel(self, supervision: Supervision) -> Any:
        """An operator's cancel: the job is asked to stop; it ends as cancelled later."""
        _, todo = machine.step(status_of(supervision), machine.CancelRequested())
        _refuse(todo)
        if machine.CancelBeforeStart() in todo:  # the engine ends queued ones itself
            self.effects.end(
                supervision,
                JobResult(phase=Phase.CANCELLED, error=None),
                reason="cancelled by an operator before it started",
            )
        elif machine.CancelJob() in todo:
            decision = Decision(
                Action.CANCEL, "cancelled by an operator", rule=Rule.OPERATOR_CANCEL
            )
            await self.effects.apply(supervision, decision, origin="operator")
        return supervision.record

    async def _force(self, supervision: Supervision, accept_pause: bool) -> Decision:
        """An operator's force-complete: finish now in the least disruptive way the
        profile allows, or once the local disks are in sync."""
        _, todo = machine.step(status_of(supervision), machine.ForceRequested())
        _refuse(todo)
        if not supervision.track:
            supervision.track.add(await self.sample(supervision))
        try:
            decision = policies.force_complete(
                supervision.profile,
                supervision.track,
                self.context(supervision),
                self.clock.now(),
                accept_pause,
                self.settings.policy,
            )
        except policies.ForceRefused as refused:
            raise Conflict(refused.reason) from refused
        decision = dataclasses.replace(decision, rule=Rule.OPERATOR_FINISH)
        latest = supervision.track.latest
        if latest is not None and not latest.disks_in_sync:
            supervision.force_pending = accept_pause  # applied once they are in sync
            self.effects.event(
                supervision,
                "note",
                "the request to finish is kept until the disks are in sync"
                + (" (a pause beyond the profile accepted)" if accept_pause else ""),
                data={FORCE_PENDING: accept_pause},
            )
        await self.effects.apply(supervision, decision, origin="operator")
        return decision

    async def sample(self, supervision: Supervision) -> Sample:
        sample = await self.effects.sample(supervision)
        self.recovery.answered(supervision)
        return sample

    async def _decide(self, supervision: Supervision, sample: Sample) -> None:
        """Ask the policy what to do after this sample, show the progress, carry it out."""
        self.refresh_profile(supervision)
        pending = supervision.force_pending is not None and sample.disks_in_sync
        decision = policies.decide(
            supervision.profile,
            supervision.track,
            self.context(supervision),
            self.clock.now(),
            self.settings.policy,
        )
        supervision.last_prediction = decision.prediction
        self.effects.publish(supervision, sample, decision.prediction)
        origin = "policy"
        if pending:  # the disks are in sync: the operator's request to finish was decided on
            supervision.force_pending = None
            if decision.rule is Rule.OPERATOR_FINISH:
                origin = "operator"
                self.effects.event(
                    supervision,
                    "note",
                    "the disks are in sync: carrying out the request to finish",
                    data={FORCE_PENDING: None},
                )
            else:
                self.effects.event(
                    supervision,
                    "note",
                    "the request to finish, made while the disks were copied, cannot be "
                    "carried out now that they are in sync: the profile allows no way to "
                    "finish now",
                    data={FORCE_PENDING: None},
                )
        if decision.action is Action.RESTART:
            await self._restart(supervision, decision)
            return
        # Nobody awaits a pending request's answer: a refusal is on the timeline.
        with contextlib.suppress(Conflict, DriverError):
            await self.effects.apply(supervision, decision, origin=origin)

    # -- starting again ------------------------------------------------------------------

    async def _restart(self, supervision: Supervision, decision: Decision) -> None:
        """Stop the job and start it again: with a higher slow-down start level, or with
        the same plan after a pause the link stretched (the instance resumes on the
        source in between; `Effects.pause_ended` records how long it was stopped).

        The intent (with the new plan) is recorded before the job is cancelled, so a
        daemon restarted in between starts the new job instead of reporting the
        migration cancelled. A cancel the hypervisor refuses (the job is ending
        anyway) drops the intent; supervising goes on."""
        record = supervision.record
        ctx = self.context(supervision)
        plan = policies.restart_plan(ctx, decision)
        before = record.restart
        intent = dataclasses.replace(
            before or Restarts(),
            count=ctx.restarts + 1,
            pending=True,
            plan=plan,
            planned_rate=decision.planned_rate,
            start_by=decision.start_by,  # the hosts may refuse the new job a while
        )
        self.effects.intend_restart(supervision, decision, intent)
        try:
            await self.effects.stop_job(supervision)
        except DriverError as error:
            self.effects.hypervisor_error(Action.RESTART.value)
            self.effects.update(
                supervision,
                "error",
                f"{Action.RESTART.value} failed: stopping the job: {error}; copying goes on",
                restart=before,
            )
            return
        supervision.cancel_sent_at = self.clock.now()
        await self._resume_restart(supervision, None)

    async def _resume_restart(self, supervision: Supervision, ended: JobResult | None) -> bool:
        """Wait until the stopped job has ended, then start the new one; False when the
        migration ended instead (recorded).

        `ended`: the job's result when it is known to have ended already (re-attached
        after a restart of lmwatch), else None. A job re-attached still running is
        stopped first (lmwatch stopped before it could cancel it)."""
        record = supervision.record
        if ended is None and supervision.cancel_sent_at is None:
            try:
                await self.effects.stop_job(supervision)
            except ActionRefused:
                pass  # already being stopped, or it ended: the samples say which
            except DriverError as error:
                if not await self.recovery.tolerate(supervision, error, operation="cancel"):
                    return False
            supervision.cancel_sent_at = self.clock.now()
        while ended is None:
            supervision.beat = self.clock.now()
            try:
                sample = await self.sample(supervision)
            except DriverError as error:
                if await self.recovery.tolerate(supervision, error):
                    continue
                return False
            _, todo = machine.step(status_of(supervision), machine.Sampled(sample.phase))
            if machine.StartAgain() in todo:
                if record.paused:  # how long the pause lasted: the ended job's account
                    with contextlib.suppress(DriverError):
                        ended = await self.effects.result(supervision)
                break
            if machine.Finish() in todo:
                ended = await self.effects.result(supervision)
                break
            await self.effects.wait_event(supervision, self.settings.poll_interval)
        # A job stopped by lmwatch shows as cancelled; read back after lmwatch restarted,
        # a hypervisor may report it failed with the instance still on the source.
        if ended is not None and not (
            ended.phase is Phase.CANCELLED
            or (ended.phase is Phase.FAILED and ended.running_on == record.source)
        ):
            await self.effects.finish(supervision, ended)
            return False
        took = self.effects.learn_stop(supervision)  # every job stopped to start again
        if record.paused:
            self.effects.pause_ended(supervision, ended, took)
        return await self._start_again(supervision, stopped=None if record.paused else took)

    async def _ended_unwatched(self, supervision: Supervision, ended: JobResult) -> bool:
        """A job that ended while lmwatch was not watching: a failure that left the
        instance on the source is started again as if it had been seen (judged on the
        last progress stored), unless lmwatch had asked for the end; any other end is
        recorded. True when a new job runs, False when the migration ended.

        A migration still recorded as starting had its plan written (intent before
        action) but lmwatch may have stopped before the hypervisor got the start: with
        no job to show and the instance on its source, it is started now, planned
        afresh, not recorded as a failure of a job that never ran."""
        record = supervision.record
        asked = end_asked(self.effects.store, record)  # (reads the timeline)
        if record.state is State.STARTING and ended.running_on == record.source and not asked:
            self.effects.event(
                supervision,
                "note",
                f"the start lmwatch planned before it stopped left no job "
                f"({ended.error or ended.phase.value}); the instance runs on "
                f"{record.source}: starting it now",
            )
            return await self._start(supervision)
        if not asked:
            supervision.track = policies.tracked(last_seen(record), self.settings.policy)
            if await self._restart_after_failure(supervision, ended):
                return True
        if not supervision.record.state.finished:
            await self.effects.finish(
                supervision, ended, reason="ended while lmwatch was not watching"
            )
        return False

    async def _restart_after_failure(self, supervision: Supervision, ended: JobResult) -> bool:
        """The job failed with the instance still on the source: start again when the
        policy says the deadline leaves time (`policies.restart_after_failure`); False
        when the migration ends with this job (or ended meanwhile, recorded)."""
        record = supervision.record
        if supervision.cancel_sent_at is not None:
            return False  # a cancel of ours or an operator's: the end is the one asked for
        ctx = self.context(supervision)
        decision = policies.restart_after_failure(
            supervision.track, ctx, ended, record.source, self.clock.now(), self.settings.policy
        )
        if decision is None:
            return False
        if record.handed_over:  # asked, but the hosts never switched (`ended` says so)
            self.effects.handover_undone(supervision)
        intent = dataclasses.replace(
            record.restart or Restarts(),
            count=ctx.restarts + 1,
            pending=True,
            plan=policies.restart_plan(ctx, decision),
            planned_rate=decision.planned_rate,
            start_by=decision.start_by,
        )
        self.effects.intend_restart(supervision, decision, intent)
        if record.paused:
            self.effects.pause_ended(supervision, ended, None)  # failed: nobody stopped it
        else:
            self.effects.stop_ended(supervision, ended)
        return await self._start_again(supervision)

    async def _start_again(self, supervision: Supervision, stopped: float | None = None) -> bool:
        """Start the new job with the plan the intent recorded; False when it cannot
        start (then the migration ends failed, the instance still on the source).
        `stopped`: seconds the stopped job took to end, for the timeline (a pause's
        end already noted it).

        With a `start_by` in the intent (the policy's restarts carry one; an intent
        recorded by an earlier version may not) the start is tried again every
        `restart_retry_seconds` until then (the link may be down a while); an
        operator's cancel meanwhile ends the migration cancelled."""
        record = supervision.record
        restart = record.restart
        assert restart is not None and restart.plan is not None  # pending: it has one
        plan = restart.plan
        retry = self.settings.policy.restart_retry_seconds
        attempts = 0
        while True:
            attempts += 1
            try:
                await self._join_link(supervision)
                await self.effects.start_job(supervision, plan)
                break
            except (DriverError, Refused) as error:
                self.effects.hypervisor_error("start")
                start_by = restart.start_by
                # A refusal (the pre-flight's: no room, no such instance) is not the
                # link: waiting does not change it.
                if (
                    isinstance(error, Refused)
                    or start_by is None
                    or self.clock.now() + retry > start_by
                ):
                    tried = "" if attempts == 1 else f" (tried {attempts} times)"
                    failed = restarted_after_failure(self.effects.store, record)
                    before = "failed" if failed else "was stopped to start again"
                    await self.effects.finish(
                        supervision,
                        JobResult(phase=Phase.FAILED, error=str(error), running_on=record.source),
                        reason=(
                            f"the job {before}, but the new start failed{tried}: {error}; "
                            f"the instance keeps running on {record.source}"
                        ),
                    )
                    return False
                log.info(
                    "start-again-refused",
                    **log_context(record),
                    attempt=attempts,
                    error=str(error),
                )
                if attempts == 1:
                    self.effects.waiting_to_start(
                        supervision,
                        f"could not start again yet: {error}; trying every "
                        f"{policies.duration_text(retry)}",
                    )
            if not await self._wait_to_retry(supervision, retry):
                return False
        supervision.track = policies.tracked((), self.settings.policy)  # a new job
        supervision.cancel_sent_at = None
        restart = dataclasses.replace(restart, pending=False, job_started_at=self.clock.now())
        self.effects.started_again(supervision, plan, restart, stopped)
        return True

    async def _wait_to_retry(self, supervision: Supervision, seconds: float) -> bool:
        """Wait `seconds` before trying a start again, answering commands meanwhile:
        nothing runs to finish, and a cancel ends the migration (the instance stays on
        the source). False when it ended so."""
        supervision.beat = self.clock.now()
        due = self.clock.now() + seconds
        while self.clock.now() < due:
            if not supervision.inbox:
                supervision.mail.clear()
                await _unless_mail(self.clock.sleep(due - self.clock.now()), supervision.mail)
            while supervision.inbox:
                command = supervision.inbox.popleft()
                if not isinstance(command.what, Cancel):
                    command.fail(Conflict(WAITING_TO_START))
                    continue
                source = supervision.record.source
                self.effects.end(
                    supervision,
                    JobResult(phase=Phase.CANCELLED, running_on=source),
                    reason=(
                        "cancelled by an operator while waiting to start again; the "
                        f"instance keeps running on {source}"
                    ),
                )
                command.reply(supervision.record)
                self.refuse_waiting(supervision)
                return False
            supervision.beat = self.clock.now()
        return True

    def _enter(self, supervision: Supervision, state: State, *, handed_over: bool) -> None:
        """Record that the job moved on to another phase."""
        changes: dict[str, Any] = {"state": state}
        if handed_over:
            changes["handed_over"] = True
            if supervision.handed_over_at is None:
                supervision.handed_over_at = self.clock.now()
        self.effects.update(supervision, "state", f"now {state.value}", **changes)

    def refresh_profile(self, supervision: Supervision) -> None:
        """Re-select the profile after a reload; say so when an edit cannot apply.

        Before the start (no plan yet) the new profile simply replaces the old one, so
        a queued migration starts with the profile in force when it starts, not with
        the one chosen when it was accepted.
        """
        if supervision.generation == self.profiles.generation:
            return
        supervision.generation = self.profiles.generation
        record = supervision.record
        try:
            selection = self.profiles.explain(
                record.instance, record.uuid, record.labels, record.requested_profile
            )
        except (UnknownProfile, NoProfile) as error:
            self.effects.event(
                supervision,
                "note",
                f"profile reload: keeping profile {record.profile_name!r} ({error})",
            )
            return
        new = selection.profile
        if new == supervision.profile:
            return
        old_name = supervision.profile.name
        if record.plan is None:
            notes: list[str] = []
            deadline = record.deadline_at
            reason = (
                f"profiles reloaded while queued: starting with profile {new.name!r} "
                f"instead of {old_name!r}: {selection.reason}"
            )
        else:
            notes = policies.review_profile_change(supervision.profile, new, plan_from(record))
            disk_bytes = supervision.track.max_disk_total
            deadline = (
                policies.deadline_at(new, record.memory_bytes, record.started_at, disk_bytes)
                if record.started_at is not None
                else record.deadline_at
            )
            reason = (
                f"profile {old_name!r} replaced by edited profile {new.name!r}: {selection.reason}"
            )
        supervision.profile = new
        self.effects.update(
            supervision,
            "note",
            reason,
            profile_name=new.name,
            profile_reason=selection.reason,
            profile=new.model_dump(mode="json"),
            deadline_at=deadline,
        )
        for note in notes:
            self.effects.event(supervision, "note", note)

    def context(self, supervision: Supervision) -> MigrationContext:
        """What the policy needs to know about the migration besides its samples."""
        record = supervision.record
        plan = plan_from(record)
        measured = supervision.change_rate
        restart = record.restart or Restarts()
        job_started_at = restart.job_started_at
        rate = None if measured is None else measured.bytes_per_second
        window = None if measured is None else measured.window
        if job_started_at is not None:  # started again: planned for the rate seen then
            rate, window = restart.planned_rate, None
        return MigrationContext(
            started_at=record.started_at or record.created_at,
            memory_bytes=record.memory_bytes,
            plan=plan,
            # A budget lowered to 0 is a budget: `or` would fall back to the plan's
            # and lower it again at every poll, forever.
            blackout_budget=(
                plan.starting_budget if record.blackout_budget is None else record.blackout_budget
            ),
            deadline_at=record.deadline_at,
            paused=record.paused,
            paused_at=supervision.paused_at,
            force=supervision.force_pending is not None,
            accept_pause=supervision.pause_by_operator or bool(supervision.force_pending),
            handed_over=record.handed_over,
            switchover=self.learned.switchover(record.source, record.destination),
            switchover_least=self.learned.switchover_least(record.source, record.destination),
            cancel_resume=self.learned.cancel_resume(record.source, record.destination),
            change_rate_before_start=rate,
            change_rate_window=window,
            restarts=restart.count,
            job_started_at=job_started_at,
        )
