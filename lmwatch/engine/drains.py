"""Draining a host: every instance off it, through the engine's own migrations.

What to do is decided by pure functions (`lmwatch.policies.drain`: the order, how
many to hand over now, what a refusal means, whether to retry elsewhere); this
module carries them out and is the only drain code that touches the engine, the
driver, the store and the metrics.

How it runs. At submission every instance on the host is asked about (`Engine.place`,
limited to the drain's destinations): one that no host can take is `blocked` at once,
with the reasons, in the 202 answer. The others are ordered longest expected move
first (see the policy's docstring) and handed to the engine progressively: no more at
once than the engine lets leave one host (`max_per_source`). The destination of each
is chosen when its turn comes, not at submission, so it sees the memory the moves
before it actually took, and a queued migration never holds memory on a destination
that an instance placed after it needs (queued migrations reserve their memory).
A destination that refuses (overcommitted, incompatible, name taken, unreachable) or
a migration that fails there is tried on another host (up to `MAX_ATTEMPTS` hosts);
a migration its profile cancelled is not: it could not finish within bounds, and the
drain reports that instance as failed.

A drained host is no destination (placement rejects it, a migration naming it is
refused), but a migration accepted to it before the drain still lands there after the
listing at submission. So a drain whose every entry has ended first waits for the
migrations arriving at its host, then lists the host again and moves what it finds
(`_relisted`): it completes only when the host is empty.

Each instance's expected move counts the change rate its guest shows at submission
(measured for all at once) and the fastest link to a host that can take it; it is
sent, at its turn, to the host among those placement accepts where it should end
soonest. A migration that ends wakes the drains at once, so a free slot is used
without waiting for the next poll.

Durable: the drain is in the store before it is acknowledged, and every change of an
instance's entry is written. The destination is recorded before the engine is asked,
and the engine is asked with an Idempotency-Key derived from the drain, the instance
and the attempt, so a restart at any moment asks again with the same key and gets the
same migration back, never a second one.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from lmwatch.clock import outside
from lmwatch.drivers.base import DriverError, UnknownHost
from lmwatch.errors import Conflict, Invalid, NotFound, ProblemError
from lmwatch.logs import get_logger
from lmwatch.model import InstanceInfo, MigrationRequest, State
from lmwatch.policies import drain as policy
from lmwatch.policies.placement import Placement
from lmwatch.records import Progress
from lmwatch.store import (
    DrainItem,
    DrainRecord,
    DrainState,
    HostDraining,
    ItemState,
    MigrationRecord,
    StoreUnwritable,
)

if TYPE_CHECKING:
    from lmwatch.engine.core import Engine

log = get_logger("lmwatch.drains")

MAX_ATTEMPTS = 3  # destinations one instance is tried on before the drain gives it up
MEASURE_TIMEOUT = 15.0  # seconds the change rates may take at submission
_IN_FLIGHT = (ItemState.SUBMITTING, ItemState.MIGRATING)


def _unplaced(placement: Placement) -> str:
    """Why no host can take the instance: placement's own sentence (it names every
    rejected host), else the rejections one by one."""
    if placement.reason:
        return placement.reason
    return "; ".join(f"{host}: {why}" for host, why in placement.rejected.items()) or "no host"


def _options(placement: Placement, source: str, exclude: Sequence[str]) -> list[policy.Option]:
    """The hosts placement accepts for the instance, with their links and arrivals."""
    return [
        policy.Option(c.host, c.bandwidth, c.arriving)
        for c in placement.candidates
        if c.host != source and c.host not in exclude and c.host not in placement.rejected
    ]


def _with(drain: DrainRecord, index: int, item: DrainItem) -> DrainRecord:
    items = list(drain.items)
    items[index] = item
    return dataclasses.replace(drain, items=tuple(items))


def fraction(item: DrainItem, record: MigrationRecord | None) -> float:
    """How far an instance's move has got (0..1): memory copied of its migration."""
    if item.state is ItemState.MOVED:
        return 1.0
    if record is None or record.progress is None:
        return 0.0
    total = float(record.progress.memory_total)
    remaining = float(record.progress.memory_remaining)
    return 0.0 if total <= 0 else min(1.0, max(0.0, (total - remaining) / total))


