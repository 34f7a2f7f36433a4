"""Recovery: taking back stored migrations at start, riding out hypervisor outages
with back-off and giving up after a while, and retrying store writes that failed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from pydantic import ValidationError

from lmwatch.clock import Clock, outside
from lmwatch.drivers.base import DriverError
from lmwatch.engine.effects import Effects
from lmwatch.engine.records import FORCE_PENDING, STOP_SECONDS, Supervision, log
from lmwatch.engine.settings import EngineSettings
from lmwatch.model import Action, JobResult, Phase, Rule, Sample, State
from lmwatch.profiles.schema import Profile
from lmwatch.store import CorruptRecord, MigrationRecord, Store, UnreadableStore


def first_problem(error: ValidationError) -> str:
    """The first problem pydantic found, on one line."""
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "profile"
    more = error.error_count() - 1
    return f"{where}: {first['msg']}" + (f" (and {more} more)" if more else "")


@dataclass(frozen=True, slots=True)
class ReadBack:
    """What a start takes from the store, every row decoded once."""

    unfinished: list[tuple[MigrationRecord, Profile]]  # with their profiles
    completed: list[MigrationRecord]  # what switchover times are learned from
    # Those whose timeline may tell how long a stopped job took to end (cancelled or
    # started again), newest first: what stop times are learned from (`stop_times`).
    stopped: list[MigrationRecord]


def read_back(store: Store) -> ReadBack:
    """Every migration the store holds as unfinished, with its profile, and the
    completed ones, from one pass over the table.

    A stored migration that cannot be read raises UnreadableStore, before anything
    is tracked, started or written. Refusing is deliberate: skipping the row would
    forget an accepted migration whose job may still be running on a host, and
    nothing would then finish, cancel or record it. The operator is told which row
    and how to look at it, and repairs or removes it.
    """
    records, problems = store.scan()
    if problems:
        raise UnreadableStore(store.path, problems)
    taken: list[tuple[MigrationRecord, Profile]] = []
    for record in records:
        if record.state.finished:
            continue
        try:
            taken.append((record, Profile.model_validate(record.profile)))
        except ValidationError as error:
            problems.append(CorruptRecord(record.id, f"column profile: {first_problem(error)}"))
    if problems:
        raise UnreadableStore(store.path, problems)
    stopped = [
        r
        for r in records
        if r.state is State.CANCELLED or (r.restart is not None and r.restart.count > 0)
    ]
    stopped.sort(key=lambda r: r.finished_at or r.started_at or r.created_at, reverse=True)
    return ReadBack(taken, [r for r in records if r.state is State.COMPLETED], stopped)


def stop_times(
    store: Store, stopped: list[MigrationRecord], per_pair: int
) -> list[tuple[str, str, float]]:
    """(source, destination, seconds) of the last `per_pair` stops the timelines of
    `stopped` (newest first) tell per host pair, oldest first: how long a job lmwatch or
    an operator stopped took to end, as noted when it did (`STOP_SECONDS`). Reads the
    timelines of at most four times as many migrations per pair (a cancel while queued
    stopped no job)."""
    found: dict[tuple[str, str], list[tuple[float, float]]] = {}
    read: dict[tuple[str, str], int] = {}
    for record in stopped:
        pair = (record.source, record.destination)
        if read.get(pair, 0) >= 4 * per_pair or len(found.get(pair, ())) >= per_pair:
            continue
        read[pair] = read.get(pair, 0) + 1
        for event in reversed(store.events(record.id)):
            seconds = (event.data or {}).get(STOP_SECONDS)
            if isinstance(seconds, int | float) and len(found.setdefault(pair, [])) < per_pair:
                found[pair].append((event.at, float(seconds)))
    stops = [(at, pair, seconds) for pair, seen in found.items() for at, seconds in seen]
    return [(pair[0], pair[1], seconds) for _, pair, seconds in sorted(stops)]


def pause_of(store: Store, record: MigrationRecord) -> tuple[float | None, bool]:
    """When the pause of a paused migration was decided (the last pause on its
    timeline: the pause came right after, so its bound's end and its last look read
    from this time are early rather than late) and whether it was an operator's
    force-complete; (None, False) when it is not paused."""
    if not record.paused:
        return None, False
    pauses = [e for e in store.events(record.id) if e.action == Action.PAUSE.value]
    if not pauses:
        return None, False
    last = pauses[-1]
    return last.at, any((e.data or {}).get("origin") == "operator" for e in pauses)


def force_pending(store: Store, record: MigrationRecord) -> bool | None:
    """An operator's force-complete still waiting for the disks to be in sync when
    lmwatch stopped (its `accept_pause`), or None: the last timeline entry that says.

    Only a migration with local disks that is neither paused nor handed over can have
    one, so the others' timelines are not read (a restart with many stays quick)."""
    progress = record.progress
    if record.paused or record.handed_over or progress is None or not progress.disk_total:
        return None
    pending: bool | None = None
    for event in store.events(record.id):
        data = event.data or {}
        if FORCE_PENDING in data:
            value = data[FORCE_PENDING]
            pending = None if value is None else bool(value)
    return pending


