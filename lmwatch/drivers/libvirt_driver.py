"""The real driver: live migration through libvirt (QEMU), peer to peer.

- One `HostLink` per host (lazy, keepalive, reconnect with backoff); blocking calls
  on a bounded pool of daemon threads per host (`call_threads` at once, up to
  `call_queue` waiting; a host that stops answering is refused at once); events
  (pass finished, job completed, lifecycle) through `libvirtaio`, so `wait_event`
  returns as soon as a migration changes phase.
- `start` runs `migrateToURI3` in a daemon thread of its own (it blocks until the
  migration ends); its exception is the failure cause. Progress comes from
  `jobStats()` on the source. When the connection that call runs on is lost, the
  driver stops waiting for the call (it may never return) and follows the job
  like an adopted one: through statistics and events on a new connection, and,
  once the source shows no job, from where the instance runs.
- How a migration ended is decided from where the instance actually runs (both
  hosts are asked), not from what the migrate call said: a daemon can go away
  while its migration still completes.
- Every message that leaves the driver (exceptions, `JobResult.error`/`note`) is
  neutral: lmwatch's words for the operation, a classified cause and libvirt's text
  through `neutral_text`; the raw text goes only to the driver's log.
- Local disks (writable file/block disks not under a directory both hosts declare
  in `shared_storage`) move with the instance: pre-flight checks that the
  destination has an active storage pool with room for them in each disk's
  directory (libvirt creates them there), `start` copies exactly those disks
  (non-shared disk mode) to the destination's migration address, and samples
  report the copy (`disk_*`; memory is copied once the disks are in sync).
- Everything libvirt-specific (flags, statistics keys, XML) is translated in
  `libvirt_mapping`; `import libvirt` happens on first use, so lmwatch imports
  without libvirt-python installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import posixpath
import uuid as uuidlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

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
    handover_broke_text,
)
from lmwatch.drivers.libvirt_conn import (
    CALL_QUEUE,
    CALL_THREADS,
    HostLink,
    HostLost,
    HypervisorError,
    in_daemon_thread,
)
from lmwatch.drivers.libvirt_mapping import (
    DIRTYRATE_MEASURED,
    LABELS_NS,
    UNLIMITED_MIB_S,
    DiskFacts,
    DomainFacts,
    HostTopology,
    Where,
    bandwidth_mib_s,
    decide_outcome,
    disk_rate_between,
    domain_facts,
    downtime_ms,
    handover_broke,
    host_cpu_xml,
    host_topology,
    job_has_ended,
    local_disks,
    measured_blackout,
    migrate_call,
    neutral_text,
    parse_labels,
    pinning_missing,
    pool_target,
    slowdown_from,
    stats_to_sample,
    topology_from_info,
    transferred_from,
    where_from_state,
    writable_disks,
)
from lmwatch.drivers.preflight import identity_refusal
from lmwatch.logs import get_logger
from lmwatch.model import (
    MIB,
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
from lmwatch.units import parse_rate

T = TypeVar("T")
log = get_logger("lmwatch.drivers.libvirt")

# Minimum versions (libvirt, hypervisor) for each capability, as libvirt encodes them.
HANDOVER_VERSIONS = (1_003_003, 2_006_000)  # post-copy: libvirt 1.3.3, QEMU 2.6
SLOW_DOWN_VERSIONS = (2_000_000, 2_007_000)  # auto-converge initial/increment parameters
CHANGE_RATE_VERSIONS = (7_002_000, 5_002_000)  # startDirtyRateCalc: libvirt 7.2, QEMU 5.2
START_ACCEPT_TIMEOUT = 15.0  # seconds to wait for the source to show the job
REACHABLE_TIMEOUT = 2.0
POLL = 0.1  # seconds between polls while waiting for the hypervisor


class HostConfig(BaseModel):
    """How to reach one host.

    `uri`: any libvirt URI (qemu+unix, qemu+tcp, qemu+ssh, qemu+tls).
    `peer_uri`: the URI the *source host's daemon* uses to reach this host as a
    destination (peer to peer); defaults to `uri`.
    `migration_address`: where memory is sent when this host is the destination,
    e.g. "tcp://10.0.0.2" (also its listen address).
    `bandwidth`: a cap for migrations to this host, e.g. "100MiB/s".
    `call_threads`: how many calls to this host run at once (each on a thread);
    `call_queue`: how many more may wait for one before calls are refused. The
    migrate calls themselves (one per running migration) are not counted.
    `shared_storage`: directories whose files this host shares with other hosts
    (NFS, a cluster file system) at the same path. An instance's file or block disk
    is copied with it unless its path lies under a shared directory of *both* the
    source and the destination: by default every such disk is local, because a
    path that merely exists on both hosts is usually two different files (a
    directory pool per host), and taking a local disk for shared would lose its
    data, while copying a shared one only costs time.
    `disks_address`: where disk data is sent when this host is the destination,
    "tcp://HOST[:PORT]"; defaults to the host of `migration_address`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str
    peer_uri: str | None = None
    migration_address: str | None = None
    bandwidth: float | None = None  # bytes/s
    call_threads: int = Field(default=CALL_THREADS, ge=1, le=64)
    call_queue: int = Field(default=CALL_QUEUE, ge=0)
    shared_storage: tuple[str, ...] = ()
    disks_address: str | None = None

    @field_validator("shared_storage", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):
            for path in value:
                if not isinstance(path, str) or not path.startswith("/"):
                    raise ValueError(f"shared_storage entries are absolute paths, not {path!r}")
        return value

    @field_validator("bandwidth", mode="before")
    @classmethod
    def _rate(cls, value: Any) -> float | None:
        if value is None:
            return None
        if isinstance(value, int | float):
            return float(value) * MIB  # a bare number is MiB/s
        return parse_rate(value)


def build_libvirt_driver(
    hosts_config: Mapping[str, Mapping[str, Any]], clock: Clock
) -> LibvirtDriver:
    """The daemon's entry point: `hosts: {name: {uri, migration_address?, bandwidth?}}`."""
    hosts = {name: HostConfig.model_validate(dict(conf)) for name, conf in hosts_config.items()}
    return LibvirtDriver(hosts, clock)