def eta(item: DrainItem, record: MigrationRecord | None, now: float) -> float | None:
    """Seconds until this instance's move ends: the migration's own prediction while it
    runs; in its first pass, before there is one, what the disk copy and the first pass
    still take (at the least; not past its deadline); when the prediction says it will
    not finish on its own, its deadline (its profile acts by then); the expected
    duration before it runs. None: nothing says."""
    if item.state.finished:
        return 0.0
    if record is None or record.state is State.QUEUED or record.progress is None:
        return item.expected_seconds
    progress = record.progress
    prediction = progress.prediction
    number = None if prediction is None else prediction.eta_seconds
    if number is not None and number == number and number != float("inf"):
        return number
    left = None if record.deadline_at is None else max(0.0, record.deadline_at - now)
    first = _first_pass_left(progress)
    if first is not None:
        return first if left is None else min(first, left)
    return left


def _first_pass_left(progress: Progress) -> float | None:
    """Seconds the disk copy and the first memory pass still take, while in them."""
    rate = float(progress.transfer_rate)
    disk_left = float(progress.disk_remaining)
    disk_rate = float(progress.disk_rate)
    if progress.passes > 1:
        return None
    if disk_left > 0:
        if disk_rate <= 0:
            return None
        memory = float(progress.memory_total)
        return disk_left / disk_rate + memory / (rate or disk_rate)
    if rate <= 0:
        return None
    return float(progress.memory_remaining) / rate


