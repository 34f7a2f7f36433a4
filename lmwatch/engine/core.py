"""The engine: the face the daemon, the API and the CLI use.

It accepts migrations (admission), starts them as the per-host limits allow
(scheduler), runs one supervision task per migration (supervision) and takes them
back after a restart (recovery). Everything that touches the driver, the store and
the metrics goes through the effect runner (effects). Operator commands on a started
migration go to its supervision's inbox and are answered from there; a queued one is
cancelled here, in one step with nothing awaited.
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import dataclasses
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmwatch import policies
from lmwatch.clock import Clock, outside
from lmwatch.drivers.base import Driver, NotOnSource, UnknownHost
from lmwatch.engine import admission, machine, placing, recovery
from lmwatch.engine.book import Book
from lmwatch.engine.drains import Drains
from lmwatch.engine.effects import Effects
from lmwatch.engine.learned import Learned
from lmwatch.engine.ownership import Ownership
from lmwatch.engine.records import (
    WAITING_TO_START,
    Cancel,
    Force,
    Supervision,
    log,
    log_context,
    post,
    restart_pending,
    status_of,
)
from lmwatch.engine.scheduler import HostLimits, Slot, startable_among
from lmwatch.engine.settings import EngineSettings
from lmwatch.engine.supervision import Supervisor
from lmwatch.errors import Conflict, NotFound
from lmwatch.events import EventHub
from lmwatch.metrics import Metrics
from lmwatch.model import (
    ChangeRate,
    Decision,
    HostInfo,
    InstanceInfo,
    JobResult,
    MigrationRequest,
    Phase,
    Prediction,
    State,
)
from lmwatch.policies.placement import GROUP_LABEL, How, Need, Placement, choose
from lmwatch.profiles import ProfileRegistry
from lmwatch.profiles.schema import Profile
from lmwatch.records import Placed
from lmwatch.store import Event, MigrationRecord, Store, StoreUnwritable

if TYPE_CHECKING:
    from lmwatch.cluster.membership import Membership
    from lmwatch.engine.commands import Relay

MAX_PAGE = 1000  # most migrations one page of the list holds


def _refuse(effects: tuple[machine.Effect, ...]) -> None:
    """Raise the state machine's refusal of an operator's command, if it refused."""
    for effect in effects:
        if isinstance(effect, machine.Refuse):
            raise Conflict(effect.text)


def _slot(record: MigrationRecord) -> Slot:
    return Slot(record.id, record.source, record.destination, record.created_at)


@dataclass(frozen=True, slots=True)
class _Accepting:
    """A migration accepted and checked, on its way to disk (`done`)."""

    record: MigrationRecord
    done: concurrent.futures.Future[None]


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
        new_id: Callable[[], str] | None = None,
        membership: Membership | None = None,
    ) -> None:
        self.driver = driver
        # Ids of accepted migrations and drains; injected where runs must repeat
        # exactly (a migration's id also sets the phase of its polls).
        self.new_id: Callable[[], str] = new_id or (lambda: str(uuid.uuid4()))
        self.store = store
        self.profiles = profiles
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.settings = settings or EngineSettings()
        # Timeline entries and progress go out here too (GET /v1/events); never blocks.
        self.hub = hub if hub is not None else EventHub()
        self._supervisions: dict[str, Supervision] = {}
        self._book = Book()  # what they hold on each host, kept as they come and go
        self._learned = Learned(
            switchover_memory=self.settings.switchover_memory,
            default_switchover=self.settings.policy.switchover_seconds,
            burst=self.settings.policy.recount_interval,
        )
        self._effects = Effects(
            driver=driver,
            store=store,
            metrics=self.metrics,
            hub=self.hub,
            clock=clock,
            settings=self.settings,
            learned=self._learned,
        )
        self._recovery = recovery.Recovery(
            effects=self._effects, clock=clock, settings=self.settings
        )
        self._supervisor = Supervisor(
            effects=self._effects,
            recovery=self._recovery,
            profiles=profiles,
            learned=self._learned,
            clock=clock,
            settings=self.settings,
            link_peers=self._link_peers,
        )
        self._submit_lock = asyncio.Lock()
        # Acceptances queued for the disk and not written yet, by instance and by key.
        self._accepting: dict[str, _Accepting] = {}
        self._accepting_keys: dict[str, _Accepting] = {}
        self.drains = Drains(self)  # draining hosts: lmwatch/engine/drains.py
        self._store_task: asyncio.Task[None] | None = None
        self.metrics.watch_store(store)
        self._started = False
        self._stopping = False
        # With a PostgreSQL store, operator commands reach the daemon supervising a
        # migration through the database (engine/commands.py).
        self._database: str | None = getattr(store._backend, "url", None)  # PostgreSQL's
        self.relay: Relay | None = None
        if self._database is not None:
            from lmwatch.engine import commands  # psycopg: there with a PostgreSQL store

            self.relay = commands.Relay(
                self._database, wait=self.settings.command_wait, poll=self.settings.command_poll
            )
        self._commands_task: asyncio.Task[None] | None = None
        # Several daemons on one database (docs/cluster.md): this one supervises only
        # the migrations it owns, and writes and acts under their claims.
        self.membership = membership
        self._ownership: Ownership | None = None
        self.metrics.watch_role(store, lambda: len(self._supervisions), membership)
        if membership is not None:
            store.fence(membership.fencing)
            self._ownership = Ownership(self, membership)
            self._effects.may_act = self._ownership.may_act

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Take back every migration the store holds as unfinished, then run the queue.

        A stored migration that cannot be read stops the start with UnreadableStore,
        before anything is tracked, started or written (see `recovery.read_back`).
        """
        back = recovery.read_back(self.store)
        self._started = True
        self._store_task = asyncio.create_task(
            recovery.keep_store(self.store, self.clock, self.settings)
        )
        for record in back.completed:
            self._learned.learn(record)
        memory = self.settings.switchover_memory
        for source, destination, seconds in recovery.stop_times(self.store, back.stopped, memory):
            self._learned.remember_stop(source, destination, seconds)
        if self._ownership is not None:
            # A member takes back only what it owns, round by round (ownership.py).
            self._ownership.start()
        else:
            for record, profile in back.unfinished:
                self._take_back(record, profile)
        self._schedule(self._book.queued_all())
        self.drains.start()  # after the migrations they follow are tracked again
        if self._database is not None:
            from lmwatch.engine import commands

            taker = commands.CommandTaker(self, self._database)
            self._commands_task = asyncio.create_task(taker.run())

    def _take_back(self, record: MigrationRecord, profile: Profile) -> None:
        """Track a stored unfinished migration again: re-attached (the evidence rebuilt
        before any forcing decision: recovery.py), or queued."""
        supervision = self._track(record, profile)
        supervision.generation = -1  # the file may have changed while we were away
        if record.paused:  # when, and whose: the pause is held to its bound from then
            supervision.paused_at, supervision.pause_by_operator = recovery.pause_of(
                self.store, record
            )
        supervision.force_pending = recovery.force_pending(self.store, record)
        if record.state is not State.QUEUED:
            log.info("reattaching", **log_context(record))
            supervision.task = asyncio.create_task(self._run(supervision, reattach=True))
            self._book.start(record.id)

    # -- ownership (several daemons) --------------------------------------------------

    def supervised(self) -> builtins.set[str]:
        """The migrations this engine supervises (or holds queued) now: the ones it
        owns, and whose operator commands are its to carry out."""
        return builtins.set(self._supervisions)

    def take_over(self, migration_id: str) -> bool:
        """Supervise a migration this member now owns, read from the store; False
        when there is nothing to supervise (unknown, or its profile unreadable)."""
        if migration_id in self._supervisions or self._stopping:
            return True
        record = self.store.get(migration_id)
        if record is None:
            return False
        if record.state.finished:
            return True  # its outcome is on its way to the database
        try:
            profile = Profile.model_validate(record.profile)
        except ValueError as error:
            log.error("cannot-take-over", migration=migration_id, error=str(error))
            return False
        log.info("taking-over", migration=migration_id, state=record.state.value)
        self._take_back(record, profile)
        return True

    async def stop_supervising(self, migration_id: str, why: str) -> None:
        """Stop supervising a migration at once, without acting and without writing
        an outcome (another member owns it now, or this one may no longer act)."""
        supervision = self._supervisions.get(migration_id)
        if supervision is None or supervision.record.state.finished:
            return
        if self.membership is not None:
            self.membership.fencing.drop(migration_id)  # nothing more is written for it
        task = supervision.task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._supervisor.refuse_waiting(supervision)
        if self._supervisions.get(migration_id) is supervision:
            self._untrack(migration_id)
            self._effects.forget(supervision.record)
        log.warning("supervision-stopped", migration=migration_id, why=why)

    def schedule_all(self) -> None:
        self._schedule(self._book.queued_all())

    async def stop(self) -> None:
        """Stop supervising (the migrations themselves go on; a new engine takes them back)."""
        self._stopping = True
        if self._ownership is not None:
            await self._ownership.stop()
        await self.drains.stop()
        tasks = [s.task for s in self._supervisions.values() if s.task is not None]
        if self._store_task is not None:
            tasks.append(self._store_task)
        if self._commands_task is not None:
            tasks.append(self._commands_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._supervisions.clear()
        self._book = Book()
        if self.relay is not None:
            self.relay.close()  # commands waited for now end on their own (command_wait)
        # What it recorded is in the file when it has stopped (or kept, while writes fail).
        await outside(self.clock, self.store.written())

    def _track(self, record: MigrationRecord, profile: Profile) -> Supervision:
        supervision = Supervision(
            record=record,
            profile=profile,
            generation=self.profiles.generation,
            track=policies.tracked((), self.settings.policy),
        )
        self._supervisions[record.id] = supervision
        self._book.add(record)
        return supervision

    def _untrack(self, migration_id: str) -> Slot | None:
        """Stop tracking a migration; the slot it held (to schedule others in)."""
        self._supervisions.pop(migration_id, None)
        return self._book.remove(migration_id)

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
    ) -> builtins.list[MigrationRecord]:
        """Stored migrations, with the live progress of those being supervised; with
        `limit`, one page of them after the migration `after` (a cursor)."""
        live = self._supervisions
        if limit is None and after is None:
            records = self.store.list(state)
        else:
            records = self.store.page(state, limit=limit or MAX_PAGE, after=after)
        return [live[r.id].record if r.id in live else r for r in records]

    async def list_everything(self, state: State | None = None) -> builtins.list[MigrationRecord]:
        """`list` without paging, read in a worker thread (its own read connection):
        a whole table of tens of thousands of records does not stop the event loop."""
        live = {key: s.record for key, s in self._supervisions.items()}
        store = self.store

        def read() -> builtins.list[MigrationRecord]:
            return [live.get(r.id, r) for r in store.list(state)]

        return await asyncio.to_thread(read)

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

    def switchover(self, source: str, destination: str) -> float:
        """Seconds of switchover to plan with between two hosts (learned, or the default)."""
        return self._learned.switchover(source, destination)

    def stop_time(self, source: str, destination: str) -> float | None:
        """The longest a job stopped between two hosts lately took to end (None: none
        on record): a pause's last look allows at least that."""
        return self._learned.cancel_resume(source, destination)

    def remember_change_rate(self, instance: str, rate: ChangeRate) -> None:
        """Keep a change rate measured before any start (a drain measures every guest
        at submission): the instance's start reuses it while it is recent instead of
        measuring again, a window of seconds on real hosts."""
        self._learned.remember_change_rate(instance, self.clock.now(), rate)

    def elsewhere(self, migration_id: str) -> bool:
        """Whether an operator's command on this migration is for another daemon:
        unfinished, not supervised here, on a store daemons share (404 if unknown)."""
        if self.relay is None or migration_id in self._supervisions:
            return False
        return not self.get(migration_id).state.finished

    def note(self, migration_id: str, text: str, data: dict[str, Any]) -> None:
        """A note on a migration's timeline (supervised here or not)."""
        supervision = self._supervisions.get(migration_id)
        if supervision is not None:
            self._effects.event(supervision, "note", text, data=data)
            return
        self.store.add_event(migration_id, self.clock.now(), "note", text, None, data)
        log.info("note", migration=migration_id, reason=text)

    def finished(self, ids: Iterable[str]) -> bool:
        """Whether every one of these migrations has ended (tests and `simulate`)."""
        return all(self.get(i).state.finished for i in ids)

    # -- commands -------------------------------------------------------------------

    async def submit(
        self, request: MigrationRequest, idempotency_key: str | None = None
    ) -> tuple[MigrationRecord, bool]:
        """Accept a migration: placed, checked, recorded durably, queued.

        Without a destination lmwatch chooses one (`place`); a named one is checked
        (pre-flight, group rule, free memory less reservations) unless `force`, which
        skips the memory checks only. Returns the record and whether it is a replay
        of an earlier identical request with the same Idempotency-Key. Nothing is
        recorded on refusal.
        """
        admission.validate(request)
        fingerprint = admission.fingerprint(request)
        earlier = admission.replayed(self.store, request, idempotency_key, fingerprint)
        if earlier is not None:
            return self.get(earlier), True
        self._effects.refuse_unless_writable()
        how = How.FORCED if request.force else How.NAMED
        chosen: Placement | None = None
        if request.destination is None:
            how = How.CHOSEN
            chosen = await self.place(
                request.instance,
                source=request.source,
                profile=request.profile,
                labels=request.labels,
            )
            if chosen.host is None:
                raise placing.NoDestination(chosen.reason)
            request = dataclasses.replace(request, destination=chosen.host)
        assert request.destination is not None
        # Asking the hypervisor may take a while: other submissions go on meanwhile.
        info = await self._effects.preflight(request)
        host = await self._effects.host_info(request.destination)
        async with self._submit_lock:
            replaying = self._being_accepted(request, idempotency_key, fingerprint)
            if replaying is None:
                earlier = admission.replayed(self.store, request, idempotency_key, fingerprint)
                if earlier is not None:
                    return self.get(earlier), True
                waiting, accepted, profile = self._check_and_queue(
                    request, idempotency_key, fingerprint, info, host, how, chosen
                )
        if replaying is not None:
            # A replay of a request being accepted: answered once that one is on disk.
            await asyncio.shield(self._effects.accepted(replaying.done))
            return self.get(replaying.record.id), True
        # Shielded: once on disk it is tracked, even if the caller went away.
        await asyncio.shield(self._accept(waiting, accepted, profile, how))
        # Only the new one can start now: the others could not, and nothing freed.
        self._schedule([_slot(waiting.record)])
        return waiting.record, False

    def _check_and_queue(
        self,
        request: MigrationRequest,
        idempotency_key: str | None,
        fingerprint: str,
        info: InstanceInfo,
        host: HostInfo,
        how: How,
        chosen: Placement | None,
    ) -> tuple[_Accepting, str, Profile]:
        """Under the submission lock: select the profile, check the destination against
        the reservations as they are now (no two submissions both take the last room
        on a host), queue the record for the disk (acceptances are written in the
        order they were checked) and reserve at once. The disk is waited for outside
        the lock, so the acceptances of concurrent submissions share one flush."""
        assert request.destination is not None
        labels, selection = admission.select(self.profiles, request, info)
        found = placing.candidate(
            request.destination,
            host,
            self._book.load(request.destination),
            instance=info.name,
            drain=self.drained_hosts().get(request.destination),
        )
        need = Need(
            instance=info.name,
            source=request.source,
            memory=info.memory_bytes,
            group=labels.get(GROUP_LABEL) or None,
            profile=selection.profile.name,
        )
        reason = placing.check_named(need, found, forced=how is How.FORCED)
        if chosen is not None:
            reason = chosen.reason
        record, accepted = admission.new_record(
            request,
            info,
            labels,
            selection,
            migration_id=self.new_id(),
            now=self.clock.now(),
            idempotency_key=idempotency_key,
            fingerprint=fingerprint,
        )
        record = dataclasses.replace(record, placement=Placed(how, reason))
        accepted = f"{accepted}; destination {how.value}: {reason}"
        waiting = _Accepting(record, self._effects.accept_soon(record, accepted))
        self._book.add(record, queue=False)
        self._accepting[record.instance] = waiting
        if idempotency_key is not None:
            self._accepting_keys[idempotency_key] = waiting
        return waiting, accepted, selection.profile

    def _being_accepted(
        self, request: MigrationRequest, idempotency_key: str | None, fingerprint: str
    ) -> _Accepting | None:
        """An acceptance on its way to disk this request replays (same key), or None;
        Conflict as `admission.replayed` says it once that one is on disk."""
        if idempotency_key is not None and idempotency_key in self._accepting_keys:
            replayed = self._accepting_keys[idempotency_key]
            if replayed.record.request_fingerprint != fingerprint:
                raise Conflict(
                    "this Idempotency-Key was used for a different request; use a new key"
                )
            return replayed
        other = self._accepting.get(request.instance)
        if other is not None:
            raise Conflict(
                f"instance {request.instance!r} is already migrating "
                f"(migration {other.record.id}, {other.record.state.value})"
            )
        return None

    async def _accept(self, waiting: _Accepting, reason: str, profile: Profile, how: How) -> None:
        """Wait until an acceptance is on disk (the loop goes on; others are checked
        and queued meanwhile), then track it; its reservation goes if it failed."""
        record = waiting.record
        try:
            await self._effects.accepted(waiting.done)
        except BaseException:
            self._book.remove(record.id)
            raise
        finally:
            self._accepting.pop(record.instance, None)
            if record.idempotency_key is not None:
                self._accepting_keys.pop(record.idempotency_key, None)
        self.metrics.placements.labels(how.value).inc()
        if self._ownership is not None:
            # Supervised by the owner of its source host (maybe this one, next round).
            self._book.remove(record.id)
            self._effects.announce(record, reason)
            self._ownership.wake()
            return
        self._track(record, profile)
        self._effects.announce(record, reason)

    async def place(
        self,
        instance: str,
        *,
        source: str | None = None,
        destinations: Sequence[str] | None = None,
        exclude: Collection[str] = (),
        profile: str | None = None,
        labels: Mapping[str, str] | None = None,
        drains: Mapping[str, str] | None = None,
    ) -> Placement:
        """Where lmwatch would move `instance` now, and why; moves nothing.

        Candidates are `destinations` when given (each must be a known host), else
        every configured host; never the source nor `exclude`. The instance's labels
        are its own overlaid with `labels`; `profile` names a profile to use instead
        of selecting one (it says whether handover is counted on). `drains`: the hosts
        being drained, when the caller has just read them (`drained_hosts`) for
        several placements; read here otherwise."""
        known = list(await self._effects.hosts())
        if destinations is not None:
            unknown = [d for d in destinations if d not in known]
            if unknown:
                raise UnknownHost(f"no host named {unknown[0]!r}")
        info: InstanceInfo = await self._effects.describe_instance(instance)
        if source is not None and info.host != source:
            raise NotOnSource(f"instance {info.name!r} runs on {info.host}, not on {source}")
        request = MigrationRequest(
            instance=info.name,
            source=info.host,
            destination=None,
            labels=dict(labels or {}),
            profile=profile,
        )
        merged, selection = admission.select(self.profiles, request, info)
        pool = [
            h
            for h in (destinations if destinations is not None else known)
            if h != info.host and h not in exclude
        ]
        hosts = sorted(set(pool))
        load = {h: self._book.load(h) for h in hosts}
        candidates = await placing.survey(
            effects=self._effects,
            request=request,
            hosts=hosts,
            load=load,
            drains=self.drained_hosts() if drains is None else drains,
        )
        need = Need(
            instance=info.name,
            source=info.host,
            memory=info.memory_bytes,
            group=merged.get(GROUP_LABEL) or None,
            handover=selection.profile.handover_allowed,
            profile=selection.profile.name,
        )
        placement = choose(need, candidates, per_destination=self.settings.max_per_destination)
        log.info(
            "placed",
            instance=info.name,
            source=info.host,
            destination=placement.host,
            candidates=len(candidates),
        )
        return placement

    def drained_hosts(self) -> dict[str, str]:
        """Host -> the unfinished drain emptying it, as the store has them now (drains
        through any daemon): never a destination. Unreadable (the database out of
        reach): none, and said in the log; the drain waits for what arrives anyway."""
        try:
            drains = self.store.unfinished_drains()
        except StoreUnwritable as error:
            log.warning("drains-unread", error=str(error))
            return {}
        return {drain.host: drain.id for drain in drains}

    async def force_complete(self, migration_id: str, accept_pause: bool = False) -> Decision:
        """Finish now in the least disruptive way the profile allows.

        The command goes to the migration's inbox; its supervision task carries it out
        between polls and answers (the decision, or Conflict with the reason)."""
        supervision = self._running(migration_id, "force-complete")
        decision: Decision = await self._ask(supervision, Force(accept_pause))
        return decision

    async def cancel(self, migration_id: str) -> MigrationRecord:
        """Cancel a migration: a queued one at once, a started one through its inbox."""
        supervision = self._supervisions.get(migration_id)
        record = self.get(migration_id)
        self._refuse_elsewhere(record, supervision)
        if record.state.finished or supervision is None:
            raise Conflict(f"migration {migration_id} has already {record.state.value}")
        if record.state is State.QUEUED:
            return self._cancel_queued(supervision)
        answer: MigrationRecord = await self._ask(supervision, Cancel())
        return answer

    def _cancel_queued(self, supervision: Supervision) -> MigrationRecord:
        """End a migration that has not started. Nothing here awaits, so nothing comes
        between the check and the end: a start due later finds it finished."""
        _, todo = machine.step(status_of(supervision), machine.CancelRequested())
        _refuse(todo)
        self._effects.end(
            supervision,
            JobResult(phase=Phase.CANCELLED, error=None),
            reason="cancelled by an operator before it started",
        )
        if supervision.task is None:
            self._untrack(supervision.record.id)  # it held no slot: nothing else can start
        return supervision.record

    def _refuse_elsewhere(self, record: MigrationRecord, supervision: Supervision | None) -> None:
        """Conflict for an unfinished migration another member supervises. The API
        passes such commands on through the database (`elsewhere`, engine/commands.py);
        this answers the moment the migration changed hands between that check and
        this call."""
        if self.membership is not None and supervision is None and not record.state.finished:
            raise Conflict(
                f"migration {record.id} is supervised by another lmwatch daemon sharing "
                "this database now; send the command again"
            )

    async def _ask(self, supervision: Supervision, what: Cancel | Force) -> Any:
        """Send an operator's command to the migration's supervision task; its answer."""
        task = supervision.task
        if self._stopping or task is None or task.done():
            raise Conflict(
                f"migration {supervision.record.id} is not being supervised now; "
                "send the command again once lmwatch has taken it back"
            )
        # Shielded: once sent, the command is carried out even if its caller goes away.
        return await asyncio.shield(post(supervision, what))

    def _running(self, migration_id: str, what: str) -> Supervision:
        record = self.get(migration_id)
        supervision = self._supervisions.get(migration_id)
        self._refuse_elsewhere(record, supervision)
        if record.state.finished or supervision is None:
            raise Conflict(f"cannot {what}: migration {migration_id} has {record.state.value}")
        if restart_pending(record):
            raise Conflict(f"cannot {what}: {WAITING_TO_START}")
        if record.state in (State.QUEUED, State.STARTING):
            raise Conflict(f"cannot {what}: migration {migration_id} has not started copying yet")
        return supervision

    def _link_peers(self, supervision: Supervision) -> builtins.list[Supervision]:
        """The other migrations with a job under way over the same link."""
        record = supervision.record
        return [
            other
            for other in self._supervisions.values()
            if other is not supervision
            and other.record.source == record.source
            and other.record.destination == record.destination
            and other.record.state not in (State.QUEUED, State.STARTING)
            and not other.record.state.finished
        ]

    # -- queue ----------------------------------------------------------------------

    def _schedule(self, queued: Iterable[Slot]) -> None:
        """Start those of `queued` the scheduler lets start now. Callers pass the only
        ones a change can let start (see `scheduler.startable_among`): a new migration,
        or the queued ones on the hosts of one that ended; the cost does not grow with
        the number of migrations."""
        if not self._started or self._stopping:
            return
        book = self._book
        limits = HostLimits(self.settings.max_per_source, self.settings.max_per_destination)
        for migration_id in startable_among(queued, book.leaving, book.arriving, limits):
            supervision = self._supervisions.get(migration_id)
            if supervision is None:
                continue  # accepted here, supervised by its source host's owner
            if supervision.task is not None or supervision.record.state.finished:
                continue
            if self.membership is not None:
                supervision.task = asyncio.create_task(self._run_with_slot(supervision))
            else:
                supervision.task = asyncio.create_task(self._run(supervision, reattach=False))
            book.start(migration_id)
        self._effects.queue_sizes(active=book.active, queued=book.queued)

    async def _run_with_slot(self, supervision: Supervision) -> None:
        """Start once the destination has room counted across every member (a slot in
        the database); without one it stays queued and is tried again next round."""
        assert self.membership is not None
        record = supervision.record
        claim = self.membership.fencing.claim_of(record.id)
        taken = claim is not None and await outside(
            self.clock,
            asyncio.to_thread(
                self.membership.take_slot,
                claim,
                record.destination,
                self.settings.max_per_destination,
            ),
        )
        if not taken:
            supervision.task = None
            self._book.unstart(record.id)
            return
        await self._run(supervision, reattach=False)

    async def _run(self, supervision: Supervision, *, reattach: bool) -> None:
        try:
            await self._supervisor.run(supervision, reattach=reattach)
        finally:
            self._supervisor.refuse_waiting(supervision)  # nobody is left to carry them out
            freed: Slot | None = None
            if supervision.record.state.finished:
                freed = self._untrack(supervision.record.id)
                self._effects.forget(supervision.record)
                self.drains.wake()
            if not self._stopping and freed is not None:
                self._schedule(self._book.queued_on(freed.source, freed.destination))