@dataclass
class _Job:
    """What the driver follows about one migration."""

    id: str
    request: MigrationRequest
    plan: StartPlan
    name: str
    blackout_budget: float
    started_at: float  # when the job started (estimated from its statistics when adopted)
    adopted: bool = False  # no migrate call of ours to wait for (restart, lost connection)
    after_restart: bool = False
    task: asyncio.Future[None] | None = None
    migrate_conn: Any | None = None  # the connection the migrate call runs on
    error: str | None = None
    cancel_requested: bool = False
    aborted: bool = False  # an abort of ours was accepted: the job is being cancelled
    cancelling: asyncio.Lock = field(default_factory=asyncio.Lock)
    paused: bool = False
    paused_at: float | None = None
    handed_over: bool = False
    handover_stop_at: float | None = None  # the source stopped it for the handover (event)
    final_stop: bool = False  # the source stopped the instance for the last copy
    final_stop_at: float | None = None  # when it did (its event)
    source_resumed_at: float | None = None  # the instance last ran again on the source (event)
    ended_at: float | None = None  # when we learned that the job ended (event or call)
    resumed_at: float | None = None  # the instance resumed on the destination (event)
    end_event_at: float | None = None  # first job-completed / stopped event from the source
    returned_at: float | None = None  # the migrate call returned
    completed_stats: dict[str, Any] | None = None
    last_stats: dict[str, Any] = field(default_factory=dict)
    passes_seen: int = 0
    memory_bytes: int = 0
    disk_bytes: int = 0  # capacity of the local disks copied with the instance
    disk_seen: tuple[float, int] | None = None  # (when, disk_processed) last measured from
    transferred_seen: int = 0
    max_slowdown: float = 0.0
    result: JobResult | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def source(self) -> str:
        return self.request.source

    @property
    def destination(self) -> str:
        return destination_of(self.request)

    def running_phase(self) -> Phase:
        if self.handed_over:
            return Phase.HANDOVER
        if self.paused or self.final_stop:
            return Phase.COMPLETING
        return Phase.COPYING


