"""The simulator driver: migrations modelled by `simphysics`, hosts from an inventory.

The model is advanced lazily to `clock.now()` on every call, so the same driver
runs in wall-clock time under the daemon and in virtual time in tests, with no
background task. Jobs sharing a link (same source and destination) share its
bandwidth, and nothing else couples two jobs: so the jobs of one link are advanced
together, and only the links a call concerns are advanced (a poll of one migration
costs the jobs of its link, not every job). Instances move between hosts when their
migrations complete; the inventory is only the starting point.
"""

from __future__ import annotations

import dataclasses
import pickle
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmwatch.clock import Clock
from lmwatch.drivers.base import (
    CHANGE_RATE_WINDOW,
    ActionRefused,
    AlreadyOnDestination,
    DriverError,
    HostUnreachable,
    Incompatible,
    InsufficientResources,
    NameTaken,
    NotOnSource,
    Refused,
    UnknownHost,
    UnknownInstance,
    destination_of,
)
from lmwatch.drivers.inventory import Instance, Inventory
from lmwatch.drivers.preflight import identity_refusal, pinning_refusal
from lmwatch.drivers.sim_world import (
    JobRow,
    JobTaken,
    Move,
    SavedWorld,
    SharedWorld,
    WorldKeeper,
)
from lmwatch.drivers.simphysics import Migration, Side, Tuning, Writer, change_rate_reading
from lmwatch.logs import get_logger
from lmwatch.model import (
    Capabilities,
    ChangeRate,
    HostInfo,
    InstanceInfo,
    JobResult,
    MigrationRequest,
    Phase,
    Sample,
    StartPlan,
)
from lmwatch.units import format_size

log = get_logger("lmwatch.drivers.sim")

FAULTS = (
    "link_break",
    "link_slow",
    "link_restore",
    "destination_refuses",
    "source_gone",
    "driver_error_on_sample",
)
_WAKE_MARGIN = 1e-3  # seconds past an expected event, so that it has happened
_WORLD_VERSION = 1  # of what `_save` writes; another version is not read back
_KEEP_ENDED = 24 * 3600.0  # seconds an ended job stays kept (a restart may ask its result)
_SAVE_EVERY = 30.0  # seconds between periodic saves of a world kept by one driver
_SHARE_EVERY = 2.0  # ... of a shared world's jobs (what a takeover replays at most)


def _disk_of(instance: Instance) -> int:
    """The instance's local disk bytes (0 for one kept by a version without disks)."""
    return int(getattr(instance, "disk", 0) or 0)


@dataclass(slots=True)
class _Job:
    migration_id: str
    request: MigrationRequest
    instance: Instance
    source: str
    destination: str
    model: Migration
    settled: bool = False
    ended_at: float | None = None  # clock time it was seen ended


@dataclass(slots=True)
class _Link:
    """The jobs of one (source, destination) pair: they share its bandwidth."""

    key: tuple[str, str]
    last: float  # clock time the jobs below were advanced to
    jobs: list[_Job] = field(default_factory=list)  # not yet settled
    saved_at: float = float("-inf")  # clock time its jobs were last kept (periodic save)
    others: int = 0  # jobs on it held by other drivers of a shared world (as last read)


@dataclass(slots=True)
class _Faults:
    broken: set[frozenset[str]] = field(default_factory=set)
    slowed: dict[frozenset[str], float] = field(default_factory=dict)  # share of nominal
    refusing: dict[str, str] = field(default_factory=dict)  # host -> "start" | "job"
    gone_until: dict[str, float] = field(default_factory=dict)
    sample_errors: dict[str | None, int] = field(default_factory=dict)  # None: any job


