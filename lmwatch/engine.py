"""The supervisor: queues migrations, runs one task per migration, applies decisions.

Each task polls its migration through the driver, asks `policies.decide` what to
do, carries it out and records it. Nothing here decides; everything here is I/O.
Clock, driver and store are injected, so tests run whole migrations in virtual time.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import hashlib
import json
import re
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from lmwatch import policies
from lmwatch.clock import Clock
from lmwatch.drivers.base import ActionRefused, Driver, DriverError, Refused
from lmwatch.errors import Conflict, Invalid, NotFound, StoreUnavailable
from lmwatch.events import EventHub
from lmwatch.logs import get_logger
from lmwatch.metrics import Metrics
from lmwatch.model import (
    Action,
    Capabilities,
    ChangeRate,
    Decision,
    JobResult,
    Method,
    MigrationContext,
    MigrationRequest,
    Phase,
    Prediction,
    Sample,
    StartPlan,
    State,
)
from lmwatch.profiles import NoProfile, ProfileRegistry, UnknownProfile
from lmwatch.profiles.schema import Profile
from lmwatch.store import (
    CorruptRecord,
    Event,
    MigrationRecord,
    Store,
    StoreUnwritable,
    UnreadableStore,
)

log = get_logger("lmwatch.engine")

MAX_PAGE = 1000  # most migrations one page of the list holds
_NUMBERS = re.compile(r"\d+(?:\.\d+)?")
_RUNNING = (State.STARTING, State.COPYING, State.COMPLETING, State.HANDOVER)
_STATE_OF_PHASE = {
    Phase.COPYING: State.COPYING,
    Phase.COMPLETING: State.COMPLETING,
    Phase.HANDOVER: State.HANDOVER,
    Phase.COMPLETED: State.COMPLETED,
    Phase.CANCELLED: State.CANCELLED,
    Phase.FAILED: State.FAILED,
}


@dataclass(frozen=True, slots=True)
class EngineSettings:
    poll_interval: float = 1.0  # seconds between samples of one migration
    max_per_source: int = 2  # migrations leaving one host at once
    max_per_destination: int = 2  # migrations arriving at one host at once
    error_tolerance: float = 90.0  # seconds of failing driver calls before a migration fails
    error_backoff: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0)
    continue_log_interval: float = 30.0  # how often an unchanged "continue" is logged
    history: int = 900  # samples kept per migration for the estimators
    measure_change_rate: bool = True
    change_rate_max_age: float = 600.0  # seconds a pre-start measurement is reused for
    switchover_memory: int = 20  # measured switchover costs kept per host pair
    store_check_interval: float = 5.0  # seconds between checks that the store file is there
    store_retry: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0)  # back-off of failed writes
    policy: policies.PolicySettings = field(default_factory=policies.PolicySettings)


@dataclass
class _Supervision:
    """Runtime state of one migration (owned by the engine, mutated in place)."""

    record: MigrationRecord
    profile: Profile
    generation: int
    history: deque[Sample]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task[None] | None = None
    last_logged: tuple[Action, str, float] | None = None
    last_prediction: Prediction | None = None
    first_error_at: float | None = None  # start of the current run of driver errors
    failures: int = 0
    progress_saved_at: float = 0.0
    cancelling: bool = False  # a cancel reached the hypervisor; wait for it to end
    change_rate: ChangeRate | None = None  # measured (or reused) before start
    handed_over_at: float | None = None  # clock time the instance resumed on the destination
    paused_at: float | None = None  # clock time we paused it (None after a restart)
    # An operator's force-complete paused it: the pause is theirs, not held to the
    # profile's bound (the policy never cancels it for running long).
    pause_by_operator: bool = False
    beat: float | None = None  # clock time its supervision last came round (watchdog)


def _fingerprint(request: MigrationRequest) -> str:
    body = json.dumps(
        {
            "instance": request.instance,
            "source": request.source,
            "destination": request.destination,
            "labels": dict(sorted(request.labels.items())),
            "profile": request.profile,
        },
        sort_keys=True,
    )
    return hashlib.sha256(body.encode()).hexdigest()


def _first(error: ValidationError) -> str:
    """The first problem pydantic found, on one line."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "profile"
    more = error.error_count() - 1
    return f"{where}: {first['msg']}" + (f" (and {more} more)" if more else "")


def _plan_from(record: MigrationRecord) -> StartPlan:
    assert record.plan is not None
    return StartPlan(**record.plan)