class LibvirtDriver:
    """`lmwatch.drivers.base.Driver` for libvirt hosts."""

    name = "libvirt"

    def __init__(
        self,
        hosts: Mapping[str, HostConfig],
        clock: Clock,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        change_rate_readings: int = 1,
        change_rate_period: int = CHANGE_RATE_WINDOW,
    ) -> None:
        self._hosts = dict(hosts)
        self._clock = clock
        self._loop = loop
        self._readings = max(1, change_rate_readings)
        self._period = max(1, change_rate_period)
        self._mods: tuple[Any, Any | None] | None = None
        self._links: dict[str, HostLink] = {}
        self._jobs: dict[str, _Job] = {}
        self._caps: dict[tuple[str, str], Capabilities] = {}

    # -- modules and hosts --------------------------------------------------------

    @property
    def _lv(self) -> Any:
        return self._modules()[0]

    def _modules(self) -> tuple[Any, Any | None]:
        if self._mods is None:
            try:
                lv = importlib.import_module("libvirt")
            except ImportError as error:
                log.error("bindings-missing", hint="pip install lmwatch[libvirt]")
                raise DriverError(
                    "the hypervisor's Python bindings are not installed "
                    "(see the driver's optional extra in the installation guide)"
                ) from error
            try:
                aio: Any | None = importlib.import_module("libvirtaio")
            except ImportError:
                aio = None
                log.warning("events-unavailable", why="libvirtaio missing; polling only")
            # libvirt's default handler prints every error (e.g. a lookup miss) to
            # stderr; errors reach us as exceptions anyway.
            with contextlib.suppress(Exception):
                lv.registerErrorHandler(_ignore_error, None)
            self._mods = (lv, aio)
        return self._mods

    def _link(self, host: str) -> HostLink:
        if host not in self._hosts:
            raise UnknownHost(
                f"unknown host {host!r}; known hosts: {', '.join(sorted(self._hosts))}"
            )
        link = self._links.get(host)
        if link is None:
            lv, aio = self._modules()
            conf = self._hosts[host]
            link = HostLink(
                host,
                conf.uri,
                lv,
                aio,
                self._clock,
                self._setup_events,
                self._loop,
                call_threads=conf.call_threads,
                call_queue=conf.call_queue,
            )
            self._links[host] = link
        return link

    async def _on_domain(
        self,
        host: str,
        name: str,
        fn: Callable[[Any], T],
        *,
        what: str,
        migration: str | None = None,
    ) -> T:
        """Run `fn(domain)` in a thread, the domain looked up by name on `host`."""
        return await self._link(host).call(
            lambda conn: fn(conn.lookupByName(name)), what=what, migration=migration
        )

    def _absent(self, error: DriverError) -> bool:
        return isinstance(error, HypervisorError) and error.code == self._lv.VIR_ERR_NO_DOMAIN

    # -- Driver: hosts --------------------------------------------------------------

    async def hosts(self) -> Sequence[str]:
        return list(self._hosts)

    async def reachable(self) -> dict[str, bool]:
        async def one(host: str) -> bool:
            try:
                async with asyncio.timeout(REACHABLE_TIMEOUT):  # (wait_for may eat a cancel)
                    await self._link(host).call(lambda c: c.getLibVersion(), what="version check")
                return True
            except (DriverError, TimeoutError):
                return False

        names = list(self._hosts)
        answers = await asyncio.gather(*(one(h) for h in names))
        return dict(zip(names, answers, strict=True))

    async def _require_reachable(self, host: str) -> None:
        try:
            await self._link(host).call(
                lambda c: c.getLibVersion(), what="version check", timeout=10
            )
        except DriverError as error:
            raise HostUnreachable(
                f"host {host} does not answer: {neutral_text(str(error))}"
            ) from error

    # -- Driver: instances ----------------------------------------------------------

    def _read_domain(self, conn: Any, instance: str) -> dict[str, Any] | None:
        """Name, uuid, state, memory, XML and labels of `instance` (thread side)."""
        lv = self._lv
        try:
            dom = conn.lookupByName(instance)
        except lv.libvirtError as error:
            if error.get_error_code() != lv.VIR_ERR_NO_DOMAIN:
                raise
            if not _looks_like_uuid(instance):
                return None
            try:
                dom = conn.lookupByUUIDString(instance)
            except lv.libvirtError as again:
                if again.get_error_code() != lv.VIR_ERR_NO_DOMAIN:
                    raise
                return None
        state, reason = dom.state()
        xml = dom.XMLDesc(0)
        try:
            labels_xml = dom.metadata(lv.VIR_DOMAIN_METADATA_ELEMENT, LABELS_NS, 0)
        except lv.libvirtError:
            labels_xml = None
        return {
            "name": dom.name(),
            "uuid": dom.UUIDString(),
            "state": state,
            "reason": reason,
            "max_kib": dom.maxMemory(),
            "xml": xml,
            "labels": parse_labels(labels_xml),
            "disks": self._disk_sizes(dom, xml),
        }

    def _disk_sizes(self, dom: Any, xml: str) -> list[tuple[DiskFacts, int]]:
        """The domain's writable file/block disks with their capacity in bytes
        (thread side); a disk whose size cannot be read counts 0."""
        sized = []
        for disk in writable_disks(xml):
            try:
                capacity = int(dom.blockInfo(disk.target, 0)[0])
            except self._lv.libvirtError as error:
                log.warning("disk-size-unknown", disk=disk.target, error=str(error))
                capacity = 0
            sized.append((disk, capacity))
        return sized

    async def _domain_on(self, host: str, instance: str) -> dict[str, Any] | None:
        return await self._link(host).call(
            lambda c: self._read_domain(c, instance), what=f"lookup of {instance}"
        )

    def _info(
        self, host: str, dom: Mapping[str, Any], destination: str | None = None
    ) -> InstanceInfo:
        local = self._local_disks(dom.get("disks", ()), host, destination)
        return InstanceInfo(
            name=dom["name"],
            uuid=dom["uuid"],
            host=host,
            memory_bytes=int(dom["max_kib"]) * 1024,
            labels=dom["labels"],
            local_disk_bytes=sum(size for _, size in local),
        )

    def _local_disks(
        self,
        disks: Sequence[tuple[DiskFacts, int]],
        source: str,
        destination: str | None = None,
    ) -> list[tuple[DiskFacts, int]]:
        """The disks that move with the instance: not under a directory that the
        source (and the destination, when one is named) declare shared."""
        shared = [self._hosts[h].shared_storage for h in (source, destination) if h is not None]
        keep = set(local_disks([d for d, _ in disks], *shared))
        return [(d, size) for d, size in disks if d in keep]

    async def describe(self, instance: str, host: str | None = None) -> InstanceInfo:
        if host is not None:
            dom = await self._domain_on(host, instance)
            if dom is None:
                raise UnknownInstance(f"instance {instance!r} is not on host {host}")
            return self._info(host, dom)
        found: list[tuple[str, dict[str, Any]]] = []
        for name in self._hosts:
            try:
                dom = await self._domain_on(name, instance)
            except DriverError:
                continue
            if dom is not None:
                found.append((name, dom))
        running = [(h, d) for h, d in found if d["state"] == self._lv.VIR_DOMAIN_RUNNING]
        for h, d in running or found:
            return self._info(h, d)
        raise UnknownInstance(f"instance {instance!r} is not on any host")

    async def instances_on(self, host: str) -> Sequence[InstanceInfo]:
        """The running (or user-paused) domains of `host`, by name; a domain paused
        because a migration is moving it in or out is not counted (it is mid-move)."""
        lv = self._lv
        moving = {
            getattr(lv, "VIR_DOMAIN_PAUSED_MIGRATION", 2),
            getattr(lv, "VIR_DOMAIN_PAUSED_POSTCOPY", 12),
        }

        def running(conn: Any) -> list[dict[str, Any]]:
            found = []
            flags = getattr(lv, "VIR_CONNECT_LIST_DOMAINS_ACTIVE", 1)
            for dom in conn.listAllDomains(flags):
                state, reason = dom.state()
                if state == lv.VIR_DOMAIN_PAUSED and reason in moving:
                    continue
                if state not in (lv.VIR_DOMAIN_RUNNING, lv.VIR_DOMAIN_PAUSED):
                    continue
                read = self._read_domain(conn, dom.name())
                if read is not None:  # gone between the listing and the lookup
                    found.append(read)
            return sorted(found, key=lambda d: str(d["name"]))

        await self._require_reachable(host)
        domains = await self._link(host).call(running, what="list of running instances")
        return [self._info(host, dom) for dom in domains]

    async def preflight(self, request: MigrationRequest) -> InstanceInfo:
        lv = self._lv
        src, dst = request.source, destination_of(request)
        self._link(src)
        self._link(dst)
        if src == dst:
            raise Refused(f"source and destination are the same host ({src})")
        await self._require_reachable(src)
        await self._require_reachable(dst)
        dom = await self._domain_on(src, request.instance)
        there = await self._domain_on(dst, request.instance)
        if (
            there is not None
            and there["state"] in (lv.VIR_DOMAIN_RUNNING, lv.VIR_DOMAIN_PAUSED)
            and (dom is None or there["uuid"] == dom["uuid"])
        ):
            raise AlreadyOnDestination(f"instance {request.instance!r} already runs on {dst}")
        if dom is None:
            raise UnknownInstance(f"instance {request.instance!r} is not on host {src}")
        if dom["state"] not in (lv.VIR_DOMAIN_RUNNING, lv.VIR_DOMAIN_PAUSED):
            raise NotOnSource(f"instance {request.instance!r} is defined on {src} but not running")
        await self._check_identity(dst, dom["name"], dom["uuid"])
        facts = domain_facts(dom["xml"])
        if facts.hostdevs:
            raise Incompatible(
                f"instance {request.instance!r} has passed-through host devices that cannot "
                f"move: {', '.join(facts.hostdevs)}"
            )
        await self._check_pinning(request, dom["name"], facts)
        need = int(dom["max_kib"]) * 1024
        # The host's own figure; what lmwatch's migrations reserve there is the
        # engine's to subtract (lmwatch.engine.placing). Forced: not checked at all.
        free = await self._link(dst).call(lambda c: c.getFreeMemory(), what="free memory")
        if not request.force and free < need:
            raise InsufficientResources(
                f"{dst} has {free // MIB} MiB free; "
                f"instance {request.instance!r} needs {need // MIB} MiB"
            )
        await self._check_cpu(request, facts)
        info = self._info(src, dom, dst)
        await self._check_disk_room(request, self._local_disks(dom["disks"], src, dst))
        return info

    async def _check_disk_room(
        self, request: MigrationRequest, disks: Sequence[tuple[DiskFacts, int]]
    ) -> None:
        """The destination must be able to create the local disks it receives.

        The hypervisor creates each file disk on the destination in the storage pool
        whose target is the disk's directory, at the disk's full capacity (a raw
        image may be filled completely by the copy). So every such directory needs
        an active pool there with room for the disks that go into it; without one
        the migration would fail only after it started. Block disks are not created:
        the destination must provide the device, which is not checked here.
        """
        lv = self._lv
        by_dir: dict[str, int] = {}
        for disk, size in disks:
            if disk.kind == "file":
                folder = posixpath.dirname(disk.path) or "/"
                by_dir[folder] = by_dir.get(folder, 0) + size
        dst, name = destination_of(request), request.instance
        for folder, need in sorted(by_dir.items()):

            def room(conn: Any, folder: str = folder) -> tuple[str, int, int] | None:
                try:
                    pool = conn.storagePoolLookupByTargetPath(folder)
                except lv.libvirtError as error:
                    if error.get_error_code() != getattr(lv, "VIR_ERR_NO_STORAGE_POOL", 49):
                        raise
                    # the lookup finds active pools only: say so when one is defined
                    for other in conn.listAllStoragePools(0):
                        if pool_target(other.XMLDesc(0)) == posixpath.normpath(folder):
                            return str(other.name()), int(other.info()[0]), 0
                    return None
                with contextlib.suppress(lv.libvirtError):
                    pool.refresh(0)
                state, _capacity, _allocation, available = pool.info()
                return str(pool.name()), int(state), int(available)

            found = await self._link(dst).call(room, what="storage pool lookup")
            if found is None:
                raise InsufficientResources(
                    f"{dst} has no storage pool for {folder}, where instance {name!r} keeps "
                    f"{need // MIB} MiB of local disk; define and start a storage pool with "
                    f"that target on {dst} so the disks can be created there"
                )
            pool_name, state, available = found
            if state != getattr(lv, "VIR_STORAGE_POOL_RUNNING", 2):
                raise InsufficientResources(
                    f"storage pool {pool_name!r} for {folder} on {dst} is not active; start "
                    f"it to receive the local disks of instance {name!r}"
                )
            if available < need:
                raise InsufficientResources(
                    f"{dst} has {available // MIB} MiB free in storage pool {pool_name!r} "
                    f"({folder}); instance {name!r} needs {need // MIB} MiB for its local "
                    f"disks there"
                )

    async def host_info(self, host: str) -> HostInfo:
        """Free memory as the host reports it, and the instances running there.

        An incoming migration takes memory on the host as its pages arrive, while the
        engine reserves all of it from acceptance on: what lmwatch's own running jobs
        to this host have copied so far is added back, so it is not counted twice."""
        lv = self._lv
        self._link(host)
        await self._require_reachable(host)

        def read(conn: Any) -> tuple[int, list[dict[str, Any]]]:
            free = int(conn.getFreeMemory())
            doms = []
            for handle in conn.listAllDomains(lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE):
                try:
                    labels_xml = handle.metadata(lv.VIR_DOMAIN_METADATA_ELEMENT, LABELS_NS, 0)
                except lv.libvirtError:
                    labels_xml = None
                doms.append(
                    {
                        "name": handle.name(),
                        "uuid": handle.UUIDString(),
                        "max_kib": handle.maxMemory(),
                        "labels": parse_labels(labels_xml),
                        "disks": self._disk_sizes(handle, handle.XMLDesc(0)),
                    }
                )
            return free, doms

        free, doms = await self._link(host).call(read, what="host resources")
        free += sum(
            min(job.memory_bytes, job.transferred_seen)
            for job in self._jobs.values()
            if job.destination == host and job.result is None
        )
        return HostInfo(
            name=host, free_memory=free, instances=tuple(self._info(host, d) for d in doms)
        )

    async def _check_identity(self, host: str, name: str, uuid: str) -> None:
        """`host` must not define another instance under `name`, nor this instance's
        uuid under another name: the hypervisor would refuse the incoming instance
        only after the migration started. A definition with the same name and uuid
        (left by an earlier migration, shut off) is fine: it is the same instance."""
        lv = self._lv

        def identities(conn: Any) -> list[tuple[str, str]]:
            found = []
            for lookup, key in ((conn.lookupByName, name), (conn.lookupByUUIDString, uuid)):
                try:
                    other = lookup(key)
                except lv.libvirtError as error:
                    if error.get_error_code() != lv.VIR_ERR_NO_DOMAIN:
                        raise
                    continue
                found.append((str(other.name()), str(other.UUIDString())))
            return found

        found = await self._link(host).call(identities, what=f"lookup of {name}")
        why = identity_refusal(host, name, uuid, found)
        if why is not None:
            raise NameTaken(why)

    async def _check_pinning(
        self, request: MigrationRequest, name: str, facts: DomainFacts
    ) -> None:
        """Host CPUs and memory nodes the instance is pinned to must exist on the
        destination (the hypervisor would fail the incoming instance after start)."""
        if not facts.pinned_cpus and not facts.pinned_nodes:
            return

        def topology(conn: Any) -> HostTopology:
            found = host_topology(conn.getCapabilities())
            return found if found is not None else topology_from_info(conn.getInfo())

        try:
            topo = await self._link(destination_of(request)).call(topology, what="host topology")
        except HostLost:
            raise
        except DriverError as error:
            log.warning("pinning-check-skipped", instance=request.instance, error=str(error))
            return
        why = pinning_missing(name, facts, destination_of(request), topo)
        if why is not None:
            raise Incompatible(why)

    async def _check_cpu(self, request: MigrationRequest, facts: Any) -> None:
        """The destination must run the instance's CPU model.

        Skipped for software-emulated guests (`type='qemu'`): the emulator provides
        the same virtual CPU on any host. For host-passthrough the source host's CPU
        is compared against the destination's.
        """
        lv = self._lv
        if facts.virt_type == "qemu":
            return
        cpu_xml = facts.cpu_xml
        if facts.cpu_mode == "host-passthrough" or cpu_xml is None:
            caps = await self._link(request.source).call(
                lambda c: c.getCapabilities(), what="capabilities"
            )
            cpu_xml = host_cpu_xml(caps)
        if cpu_xml is None:
            return
        xml = cpu_xml

        def compare(conn: Any) -> int:
            if facts.cpu_mode in ("custom", None) and hasattr(conn, "compareHypervisorCPU"):
                return int(
                    conn.compareHypervisorCPU(
                        None, facts.arch, facts.machine, facts.virt_type, xml, 0
                    )
                )
            return int(conn.compareCPU(xml, 0))

        try:
            result = await self._link(destination_of(request)).call(compare, what="CPU comparison")
        except HostLost:
            raise
        except DriverError as error:
            log.warning("cpu-check-skipped", instance=request.instance, error=str(error))
            return
        if result == lv.VIR_CPU_COMPARE_INCOMPATIBLE:
            raise Incompatible(
                f"the CPU of instance {request.instance!r} "
                f"is not available on {destination_of(request)}"
            )

    async def capabilities(self, source: str, destination: str) -> Capabilities:
        key = (source, destination)
        if key in self._caps:
            return self._caps[key]
        versions = []
        for host in (source, destination):
            try:
                versions.append(
                    await self._link(host).call(
                        lambda c: (int(c.getLibVersion()), int(c.getVersion())),
                        what="version check",
                    )
                )
            except DriverError as error:
                raise HostUnreachable(
                    f"host {host} does not answer: {neutral_text(str(error))}"
                ) from error

        def both(minimum: tuple[int, int]) -> bool:
            return all(lib >= minimum[0] and hv >= minimum[1] for lib, hv in versions)

        lib_src, hv_src = versions[0]
        caps = Capabilities(
            handover=both(HANDOVER_VERSIONS),
            slow_down=both(SLOW_DOWN_VERSIONS),
            measure_change_rate=(
                lib_src >= CHANGE_RATE_VERSIONS[0]
                and hv_src >= CHANGE_RATE_VERSIONS[1]
                and hasattr(self._lv.virDomain, "startDirtyRateCalc")
            ),
            # The configured cap is what a migration can expect at most; the network
            # itself is not measured before start.
            bandwidth=self._hosts[destination].bandwidth,
        )
        self._caps[key] = caps
        return caps

    async def measure_change_rate(self, instance: str, host: str) -> ChangeRate | None:
        """Mean of a few short page-sampling readings (each over `period` seconds);
        None when unsupported."""
        lv = self._lv
        unsupported = {
            getattr(lv, name)
            for name in (
                "VIR_ERR_NO_SUPPORT",
                "VIR_ERR_OPERATION_UNSUPPORTED",
                "VIR_ERR_ARGUMENT_UNSUPPORTED",
            )
            if hasattr(lv, name)
        }
        readings: list[float] = []
        try:
            for _ in range(self._readings):
                value = await self._one_change_rate(instance, host)
                if value is None:
                    return None
                readings.append(value)
        except AttributeError:
            return None
        except HypervisorError as error:
            if error.code in unsupported:
                return None
            raise
        return ChangeRate(sum(readings) / len(readings) * MIB, float(self._period))

    async def _one_change_rate(self, instance: str, host: str) -> float | None:
        lv = self._lv
        period = self._period
        await self._on_domain(
            host,
            instance,
            lambda d: d.startDirtyRateCalc(period, 0),
            what="change-rate measurement",
        )

        def read(conn: Any) -> Mapping[str, Any]:
            dom = conn.lookupByName(instance)
            stats = conn.domainListGetStats([dom], lv.VIR_DOMAIN_STATS_DIRTYRATE, 0)
            return stats[0][1] if stats else {}

        await self._clock.sleep(period)
        for _ in range(int(10 / POLL)):
            stats = await self._link(host).call(read, what="change-rate reading")
            if stats.get("dirtyrate.calc_status") == DIRTYRATE_MEASURED:
                value = stats.get("dirtyrate.megabytes_per_second")
                return float(value) if isinstance(value, int | float) else None
            await self._clock.sleep(POLL)
        raise DriverError(f"host {host}: the change-rate measurement of {instance} did not finish")

    # -- events ------------------------------------------------------------------------

    def _setup_events(self, host: str, conn: Any) -> list[int]:
        """Register domain event callbacks on a new connection (thread side)."""
        lv = self._lv
        ids = []
        handlers: list[tuple[int, Callable[..., None]]] = [
            (lv.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle),
            (lv.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION, self._on_iteration),
            (lv.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._on_job_completed),
        ]
        for event_id, handler in handlers:
            try:
                ids.append(conn.domainEventRegisterAny(None, event_id, handler, host))
            except lv.libvirtError as error:
                log.warning("event-unavailable", host=host, event_id=event_id, error=str(error))
        return ids

    def _jobs_for(self, dom: Any) -> list[_Job]:
        try:
            name = dom.name()
        except Exception:
            return []
        return [j for j in self._jobs.values() if j.name == name and j.result is None]

    def _on_lifecycle(self, conn: Any, dom: Any, event: int, detail: int, host: str) -> None:
        lv = self._lv
        for job in self._jobs_for(dom):
            if event == lv.VIR_DOMAIN_EVENT_SUSPENDED and host == job.source:
                if detail == lv.VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED:
                    job.final_stop = True
                    if job.final_stop_at is None:
                        job.final_stop_at = self._clock.now()
                elif detail == lv.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY:
                    job.handed_over = True
                    if job.handover_stop_at is None:
                        job.handover_stop_at = self._clock.now()
            elif event == lv.VIR_DOMAIN_EVENT_RESUMED:
                if detail == lv.VIR_DOMAIN_EVENT_RESUMED_POSTCOPY:
                    job.handed_over = True
                if host == job.destination and job.resumed_at is None:
                    job.resumed_at = self._clock.now()
                elif host == job.source:
                    job.source_resumed_at = self._clock.now()
            elif event == lv.VIR_DOMAIN_EVENT_STOPPED and host == job.source:
                now = self._clock.now()
                job.ended_at = now if job.ended_at is None else job.ended_at
                job.end_event_at = now if job.end_event_at is None else job.end_event_at
            job.changed.set()

    def _on_iteration(self, conn: Any, dom: Any, iteration: int, host: str) -> None:
        for job in self._jobs_for(dom):
            job.passes_seen = max(job.passes_seen, int(iteration))
            job.changed.set()

    def _on_job_completed(self, conn: Any, dom: Any, params: Mapping[str, Any], host: str) -> None:
        for job in self._jobs_for(dom):
            if host == job.source and job.completed_stats is None:
                job.completed_stats = dict(params)
                now = self._clock.now()
                job.ended_at = now if job.ended_at is None else job.ended_at
                job.end_event_at = now if job.end_event_at is None else job.end_event_at
            job.changed.set()

    async def wait_event(self, migration_id: str, timeout: float) -> None:
        job = self._jobs.get(migration_id)
        if job is None or job.result is not None or (job.task is not None and job.task.done()):
            return
        waiter = asyncio.ensure_future(job.changed.wait())
        sleeper = asyncio.ensure_future(self._clock.sleep(timeout))
        try:
            await asyncio.wait({waiter, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            sleeper.cancel()

    # -- start -------------------------------------------------------------------------

    async def start(self, migration_id: str, request: MigrationRequest, plan: StartPlan) -> None:
        lv = self._lv
        to = destination_of(request)
        dest = self._hosts.get(to)
        self._link(request.source)
        if dest is None:
            raise UnknownHost(f"unknown host {to!r}")
        caps = await self.capabilities(request.source, to)
        if plan.arm_handover and not caps.handover:
            raise Incompatible(f"the hypervisors on {request.source} and {to} cannot hand over")
        if plan.arm_slow_down and not caps.slow_down:
            raise Incompatible(
                f"the hypervisors on {request.source} and {to} cannot slow the guest"
            )
        max_downtime = downtime_ms(plan.starting_budget)

        def prepare(dom: Any) -> tuple[int, list[tuple[DiskFacts, int]]]:
            dom.migrateSetMaxDowntime(max_downtime, 0)
            return int(dom.maxMemory()) * 1024, self._disk_sizes(dom, dom.XMLDesc(0))

        memory_bytes, disks = await self._on_domain(
            request.source, request.instance, prepare, what="setting the blackout budget"
        )
        local = self._local_disks(disks, request.source, to)
        call = migrate_call(
            lv,
            plan,
            instance=request.instance,
            migration_address=dest.migration_address,
            link_bandwidth=dest.bandwidth,
            disks=[d.target for d, _ in local],
            disks_address=dest.disks_address,
        )
        job = _Job(
            id=migration_id,
            request=request,
            plan=plan,
            name=request.instance,
            blackout_budget=plan.starting_budget,
            started_at=self._clock.now(),
            memory_bytes=memory_bytes,
            disk_bytes=sum(size for _, size in local),
        )
        self._jobs[migration_id] = job
        peer_uri = dest.peer_uri or dest.uri
        with contextlib.suppress(DriverError):  # for its events (the instance resumed there)
            await self._link(destination_of(request)).connection()
        link = self._link(request.source)
        conn = await link.connection()

        def migrate() -> None:
            dom = conn.lookupByName(request.instance)
            dom.migrateToURI3(peer_uri, dict(call.params), call.flags)

        job.migrate_conn = conn
        job.task = in_daemon_thread(migrate, name=f"lmw-migrate-{migration_id}")
        job.task.add_done_callback(lambda fut: self._migrate_done(job, fut, link))
        log.info(
            "migration-started",
            migration=migration_id,
            instance=request.instance,
            source=request.source,
            destination=destination_of(request),
            flags=call.flags,
            local_disks=",".join(d.target for d, _ in local) or None,
        )
        await self._wait_accepted(job)

    def _migrate_done(self, job: _Job, fut: asyncio.Future[None], link: HostLink) -> None:
        error = None if fut.cancelled() else fut.exception()
        if job.task is not fut:  # detached: the job is followed on a new connection
            log.info("migrate-call-returned-late", migration=job.id, error=str(error))
            return
        now = self._clock.now()
        job.returned_at = now
        if job.ended_at is None:
            job.ended_at = now
        if error is not None:
            if isinstance(error, self._lv.libvirtError):
                job.error = str(link.translate(error, "the migration", migration=job.id))
            else:
                log.warning("migrate-call-failed", migration=job.id, error=repr(error))
                job.error = (
                    f"the migration failed: {neutral_text(str(error) or type(error).__name__)}"
                )
        job.changed.set()

    async def _wait_accepted(self, job: _Job) -> None:
        """Return once the source shows the job (or the migrate call already ended)."""
        waited = 0.0
        while waited < START_ACCEPT_TIMEOUT:
            assert job.task is not None
            if job.task.done():
                if job.error is not None:
                    try:
                        migrating = await self._still_migrating(job)
                    except HostLost:
                        raise
                    except DriverError:
                        migrating = False  # the call failed; report its error, not this one
                    if not migrating:
                        self._jobs.pop(job.id, None)
                        raise DriverError(job.error)
                return
            try:
                stats = await self._job_stats(job)
            except DriverError:
                stats = {}
            if stats.get("type", self._lv.VIR_DOMAIN_JOB_NONE) != self._lv.VIR_DOMAIN_JOB_NONE:
                job.last_stats = dict(stats)
                return
            await asyncio.sleep(POLL)  # the migrate thread is real: wait real time for it
            waited += POLL

    # -- progress ----------------------------------------------------------------------

    async def _job_stats(
        self, job: _Job, flags: int = 0, host: str | None = None
    ) -> dict[str, Any]:
        return dict(
            await self._on_domain(
                host or job.source,
                job.name,
                lambda d: d.jobStats(flags),
                what="job statistics",
                migration=job.id,
            )
        )

    async def _still_migrating(self, job: _Job) -> bool:
        """Whether the source still runs an outgoing migration job for the instance."""
        lv = self._lv
        try:
            stats = await self._job_stats(job)
        except HypervisorError as error:
            if isinstance(error, HostLost) or not job_has_ended(lv, error.code):
                raise  # cannot tell now; the caller asks again later
            return False
        if stats.get("type", lv.VIR_DOMAIN_JOB_NONE) in (
            lv.VIR_DOMAIN_JOB_NONE,
            lv.VIR_DOMAIN_JOB_COMPLETED,
        ):
            return False
        operation = stats.get("operation")
        return operation is None or operation == lv.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT

    def _job(self, migration_id: str) -> _Job:
        job = self._jobs.get(migration_id)
        if job is None:
            raise DriverError(f"no migration {migration_id} is known to this driver")
        return job

    async def sample(self, migration_id: str) -> Sample:
        job = self._job(migration_id)
        job.changed.clear()
        self._detach_if_lost(job)
        if job.result is None and self._ended(job):
            await self._conclude(job)
        if job.result is not None:
            return self._terminal_sample(job)
        lv = self._lv
        try:
            stats = await self._job_stats(job)
        except HostLost:
            self._detach_if_lost(job)
            if job.task is None:  # nobody's migrate call will tell: ask where it runs
                with contextlib.suppress(DriverError):  # undecided: say the host is lost
                    await self._conclude(job)
                if job.result is not None:
                    return self._terminal_sample(job)
            raise
        except HypervisorError as error:
            if not job_has_ended(lv, error.code):
                raise  # the statistics could not be read, not "the job ended": retried
            stats = {}  # "domain is not running" / gone: the job has just ended
        if stats.get("type", lv.VIR_DOMAIN_JOB_NONE) == lv.VIR_DOMAIN_JOB_NONE:
            if job.adopted:
                await self._conclude(job)
                if job.result is not None:
                    return self._terminal_sample(job)
            # the job is ending: completing, unless our abort is ending it
            phase = job.running_phase() if job.aborted else Phase.COMPLETING
            return self._sample_from(job, job.last_stats, phase)
        if job.handed_over:  # a handover whose link broke shows only in the source's state
            at_src, src_reason = await self._where(job.source, job.name)
            if handover_broke(lv, at_src, src_reason):
                self._handover_broke(job)
                return self._terminal_sample(job)
        job.last_stats = {**job.last_stats, **stats}  # early or late readings lack keys
        self._note_disk_rate(job, stats)
        job.max_slowdown = max(job.max_slowdown, slowdown_from(stats))
        processed = stats.get("memory_processed")
        if isinstance(processed, int | float):
            job.transferred_seen = max(job.transferred_seen, int(processed))
        return self._sample_from(job, job.last_stats, job.running_phase())

    def _note_disk_rate(self, job: _Job, stats: Mapping[str, Any]) -> None:
        """Keep a measured disk copy rate in `job.last_stats['disk_bps']` when the
        statistics give none: from `disk_processed` between readings."""
        processed = stats.get("disk_processed")
        if "disk_bps" in stats or not isinstance(processed, int | float):
            return
        now = self._clock.now()
        rate = disk_rate_between(job.disk_seen, now, int(processed))
        if job.disk_seen is None or rate is not None or int(processed) < job.disk_seen[1]:
            job.disk_seen = (now, int(processed))
        if rate is not None:
            job.last_stats["disk_bps"] = rate

    def _ended(self, job: _Job) -> bool:
        if job.task is not None:
            return job.task.done()
        return job.completed_stats is not None or job.ended_at is not None

    def _detach_if_lost(self, job: _Job) -> None:
        """Stop waiting for a migrate call whose connection is gone; follow the job instead.

        A call on a connection whose daemon went away may never return. The job itself
        lives on (or ends) in the source's daemon: it is followed from then on like an
        adopted one, through statistics and events on a new connection and, once the
        source shows no job, from where the instance runs.
        """
        if job.task is None or job.task.done() or job.migrate_conn is None:
            return
        link = self._links.get(job.source)
        if link is not None and link.current is job.migrate_conn:
            return
        log.warning("migration-detached", migration=job.id, host=job.source)
        job.task, job.migrate_conn, job.adopted = None, None, True
        if job.error is None:
            job.error = f"host {job.source}: the connection was lost during the migration"

    def _sample_from(self, job: _Job, stats: Mapping[str, Any], phase: Phase) -> Sample:
        return stats_to_sample(
            stats,
            now=self._clock.now(),
            phase=phase,
            blackout_budget=job.blackout_budget,
            passes_seen=job.passes_seen,
            memory_bytes=job.memory_bytes,
            disk_bytes=job.disk_bytes,
        )

    def _handover_broke(self, job: _Job) -> None:
        """End a handover whose link broke (`handover_broke`): the source's job stays
        open but moves nothing until the move is resumed, which this driver does not
        do (the rig's destination daemon went away on each resume tried). The migration ends
        failed, the instance counted on neither host, so that no one stops the source
        thinking it moved."""
        error = handover_broke_text(job.source, job.destination)
        job.adopted, job.task = True, None
        job.handed_over = True
        job.result = JobResult(
            phase=Phase.FAILED,
            transferred=job.transferred_seen,
            passes=max(job.passes_seen, int(job.last_stats.get("memory_iteration", 0) or 0)),
            paused=job.paused,
            handed_over=True,
            slowdown=job.max_slowdown,
            error=error,
            running_on=None,
        )
        log.error(
            "handover-broke",
            migration=job.id,
            instance=job.name,
            source=job.source,
            destination=job.destination,
        )

    def _terminal_sample(self, job: _Job) -> Sample:
        assert job.result is not None
        base = self._sample_from(job, job.completed_stats or job.last_stats, job.result.phase)
        remaining = 0 if job.result.phase is Phase.COMPLETED else base.memory_remaining
        disks = base
        if job.completed_stats and not job.completed_stats.get("disk_total"):
            disks = self._sample_from(job, job.last_stats, job.result.phase)
        return Sample(
            time=base.time,
            memory_total=base.memory_total,
            memory_remaining=remaining,
            memory_transferred=job.result.transferred or base.memory_transferred,
            transfer_rate=0.0,
            change_rate=0.0,
            passes=max(base.passes, job.result.passes),
            phase=job.result.phase,
            blackout_budget=job.blackout_budget,
            slowdown=0.0,
            expected_blackout=None,
            disk_total=disks.disk_total,
            disk_remaining=0 if job.result.phase is Phase.COMPLETED else disks.disk_remaining,
            disk_rate=0.0,
        )

    async def result(self, migration_id: str) -> JobResult:
        job = self._job(migration_id)
        self._detach_if_lost(job)
        if job.result is None:
            if not self._ended(job):
                raise DriverError(f"migration {migration_id} has not ended")
            await self._conclude(job)
        if job.result is None:
            raise DriverError(f"migration {migration_id} is still running")
        return job.result

    # -- outcome -------------------------------------------------------------------------

    async def _where(self, host: str, name: str) -> tuple[Where, int | None]:
        try:
            state = await self._on_domain(host, name, lambda d: d.state(), what="state")
        except UnknownHost:
            return Where.UNKNOWN, None
        except DriverError as error:
            if self._absent(error):
                return Where.ABSENT, None
            return Where.UNKNOWN, None
        return where_from_state(self._lv, state[0]), int(state[1])

    async def _completed_stats(self, job: _Job) -> dict[str, Any] | None:
        if job.completed_stats:
            return job.completed_stats
        lv = self._lv
        for host in (job.source, job.destination):
            with contextlib.suppress(DriverError):
                stats = await self._job_stats(job, lv.VIR_DOMAIN_JOB_STATS_COMPLETED, host)
                if stats and stats.get("type", lv.VIR_DOMAIN_JOB_NONE) != lv.VIR_DOMAIN_JOB_NONE:
                    job.completed_stats = stats
                    return stats
        return None

    async def _conclude(self, job: _Job) -> None:
        """Decide how an ended job finished, from where the instance runs now.

        Leaves `job.result` unset (and adopts the job) when the source still runs the
        migration, e.g. after our connection dropped; raises DriverError when a host
        cannot be asked and the answer depends on it.
        """
        lv = self._lv
        at_src, src_reason = await self._where(job.source, job.name)
        if handover_broke(lv, at_src, src_reason):
            self._handover_broke(job)
            return
        if at_src in (Where.RUNNING, Where.PAUSED) and await self._still_migrating(job):
            if not job.adopted:
                log.warning("migration-adopted", migration=job.id, why=job.error)
            job.adopted, job.task, job.error, job.ended_at = True, None, None, None
            return
        at_dst, dst_reason = await self._where(job.destination, job.name)
        outcome = decide_outcome(
            job.source,
            job.destination,
            at_src,
            at_dst,
            error=job.error,
            cancel_requested=job.cancel_requested,
            # ours to resume: our pause, or the job's final stop of a running instance
            # that the hypervisor left in place when the job failed
            we_paused=job.paused
            or (job.final_stop_at is not None and src_reason == lv.VIR_DOMAIN_PAUSED_MIGRATION),
            after_restart=job.after_restart,
        )
        if outcome.undecided:
            raise DriverError(
                f"migration {job.id} ended but where {job.name} runs cannot be told yet "
                f"({job.source}: {at_src}, {job.destination}: {at_dst})"
            )
        if (
            outcome.resume_on == job.destination and dst_reason == lv.VIR_DOMAIN_PAUSED_MIGRATION
        ):  # an incoming instance, not a paused one: libvirt finishes or discards it
            raise DriverError(
                f"migration {job.id}: {job.name} is still arriving on {job.destination}"
            )
        note = None
        if outcome.resume_on is not None:
            await self._on_domain(
                outcome.resume_on,
                job.name,
                lambda d: d.resume(),
                what="resuming the instance",
                migration=job.id,
            )
            note = (
                f"the instance was paused on {outcome.resume_on} afterwards and was resumed there"
            )
            log.warning("instance-resumed", migration=job.id, host=outcome.resume_on)
        completed = await self._completed_stats(job) if outcome.phase is Phase.COMPLETED else None
        blackout = measured_blackout(completed)
        if outcome.phase is Phase.COMPLETED and job.paused and job.paused_at is not None:
            blackout = max(blackout or 0.0, self._resumed_at(job, completed) - job.paused_at)
        elif outcome.phase is Phase.COMPLETED and blackout is None:
            blackout = self._blackout_from_events(job)
        elif outcome.phase is not Phase.COMPLETED and outcome.running_on == job.source:
            blackout = self._stop_on_the_source(job, resumed_by_us=outcome.resume_on == job.source)
        passes = max(
            job.passes_seen,
            int((completed or {}).get("memory_iteration", 0) or 0),
            int(job.last_stats.get("memory_iteration", 0) or 0),
        )
        error = neutral_text(outcome.error) if outcome.error else None
        note = neutral_text(note) if note else None
        job.result = JobResult(
            phase=outcome.phase,
            blackout_seconds=blackout,
            transferred=transferred_from(completed, {"memory_processed": job.transferred_seen}),
            passes=passes,
            paused=job.paused,
            # switched: an instance running on the source again was never handed over,
            # whatever was asked (the hosts switch some time after the request)
            handed_over=(job.handed_over or dst_reason == lv.VIR_DOMAIN_RUNNING_POSTCOPY)
            and outcome.running_on != job.source,
            slowdown=max(job.max_slowdown, slowdown_from(completed or {})),
            error=error,
            running_on=outcome.running_on,
            note=note,
        )
        log.info(
            "migration-ended",
            migration=job.id,
            phase=outcome.phase.value,
            running_on=outcome.running_on,
            blackout=blackout,
            error=error,
        )
        job.changed.set()

    @staticmethod
    def _blackout_from_events(job: _Job) -> float | None:
        """The final stop of a completed job from its events, when the hypervisor's own
        figure is missing: the migrate call can return before the source's job-completed
        event, and with the source's definition removed its completed statistics are gone.
        From the source's stop (for the last copy, or for the handover) to the instance
        running on the destination; None when either event was not seen.
        """
        began = job.final_stop_at if job.final_stop_at is not None else job.handover_stop_at
        if began is None or job.resumed_at is None or job.resumed_at < began:
            return None
        return job.resumed_at - began

    def _stop_on_the_source(self, job: _Job, *, resumed_by_us: bool) -> float | None:
        """How long a stop for the final copy (the hypervisor's, or our pause) that did
        not complete kept the instance stopped on the source; None when it never stopped.

        The hypervisor serves no statistics call during its final copy, so samples cannot
        tell when it began: the stop's event does. It ends when the instance runs on the
        source again (its resume event, or our resume when nothing resumed it).
        """
        began = job.paused_at if job.paused else job.final_stop_at
        if began is None:
            return None
        now = self._clock.now()
        if resumed_by_us:
            ended = now
        elif job.source_resumed_at is not None and job.source_resumed_at >= began:
            ended = job.source_resumed_at
        else:
            ended = job.ended_at if job.ended_at is not None else now
        return max(0.0, ended - began)

    def _resumed_at(self, job: _Job, completed: Mapping[str, Any] | None) -> float:
        """When the instance ran again on the destination (the end of a pause's blackout).

        The destination's resume event says it exactly. Without it: the earliest of
        the job's end by its completed statistics (start + elapsed time), the source's
        job-completed or stopped event, and the migrate call's return; the last two
        come a second or more after the resume (the source confirms afterwards).
        """
        if job.resumed_at is not None:
            return job.resumed_at
        candidates = [t for t in (job.end_event_at, job.returned_at) if t is not None]
        elapsed = (completed or {}).get("time_elapsed")
        if isinstance(elapsed, int | float) and elapsed > 0:
            candidates.append(job.started_at + float(elapsed) / 1000.0)
        return min(candidates) if candidates else (job.ended_at or self._clock.now())

    # -- actions -----------------------------------------------------------------------

    async def _act(self, job: _Job, fn: Callable[[Any], Any], what: str) -> None:
        lv = self._lv
        try:
            await self._on_domain(job.source, job.name, fn, what=what, migration=job.id)
        except HypervisorError as error:
            refusals = {
                lv.VIR_ERR_OPERATION_INVALID,
                getattr(lv, "VIR_ERR_OPERATION_UNSUPPORTED", -1),
            }
            if error.code in refusals:
                raise ActionRefused(neutral_text(str(error))) from error
            raise

    async def set_blackout_budget(self, migration_id: str, seconds: float) -> None:
        job = self._job(migration_id)
        ms = downtime_ms(seconds)
        await self._act(
            job, lambda d: d.migrateSetMaxDowntime(ms, 0), "setting the blackout budget"
        )
        job.blackout_budget = seconds

    async def set_bandwidth(self, migration_id: str, bytes_per_second: float | None) -> None:
        job = self._job(migration_id)
        mib = bandwidth_mib_s(bytes_per_second, self._hosts[job.destination].bandwidth)
        speed = UNLIMITED_MIB_S if mib is None else mib
        await self._act(job, lambda d: d.migrateSetMaxSpeed(speed, 0), "setting the bandwidth")

    async def pause(self, migration_id: str) -> None:
        job = self._job(migration_id)
        if job.handed_over:
            raise ActionRefused("the instance already runs on the destination (handed over)")
        await self._act(job, lambda d: d.suspend(), "pausing the instance")
        job.paused = True
        job.paused_at = self._clock.now()
        job.changed.set()

    async def handover(self, migration_id: str) -> None:
        job = self._job(migration_id)
        if not job.plan.arm_handover:
            raise ActionRefused("handover was not armed when this migration started")
        if job.handed_over:
            return
        await self._act(job, lambda d: d.migrateStartPostCopy(0), "handing over")
        job.handed_over = True
        job.changed.set()

    async def cancel(self, migration_id: str) -> None:
        """Abort the job. Once an abort of ours was accepted, the job counts as cancelled:
        a later cancel that is refused (the job is already ending) changes nothing."""
        job = self._job(migration_id)
        if job.handed_over:
            raise ActionRefused("cannot cancel: the instance already runs on the destination")
        async with job.cancelling:  # one abort at a time; a second sees the first's answer
            if job.result is not None:
                if job.result.phase is Phase.CANCELLED:
                    return
                raise ActionRefused(f"the migration has already ended ({job.result.phase.value})")
            job.cancel_requested = True
            try:
                await self._act(job, lambda d: d.abortJob(), "cancelling")
            except DriverError as error:
                if job.aborted:
                    log.info("cancel-under-way", migration=job.id, error=str(error))
                    return
                job.cancel_requested = False
                raise
            job.aborted = True

    # -- restart -------------------------------------------------------------------------

    async def reattach(
        self,
        migration_id: str,
        request: MigrationRequest,
        plan: StartPlan,
        *,
        paused: bool = False,
    ) -> JobResult | None:
        lv = self._lv
        self._link(request.source)
        self._link(destination_of(request))
        job = _Job(
            id=migration_id,
            request=request,
            plan=plan,
            name=request.instance,
            blackout_budget=plan.blackout_budget,
            started_at=self._clock.now(),
            adopted=True,
            after_restart=True,
            # ours to resume on the source if the job ended without completing (a job
            # still running says afresh below whether the instance is paused)
            paused=paused,
        )
        self._jobs[migration_id] = job
        at_src, reason = await self._where(request.source, request.instance)
        if at_src is Where.UNKNOWN:
            self._jobs.pop(migration_id, None)
            raise DriverError(
                f"host {request.source} does not answer; cannot find migration {migration_id}"
            )
        if handover_broke(lv, at_src, reason):  # its job looks alive, but nothing moves
            self._handover_broke(job)
            return job.result
        try:
            migrating = at_src in (Where.RUNNING, Where.PAUSED) and await self._still_migrating(job)
        except DriverError:
            self._jobs.pop(migration_id, None)  # asked again when the engine retries
            raise
        if migrating:
            job.handed_over = at_src is Where.PAUSED and reason == lv.VIR_DOMAIN_PAUSED_POSTCOPY
            job.paused = at_src is Where.PAUSED and reason == lv.VIR_DOMAIN_PAUSED_USER
            with contextlib.suppress(DriverError):
                job.memory_bytes = await self._on_domain(
                    job.source, job.name, lambda d: int(d.maxMemory()) * 1024, what="memory size"
                )
            with contextlib.suppress(DriverError, AttributeError):
                # the budget in force: the plan's, a raised one, or the first pass's
                job.blackout_budget = await self._on_domain(
                    job.source,
                    job.name,
                    lambda d: int(d.migrateGetMaxDowntime(0)) / 1000.0,
                    what="blackout budget",
                )
            with contextlib.suppress(DriverError):
                disks = await self._on_domain(
                    job.source,
                    job.name,
                    lambda d: self._disk_sizes(d, d.XMLDesc(0)),
                    what="disk sizes",
                )
                local = self._local_disks(disks, job.source, job.destination)
                job.disk_bytes = sum(size for _, size in local)
            with contextlib.suppress(DriverError):
                job.last_stats = await self._job_stats(job)
                job.transferred_seen = int(job.last_stats.get("memory_processed", 0) or 0)
                elapsed = job.last_stats.get("time_elapsed")
                if isinstance(elapsed, int | float):  # when the job itself started
                    job.started_at = self._clock.now() - float(elapsed) / 1000.0
            with contextlib.suppress(DriverError):  # for its events (the instance resumed there)
                await self._link(job.destination).connection()
            log.info("migration-reattached", migration=migration_id, handed_over=job.handed_over)
            return None
        try:
            await self._conclude(job)
        except DriverError:
            self._jobs.pop(migration_id, None)
            raise
        return job.result

    async def close(self) -> None:
        for link in self._links.values():
            with contextlib.suppress(Exception):
                await link.close()
        self._links.clear()


def _ignore_error(context: Any, error: Any) -> None:
    """libvirt error handler that keeps quiet."""


def _looks_like_uuid(text: str) -> bool:
    try:
        uuidlib.UUID(text)
    except ValueError:
        return False
    return True