def end_asked(store: Store, record: MigrationRecord) -> bool:
    """Whether lmwatch asked for the job's end (an operator's cancel or its own) before
    it stopped: a job read back as failed may be that cancel's end."""
    return any(
        e.kind == "decision" and e.action == Action.CANCEL.value for e in store.events(record.id)
    )


def restarted_after_failure(store: Store, record: MigrationRecord) -> bool:
    """Whether the last decision to start again followed a failed job (rather than a job
    lmwatch stopped to start again): the timeline says, also to a daemon that re-attached
    after the decision (a stopped job may read back as failed then)."""
    for e in reversed(store.events(record.id)):
        if e.kind == "decision" and e.action == Action.RESTART.value:
            return (e.data or {}).get("rule") == Rule.JOB_FAILED.value
    return False


def last_seen(record: MigrationRecord) -> list[Sample]:
    """What lmwatch last saw of a migration's job, as evidence for a decision on a job
    that ended while it was not watching: the progress it stored (at most a few seconds
    older than its stop), or nothing."""
    p = record.progress
    if p is None:
        return []
    return [
        Sample(
            time=p.time,
            memory_total=p.memory_total,
            memory_remaining=p.memory_remaining,
            memory_transferred=p.memory_transferred,
            transfer_rate=p.transfer_rate,
            change_rate=p.change_rate,
            passes=p.passes,
            phase=Phase.COPYING,
            blackout_budget=p.blackout_budget,
            slowdown=p.slowdown,
            disk_total=p.disk_total,
            disk_remaining=p.disk_remaining,
            disk_rate=p.disk_rate,
        )
    ]


async def keep_store(store: Store, clock: Clock, settings: EngineSettings) -> None:
    """Check now and then that the store file is still there, and while writes
    fail, retry them with back-off until the store takes them again."""
    retry = settings.store_retry
    attempts = 0
    while True:
        failing = store.failing()
        delay = retry[min(attempts, len(retry) - 1)] if failing else None
        await clock.sleep(delay or settings.store_check_interval)
        try:
            store.check_file()
            if store.file_lost():
                # Copying the whole database takes a while: not on the event loop.
                await outside(clock, asyncio.to_thread(store.keep_rescue))
            if store.failing():
                # The writer thread tries again; the next round sees how it went.
                store.retry(clock.now())
                attempts += 1
            else:
                attempts = 0
        except Exception as error:  # never stop watching the store
            log.exception("store-watch-error", path=store.path, error=repr(error))


class Recovery:
    """Re-attaching to jobs after a restart and tolerating hypervisor outages."""

    def __init__(self, *, effects: Effects, clock: Clock, settings: EngineSettings) -> None:
        self.effects = effects
        self.clock = clock
        self.settings = settings

    async def reattach(self, supervision: Supervision) -> JobResult | None:
        """Find the job again after a restart, retrying while the hypervisor is away.

        Returns its result when it ended meanwhile, None when it goes on (or when the
        hypervisor stayed away too long: then the migration is recorded as failed).
        """
        while True:
            try:
                return await self.effects.reattach(supervision)
            except DriverError as error:
                if not await self.tolerate(supervision, error, operation="reattach"):
                    return None

    async def tolerate(
        self,
        supervision: Supervision,
        error: DriverError,
        operation: str = "sample",
        *,
        wake: asyncio.Event | None = None,
    ) -> bool:
        """Keep trying through a hypervisor outage for a while; fail the migration after.

        Returns True after backing off (try again), False once it has given up. `wake`
        (an operator's command arrived) cuts the back-off short.
        """
        self.effects.hypervisor_error(operation)
        now = self.clock.now()
        supervision.beat = now
        if supervision.first_error_at is None:
            supervision.first_error_at = now
            self.effects.event(supervision, "error", f"hypervisor error, retrying: {error}")
        first = supervision.first_error_at
        supervision.failures += 1
        failures = supervision.failures
        if now - first >= self.settings.error_tolerance:
            await self._give_up(supervision, error, now - first)
            return False
        backoff = self.settings.error_backoff
        delay = backoff[min(failures - 1, len(backoff) - 1)]
        if wake is None:
            await self.clock.sleep(delay)
            return True
        sleeper = asyncio.ensure_future(self.clock.sleep(delay))
        waiter = asyncio.ensure_future(wake.wait())
        try:
            await asyncio.wait((sleeper, waiter), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waiter.cancel()
        return True

    async def _give_up(self, supervision: Supervision, error: DriverError, silent: float) -> None:
        # Give up supervising, but first ask the hypervisor to stop the job, so that
        # a migration we no longer watch does not go on to finish by itself.
        try:
            await self.effects.stop_job(supervision)
            stopped = "lmwatch asked the hypervisor to stop it"
        except DriverError as cancel_error:
            stopped = f"stopping it failed too ({cancel_error})"
        await self.effects.finish(
            supervision,
            JobResult(
                phase=Phase.FAILED,
                error=f"the hypervisor did not answer (last error: {error})",
            ),
            reason=(
                f"the hypervisor did not answer for {silent:.0f}s "
                f"(last error: {error}); {stopped}; where the instance runs could not "
                "be confirmed: check both hosts"
            ),
        )

    @staticmethod
    def answered(supervision: Supervision) -> None:
        """The hypervisor answered: the current outage, if any, is over."""
        supervision.first_error_at = None
        supervision.failures = 0