class Drains:
    """The drains of one engine: accepted, run, resumed after a restart, cancelled."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._live: dict[str, DrainRecord] = {}  # unfinished drains, latest state
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()  # submissions: one drain per host
        self._guards: dict[str, asyncio.Lock] = {}  # a drain's step and its cancel
        self._wakers: dict[str, asyncio.Event] = {}  # a migration ended: look now
        self._stopping = False
        # How instances are ordered (the benchmark swaps in the naive order).
        self.order: Callable[[Iterable[policy.Candidate]], list[str]] = policy.lpt_order
        self.quickest = True  # False: placement's own pick (the benchmark compares)

    @property
    def slots(self) -> int:
        return max(1, self.engine.settings.max_per_source)

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        """Take back every unfinished drain the store holds (after the engine has
        taken back its migrations). With several daemons on one database a drain is
        run by the member holding its host: the ownership rounds call `follow`."""
        if self.engine.membership is None:
            for drain in self.engine.store.unfinished_drains():
                self._adopt(drain, "drain-resumed")
        self._publish()

    def _adopt(self, drain: DrainRecord, event: str) -> None:
        log.info(event, drain=drain.id, host=drain.host)
        self._live[drain.id] = drain
        self._spawn(drain.id)

    def _runs_here(self, host: str) -> bool:
        """Whether this daemon runs the drains of `host`: always alone; with several
        daemons, while it holds the host (as of its last ownership round)."""
        membership = self.engine.membership
        if membership is None:
            return True
        last = membership.last
        return last is not None and host in last.hosts and membership.may_act()

    async def follow(self, hosts: Collection[str]) -> None:
        """Run exactly the unfinished drains of `hosts`, the source hosts this member
        holds now (several daemons on one database): stop running those of other
        hosts (their records stay; the host's holder takes them over), take over those
        not run here yet. A drain stopped between choosing a destination and handing
        the migration over resumes as after a restart (the same key)."""
        for drain_id, drain in builtins.list(self._live.items()):
            if drain.host not in hosts:
                await self._let_go(drain_id)
        if hosts:  # (none: nothing to read; the database may be out of reach)
            try:
                unfinished = self.engine.store.unfinished_drains()
            except StoreUnwritable as error:  # cannot be reached: the next round
                log.warning("drains-unread", error=str(error))
                unfinished = []
            for drain in unfinished:
                if drain.host in hosts and drain.id not in self._live:
                    self._adopt(drain, "drain-taken-over")
        self._publish()

    async def _let_go(self, drain_id: str) -> None:
        task = self._tasks.pop(drain_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        drain = self._live.pop(drain_id, None)
        if drain is not None:
            log.info("drain-given-up", drain=drain_id, host=drain.host, why="host held elsewhere")

    async def stop(self) -> None:
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()

    def wake(self) -> None:
        """A migration ended: every drain looks at once instead of at its next poll,
        so that a free slot is used without waiting up to a poll interval."""
        for event in self._wakers.values():
            event.set()

    async def _pause(self, drain_id: str, seconds: float) -> None:
        """Sleep `seconds` on the engine's clock, or until `wake`."""
        event = self._wakers.setdefault(drain_id, asyncio.Event())
        if not event.is_set():
            sleeper = asyncio.ensure_future(self.engine.clock.sleep(seconds))
            waiter = asyncio.ensure_future(event.wait())
            try:
                await asyncio.wait({sleeper, waiter}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waiter.cancel()
        event.clear()

    def _guard(self, drain_id: str) -> asyncio.Lock:
        return self._guards.setdefault(drain_id, asyncio.Lock())

    def _spawn(self, drain_id: str) -> None:
        if not self._stopping:
            self._tasks[drain_id] = asyncio.create_task(self._run(drain_id))

    # -- queries --------------------------------------------------------------------

    def get(self, drain_id: str) -> DrainRecord:
        live = self._live.get(drain_id)
        if live is not None:
            return live
        stored = self.engine.store.get_drain(drain_id)
        if stored is None:
            raise NotFound(f"no drain with id {drain_id!r}")
        return stored

    def list(self) -> builtins.list[DrainRecord]:
        return [self._live.get(d.id, d) for d in self.engine.store.drains()]

    def migration(self, item: DrainItem) -> MigrationRecord | None:
        if item.migration_id is None:
            return None
        try:
            return self.engine.get(item.migration_id)
        except NotFound:
            return None

    def eta(self, drain: DrainRecord) -> float | None:
        """Seconds until the host is empty, when it can be told (None: a migration
        under way will not finish on its own and has no deadline)."""
        if drain.state.finished:
            return 0.0
        running: list[float] = []
        queued: list[float] = []
        for item in drain.items:
            if item.state in _IN_FLIGHT:
                left = eta(item, self.migration(item), self.engine.clock.now())
                if left is None:
                    return None
                running.append(left)
            elif item.state is ItemState.PENDING and drain.state is DrainState.RUNNING:
                queued.append(item.expected_seconds)
        return policy.makespan(running, queued, self.slots)

    async def _place(
        self,
        instance: str,
        source: str,
        destinations: Sequence[str] | None,
        exclude: Sequence[str],
        profile: str | None,
        drains: Mapping[str, str] | None = None,
    ) -> Placement:
        """Where placement would put the instance now (`Engine.place`: explains, moves
        nothing); `drains` as `Engine.place` takes them."""
        return await self.engine.place(
            instance,
            source=source,
            destinations=None if destinations is None else list(destinations),
            exclude=tuple(exclude),
            profile=profile,
            drains=drains,
        )

    # -- commands -------------------------------------------------------------------

    async def submit(
        self, host: str, destinations: Sequence[str] | None = None, profile: str | None = None
    ) -> DrainRecord:
        """Accept a drain of `host`: checked, planned, recorded, started.

        Raises UnknownHost (404: the host or a destination), Invalid (422: a
        destination is the host itself, an unknown profile), Conflict (409: the host
        is already draining)."""
        engine = self.engine
        hosts = list(await engine.driver.hosts())
        if host not in hosts:
            raise UnknownHost(f"no host named {host!r}; known hosts: {', '.join(hosts)}")
        wanted = None if destinations is None else tuple(dict.fromkeys(destinations))
        if wanted is not None:
            if host in wanted:
                raise Invalid(f"the destinations include the drained host {host} itself")
            if not wanted:
                raise Invalid("destinations is empty; leave it out to let lmwatch choose")
            unknown = [d for d in wanted if d not in hosts]
            if unknown:
                raise UnknownHost(
                    f"no host named {', '.join(map(repr, unknown))}; known hosts: "
                    + ", ".join(hosts)
                )
        if profile is not None and profile not in {
            p.name for p in engine.profiles.current.profiles
        }:
            raise Invalid(f"no profile named {profile!r} is loaded")
        engine._effects.refuse_unless_writable()
        async with self._lock:
            # From the store (its reads show changes not written yet): with several
            # daemons, another may run the host's drain.
            unfinished = engine.store.unfinished_drains()
            for other in unfinished:
                if other.host == host:
                    raise Conflict(f"host {host} is already draining (drain {other.id})")
            running = await engine.driver.instances_on(host)
            items: list[DrainItem] = []
            room: dict[str, dict[str, int | None]] = {}
            drained = {other.host: other.id for other in unfinished}  # read just now
            entries = await self._entries(host, running, wanted, profile, drained)
            for info, (item, accepting) in zip(running, entries, strict=True):
                items.append(item)
                room[info.name] = accepting
            movable = [i for i in items if i.state is not ItemState.BLOCKED]
            order = self.order(
                policy.Candidate(i.instance, i.expected_seconds, i.memory_bytes) for i in movable
            )
            by_name = {i.instance: i for i in movable}
            pending = [by_name[n] for n in order if by_name[n].state is ItemState.PENDING]
            short = policy.shortfall([(i.instance, i.memory_bytes) for i in pending], room)
            for name, why in short.items():
                by_name[name] = dataclasses.replace(by_name[name], warning=why)
            ordered = tuple(
                [by_name[name] for name in order]
                + [i for i in items if i.state is ItemState.BLOCKED]
            )
            now = engine.clock.now()
            drain = DrainRecord(
                id=engine.new_id(),
                host=host,
                state=DrainState.RUNNING,
                created_at=now,
                items=ordered,
                destinations=wanted,
                profile=profile,
                reason=f"moving {len(movable)} instance(s) off {host}",
            )
            if not self._arriving(host):  # else it waits for them, then looks again
                drain = self._concluded(drain, now) or drain
            try:
                await outside(engine.clock, engine.store.insert_drain_async(drain))
            except HostDraining as refused:  # recorded through another daemon meanwhile
                raise Conflict(str(refused)) from None
            blocked = [i.instance for i in ordered if i.state is ItemState.BLOCKED]
            log.info(
                "drain-accepted",
                drain=drain.id,
                host=host,
                instances=len(ordered),
                blocked=",".join(blocked) or None,
                state=drain.state.value,
            )
            if not drain.state.finished and drain.id not in self._live:
                if self._runs_here(host):
                    self._live[drain.id] = drain
                    self._spawn(drain.id)
                else:  # the member holding the host takes it at its next round
                    log.info("drain-passed-on", drain=drain.id, host=host)
        self._publish()
        return drain

    async def _change_rates(self, host: str, instances: Sequence[str]) -> dict[str, float]:
        """What each guest rewrites (bytes/s), measured at once for all of them where
        the host can tell within `MEASURE_TIMEOUT` (seconds on real hosts); the
        ordering does without the others. Each start reuses its guest's reading while
        it is recent (`EngineSettings.change_rate_max_age`)."""
        if not instances:
            return {}

        async def one(name: str) -> tuple[str, float | None]:
            try:
                rate = await self.engine.driver.measure_change_rate(name, host)
            except (DriverError, ProblemError):
                return name, None
            if rate is None:
                return name, None
            self.engine.remember_change_rate(name, rate)  # its start reuses it
            return name, rate.bytes_per_second

        try:
            async with asyncio.timeout(MEASURE_TIMEOUT):
                answers = await asyncio.gather(*(one(name) for name in instances))
        except TimeoutError:
            log.info("drain-change-rates-late", host=host, instances=len(instances))
            return {}
        return {name: rate for name, rate in answers if rate is not None}

    async def _entries(
        self,
        host: str,
        running: Sequence[InstanceInfo],
        destinations: Sequence[str] | None,
        profile: str | None,
        drains: Mapping[str, str] | None = None,
    ) -> builtins.list[tuple[DrainItem, dict[str, int | None]]]:
        """`_plan` for each of `running`, in order, their change rates measured at once
        and the hosts being drained (`drains`, when the caller has just read them) read
        once."""
        rates = await self._change_rates(host, [info.name for info in running])
        if drains is None:
            drains = self.engine.drained_hosts()
        return [
            await self._plan(host, info, rates.get(info.name), destinations, profile, drains)
            for info in running
        ]

    async def _plan(
        self,
        host: str,
        info: InstanceInfo,
        change_rate: float | None,
        destinations: Sequence[str] | None,
        profile: str | None,
        drains: Mapping[str, str],
    ) -> tuple[DrainItem, dict[str, int | None]]:
        """An instance's entry at submission: blocked (and why) when no host can take
        it now, else its expected move duration to where placement would put it (never
        a host being drained: placement rejects those); and the room each accepting
        host has for it (bytes after reservations)."""
        instance = info.name
        memory = int(info.memory_bytes)
        disk = info.local_disk_bytes
        active = self.engine.store.active_for_instance(instance)
        if active is not None:  # already leaving: the drain follows that migration
            expected = policy.expected_seconds(memory, None, None, disk)
            following = DrainItem(
                instance,
                memory,
                expected,
                state=ItemState.MIGRATING,
                migration_id=active.id,
                destination=active.destination,
                reason=f"already migrating to {active.destination} (migration {active.id})",
            )
            return following, {}
        try:
            placement = await self._place(instance, host, destinations, (), profile, drains)
        except ProblemError as error:
            blocked = DrainItem(
                instance, memory, 0.0, state=ItemState.BLOCKED, reason=error.message
            )
            return blocked, {}
        if placement.host is None:
            reason = _unplaced(placement)
            return DrainItem(instance, memory, 0.0, state=ItemState.BLOCKED, reason=reason), {}
        speeds = [o.bandwidth for o in _options(placement, host, ()) if o.bandwidth]
        bandwidth = max(speeds, default=None)
        expected = policy.expected_seconds(memory, bandwidth, change_rate, disk)
        accepting = {
            c.host: c.available
            for c in placement.candidates
            if c.host != host and c.host not in placement.rejected
        }
        item = DrainItem(instance, memory, expected, reason=f"waiting; {placement.reason}")
        return item, accepting

    async def cancel(self, drain_id: str) -> DrainRecord:
        """Start nothing more; migrations under way finish or end as their profiles say."""
        self.get(drain_id)  # 404 first
        async with self._guard(drain_id):
            return self._cancel(self.get(drain_id))

    def _cancel(self, drain: DrainRecord) -> DrainRecord:
        if drain.state.finished:
            raise Conflict(f"drain {drain.id} has already {drain.state.value}")
        if drain.state is DrainState.CANCELLING:
            return drain
        now = self.engine.clock.now()
        items = tuple(
            dataclasses.replace(i, state=ItemState.CANCELLED, reason="drain cancelled")
            if i.state is ItemState.PENDING
            else i
            for i in drain.items
        )
        drain = dataclasses.replace(
            drain,
            items=items,
            state=DrainState.CANCELLING,
            reason="cancelled: nothing more is started; migrations under way go on",
        )
        drain = self._concluded(drain, now) or drain
        self._save(drain)
        log.info("drain-cancelled", drain=drain.id, host=drain.host, state=drain.state.value)
        return drain

    # -- the loop -------------------------------------------------------------------

    async def _run(self, drain_id: str) -> None:
        interval = self.engine.settings.poll_interval
        try:
            while True:
                drain = self._live.get(drain_id)
                if drain is None or drain.state.finished:
                    return
                try:
                    await self.step(drain_id)
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # a bug or an outage: keep the drain going
                    log.exception("drain-step-failed", drain=drain_id, error=repr(error))
                if self._live.get(drain_id) is None:
                    return
                await self._pause(drain_id, interval)
        finally:
            self._tasks.pop(drain_id, None)
            self._wakers.pop(drain_id, None)

    async def step(self, drain_id: str) -> DrainRecord:
        """One round: read how its migrations ended, hand the next instances over,
        conclude when nothing is left."""
        async with self._guard(drain_id):
            return await self._step(self._live[drain_id])

    async def _step(self, drain: DrainRecord) -> DrainRecord:
        if self.engine.membership is not None:
            stored = self.engine.store.get_drain(drain.id)
            if stored is not None and stored.state.finished:  # ended through another daemon
                self._live.pop(drain.id, None)
                self._publish()
                return stored
            if stored is not None and (stored.state, drain.state) == (
                DrainState.CANCELLING,
                DrainState.RUNNING,
            ):  # cancelled through another daemon's API: carried out here
                drain = self._cancel(drain)
        for index, item in enumerate(drain.items):
            if item.state is ItemState.MIGRATING:
                after = self._followed(drain, item)
                if after != item:
                    drain = _with(drain, index, after)
                    self._save(drain)
            elif item.state is ItemState.SUBMITTING:  # a restart between choice and answer
                drain = await self._hand_over(drain, index)
        drain = await self._start_pending(drain)
        if drain.state is DrainState.RUNNING and all(i.state.finished for i in drain.items):
            drain, settled = await self._relisted(drain)
            if not settled:  # something is arriving, or the host cannot be listed now
                self._publish()
                return drain
            drain = await self._start_pending(drain)
        concluded = self._concluded(drain, self.engine.clock.now())
        if concluded is not None:
            drain = concluded
            self._save(drain)
        self._publish()
        return drain

    async def _start_pending(self, drain: DrainRecord) -> DrainRecord:
        """Hand the engine as many pending instances as free slots allow."""
        while drain.state is DrainState.RUNNING:
            pending = [i.instance for i in drain.items if i.state is ItemState.PENDING]
            in_flight = sum(1 for i in drain.items if i.state in _IN_FLIGHT)
            chosen = policy.to_submit(pending, in_flight, self.slots)
            if not chosen:
                break
            index = next(n for n, i in enumerate(drain.items) if i.instance == chosen[0])
            drain = await self._start(drain, index)
        return drain

    def _arriving(self, host: str) -> builtins.list[MigrationRecord]:
        """Unfinished migrations to `host` (through any daemon): accepted before its
        drain was, they land there after the drain listed the host's instances."""
        return [m for m in self.engine.store.unfinished() if m.destination == host]

    async def _relisted(self, drain: DrainRecord) -> tuple[DrainRecord, bool]:
        """Before a drain whose every entry has ended concludes: the host as it is now.

        Not settled while a migration is still arriving there (the next round looks
        again) or while the host cannot be listed. An instance found there that the
        drain has no entry for (one that landed after the listing at submission) gets
        a pending entry, placed like the others. Returns the drain and whether the
        host was seen settled."""
        host = drain.host
        try:
            arriving = self._arriving(host)
            running = await self.engine.driver.instances_on(host)
        except (StoreUnwritable, DriverError, ProblemError) as error:
            why = f"every instance has left {host}, which cannot be listed again now: {error}"
            return self._waiting(drain, why, problem=True), False
        if arriving:
            names = ", ".join(f"{m.instance} from {m.source} (migration {m.id})" for m in arriving)
            why = f"waiting for what is still arriving at {host} to move it too: {names}"
            return self._waiting(drain, why, problem=False), False
        before = {i.instance: i for i in drain.items}
        # one the drain moved away that runs there again (put back by something else
        # than lmwatch) is moved again: the host is not empty while it is there
        moved = {name for name, i in before.items() if i.state is ItemState.MOVED}
        newcomers = [info for info in running if info.name not in before or info.name in moved]
        if not newcomers:
            return drain, True
        entries = await self._entries(host, newcomers, drain.destinations, drain.profile)
        fresh = {}
        for item, _ in entries:
            back = item.instance in moved
            how = "came back after it was moved" if back else "arrived after the drain began"
            moves = before[item.instance].moves + 1 if back else 0
            fresh[item.instance] = dataclasses.replace(
                item, reason=f"{how}; {item.reason}", moves=moves
            )
        # a returning instance's entry is replaced where it stood; newcomers come last
        items = [fresh.pop(i.instance) if i.instance in fresh else i for i in drain.items]
        items += fresh.values()
        log.info(
            "drain-newcomers",
            drain=drain.id,
            host=host,
            instances=",".join(info.name for info in newcomers),
        )
        movable = sum(1 for i in items if i.state is not ItemState.BLOCKED)
        reason = (
            f"moving {movable} instance(s) off {host} ({len(newcomers)} arrived after it began)"
        )
        drain = dataclasses.replace(drain, items=tuple(items), reason=reason)
        self._save(drain)
        return drain, True

    def _waiting(self, drain: DrainRecord, why: str, *, problem: bool) -> DrainRecord:
        """The drain with `why` as its reason (saved and logged when it changes: as a
        warning when it is a `problem`, not an ordinary wait for what arrives)."""
        if drain.reason == why:
            return drain
        (log.warning if problem else log.info)(
            "drain-not-settled", drain=drain.id, host=drain.host, why=why
        )
        drain = dataclasses.replace(drain, reason=why)
        self._save(drain)
        return drain

    def _followed(self, drain: DrainRecord, item: DrainItem) -> DrainItem:
        """An instance's entry once its migration has ended (unchanged before)."""
        record = self.migration(item)
        if record is None:
            return dataclasses.replace(
                item, state=ItemState.FAILED, reason=f"migration {item.migration_id} is unknown"
            )
        if not record.state.finished:
            return item
        destination = record.destination
        if record.state is State.COMPLETED:
            return dataclasses.replace(
                item,
                state=ItemState.MOVED,
                destination=destination,
                reason=f"moved to {destination}"
                + (
                    f" (again: put back on {drain.host} {item.moves} time(s))" if item.moves else ""
                ),
            )
        why = self._why_ended(record)
        attempts = (*item.attempts, (destination, why))
        cancelled = record.state is State.CANCELLED
        retry = drain.state is DrainState.RUNNING and policy.retry_destination(
            [d for d, _ in attempts],
            failed_on_destination=not cancelled,
            cancelled=cancelled,
            max_attempts=MAX_ATTEMPTS,
        )
        if retry:
            log.info(
                "drain-retry",
                drain=drain.id,
                instance=item.instance,
                failed_on=destination,
                why=why,
            )
            return dataclasses.replace(
                item,
                state=ItemState.PENDING,
                attempts=attempts,
                destination=None,
                reason=f"failed on {destination} ({why}); trying another host",
            )
        verb = "cancelled" if cancelled else "failed"
        return dataclasses.replace(
            item,
            state=ItemState.FAILED,
            attempts=attempts,
            reason=f"its migration to {destination} was {verb}: {why}",
        )

    def _why_ended(self, record: MigrationRecord) -> str:
        error = None if record.outcome is None else record.outcome.error
        if error:
            return str(error)
        for event in reversed(self.engine.store.events(record.id)):
            if event.kind in ("state", "decision", "error") and event.reason:
                return event.reason
        return record.state.value

    async def _start(self, drain: DrainRecord, index: int) -> DrainRecord:
        """Choose a destination for a pending instance (away from those already tried),
        record it, and hand the migration to the engine."""
        item = drain.items[index]
        tried = tuple(d for d, _ in item.attempts)
        if len(tried) >= MAX_ATTEMPTS:
            failed = dataclasses.replace(
                item, state=ItemState.FAILED, reason=f"tried {len(tried)} hosts: none took it"
            )
            drain = _with(drain, index, failed)
            self._save(drain)
            return drain
        try:
            placement = await self._place(
                item.instance,
                drain.host,
                drain.destinations,
                tried,
                drain.profile,
            )
        except ProblemError as error:
            if policy.on_refusal(error.kind, error.message) == policy.LEFT_HOST:
                left = dataclasses.replace(
                    item, state=ItemState.MOVED, reason=f"no longer on {drain.host}: {error}"
                )
                drain = _with(drain, index, left)
                self._save(drain)
                return drain
            placement = None
            why = error.message
        if placement is None or placement.host is None:
            if placement is not None:
                why = _unplaced(placement)
            blocked = dataclasses.replace(item, state=ItemState.BLOCKED, reason=why)
            log.warning("drain-instance-blocked", drain=drain.id, instance=item.instance, why=why)
            drain = _with(drain, index, blocked)
            self._save(drain)
            return drain
        options = _options(placement, drain.host, tried)
        target = placement.host
        if self.quickest:
            per_destination = self.engine.settings.max_per_destination
            target = policy.quickest(options, per_destination, placement.host) or target
        why = f"placement: {placement.reason}"
        if target != placement.host:
            why = f"quickest of the hosts placement accepts ({why})"
        chosen = dataclasses.replace(
            item,
            state=ItemState.SUBMITTING,
            destination=target,
            reason=f"to {target}: {why}",
        )
        drain = _with(drain, index, chosen)
        self._save(drain)  # before the engine is asked: a restart asks again, same key
        return await self._hand_over(drain, index)

    async def _hand_over(self, drain: DrainRecord, index: int) -> DrainRecord:
        item = drain.items[index]
        assert item.destination is not None
        key = f"drain-{drain.id}-{item.instance}-{len(item.attempts)}"
        if item.moves:  # moved off the host before and put back: a new migration
            key += f"-again-{item.moves}"
        request = MigrationRequest(
            instance=item.instance,
            source=drain.host,
            destination=item.destination,
            profile=drain.profile,
        )
        try:
            record, _ = await self.engine.submit(request, key)
        except (ProblemError, DriverError) as error:
            kind = error.kind if isinstance(error, ProblemError) else "hypervisor-error"
            message = error.message if isinstance(error, ProblemError) else str(error)
            after = await self._refused(drain, item, kind, message)
        else:
            after = dataclasses.replace(
                item,
                state=ItemState.MIGRATING,
                migration_id=record.id,
                reason=f"migrating to {item.destination} (migration {record.id})",
                warning="",
            )
            log.info(
                "drain-migration",
                drain=drain.id,
                instance=item.instance,
                destination=item.destination,
                migration=record.id,
            )
        drain = _with(drain, index, after)
        self._save(drain)
        return drain

    async def _refused(
        self, drain: DrainRecord, item: DrainItem, kind: str, message: str
    ) -> DrainItem:
        what = policy.on_refusal(kind, message)
        destination = item.destination or "?"
        log.info(
            "drain-refused",
            drain=drain.id,
            instance=item.instance,
            destination=destination,
            kind=kind,
            then=what,
            why=message,
        )
        if what == policy.WAIT:
            return item  # still submitting: the next round asks again, same key
        if what == policy.LEFT_HOST:
            return dataclasses.replace(
                item, state=ItemState.MOVED, reason=f"no longer on {drain.host}: {message}"
            )
        if what == policy.ADOPT:
            active = self.engine.store.active_for_instance(item.instance)
            if active is not None:
                return dataclasses.replace(
                    item,
                    state=ItemState.MIGRATING,
                    migration_id=active.id,
                    destination=active.destination,
                    reason=f"already migrating to {active.destination} (migration {active.id})",
                )
            what = policy.RETRY_ELSEWHERE
        if what == policy.RETRY_ELSEWHERE:
            return dataclasses.replace(
                item,
                state=ItemState.PENDING,
                destination=None,
                attempts=(*item.attempts, (destination, message)),
                reason=f"{destination} refused it ({message}); trying another host",
            )
        return dataclasses.replace(item, state=ItemState.FAILED, reason=message)

    # -- bookkeeping ----------------------------------------------------------------

    def _concluded(self, drain: DrainRecord, now: float) -> DrainRecord | None:
        """The drain as it ends, once every entry has; None while some has not."""
        if drain.state.finished or not all(i.state.finished for i in drain.items):
            return None
        left = [i for i in drain.items if i.state is not ItemState.MOVED]
        if drain.state is DrainState.CANCELLING:
            state, reason = DrainState.CANCELLED, "cancelled"
            if left:
                reason += f"; still on {drain.host}: {', '.join(i.instance for i in left)}"
        elif not drain.items:
            state, reason = DrainState.COMPLETED, f"nothing runs on {drain.host}: already empty"
        elif not left:
            state, reason = DrainState.COMPLETED, f"{drain.host} is empty"
        else:
            state = DrainState.FAILED
            reason = f"{len(left)} instance(s) could not leave {drain.host}: " + "; ".join(
                f"{i.instance}: {i.reason}" for i in left
            )
        log.info("drain-finished", drain=drain.id, host=drain.host, state=state.value)
        return dataclasses.replace(drain, state=state, finished_at=now, reason=reason)

    def _save(self, drain: DrainRecord) -> None:
        if drain.id not in self._live:
            pass  # run by another daemon (a cancel through this one's API): the store only
        elif drain.state.finished:
            self._live.pop(drain.id, None)
        else:
            self._live[drain.id] = drain
        # Queued for the store's writer, which keeps it while writes fail; the
        # store's reads show it meanwhile.
        self.engine.store.update_drain(drain)
        self._publish()

    def _publish(self) -> None:
        counts: dict[tuple[str, str, str], int] = {}
        active = 0
        for drain in self._live.values():
            if drain.state.finished:
                continue
            active += 1
            for item in drain.items:
                key = (drain.id, drain.host, item.state.value)
                counts[key] = counts.get(key, 0) + 1
        self.engine.metrics.drains(active, counts)