class SimDriver:
    """A Driver whose hypervisor is the migration model."""

    name = "sim"

    def __init__(
        self,
        inventory: Inventory,
        clock: Clock,
        *,
        step: float = 0.1,
        tuning: Tuning | None = None,
        world: WorldKeeper | SharedWorld | None = None,
        save_every: float | None = None,
    ) -> None:
        self.inventory = inventory
        self.clock = clock
        self.step = step
        self.tuning = tuning or Tuning(max_step=step)
        self._jobs: dict[str, _Job] = {}
        self._measurements = 0  # change-rate readings taken (each draws its own scatter)
        self._where: dict[str, str | None] = {i.name: i.host for i in inventory.instances}
        self._free: dict[str, int] = {h.name: h.memory for h in inventory.hosts}
        # Local storage free for incoming disks; None: not modelled (any disk fits).
        self._storage: dict[str, int | None] = {h.name: h.disk for h in inventory.hosts}
        self._faults = _Faults()
        self._links: dict[tuple[str, str], _Link] = {}
        self._latest: dict[str, _Job] = {}  # instance name -> its latest job
        # A world kept whole by this driver alone, or shared row by row with others.
        self._shared = world if isinstance(world, SharedWorld) else None
        self._world = None if isinstance(world, SharedWorld) else world
        self._lost: set[str] = set()  # jobs another driver of the shared world took over
        # Instances a job of another driver moves (as `where` last read them).
        self._others_moving: set[str] = set()
        if save_every is None:
            save_every = _SHARE_EVERY if self._shared is not None else _SAVE_EVERY
        self._save_every = save_every
        self._saved_at = clock.now()
        if self._world is not None:
            saved = self._world.load()
            if saved is not None:
                self._restore(saved)
        if self._shared is not None:
            self._shared.seed(
                {i.name: i.host for i in inventory.instances},
                {h.name: (h.memory, h.disk) for h in inventory.hosts},
            )
            self._pull_faults()

    # ------------------------------------------------------------ the model

    def _sync(self) -> None:
        """Advance every running job to the clock's now."""
        for link in list(self._links.values()):
            self._sync_link(link)

    def _sync_host(self, host: str) -> None:
        """Advance the jobs leaving or reaching `host` (they change its free memory);
        read what the shared world says it has free."""
        for key, link in list(self._links.items()):
            if host in key:
                self._sync_link(link)
        if self._shared is not None:
            free, storage = self._shared.host(host)
            self._free[host] = free
            if self._storage.get(host) is not None and storage is not None:
                self._storage[host] = storage

    def _sync_instance(self, instance: str) -> _Job | None:
        """Advance the instance's latest job's link; that job, if any."""
        job = self._latest.get(instance)
        if job is not None:
            self._sync_link(self._links[(job.source, job.destination)])
        return job

    def _sync_link(self, link: _Link) -> None:
        """Advance the jobs of one link to the clock's now."""
        now = self.clock.now()
        while link.last < now - 1e-12:
            active = [j for j in link.jobs if not j.model.phase.finished]
            if not active:
                break
            moving = sum(1 for job in active if job.model.moving)
            bandwidth = self.inventory.bandwidth(*link.key) * self._faults.slowed.get(
                frozenset(link.key), 1.0
            )
            for job in active:
                job.model.set_link_bandwidth(bandwidth / max(1, moving + link.others))
            dt = now - link.last
            if moving > 1:
                # Shares change only when a job ends: advance to the next such moment.
                upcoming = [e for j in active if (e := j.model.next_event_in()) is not None]
                if upcoming:
                    dt = min(dt, max(min(upcoming) + 1e-6, 1e-3))
            for job in active:
                job.model.advance(dt)
            link.last += dt
            self._settle(link)
        link.last = max(link.last, now)
        self._settle(link)
        if self._world is not None or self._shared is not None:
            # Periodic saves, spread: each link's jobs when that link is advanced, the
            # rest of the world on its own; never every job at once (at thousands of
            # jobs one save of all of them stalled the daemon for a tenth of a second).
            # A link not advanced meanwhile has jobs unchanged since their last save.
            if now - link.saved_at >= self._save_every:
                link.saved_at = now
                self._save([job.migration_id for job in link.jobs])
                if self._shared is not None:
                    link.others = self._shared.others_on(*link.key)
            if now - self._saved_at >= self._save_every:
                self._save(prune=True)

    def _settle(self, link: _Link) -> None:
        ended: list[str] = []
        moves: dict[str, Move] = {}
        for job in link.jobs:
            if job.settled or not job.model.phase.finished:
                continue
            job.settled = True
            job.ended_at = link.last
            ended.append(job.migration_id)
            side = job.model.running_on
            if side is Side.DESTINATION:
                self._where[job.instance.name] = job.destination
                self._free[job.destination] -= job.instance.memory
                self._free[job.source] += job.instance.memory
                self._move_disk(job)
            elif side is Side.NOWHERE:
                self._where[job.instance.name] = None
            if side is not Side.SOURCE:
                moves[job.migration_id] = Move(
                    instance=job.instance.name,
                    source=job.source,
                    destination=job.destination if side is Side.DESTINATION else None,
                    memory=job.instance.memory,
                    disk=_disk_of(job.instance),
                )
        link.jobs = [job for job in link.jobs if not job.settled]
        if ended:
            self._save(ended, moves=moves)  # where the instances run now, each job's end

    def _move_disk(self, job: _Job) -> None:
        """The instance's disks now live on the destination (its copy on the source is gone)."""
        size = _disk_of(job.instance)
        if not size:
            return
        for host, change in ((job.destination, -size), (job.source, size)):
            free = self._storage.get(host)
            if free is not None:
                self._storage[host] = free + change

    def _incoming(self, host: str) -> list[_Job]:
        """Jobs under way to `host`."""
        return [
            j
            for key, link in self._links.items()
            if key[1] == host
            for j in link.jobs
            if not j.model.phase.finished
        ]

    def _storage_taken(self, host: str) -> int:
        """Local storage the disk copies under way to `host` take there: the copy is
        written on the destination from its start (the source's is freed when the
        migration completes; a cancelled copy is discarded)."""
        return sum(_disk_of(j.instance) for j in self._incoming(host))

    def _active_job_of(self, instance: str) -> _Job | None:
        job = self._latest.get(instance)
        return job if job is not None and not job.model.phase.finished else None

    def _host_up(self, host: str) -> bool:
        return self.clock.now() >= self._faults.gone_until.get(host, float("-inf"))

    def _link_of(self, job: _Job) -> _Link:
        return self._links[(job.source, job.destination)]

    def _job(self, migration_id: str) -> _Job:
        job = self._jobs.get(migration_id)
        if job is None and migration_id not in self._lost:
            job = self._adopt(migration_id)  # kept by an earlier or another driver
        if job is None:
            raise DriverError(f"no migration {migration_id!r} is known to the simulator")
        self._sync_link(self._link_of(job))
        if migration_id not in self._jobs:  # its save found it taken over meanwhile
            raise DriverError(f"no migration {migration_id!r} is known to the simulator")
        if not self._host_up(job.source):
            raise DriverError(f"{job.source} does not answer")
        return job

    def _instance(self, name: str) -> Instance:
        instance = self.inventory.instance(name)
        if instance is None:
            raise UnknownInstance(f"no instance named {name!r}")
        return instance

    def _known_host(self, host: str) -> None:
        if self.inventory.host(host) is None:
            raise UnknownHost(f"no host named {host!r}")

    def _info(self, instance: Instance, host: str) -> InstanceInfo:
        return InstanceInfo(
            name=instance.name,
            uuid=instance.uuid,
            host=host,
            memory_bytes=instance.memory,
            labels=dict(instance.labels),
            local_disk_bytes=instance.disk,
        )

    # ------------------------------------------------------- for tests / CLI

    def where(self, instance: str) -> str | None:
        """The host the instance runs on now; None when it was lost."""
        found = self._instance(instance)
        self._sync_instance(found.name)
        if self._shared is not None:
            host, others = self._shared.instance(found.name)
            self._where[found.name] = host
            self._others_moving.discard(found.name)
            self._see_others(others)
        return self._where_now(found.name)

    def _where_now(self, name: str) -> str | None:
        """Where the instance runs, from the kept placement and its job (both current)."""
        job = self._active_job_of(name)
        if job is not None and job.model.running_on is Side.DESTINATION:
            return job.destination
        return self._where[name]

    def instances(self) -> list[InstanceInfo]:
        """Every instance that still runs somewhere, with its current host."""
        self._sync()
        if self._shared is not None:
            kept = self._shared.placement()
            for name in self._where:
                if name in kept:
                    self._where[name] = kept[name]
            self._others_moving.clear()
            self._see_others(self._shared.others_jobs())
        result = []
        for instance in self.inventory.instances:
            host = self._where_now(instance.name)
            if host is not None:
                result.append(self._info(instance, host))
        return result

    def free_storage(self, host: str) -> int | None:
        """Local storage the host has left for incoming disks (not counting
        reservations); None when its storage is not modelled."""
        self._known_host(host)
        self._sync_host(host)
        return self._storage[host]

    def free_memory(self, host: str) -> int:
        """Memory the host has left for incoming instances (not counting reservations)."""
        self._known_host(host)
        self._sync_host(host)
        return self._free[host]

    def inject_fault(self, kind: str, **params: Any) -> None:
        """Make something go wrong, the way it goes wrong on real hosts.

        - `link_break(between=(a, b))`: copying between a and b stalls; after the
          link timeout the job fails (instance on the source) — or, when handed
          over, the instance is lost. `link_slow(between=(a, b), share=0.2)`: the
          link carries only that share of its bandwidth. `link_restore(between=(a, b))`
          heals either.
        - `destination_refuses(host=h, when="start"|"job")`: starting a migration
          to h raises DriverError, or the job fails within a second. Lasts until
          `clear_faults()`.
        - `source_gone(host=h, duration=60)`: h stops answering for `duration`
          seconds; its migrations go on for a grace period and then fail (or
          complete on the destination when handed over or fast enough).
        - `driver_error_on_sample(count=n, migration_id=None)`: the next n `sample`
          calls raise DriverError (only for that migration when one is named).

        In a shared world the faults but `driver_error_on_sample` reach every driver
        (each reads them before a start and at its periodic save); that one counts
        the calls of this driver only.
        """
        self._pull_faults()
        self._sync()
        if kind == "link_slow":
            a, b = params["between"]
            self._known_host(a)
            self._known_host(b)
            share = float(params["share"])
            if not 0 < share <= 1:
                raise ValueError(f"link_slow: share must be in (0, 1], not {share!r}")
            self._faults.slowed[frozenset((a, b))] = share
        elif kind in ("link_break", "link_restore"):
            a, b = params["between"]
            self._known_host(a)
            self._known_host(b)
            pair = frozenset((a, b))
            if kind == "link_restore":
                self._faults.slowed.pop(pair, None)
            for job in self._jobs.values():
                if frozenset((job.source, job.destination)) == pair:
                    if kind == "link_break":
                        job.model.break_link()
                    else:
                        job.model.restore_link()
            if kind == "link_break":
                self._faults.broken.add(pair)
            else:
                self._faults.broken.discard(pair)
        elif kind == "destination_refuses":
            host = params["host"]
            self._known_host(host)
            when = params.get("when", "start")
            if when not in ("start", "job"):
                raise ValueError("destination_refuses: when is 'start' or 'job'")
            self._faults.refusing[host] = when
        elif kind == "source_gone":
            host = params["host"]
            self._known_host(host)
            duration = float(params.get("duration", 60.0))
            self._faults.gone_until[host] = self.clock.now() + duration
            for job in self._jobs.values():
                if job.source == host:
                    job.model.lose_source()
        elif kind == "driver_error_on_sample":
            target = params.get("migration_id")
            errors = self._faults.sample_errors
            errors[target] = errors.get(target, 0) + int(params.get("count", 1))
        else:
            raise ValueError(f"unknown fault {kind!r} (known: {', '.join(FAULTS)})")
        self._sync()
        self._push_faults()
        self._save()

    def clear_faults(self) -> None:
        """Heal every link, let every host answer and accept instances again."""
        self._pull_faults()
        self._sync()
        for pair in list(self._faults.broken):
            a, b = sorted(pair)
            self.inject_fault("link_restore", between=(a, b))
        self._faults = _Faults()
        self._push_faults()
        self._save()

    # ------------------------------------------------------ Driver protocol

    async def hosts(self) -> Sequence[str]:
        return [h.name for h in self.inventory.hosts]

    async def reachable(self) -> dict[str, bool]:
        return {h.name: self._host_up(h.name) for h in self.inventory.hosts}

    async def describe(self, instance: str, host: str | None = None) -> InstanceInfo:
        if host is not None:
            self._known_host(host)
        found = self._instance(instance)
        now_on = self.where(found.name)
        if now_on is None:
            raise UnknownInstance(f"instance {found.name!r} was lost and runs nowhere")
        if not self._host_up(now_on):
            raise HostUnreachable(f"{now_on} does not answer")
        if host is not None and host != now_on:
            raise UnknownInstance(f"instance {found.name!r} does not run on {host}")
        return self._info(found, now_on)

    async def instances_on(self, host: str) -> Sequence[InstanceInfo]:
        """Instances running on `host`, in inventory order (one that is being handed
        over counts where it runs now)."""
        self._known_host(host)
        if not self._host_up(host):
            raise HostUnreachable(f"{host} does not answer")
        return list(self._instances_on(host))

    async def preflight(self, request: MigrationRequest) -> InstanceInfo:
        source, destination = request.source, destination_of(request)
        self._known_host(source)
        self._known_host(destination)
        self._sync_host(destination)  # its free memory
        if source == destination:
            raise Refused(f"source and destination are the same host ({source})")
        for host in (source, destination):
            if not self._host_up(host):
                raise HostUnreachable(f"{host} does not answer")
        found = self._instance(request.instance)
        now_on = self.where(found.name)
        if now_on is None:
            raise UnknownInstance(f"instance {found.name!r} was lost and runs nowhere")
        if self._active_job_of(found.name) is not None or found.name in self._others_moving:
            raise Refused(f"instance {found.name!r} is already migrating")
        if now_on == destination:
            raise AlreadyOnDestination(f"instance {found.name!r} already runs on {destination}")
        if now_on != source:
            raise NotOnSource(f"instance {found.name!r} runs on {now_on}, not on {source}")
        there = self.inventory.host(destination)
        assert there is not None  # _known_host
        why = identity_refusal(
            destination, found.name, found.uuid, ((d.name, d.uuid) for d in there.defined)
        )
        if why is not None:
            raise NameTaken(why)
        why = pinning_refusal(
            found.name,
            destination,
            pinned_cpus=found.pinned_cpus,
            pinned_nodes=found.pinned_nodes,
            host_cpus=there.cpu_ids,
            host_nodes=there.node_ids,
        )
        if why is not None:
            raise Incompatible(why)
        # The simulated hypervisor's own figure: instances arriving take their memory
        # when they land. What lmwatch's queued and running migrations reserve is the
        # engine's to subtract (lmwatch.engine.placing), never the driver's.
        free = self._free[destination]
        if not request.force and free < found.memory:
            raise InsufficientResources(
                f"{destination} has {format_size(max(0, free))} free, "
                f"{found.name} needs {format_size(found.memory)}"
            )
        # Not skipped by force: a destination that cannot hold the disks cannot take
        # the instance at all (the copy would fail).
        storage = self._storage.get(destination)
        if found.disk and storage is not None:
            left = storage - self._storage_taken(destination)
            if left < found.disk:
                raise InsufficientResources(
                    f"{destination} has {format_size(max(0, left))} of local storage free, "
                    f"{found.name}'s disks need {format_size(found.disk)}"
                )
        return self._info(found, source)

    async def host_info(self, host: str) -> HostInfo:
        self._known_host(host)
        if not self._host_up(host):
            raise HostUnreachable(f"{host} does not answer")
        running = self._instances_on(host)  # advances its links: its memory is current
        return HostInfo(name=host, free_memory=self._free[host], instances=running)

    def _instances_on(self, host: str) -> tuple[InstanceInfo, ...]:
        """The instances running on `host` now, in inventory order (as `where` says),
        after advancing only the jobs leaving or reaching it."""
        self._sync_host(host)
        here = self._running_on(host)
        return tuple(
            self._info(instance, host)
            for instance in self.inventory.instances
            if instance.name in here
        )

    def _running_on(self, host: str) -> set[str]:
        """Names of the instances running on `host` now (as `where` says), from the
        kept placement and the unfinished jobs of its links only (its links advanced)."""
        if self._shared is not None:
            here = self._shared.instances_on(host) & self._where.keys()
            for name in here:
                self._where[name] = host
            for name, (on, _) in self._others_now(self._shared.others_jobs(host)).items():
                if on == host:
                    here.add(name)
                else:
                    here.discard(name)
        else:
            here = {name for name, at in self._where.items() if at == host}
        for key, link in self._links.items():
            if host not in key:
                continue
            for job in link.jobs:
                if job.model.phase.finished or job.model.running_on is not Side.DESTINATION:
                    continue
                if job.source == host:
                    here.discard(job.instance.name)
                if job.destination == host:
                    here.add(job.instance.name)
        return here

    async def capabilities(self, source: str, destination: str) -> Capabilities:
        src, dst = self.inventory.host(source), self.inventory.host(destination)
        if src is None or dst is None:
            raise UnknownHost(f"no host named {source if src is None else destination!r}")
        return Capabilities(
            handover=src.handover and dst.handover,
            slow_down=src.slow_down,
            measure_change_rate=True,
            bandwidth=self.inventory.bandwidth(source, destination),
        )

    async def measure_change_rate(self, instance: str, host: str) -> ChangeRate | None:
        """What a measurement of some seconds before start sees: distinct bytes dirtied
        in the window over its length (a random writer saturates)."""
        self._known_host(host)
        found = self._instance(instance)
        if not self._host_up(host):
            raise DriverError(f"{host} does not answer")
        if self.where(found.name) != host:
            raise NotOnSource(f"instance {found.name!r} does not run on {host}")
        if self._active_job_of(found.name) is not None:
            raise DriverError(f"cannot measure {found.name!r} while it migrates")
        window = float(CHANGE_RATE_WINDOW)
        self._measurements += 1
        rate = change_rate_reading(
            found.change_rate,
            found.working_set,
            Writer(found.writer),
            found.memory,
            window,
            seed=f"{found.name}:measurement:{self._measurements}",
        )
        return ChangeRate(rate, window)

    async def start(self, migration_id: str, request: MigrationRequest, plan: StartPlan) -> None:
        earlier = self._jobs.get(migration_id)
        if earlier is not None:
            self._sync_link(self._link_of(earlier))
            if not earlier.model.phase.finished:
                raise DriverError(f"migration {migration_id!r} was already started")
        # Started again after its job ended (a restart with a new plan): the guest's
        # writing goes on where it was when that job began, not from its beginning.
        pattern_at = 0.0
        if earlier is not None:  # its model was advanced to `ended_at`, then left alone
            seen = earlier.ended_at if earlier.ended_at is not None else self.clock.now()
            pattern_at = earlier.model.elapsed + max(0.0, self.clock.now() - seen)
        info = await self.preflight(request)
        self._pull_faults()  # a shared world's faults as they are now
        destination = destination_of(request)
        caps = await self.capabilities(request.source, destination)
        if plan.arm_handover and not caps.handover:
            raise Incompatible(f"{request.source} -> {destination} cannot hand over")
        if plan.arm_slow_down and not caps.slow_down:
            raise Incompatible(f"{request.source} cannot slow instances down")
        pair = frozenset((request.source, destination))
        if pair in self._faults.broken:
            raise DriverError(f"cannot reach {destination} from {request.source}")
        refusing = self._faults.refusing.get(destination)
        if refusing == "start":
            raise DriverError(f"{destination} refused the incoming instance")
        instance = self._instance(info.name)
        tuning = self.tuning
        switchover = self.inventory.switchover(request.source, destination)
        if switchover is not None:
            tuning = dataclasses.replace(tuning, device_state=switchover)
        model = Migration(
            memory=instance.memory,
            working_set=instance.working_set,
            change_rate=instance.change_rate,
            bandwidth=self.inventory.bandwidth(request.source, destination),
            plan=plan,
            source=request.source,
            destination=destination,
            tuning=tuning,
            writer=Writer(instance.writer),
            disk=instance.disk,
            disk_writes=instance.disk_writes,
            start=pattern_at,
            jitter=instance.jitter,
            jitter_seed=zlib.crc32(instance.name.encode()),
        )
        if refusing == "job":
            model.refuse()
        job = _Job(migration_id, request, instance, request.source, destination, model)
        key = (request.source, destination)
        link = self._links.get(key)
        if link is None:
            link = self._links[key] = _Link(key, self.clock.now())
        self._sync_link(link)  # the others share the link from now on
        if self._shared is not None:
            try:  # kept, held by this driver, before anything else sees it
                self._shared.start_job(self._row(job, link.last))
            except JobTaken as taken:
                raise Refused(str(taken)) from None
            self._lost.discard(migration_id)
        link.jobs.append(job)
        self._jobs[migration_id] = job
        self._latest[instance.name] = job
        if self._shared is None:
            self._save([migration_id])  # before the start is acknowledged

    async def sample(self, migration_id: str) -> Sample:
        job = self._job(migration_id)
        errors = self._faults.sample_errors
        for target in (migration_id, None):
            if errors.get(target, 0) > 0:
                errors[target] -= 1
                raise DriverError("the hypervisor did not answer (injected)")
        return job.model.snapshot(self.clock.now())

    async def result(self, migration_id: str) -> JobResult:
        job = self._job(migration_id)
        if not job.model.phase.finished:
            raise DriverError(f"migration {migration_id!r} is still running")
        return job.model.result()

    async def set_blackout_budget(self, migration_id: str, seconds: float) -> None:
        self._job(migration_id).model.set_budget(seconds)
        self._keep(migration_id)

    async def set_bandwidth(self, migration_id: str, bytes_per_second: float | None) -> None:
        self._job(migration_id).model.set_cap(bytes_per_second)
        self._keep(migration_id)

    async def pause(self, migration_id: str) -> None:
        job = self._job(migration_id)
        job.model.pause()
        self._settle(self._link_of(job))
        self._keep(migration_id)

    async def handover(self, migration_id: str) -> None:
        job = self._job(migration_id)
        job.model.handover()
        self._settle(self._link_of(job))
        self._keep(migration_id)

    async def cancel(self, migration_id: str) -> None:
        job = self._job(migration_id)
        if job.model.phase is Phase.HANDOVER or job.model.handed_over:
            raise ActionRefused("cannot cancel once handed over")
        job.model.cancel()
        self._keep(migration_id)

    async def reattach(
        self,
        migration_id: str,
        request: MigrationRequest,
        plan: StartPlan,
        *,
        paused: bool = False,
    ) -> JobResult | None:
        # `paused` is not needed: the model resumes its paused guest when the job ends
        job = self._jobs.get(migration_id)
        if job is None and self._shared is not None:
            job = self._adopt(migration_id)  # continued from where its row left it
        if job is None:
            host = (
                self.where(request.instance) if self.inventory.instance(request.instance) else None
            )
            place = f"instance runs on {host}" if host else "instance runs nowhere"
            return JobResult(
                phase=Phase.FAILED,
                error=f"the migration is no longer known to the hypervisor; {place}",
                running_on=host,
            )
        job = self._job(migration_id)
        return job.model.result() if job.model.phase.finished else None

    async def wait_event(self, migration_id: str, timeout: float) -> None:
        job = self._jobs.get(migration_id)
        delay = timeout
        if job is not None:
            # The model as last advanced (a poll samples just before it waits): its next
            # event is due that long after the link's last advance. Advancing the link
            # again for the few microseconds since would cost every job of the link.
            # (When that moment has passed, the link is advanced and asked again.)
            link = self._link_of(job)
            for _ in range(2):
                if job.model.phase.finished:
                    delay = 0.0
                    break
                upcoming = job.model.next_event_in()
                if upcoming is None:
                    break
                due = link.last + upcoming + _WAKE_MARGIN - self.clock.now()
                if due > 0 or link.last >= self.clock.now():
                    delay = min(timeout, due)
                    break
                self._sync_link(link)
        await self.clock.sleep(max(0.0, delay))

    async def close(self) -> None:
        if self._world is not None or self._shared is not None:
            self._sync()
            self._save()
        if self._world is not None:
            self._world.close()
        if self._shared is not None:
            self._shared.close()

    # ------------------------------------------------------------ durability

    def _job_time(self, job: _Job) -> float:
        """The clock time the job's model state is for."""
        if job.ended_at is not None:
            return job.ended_at
        link = self._links.get((job.source, job.destination))
        return self._saved_at if link is None else link.last

    def _save(
        self,
        migration_ids: Iterable[str] | None = None,
        *,
        prune: bool = False,
        moves: dict[str, Move] | None = None,
    ) -> None:
        """Keep the world and these jobs (None: every job not yet ended). Ended jobs
        are kept a day for a restarted daemon to read their results; `prune` (the
        periodic save of the world, with no job unless named) drops older ones.
        `moves`: what the named jobs' ends change (a shared world applies them with
        the jobs; a world kept whole takes the placement as it is)."""
        if self._shared is not None:
            self._save_shared(migration_ids, prune=prune, moves=moves or {})
            return
        if self._world is None:
            return
        now = self.clock.now()
        ids, old = self._saving(migration_ids, prune=prune, now=now)
        state = pickle.dumps(
            {
                "version": _WORLD_VERSION,
                "where": self._where,
                "free": self._free,
                "storage": self._storage,
                "faults": self._faults,
            }
        )
        jobs = {
            job_id: (pickle.dumps(self._jobs[job_id]), self._job_time(self._jobs[job_id]))
            for job_id in ids
            if job_id in self._jobs
        }
        self._world.save(state, now, jobs, drop=old)

    def _restore(self, saved: SavedWorld) -> None:
        """Take back the kept world. The jobs of one link, kept at different times,
        are first brought to the latest of those each on its own (link shares are not
        replayed for those few seconds); the next call advances each link to now, so
        jobs went on while no daemon watched, as on real hosts. Instances and hosts no
        longer in the inventory are dropped; new ones start where the inventory puts
        them."""
        state = pickle.loads(saved.state)
        if not isinstance(state, dict) or state.get("version") != _WORLD_VERSION:
            return
        for name, host in state["where"].items():
            if name in self._where and (host is None or host in self._free):
                self._where[name] = host
        for host, free in state["free"].items():
            if host in self._free:
                self._free[host] = free
        for host, storage in state.get("storage", {}).items():
            # kept only while the inventory still models that host's storage
            if self._storage.get(host) is not None and storage is not None:
                self._storage[host] = storage
        self._faults = state["faults"]
        kept: list[tuple[_Job, float]] = []
        for blob, at in saved.jobs.values():
            job = pickle.loads(blob)
            if isinstance(job, _Job):
                kept.append((job, at))
        for job, at in sorted(kept, key=lambda item: item[1]):
            self._jobs[job.migration_id] = job
            key = (job.source, job.destination)
            link = self._links.setdefault(key, _Link(key, at))
            link.last = max(link.last, at)
            if not job.settled:
                link.jobs.append(job)
            latest = self._latest.get(job.instance.name)
            if latest is None or latest.settled:
                self._latest[job.instance.name] = job
        for job, at in kept:
            shared = self._links.get((job.source, job.destination))
            if not job.settled and shared is not None and shared.last > at:
                job.model.advance(shared.last - at)
        for each in list(self._links.values()):
            self._settle(each)

    # ------------------------------------------------------------ a shared world

    def _row(self, job: _Job, at: float, move: Move | None = None) -> JobRow:
        return JobRow(
            id=job.migration_id,
            instance=job.instance.name,
            source=job.source,
            destination=job.destination,
            state=pickle.dumps(job),
            at=at,
            ended=job.settled,
            move=move,
        )

    def _saving(
        self, migration_ids: Iterable[str] | None, *, prune: bool, now: float
    ) -> tuple[list[str], list[str]]:
        """The jobs a save writes (those named; None: every one not yet settled, or
        with `prune` none), and those it forgets: a save of them all forgets the jobs
        that ended long ago."""
        if migration_ids is None and not prune:
            ids = [job_id for job_id, job in self._jobs.items() if not job.settled]
        else:
            ids = list(migration_ids or ())
        old: list[str] = []
        if migration_ids is None:
            self._saved_at = now
            old = [
                job_id
                for job_id, job in self._jobs.items()
                if job.ended_at is not None and now - job.ended_at > _KEEP_ENDED
            ]
            for job_id in old:
                job = self._jobs.pop(job_id)
                if self._latest.get(job.instance.name) is job:
                    del self._latest[job.instance.name]
        return ids, old

    def _save_shared(
        self, migration_ids: Iterable[str] | None, *, prune: bool, moves: dict[str, Move]
    ) -> None:
        """`_save` for a shared world: the jobs named (None: every one not yet ended)
        written while this driver holds them; those another took over are dropped."""
        assert self._shared is not None
        now = self.clock.now()
        ids, _ = self._saving(migration_ids, prune=prune, now=now)
        if migration_ids is None and prune:
            self._shared.prune(now - _KEEP_ENDED)
            self._pull_faults()
        rows = [
            self._row(self._jobs[job_id], self._job_time(self._jobs[job_id]), moves.get(job_id))
            for job_id in ids
            if job_id in self._jobs
        ]
        lost = self._shared.save_jobs(rows)
        for job_id in lost:
            self._drop_lost(job_id)

    def _drop_lost(self, migration_id: str) -> None:
        """Forget a job another driver took over: it is simulated there now."""
        job = self._jobs.pop(migration_id, None)
        self._lost.add(migration_id)
        if job is None:
            return
        link = self._links.get((job.source, job.destination))
        if link is not None and job in link.jobs:
            link.jobs.remove(job)
        if self._latest.get(job.instance.name) is job:
            del self._latest[job.instance.name]
        log.info(
            "sim-job-taken-over",
            migration_id=migration_id,
            holder=self._shared.holder if self._shared is not None else None,
        )

    def _keep(self, migration_id: str) -> None:
        """Save a job an action changed; a job taken over meanwhile is no longer known."""
        self._save([migration_id])
        if migration_id in self._lost:
            raise DriverError(f"no migration {migration_id!r} is known to the simulator")

    def _adopt(self, migration_id: str) -> _Job | None:
        """Take over a job kept in the shared world (by another driver, or by this
        daemon before it restarted): become its holder and continue it from where its
        row left it, advanced on its own to now (its link's jobs here are advanced to
        now first); None when the world has no such job."""
        if self._shared is None:
            return None
        taken = self._shared.take_job(migration_id)
        if taken is None:
            return None
        blob, at = taken
        job = pickle.loads(blob)
        if not isinstance(job, _Job):
            return None
        self._lost.discard(migration_id)
        now = self.clock.now()
        key = (job.source, job.destination)
        link = self._links.get(key)
        if link is None:
            link = self._links[key] = _Link(key, now)
        self._sync_link(link)
        if not job.settled:
            active = [j for j in link.jobs if j.model.moving] + [job]
            share = self.inventory.bandwidth(*key) / max(1, len(active) + link.others)
            job.model.set_link_bandwidth(share)
            job.model.advance(max(0.0, now - at))
            link.jobs.append(job)
        self._jobs[migration_id] = job
        latest = self._latest.get(job.instance.name)
        if latest is None or latest.settled or latest is job:
            self._latest[job.instance.name] = job
        log.info("sim-job-adopted", migration_id=migration_id, kept_at=at, replayed=now - at)
        self._settle(link)
        return job

    def _others_now(
        self, kept: Iterable[tuple[bytes, float]]
    ) -> dict[str, tuple[str | None, bool]]:
        """Where other drivers' jobs (as kept) have their instances now, and whether
        they still move them: each job's copy advanced on its own from its kept time,
        as the hosts went on with it whoever watches (its holder applies the end)."""
        now = self.clock.now()
        seen: dict[str, tuple[str | None, bool]] = {}
        for blob, at in kept:
            job = pickle.loads(blob)
            if not isinstance(job, _Job) or job.instance.name not in self._where:
                continue
            job.model.advance(max(0.0, now - at))
            side = job.model.running_on
            host = {Side.SOURCE: job.source, Side.DESTINATION: job.destination}.get(side)
            seen[job.instance.name] = (host, not job.model.phase.finished)
        return seen

    def _see_others(self, kept: Iterable[tuple[bytes, float]]) -> None:
        """Take other drivers' jobs into the placement this driver answers from."""
        for name, (host, moving) in self._others_now(kept).items():
            self._where[name] = host
            if moving:
                self._others_moving.add(name)

    def _pull_faults(self) -> None:
        """Take the shared world's faults, applying the links broken or healed and the
        hosts gone since last read to the jobs this driver holds."""
        if self._shared is None:
            return
        blob = self._shared.faults()
        if blob is None:
            return
        kept = pickle.loads(blob)
        if not isinstance(kept, dict) or kept.get("version") != _WORLD_VERSION:
            return
        broken: set[frozenset[str]] = kept["broken"]
        gone: dict[str, float] = kept["gone_until"]
        for job in self._jobs.values():
            pair = frozenset((job.source, job.destination))
            if pair in broken and pair not in self._faults.broken:
                job.model.break_link()
            elif pair in self._faults.broken and pair not in broken:
                job.model.restore_link()
            if gone.get(job.source, float("-inf")) > self._faults.gone_until.get(
                job.source, float("-inf")
            ):
                job.model.lose_source()
        self._faults.broken = set(broken)
        self._faults.slowed = dict(kept.get("slowed", {}))
        self._faults.refusing = dict(kept["refusing"])
        self._faults.gone_until = dict(gone)

    def _push_faults(self) -> None:
        if self._shared is None:
            return
        self._shared.save_faults(
            pickle.dumps(
                {
                    "version": _WORLD_VERSION,
                    "broken": self._faults.broken,
                    "slowed": self._faults.slowed,
                    "refusing": self._faults.refusing,
                    "gone_until": self._faults.gone_until,
                }
            )
        )