def _method_of(result: JobResult, record: MigrationRecord) -> Method:
    if result.phase is Phase.FAILED:
        return Method.FAILED
    if result.phase is Phase.CANCELLED:
        return Method.CANCELLED
    if result.handed_over or record.handed_over:
        return Method.HANDOVER
    if result.paused or record.paused:
        return Method.PAUSED
    if result.slowdown > 0:
        return Method.SLOWED
    initial = record.plan.get("blackout_budget") if record.plan else None
    if initial is not None and (record.blackout_budget or 0) > initial + 1e-9:
        return Method.BLACKOUT_RAISED
    return Method.CONVERGED


class Engine:
    def __init__(
        self,
        *,
        driver: Driver,
        store: Store,
        profiles: ProfileRegistry,
        clock: Clock,
        metrics: Metrics | None = None,
        settings: EngineSettings | None = None,
        hub: EventHub | None = None,
    ) -> None:
        self.driver = driver
        self.store = store
        self.profiles = profiles
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.settings = settings or EngineSettings()
        # Timeline entries and progress go out here too (GET /v1/events); never blocks.
        self.hub = hub if hub is not None else EventHub()
        self._supervisions: dict[str, _Supervision] = {}
        # Switchover costs measured on completed migrations, per (source, destination).
        self._switchovers: dict[tuple[str, str], deque[float]] = {}
        # Change rates measured before start, per instance: (clock time, bytes/s).
        self._change_rates: dict[str, tuple[float, ChangeRate]] = {}
        self._submit_lock = asyncio.Lock()
        self._store_task: asyncio.Task[None] | None = None
        self.metrics.watch_store(store)
        self._started = False
        self._stopping = False

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Take back every migration the store holds as unfinished, then run the queue.

        A stored migration that cannot be read stops the start with UnreadableStore,
        before anything is tracked, started or written. Refusing is deliberate:
        skipping the row would forget an accepted migration whose job may still be
        running on a host, and nothing would then finish, cancel or record it. The
        operator is told which row and how to look at it, and repairs or removes it.
        """
        problems = self.store.unreadable()
        unfinished = [] if problems else self.store.unfinished()
        profiles: dict[str, Profile] = {}
        for record in unfinished:
            try:
                profiles[record.id] = Profile.model_validate(record.profile)
            except ValidationError as error:
                problems.append(CorruptRecord(record.id, f"column profile: {_first(error)}"))
            if record.plan is not None:
                try:
                    _plan_from(record)
                except TypeError as error:
                    problems.append(CorruptRecord(record.id, f"column plan: {error}"))
        if problems:
            raise UnreadableStore(self.store.path, problems)
        self._started = True
        self._store_task = asyncio.create_task(self._keep_store())
        for record in self.store.list(State.COMPLETED):
            self._learn_switchover(record)
        for record in unfinished:
            profile = profiles[record.id]
            supervision = self._track(record, profile)
            supervision.generation = -1  # the file may have changed while we were away
            if record.paused:
                supervision.pause_by_operator = any(
                    e.action == Action.PAUSE.value and (e.data or {}).get("origin") == "operator"
                    for e in self.store.events(record.id)
                )
            if record.state is not State.QUEUED:
                log.info("reattaching", migration=record.id, instance=record.instance)
                supervision.task = asyncio.create_task(self._run(supervision, reattach=True))
        self._schedule()

    async def stop(self) -> None:
        """Stop supervising (the migrations themselves go on; a new engine takes them back)."""
        self._stopping = True
        tasks = [s.task for s in self._supervisions.values() if s.task is not None]
        if self._store_task is not None:
            tasks.append(self._store_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._supervisions.clear()

    async def _keep_store(self) -> None:
        """Check now and then that the store file is still there, and while writes
        fail, retry them with back-off until the store takes them again."""
        retry = self.settings.store_retry
        attempts = 0
        while True:
            failing = self.store.failing()
            delay = retry[min(attempts, len(retry) - 1)] if failing else None
            await self.clock.sleep(delay or self.settings.store_check_interval)
            try:
                self.store.check_file()
                if not self.store.failing() or self.store.flush(self.clock.now()):
                    attempts = 0
                else:
                    attempts += 1
            except Exception as error:  # never stop watching the store
                log.exception("store-watch-error", path=self.store.path, error=repr(error))

    def _refuse_unless_writable(self) -> None:
        """New work only while the store takes it (and its file is still there)."""
        problem = self.store.check_file()
        if problem is not None:
            raise StoreUnavailable(problem)

    def _track(self, record: MigrationRecord, profile: Profile) -> _Supervision:
        supervision = _Supervision(
            record=record,
            profile=profile,
            generation=self.profiles.generation,
            history=deque(maxlen=self.settings.history),
        )
        self._supervisions[record.id] = supervision
        return supervision

    # -- queries --------------------------------------------------------------------

    def get(self, migration_id: str) -> MigrationRecord:
        supervision = self._supervisions.get(migration_id)
        if supervision is not None:
            return supervision.record
        record = self.store.get(migration_id)
        if record is None:
            raise NotFound(f"no migration with id {migration_id!r}")
        return record

    def list(
        self, state: State | None = None, *, limit: int | None = None, after: str | None = None
    ) -> list[MigrationRecord]:
        """Stored migrations, with the live progress of those being supervised; with
        `limit`, one page of them after the migration `after` (a cursor)."""
        live = self._supervisions
        if limit is None and after is None:
            records = self.store.list(state)
        else:
            records = self.store.page(state, limit=limit or MAX_PAGE, after=after)
        return [live[r.id].record if r.id in live else r for r in records]

    def events(self, migration_id: str) -> builtins.list[Event]:
        self.get(migration_id)
        return self.store.events(migration_id)

    def prediction(self, migration_id: str) -> Prediction | None:
        supervision = self._supervisions.get(migration_id)
        return None if supervision is None else supervision.last_prediction

    def active_count(self) -> int:
        return len(self._supervisions)

    def stalled(self, max_age: float) -> builtins.list[str]:
        """Migrations whose supervision has not come round for more than `max_age`
        seconds (a hung hypervisor call, say); the systemd watchdog goes by this."""
        now = self.clock.now()
        return [
            migration_id
            for migration_id, s in self._supervisions.items()
            if s.task is not None
            and not s.task.done()
            and s.beat is not None
            and now - s.beat > max_age
        ]

    # -- commands -------------------------------------------------------------------

    async def submit(
        self, request: MigrationRequest, idempotency_key: str | None = None
    ) -> tuple[MigrationRecord, bool]:
        """Accept a migration: checked, recorded durably, queued.

        Returns the record and whether it is a replay of an earlier identical
        request with the same Idempotency-Key. Nothing is recorded on refusal.
        """
        if request.source == request.destination:
            raise Invalid("source and destination are the same host")
        fingerprint = _fingerprint(request)
        earlier = self._admission(request, idempotency_key, fingerprint)
        if earlier is not None:
            return earlier, True
        self._refuse_unless_writable()
        # Asking the hypervisor may take a while: other submissions go on meanwhile.
        info = await self.driver.preflight(request)
        async with self._submit_lock:
            earlier = self._admission(request, idempotency_key, fingerprint)
            if earlier is not None:
                return earlier, True
            labels = {**info.labels, **request.labels}
            try:
                selection = self.profiles.explain(
                    request.instance, info.uuid, labels, request.profile
                )
            except (UnknownProfile, NoProfile) as error:
                raise Invalid(str(error)) from error
            now = self.clock.now()
            record = MigrationRecord(
                id=str(uuid.uuid4()),
                instance=request.instance,
                source=request.source,
                destination=request.destination,
                labels=labels,
                requested_profile=request.profile,
                profile_name=selection.profile.name,
                profile_reason=selection.reason,
                profile=selection.profile.model_dump(mode="json"),
                memory_bytes=info.memory_bytes,
                uuid=info.uuid,
                state=State.QUEUED,
                created_at=now,
                idempotency_key=idempotency_key,
                request_fingerprint=fingerprint,
            )
            accepted = f"accepted; profile {selection.profile.name!r}: {selection.reason}"
            self._refuse_unless_writable()
            try:
                self.store.insert(record, accepted)
            except StoreUnwritable as error:
                raise StoreUnavailable(str(error)) from error
            self._track(record, selection.profile)
            self.hub.timeline(record, now, "state", accepted)
            log.info(
                "accepted",
                migration=record.id,
                instance=record.instance,
                source=record.source,
                destination=record.destination,
                profile=record.profile_name,
            )
        self._schedule()
        return record, False

    def _admission(
        self, request: MigrationRequest, idempotency_key: str | None, fingerprint: str
    ) -> MigrationRecord | None:
        """The earlier migration this request replays, or None; Conflict when refused."""
        if idempotency_key is not None:
            earlier = self.store.by_idempotency_key(idempotency_key)
            if earlier is not None:
                if earlier.request_fingerprint != fingerprint:
                    raise Conflict(
                        "this Idempotency-Key was used for a different request; use a new key"
                    )
                return self.get(earlier.id)
        active = self.store.active_for_instance(request.instance)
        if active is not None:
            raise Conflict(
                f"instance {request.instance!r} is already migrating "
                f"(migration {active.id}, {active.state.value})"
            )
        return None

    async def force_complete(self, migration_id: str, accept_pause: bool = False) -> Decision:
        """Finish now in the least disruptive way the profile allows."""
        supervision = self._running(migration_id, "force-complete")
        async with supervision.lock:
            record = supervision.record
            if record.state.finished:
                raise Conflict(
                    f"cannot force-complete: migration {migration_id} has {record.state.value}"
                )
            if supervision.cancelling:
                raise Conflict(f"migration {migration_id} is being cancelled")
            if record.paused or record.handed_over or record.state is State.COMPLETING:
                raise Conflict(f"migration {migration_id} is already completing")
            if not supervision.history:
                supervision.history.append(await self._sample(supervision))
            try:
                decision = policies.force_complete(
                    supervision.profile,
                    list(supervision.history),
                    self._context(supervision),
                    self.clock.now(),
                    accept_pause,
                    self.settings.policy,
                )
            except policies.ForceRefused as refused:
                raise Conflict(refused.reason) from refused
            await self._apply(supervision, decision, origin="operator")
            return decision

    async def cancel(self, migration_id: str) -> MigrationRecord:
        supervision = self._supervisions.get(migration_id)
        record = self.get(migration_id)
        if record.state.finished or supervision is None:
            raise Conflict(f"migration {migration_id} has already {record.state.value}")
        async with supervision.lock:  # the start holds it too: never cancel half-started
            record = supervision.record
            if record.state.finished:
                raise Conflict(f"migration {migration_id} has already {record.state.value}")
            if record.handed_over or record.state is State.HANDOVER:
                raise Conflict(
                    "the instance already runs on the destination (handover); "
                    "it can no longer be cancelled"
                )
            if record.state is State.QUEUED:  # its start, if due, sees it finished
                await self._finish(
                    supervision,
                    JobResult(phase=Phase.CANCELLED, error=None),
                    reason="cancelled by an operator before it started",
                )
                if supervision.task is None:
                    self._supervisions.pop(migration_id, None)
                self._schedule()
                return supervision.record
            if supervision.cancelling:
                return record  # already being cancelled
            decision = Decision(Action.CANCEL, "cancelled by an operator")
            await self._apply(supervision, decision, origin="operator")
            return supervision.record

    def _running(self, migration_id: str, what: str) -> _Supervision:
        record = self.get(migration_id)
        supervision = self._supervisions.get(migration_id)
        if record.state.finished or supervision is None:
            raise Conflict(f"cannot {what}: migration {migration_id} has {record.state.value}")
        if record.state in (State.QUEUED, State.STARTING):
            raise Conflict(f"cannot {what}: migration {migration_id} has not started copying yet")
        return supervision

    # -- queue ----------------------------------------------------------------------

    def _schedule(self) -> None:
        """Start queued migrations, oldest first, within the per-host limits."""
        if not self._started or self._stopping:
            return
        busy_source: dict[str, int] = {}
        busy_destination: dict[str, int] = {}
        for supervision in self._supervisions.values():
            if supervision.task is not None:
                record = supervision.record
                busy_source[record.source] = busy_source.get(record.source, 0) + 1
                busy_destination[record.destination] = (
                    busy_destination.get(record.destination, 0) + 1
                )
        queued = sorted(
            (
                s
                for s in self._supervisions.values()
                if s.task is None and not s.record.state.finished
            ),
            key=lambda s: (s.record.created_at, s.record.id),
        )
        for supervision in queued:
            record = supervision.record
            if busy_source.get(record.source, 0) >= self.settings.max_per_source:
                continue
            if busy_destination.get(record.destination, 0) >= self.settings.max_per_destination:
                continue
            busy_source[record.source] = busy_source.get(record.source, 0) + 1
            busy_destination[record.destination] = busy_destination.get(record.destination, 0) + 1
            supervision.task = asyncio.create_task(self._run(supervision, reattach=False))
        self.metrics.active.set(sum(1 for s in self._supervisions.values() if s.task))
        self.metrics.queued.set(sum(1 for s in self._supervisions.values() if not s.task))

    # -- one migration ----------------------------------------------------------------

    async def _run(self, supervision: _Supervision, *, reattach: bool) -> None:
        record = supervision.record
        mlog = log.bind(migration=record.id, instance=record.instance)
        supervision.beat = self.clock.now()
        try:
            if reattach and record.plan is not None:
                result = await self._reattach(supervision)
                if supervision.record.state.finished:
                    return  # the hypervisor stayed away too long; recorded as failed
                if result is not None:
                    await self._finish(
                        supervision, result, reason="ended while lmwatch was not watching"
                    )
                    return
                self._event(supervision, "note", "supervision resumed after a restart")
            else:
                if not await self._start(supervision):
                    return
            await self._supervise(supervision)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a bug must not leave the migration unaccounted for
            mlog.exception("supervisor-crashed", error=repr(error))
            if not supervision.record.state.finished:
                kind = type(error).__name__
                try:
                    await self._finish(
                        supervision,
                        JobResult(phase=Phase.FAILED, error=f"internal error ({kind})"),
                        reason=f"lmwatch failed internally ({kind}); see the daemon log",
                    )
                except Exception as second:  # e.g. the store is full: a restart re-attaches
                    mlog.exception("cannot-record-failure", error=repr(second))
        finally:
            if supervision.record.state.finished:
                self._supervisions.pop(record.id, None)
                self.metrics.forget(self._labels(record))
            if not self._stopping:
                self._schedule()

    async def _reattach(self, supervision: _Supervision) -> JobResult | None:
        """Find the job again after a restart, retrying while the hypervisor is away."""
        record = supervision.record
        while True:
            try:
                return await self.driver.reattach(
                    record.id, self._request(record), _plan_from(record)
                )
            except DriverError as error:
                if not await self._tolerate(supervision, error, operation="reattach"):
                    return None

    async def _start(self, supervision: _Supervision) -> bool:
        async with supervision.lock:
            if supervision.record.state.finished:  # cancelled while queued
                return False
            return await self._start_locked(supervision)

    async def _start_locked(self, supervision: _Supervision) -> bool:
        self._refresh_profile(supervision)  # plan with the profile in force now
        record = supervision.record
        now = self.clock.now()
        self._update(supervision, "state", "starting", state=State.STARTING, started_at=now)
        request = self._request(record)
        try:
            capabilities = await self.driver.capabilities(record.source, record.destination)
            change_rate = await self._change_rate_for_start(supervision, capabilities)
            supervision.change_rate = change_rate
            info = await self.driver.describe(record.instance, record.source)
            plan = policies.plan_start(
                supervision.profile,
                info,
                capabilities,
                None if change_rate is None else change_rate.bytes_per_second,
                capabilities.bandwidth,
                self.settings.policy,
                switchover=self.switchover(record.source, record.destination),
            )
            started_at = self.clock.now()
            deadline = policies.deadline_at(supervision.profile, record.memory_bytes, started_at)
            self._update(
                supervision,
                "decision",
                plan.reason or "start planned",
                action="start",
                plan=dataclasses.asdict(plan),
                blackout_budget=plan.blackout_budget,
                deadline_at=deadline,
                started_at=started_at,
                data={"change_rate": None if change_rate is None else change_rate.bytes_per_second},
            )
            await self.driver.start(record.id, request, plan)
        except (DriverError, Refused) as error:
            self.metrics.hypervisor_errors.labels("start").inc()
            await self._finish(
                supervision,
                JobResult(phase=Phase.FAILED, error=str(error)),
                reason=f"could not start: {error}",
            )
            return False
        self.metrics.started.labels(record.profile_name).inc()
        self._update(supervision, "state", "copying started", state=State.COPYING)
        return True

    async def _change_rate_for_start(
        self, supervision: _Supervision, capabilities: Capabilities
    ) -> ChangeRate | None:
        """The change rate before start: reused when recent, measured otherwise.

        It sets the first slow-down level, tells a saturated first pass from a steady
        writer, and shows whether the guest had quieter phases; but measuring takes
        seconds on real hosts, so one measurement serves an instance for a while
        (a round trip does not measure twice).
        """
        record = supervision.record
        if not (self.settings.measure_change_rate and capabilities.measure_change_rate):
            return None
        recent = self._change_rates.get(record.instance)
        now = self.clock.now()
        if recent is not None and now - recent[0] <= self.settings.change_rate_max_age:
            return recent[1]
        rate = await self._measure_change_rate(supervision)
        if rate is not None:
            self._change_rates[record.instance] = (self.clock.now(), rate)
        return rate

    def switchover(self, source: str, destination: str) -> float:
        """Seconds of switchover to plan with between two hosts (learned, or the default)."""
        measured = self._switchovers.get((source, destination), ())
        return policies.learned_switchover(measured, self.settings.policy.switchover_seconds)

    def _learn_switchover(self, record: MigrationRecord) -> None:
        outcome = record.outcome or {}
        blackout = outcome.get("blackout_seconds")
        if record.state is not State.COMPLETED or not isinstance(blackout, int | float):
            return
        if record.paused or outcome.get("method") == Method.PAUSED.value:
            return  # a pause's length depends on what was left, not on the hosts
        progress = record.progress or {}
        measured = policies.measured_switchover(
            float(blackout),
            handed_over=record.handed_over,
            budget=float(record.blackout_budget or 0.0),
            remaining=float(progress.get("memory_remaining_seen") or 0.0),
            rate=float(progress.get("transfer_rate") or 0.0),
            burst=self.settings.policy.recount_interval,
        )
        key = (record.source, record.destination)
        kept = self._switchovers.setdefault(key, deque(maxlen=self.settings.switchover_memory))
        kept.append(measured)

    async def _measure_change_rate(self, supervision: _Supervision) -> ChangeRate | None:
        """The guest's change rate before start; a failed measurement is not fatal."""
        record = supervision.record
        try:
            return await self.driver.measure_change_rate(record.instance, record.source)
        except DriverError as error:
            self.metrics.hypervisor_errors.labels("measure").inc()
            self._event(
                supervision,
                "note",
                f"the change rate could not be measured before start ({error}); "
                "deciding from the first passes instead",
            )
            return None

    async def _supervise(self, supervision: _Supervision) -> None:
        settings = self.settings
        while True:
            scheduled = self.clock.now()
            supervision.beat = scheduled
            try:
                sample = await self._sample(supervision)
            except DriverError as error:
                if await self._tolerate(supervision, error):
                    continue
                return
            supervision.history.append(sample)
            if sample.phase.finished:
                async with supervision.lock:
                    result = await self.driver.result(supervision.record.id)
                    await self._finish(supervision, result)
                return
            async with supervision.lock:
                self._follow_phase(supervision, sample)
                self._refresh_profile(supervision)
                decision = policies.decide(
                    supervision.profile,
                    list(supervision.history),
                    self._context(supervision),
                    self.clock.now(),
                    settings.policy,
                )
                supervision.last_prediction = decision.prediction
                self._publish(supervision, sample, decision.prediction)
                await self._apply(supervision, decision, origin="policy")
            await self.driver.wait_event(supervision.record.id, settings.poll_interval)
            lag = self.clock.now() - scheduled - settings.poll_interval
            self.metrics.poll_lag.observe(max(0.0, lag))

    async def _sample(self, supervision: _Supervision) -> Sample:
        sample = await self.driver.sample(supervision.record.id)
        supervision.first_error_at = None
        supervision.failures = 0
        return sample

    async def _tolerate(
        self, supervision: _Supervision, error: DriverError, operation: str = "sample"
    ) -> bool:
        """Keep trying through a hypervisor outage for a while; fail the migration after."""
        self.metrics.hypervisor_errors.labels(operation).inc()
        now = self.clock.now()
        supervision.beat = now
        if supervision.first_error_at is None:
            supervision.first_error_at = now
            self._event(supervision, "error", f"hypervisor error, retrying: {error}")
        first = supervision.first_error_at
        supervision.failures += 1
        failures = supervision.failures
        if now - first >= self.settings.error_tolerance:
            # Give up supervising, but first ask the hypervisor to stop the job, so that
            # a migration we no longer watch does not go on to finish by itself.
            try:
                await self.driver.cancel(supervision.record.id)
                stopped = "lmwatch asked the hypervisor to stop it"
            except DriverError as cancel_error:
                stopped = f"stopping it failed too ({cancel_error})"
            await self._finish(
                supervision,
                JobResult(
                    phase=Phase.FAILED,
                    error=f"the hypervisor did not answer (last error: {error})",
                ),
                reason=(
                    f"the hypervisor did not answer for {now - first:.0f}s "
                    f"(last error: {error}); {stopped}; where the instance runs could not "
                    "be confirmed: check both hosts"
                ),
            )
            return False
        backoff = self.settings.error_backoff
        await self.clock.sleep(backoff[min(failures - 1, len(backoff) - 1)])
        return True

    def _follow_phase(self, supervision: _Supervision, sample: Sample) -> None:
        state = _STATE_OF_PHASE[sample.phase]
        if state is not supervision.record.state and state in _RUNNING:
            changes: dict[str, Any] = {"state": state}
            if state is State.HANDOVER:
                changes["handed_over"] = True
                if supervision.handed_over_at is None:
                    supervision.handed_over_at = self.clock.now()
            self._update(supervision, "state", f"now {state.value}", **changes)

    def _refresh_profile(self, supervision: _Supervision) -> None:
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
            self._event(
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
            notes = policies.review_profile_change(supervision.profile, new, _plan_from(record))
            deadline = (
                policies.deadline_at(new, record.memory_bytes, record.started_at)
                if record.started_at is not None
                else record.deadline_at
            )
            reason = (
                f"profile {old_name!r} replaced by edited profile {new.name!r}: {selection.reason}"
            )
        supervision.profile = new
        self._update(
            supervision,
            "note",
            reason,
            profile_name=new.name,
            profile_reason=selection.reason,
            profile=new.model_dump(mode="json"),
            deadline_at=deadline,
        )
        for note in notes:
            self._event(supervision, "note", note)

    def _context(self, supervision: _Supervision) -> MigrationContext:
        record = supervision.record
        plan = _plan_from(record)
        measured = supervision.change_rate
        return MigrationContext(
            started_at=record.started_at or record.created_at,
            memory_bytes=record.memory_bytes,
            plan=plan,
            blackout_budget=record.blackout_budget or plan.blackout_budget,
            deadline_at=record.deadline_at,
            paused=record.paused,
            paused_at=supervision.paused_at,
            accept_pause=supervision.pause_by_operator,
            handed_over=record.handed_over,
            switchover=self.switchover(record.source, record.destination),
            change_rate_before_start=None if measured is None else measured.bytes_per_second,
            change_rate_window=None if measured is None else measured.window,
        )

    async def _apply(self, supervision: _Supervision, decision: Decision, *, origin: str) -> None:
        record = supervision.record
        action = decision.action
        mlog = log.bind(migration=record.id, instance=record.instance, origin=origin)
        if supervision.cancelling:
            return  # a cancel is under way; nothing else applies or needs recording
        self.metrics.decisions.labels(action.value).inc()
        if action is Action.CONTINUE:
            self._log_continue(supervision, decision)
            return
        data = {"origin": origin, "prediction": _prediction_json(decision.prediction)}
        # Record the intent first: a crash after acting still leaves a trace.
        changes: dict[str, Any] = {}
        if action is Action.RAISE_BLACKOUT:
            changes["blackout_budget"] = decision.blackout_budget
        elif action is Action.PAUSE:
            changes["paused"] = True
        elif action is Action.HANDOVER:
            changes["handed_over"] = True
        self._update(supervision, "decision", decision.reason, action=action.value, data=data)
        mlog.info("decision", action=action.value, reason=decision.reason)
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
                supervision.cancelling = True
        except ActionRefused as refused:
            self.metrics.hypervisor_errors.labels(action.value).inc()
            self._event(supervision, "error", f"{action.value} refused: {refused}")
            if origin == "operator":
                raise Conflict(str(refused)) from refused
            return
        except DriverError as error:
            self.metrics.hypervisor_errors.labels(action.value).inc()
            self._event(supervision, "error", f"{action.value} failed: {error}")
            if origin == "operator":
                raise
            return
        if changes:
            self._update(supervision, None, "", **changes)
        if decision.note:
            self._event(supervision, "note", decision.note)

    def _log_continue(self, supervision: _Supervision, decision: Decision) -> None:
        """Record 'continue' when its gist changes, or every so often."""
        now = self.clock.now()
        gist = _NUMBERS.sub("#", decision.reason)
        last = supervision.last_logged
        if (
            last is not None
            and last[0] is Action.CONTINUE
            and last[1] == gist
            and now - last[2] < self.settings.continue_log_interval
        ):
            return
        supervision.last_logged = (Action.CONTINUE, gist, now)
        self._event(
            supervision,
            "decision",
            decision.reason,
            action=Action.CONTINUE.value,
            data={"prediction": _prediction_json(decision.prediction)},
        )

    async def _finish(
        self, supervision: _Supervision, result: JobResult, reason: str | None = None
    ) -> None:
        record = supervision.record
        now = self.clock.now()
        method = _method_of(result, record)
        state = {
            Phase.COMPLETED: State.COMPLETED,
            Phase.CANCELLED: State.CANCELLED,
        }.get(result.phase, State.FAILED)
        started = record.started_at or record.created_at
        total = now - started
        outcome = {
            "method": method.value,
            "total_seconds": total,
            "blackout_seconds": result.blackout_seconds,
            "passes": result.passes,
            "transferred_bytes": result.transferred,
            "error": result.error,
            "running_on": result.running_on,
        }
        progress = dict(record.progress) if record.progress else None
        if progress is not None and state is State.COMPLETED:
            progress["memory_remaining"] = 0
            progress["memory_transferred"] = max(
                result.transferred, int(progress.get("memory_transferred") or 0)
            )
        text = (
            reason
            or {
                State.COMPLETED: f"completed ({method.value})",
                State.CANCELLED: "cancelled; the instance keeps running on the source",
                State.FAILED: f"failed: {result.error}",
            }[state]
        )
        self._update(
            supervision,
            "state",
            text,
            state=state,
            finished_at=now,
            outcome=outcome,
            progress=progress,
            data=outcome,
        )
        if result.note:
            self._event(supervision, "note", result.note)
        self._check_profile(supervision, result, total, completed=state is State.COMPLETED)
        if state is State.COMPLETED:
            self._learn_switchover(supervision.record)
        self.metrics.finished.labels(state.value, method.value).inc()
        self.metrics.duration.labels(method.value).observe(total)
        if result.blackout_seconds is not None:
            self.metrics.blackout.labels(method.value).observe(result.blackout_seconds)
        log.info(
            "finished",
            migration=record.id,
            instance=record.instance,
            state=state.value,
            method=method.value,
            blackout=result.blackout_seconds,
        )

    def _check_profile(
        self, supervision: _Supervision, result: JobResult, total: float, *, completed: bool
    ) -> None:
        """Record every way the ended migration exceeded its profile (a pause or a
        handover counts even when it then failed or was cancelled)."""
        record = supervision.record
        profile = supervision.profile
        degraded = None
        if supervision.handed_over_at is not None and record.finished_at is not None:
            degraded = max(0.0, record.finished_at - supervision.handed_over_at)
        stopped = result.blackout_seconds
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
        for violation in policies.violations(profile, finish):
            self.metrics.violations.labels(profile.name, violation.kind).inc()
            self._event(
                supervision,
                "violation",
                f"profile {profile.name!r} exceeded: {violation.text}",
                data={"kind": violation.kind},
            )
            log.warning(
                "profile-violation",
                migration=record.id,
                instance=record.instance,
                source=record.source,
                destination=record.destination,
                kind=violation.kind,
                reason=violation.text,
            )

    # -- helpers ----------------------------------------------------------------------

    def _update(
        self,
        supervision: _Supervision,
        kind: str | None,
        reason: str,
        *,
        action: str | None = None,
        data: dict[str, Any] | None = None,
        **changes: Any,
    ) -> None:
        event = None if kind is None else (kind, reason, action)
        now = self.clock.now()
        supervision.record = self.store.update(
            supervision.record, event=event, at=now, data=data, **changes
        )
        if kind is not None:
            self.hub.timeline(supervision.record, now, kind, reason, action, data)

    def _event(
        self,
        supervision: _Supervision,
        kind: str,
        reason: str,
        *,
        action: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        now = self.clock.now()
        self.store.add_event(supervision.record.id, now, kind, reason, action, data)
        self.hub.timeline(supervision.record, now, kind, reason, action, data)
        if kind in ("note", "error"):
            log.info(kind, migration=supervision.record.id, reason=reason)

    def _publish(
        self, supervision: _Supervision, sample: Sample, prediction: Prediction | None
    ) -> None:
        seen = sample.memory_remaining
        if sample.phase is not Phase.COPYING and supervision.record.progress:
            seen = int(supervision.record.progress.get("memory_remaining_seen") or seen)
        progress: dict[str, Any] = {
            "time": sample.time,
            "memory_remaining_seen": seen,  # last remainder seen while copying
            "memory_total": sample.memory_total,
            "memory_remaining": sample.memory_remaining,
            "memory_transferred": sample.memory_transferred,
            "transfer_rate": sample.transfer_rate,
            "change_rate": sample.change_rate,
            "passes": sample.passes,
            "blackout_budget": sample.blackout_budget,
            "slowdown": sample.slowdown,
            "prediction": _prediction_json(prediction),
        }
        supervision.record = dataclasses.replace(supervision.record, progress=progress)
        self.hub.progress(supervision.record, sample.time)
        # Progress is persisted at most every few seconds; it is cheap to lose.
        if sample.time - supervision.progress_saved_at >= 5.0:
            supervision.progress_saved_at = sample.time
            self._update(supervision, None, "", progress=progress)
        labels = self._labels(supervision.record)
        self.metrics.remaining.labels(*labels).set(sample.memory_remaining)
        self.metrics.transfer_rate.labels(*labels).set(sample.transfer_rate)
        self.metrics.change_rate.labels(*labels).set(sample.change_rate)
        if prediction is not None:
            eta = prediction.eta_seconds
            self.metrics.eta.labels(*labels).set(float("nan") if eta is None else eta)
            blackout = prediction.blackout_seconds
            self.metrics.predicted_blackout.labels(*labels).set(
                float("nan") if blackout is None else blackout
            )

    @staticmethod
    def _labels(record: MigrationRecord) -> tuple[str, str, str, str]:
        return (record.id, record.instance, record.source, record.destination)

    @staticmethod
    def _request(record: MigrationRecord) -> MigrationRequest:
        return MigrationRequest(
            instance=record.instance,
            source=record.source,
            destination=record.destination,
            labels=dict(record.labels),
            profile=record.requested_profile,
        )

    def finished(self, ids: Iterable[str]) -> bool:
        """Whether every one of these migrations has ended (tests and `simulate`)."""
        return all(self.get(i).state.finished for i in ids)


def _prediction_json(prediction: Prediction | None) -> dict[str, Any] | None:
    return None if prediction is None else dataclasses.asdict(prediction)
