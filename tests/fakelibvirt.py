"""A small fake of the `libvirt` and `libvirtaio` modules for driver unit tests.

It models what the driver relies on: hosts reached by URI, domains with a state,
XML, metadata and a migration job whose statistics the test sets; a migrate call
that blocks (in the driver's thread) until the test completes, fails or aborts
it; domain events the test fires. Constants carry libvirt's real values.
"""

from __future__ import annotations

import threading
import types
from dataclasses import dataclass, field
from typing import Any

CONSTANTS: dict[str, Any] = {
    "VIR_ERR_INTERNAL_ERROR": 1,
    "VIR_ERR_NO_SUPPORT": 3,
    "VIR_ERR_OPERATION_FAILED": 9,
    "VIR_ERR_SYSTEM_ERROR": 38,
    "VIR_ERR_RPC": 39,
    "VIR_ERR_NO_DOMAIN": 42,
    "VIR_ERR_OPERATION_INVALID": 55,
    "VIR_ERR_OPERATION_TIMEOUT": 68,
    "VIR_ERR_OPERATION_ABORTED": 78,
    "VIR_ERR_OPERATION_UNSUPPORTED": 84,
    "VIR_ERR_ARGUMENT_UNSUPPORTED": 74,
    "VIR_FROM_QEMU": 10,
    "VIR_FROM_RPC": 7,
    "VIR_MIGRATE_LIVE": 1,
    "VIR_MIGRATE_PEER2PEER": 2,
    "VIR_MIGRATE_PERSIST_DEST": 8,
    "VIR_MIGRATE_UNDEFINE_SOURCE": 16,
    "VIR_MIGRATE_AUTO_CONVERGE": 8192,
    "VIR_MIGRATE_POSTCOPY": 32768,
    "VIR_MIGRATE_NON_SHARED_DISK": 64,
    "VIR_MIGRATE_PARAM_MIGRATE_DISKS": "migrate_disks",
    "VIR_MIGRATE_PARAM_DISKS_URI": "disks_uri",
    "VIR_MIGRATE_PARAM_DISKS_PORT": "disks_port",
    "VIR_ERR_NO_STORAGE_POOL": 49,
    "VIR_STORAGE_POOL_INACTIVE": 0,
    "VIR_STORAGE_POOL_RUNNING": 2,
    "VIR_MIGRATE_PARAM_URI": "migrate_uri",
    "VIR_MIGRATE_PARAM_LISTEN_ADDRESS": "listen_address",
    "VIR_MIGRATE_PARAM_BANDWIDTH": "bandwidth",
    "VIR_MIGRATE_PARAM_DEST_NAME": "destination_name",
    "VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL": "auto_converge.initial",
    "VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT": "auto_converge.increment",
    "VIR_DOMAIN_RUNNING": 1,
    "VIR_DOMAIN_BLOCKED": 2,
    "VIR_DOMAIN_PAUSED": 3,
    "VIR_DOMAIN_SHUTOFF": 5,
    "VIR_DOMAIN_PMSUSPENDED": 7,
    "VIR_DOMAIN_RUNNING_MIGRATED": 2,
    "VIR_DOMAIN_RUNNING_MIGRATION_CANCELED": 6,
    "VIR_DOMAIN_RUNNING_POSTCOPY": 10,
    "VIR_DOMAIN_PAUSED_USER": 1,
    "VIR_DOMAIN_PAUSED_MIGRATION": 2,
    "VIR_DOMAIN_PAUSED_POSTCOPY": 12,
    "VIR_DOMAIN_PAUSED_POSTCOPY_FAILED": 13,
    "VIR_DOMAIN_RUNNING_POSTCOPY_FAILED": 11,
    "VIR_DOMAIN_JOB_NONE": 0,
    "VIR_DOMAIN_JOB_BOUNDED": 1,
    "VIR_DOMAIN_JOB_UNBOUNDED": 2,
    "VIR_DOMAIN_JOB_COMPLETED": 3,
    "VIR_DOMAIN_JOB_FAILED": 4,
    "VIR_DOMAIN_JOB_CANCELLED": 5,
    "VIR_DOMAIN_JOB_STATS_COMPLETED": 1,
    "VIR_DOMAIN_JOB_OPERATION_MIGRATION_IN": 4,
    "VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT": 5,
    "VIR_DOMAIN_METADATA_ELEMENT": 2,
    "VIR_CONNECT_LIST_DOMAINS_ACTIVE": 1,
    "VIR_DOMAIN_STATS_DIRTYRATE": 512,
    "VIR_CPU_COMPARE_INCOMPATIBLE": 0,
    "VIR_CPU_COMPARE_IDENTICAL": 1,
    "VIR_CPU_COMPARE_SUPERSET": 2,
    "VIR_DOMAIN_EVENT_ID_LIFECYCLE": 0,
    "VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION": 20,
    "VIR_DOMAIN_EVENT_ID_JOB_COMPLETED": 21,
    "VIR_DOMAIN_EVENT_SUSPENDED": 3,
    "VIR_DOMAIN_EVENT_RESUMED": 4,
    "VIR_DOMAIN_EVENT_STOPPED": 5,
    "VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED": 1,
    "VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY": 7,
    "VIR_DOMAIN_EVENT_RESUMED_MIGRATED": 1,
    "VIR_DOMAIN_EVENT_RESUMED_POSTCOPY": 3,
    "VIR_DOMAIN_EVENT_STOPPED_MIGRATED": 3,
}
C = types.SimpleNamespace(**CONSTANTS)
ABORTED = "operation aborted: migration out job: canceled by client"


class libvirtError(Exception):
    def __init__(self, message: str, code: int = 1, domain: int = 10) -> None:
        super().__init__(message)
        self._code, self._domain, self._message = code, domain, message

    def get_error_code(self) -> int:
        return self._code

    def get_error_domain(self) -> int:
        return self._domain

    def get_error_message(self) -> str:
        return self._message


def no_domain(name: str) -> libvirtError:
    return libvirtError(
        f"Domain not found: no domain with matching name '{name}'", C.VIR_ERR_NO_DOMAIN
    )


def gone() -> libvirtError:
    return libvirtError(
        "End of file while reading data: Input/output error", C.VIR_ERR_SYSTEM_ERROR, 7
    )


def disk_xml(target: str, path: str, kind: str = "file", extra: str = "") -> str:
    """A `<disk>` element: a file or block disk at `path` seen by the guest as `target`."""
    attr = "file" if kind == "file" else "dev"
    return (
        f"<disk type='{kind}' device='disk'><driver name='qemu' type='raw'/>"
        f"<source {attr}='{path}'/><target dev='{target}' bus='virtio'/>{extra}</disk>"
    )


def domain_xml(name: str, virt: str = "qemu", devices: str = "", cpu: str = "") -> str:
    return (
        f"<domain type='{virt}'><name>{name}</name><memory unit='KiB'>131072</memory>"
        f"<os><type arch='x86_64' machine='pc'>hvm</type></os>{cpu}"
        f"<devices>{devices}</devices></domain>"
    )


@dataclass
class FakeDomain:
    name: str
    host: FakeHost
    uuid: str = "6c6d7761-0000-4000-8000-000000000001"
    state: tuple[int, int] = (1, 1)
    max_kib: int = 131072
    xml: str = ""
    labels_xml: str | None = None
    job: dict[str, Any] = field(default_factory=lambda: {"type": 0})
    completed: dict[str, Any] | None = None
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    dirty_readings: list[float] = field(default_factory=list)
    fail_with: dict[str, libvirtError] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)
    outcome: libvirtError | None = None
    disk_sizes: dict[str, int] = field(default_factory=dict)  # target -> capacity bytes
    max_downtime: int = 300  # ms, as the hypervisor holds it (its default)

    def _call(self, what: str, *args: Any) -> None:
        self.host.check()
        self.calls.append((what, *args))
        if what in self.fail_with:
            raise self.fail_with[what]

    def _alive(self) -> FakeDomain:
        self.host.check()
        if self.host.domains.get(self.name) is not self:
            raise no_domain(self.name)
        return self

    # identity and description
    def name_(self) -> str:
        return self.name

    def UUIDString(self) -> str:
        return self.uuid

    def maxMemory(self) -> int:
        return self.max_kib

    def XMLDesc(self, flags: int = 0) -> str:
        return self.xml or domain_xml(self.name)

    def blockInfo(self, target: str, flags: int = 0) -> list[int]:
        self._alive()._call("blockInfo", target)
        if target not in self.disk_sizes:
            raise libvirtError(f"invalid argument: invalid path {target} not assigned to domain", 8)
        size = self.disk_sizes[target]
        return [size, size, size]

    def metadata(self, kind: int, uri: str, flags: int = 0) -> str:
        if self.labels_xml is None:
            raise libvirtError("metadata not found", 80)
        return self.labels_xml

    def state_(self) -> list[int]:
        self._alive()
        return list(self.state)

    # job
    def jobStats(self, flags: int = 0) -> dict[str, Any]:
        self._alive()
        self._call("jobStats", flags)
        if flags & C.VIR_DOMAIN_JOB_STATS_COMPLETED:
            return dict(self.completed) if self.completed else {"type": 0}
        if self.state[0] not in (1, 3):
            raise libvirtError("Requested operation is not valid: domain is not running", 55)
        return dict(self.job)

    def migrateSetMaxDowntime(self, ms: int, flags: int = 0) -> int:
        self._alive()._call("migrateSetMaxDowntime", ms)
        self.max_downtime = ms
        return 0

    def migrateGetMaxDowntime(self, flags: int = 0) -> int:
        self._alive()._call("migrateGetMaxDowntime")
        return self.max_downtime

    def migrateSetMaxSpeed(self, mib: int, flags: int = 0) -> int:
        self._alive()._call("migrateSetMaxSpeed", mib)
        return 0

    def suspend(self) -> int:
        self._alive()._call("suspend")
        self.state = (C.VIR_DOMAIN_PAUSED, C.VIR_DOMAIN_PAUSED_USER)
        return 0

    def resume(self) -> int:
        self._alive()._call("resume")
        self.state = (C.VIR_DOMAIN_RUNNING, 5)
        return 0

    def migrateStartPostCopy(self, flags: int = 0) -> int:
        self._alive()._call("migrateStartPostCopy")
        return 0

    def abortJob(self) -> int:
        self._alive()._call("abortJob")
        self.job = {"type": 0}
        self.outcome = libvirtError(ABORTED, C.VIR_ERR_OPERATION_ABORTED)
        self.release.set()
        return 0

    def migrateToURI3(self, uri: str, params: dict[str, Any], flags: int) -> int:
        self._alive()._call("migrateToURI3", uri, params, flags)
        if self.job.get("type", 0) == 0:
            self.job = {"type": C.VIR_DOMAIN_JOB_UNBOUNDED, "operation": 5, "memory_iteration": 1}
        if not self.release.wait(10):
            raise libvirtError("test did not finish the migration", 1)
        if self.outcome is not None:
            raise self.outcome
        return 0

    def startDirtyRateCalc(self, seconds: int, flags: int = 0) -> None:
        self._alive()._call("startDirtyRateCalc", seconds)


class virDomain:
    startDirtyRateCalc = FakeDomain.startDirtyRateCalc


@dataclass
class FakeHost:
    name: str
    uri: str
    domains: dict[str, FakeDomain] = field(default_factory=dict)
    up: bool = True
    free: int = 8 * 1024**3
    lib_version: int = 11_003_000
    hv_version: int = 10_000_000
    cpu_compare: int = 1
    cpus: int = 8  # host CPUs 0..cpus-1, spread evenly over `nodes` NUMA cells
    nodes: int = 1
    describes_cells: bool = True  # getCapabilities() has <topology><cells>
    opens: int = 0
    open_gate: threading.Event | None = None  # if given: opens wait until it is set
    closes: int = 0  # connections closed
    pools: dict[str, FakePool] = field(default_factory=dict)  # by target path
    callbacks: dict[int, tuple[int, Any, Any]] = field(default_factory=dict)

    def check(self) -> None:
        if not self.up:
            raise gone()

    def add(self, name: str, **kwargs: Any) -> FakeDomain:
        dom = FakeDomain(name=name, host=self, **kwargs)
        self.domains[name] = dom
        return dom


@dataclass
class FakePool:
    """A storage pool: name, state and free bytes (`info()`)."""

    name: str
    available: int
    state: int = 2  # VIR_STORAGE_POOL_RUNNING
    capacity: int = 64 * 1024**3
    refreshed: int = 0
    target: str = ""  # set by FakeHost.pools' key when looked up

    def info(self) -> list[int]:
        return [self.state, self.capacity, self.capacity - self.available, self.available]

    def refresh(self, flags: int = 0) -> int:
        self.refreshed += 1
        return 0

    def name_(self) -> str:
        return self.name


class PoolHandle:
    def XMLDesc(self, flags: int = 0) -> str:
        return (
            f"<pool type='dir'><name>{self.pool.name}</name>"
            f"<target><path>{self.pool.target}</path></target></pool>"
        )

    def __init__(self, pool: FakePool) -> None:
        self.pool = pool

    def name(self) -> str:
        return self.pool.name

    def info(self) -> list[int]:
        return self.pool.info()

    def refresh(self, flags: int = 0) -> int:
        return self.pool.refresh(flags)


class FakeConnect:
    def __init__(self, host: FakeHost) -> None:
        self.host = host
        self.alive = True

    def _check(self) -> None:
        if not self.host.up:
            self.alive = False
        self.host.check()

    def lookupByName(self, name: str) -> Any:
        self._check()
        dom = self.host.domains.get(name)
        if dom is None:
            raise no_domain(name)
        return DomainHandle(dom)

    def lookupByUUIDString(self, uuid: str) -> Any:
        self._check()
        for dom in self.host.domains.values():
            if dom.uuid == uuid:
                return DomainHandle(dom)
        raise no_domain(uuid)

    def storagePoolLookupByTargetPath(self, path: str) -> PoolHandle:
        self._check()
        pool = self.host.pools.get(path.rstrip("/") or "/")
        if pool is None or pool.state != C.VIR_STORAGE_POOL_RUNNING:  # as libvirt: active only
            raise libvirtError(
                f"Storage pool not found: no storage pool with matching target path '{path}'",
                C.VIR_ERR_NO_STORAGE_POOL,
                18,
            )
        return PoolHandle(pool)

    def listAllStoragePools(self, flags: int = 0) -> list[PoolHandle]:
        self._check()
        for target, pool in self.host.pools.items():
            pool.target = target
        return [PoolHandle(pool) for pool in self.host.pools.values()]

    def getLibVersion(self) -> int:
        self._check()
        return self.host.lib_version

    def getVersion(self) -> int:
        self._check()
        return self.host.hv_version

    def getFreeMemory(self) -> int:
        self._check()
        return self.host.free

    def listAllDomains(self, flags: int = 0) -> list[Any]:
        self._check()
        running = (C.VIR_DOMAIN_RUNNING, C.VIR_DOMAIN_PAUSED)
        domains = self.host.domains.values()
        return [DomainHandle(d) for d in domains if not flags or d.state[0] in running]

    def getCapabilities(self) -> str:
        self._check()
        cpu = "<cpu><arch>x86_64</arch><model>Haswell</model></cpu>"
        cells = ""
        if self.host.describes_cells:
            per = self.host.cpus // self.host.nodes
            for node in range(self.host.nodes):
                ids = range(node * per, (node + 1) * per)
                cpus = "".join(f"<cpu id='{i}' socket_id='0' core_id='{i}'/>" for i in ids)
                cells += (
                    f"<cell id='{node}'><memory unit='KiB'>8388608</memory>"
                    f"<cpus num='{per}'>{cpus}</cpus></cell>"
                )
            cells = f"<topology><cells num='{self.host.nodes}'>{cells}</cells></topology>"
        return f"<capabilities><host>{cpu}{cells}</host></capabilities>"

    def getInfo(self) -> list[Any]:
        self._check()
        h = self.host
        return ["x86_64", 8192, h.cpus, 2000, h.nodes, 1, h.cpus // h.nodes, 1]

    def compareCPU(self, xml: str, flags: int = 0) -> int:
        return self.host.cpu_compare

    def compareHypervisorCPU(self, *args: Any) -> int:
        return self.host.cpu_compare

    def setKeepAlive(self, interval: int, count: int) -> int:
        return 0

    def registerCloseCallback(self, cb: Any, opaque: Any) -> int:
        return 0

    def unregisterCloseCallback(self) -> int:
        return 0

    def domainEventRegisterAny(self, dom: Any, event_id: int, cb: Any, opaque: Any) -> int:
        key = len(self.host.callbacks) + 1
        self.host.callbacks[key] = (event_id, cb, opaque)
        return key

    def domainEventDeregisterAny(self, key: int) -> int:
        self.host.callbacks.pop(key, None)
        return 0

    def isAlive(self) -> int:
        return int(self.alive and self.host.up)

    def close(self) -> int:
        self.host.closes += 1
        return 0

    def domainListGetStats(self, doms: list[Any], stats: int, flags: int = 0) -> list[Any]:
        self._check()
        dom = doms[0].dom
        if not dom.dirty_readings:
            return [(doms[0], {"dirtyrate.calc_status": 1})]
        value = dom.dirty_readings.pop(0)
        return [(doms[0], {"dirtyrate.calc_status": 2, "dirtyrate.megabytes_per_second": value})]


class DomainHandle:
    """What lookupByName returns: forwards to the host's FakeDomain."""

    def __init__(self, dom: FakeDomain) -> None:
        self.dom = dom

    def name(self) -> str:
        return self.dom.name

    def state(self) -> list[int]:
        return self.dom.state_()

    def __getattr__(self, attr: str) -> Any:
        return getattr(self.dom, attr)


class FakeCloud:
    """Hosts by URI, and the `libvirt` / `libvirtaio` modules that reach them."""

    def __init__(self, *names: str) -> None:
        self.hosts = {n: FakeHost(n, f"fake:///{n}") for n in names}
        self.libvirt = types.ModuleType("libvirt")
        for key, value in CONSTANTS.items():
            setattr(self.libvirt, key, value)
        self.libvirt.libvirtError = libvirtError  # type: ignore[attr-defined]
        self.libvirt.virDomain = virDomain  # type: ignore[attr-defined]
        self.libvirt.open = self._open  # type: ignore[attr-defined]
        self.libvirtaio = types.ModuleType("libvirtaio")
        self.libvirtaio.virEventAsyncIOImpl = _FakeImpl  # type: ignore[attr-defined]
        self.registered = 0

    def _open(self, uri: str) -> FakeConnect:
        for host in self.hosts.values():
            if host.uri == uri:
                host.opens += 1
                if host.open_gate is not None:
                    host.open_gate.wait()
                host.check()
                return FakeConnect(host)
        raise libvirtError(f"no host at {uri}", 38, 7)

    def fire(self, host: str, event_id: int, dom: FakeDomain, *args: Any) -> None:
        """Deliver a domain event to every callback registered on `host`."""
        for eid, cb, opaque in list(self.hosts[host].callbacks.values()):
            if eid == event_id:
                cb(None, DomainHandle(dom), *args, opaque)

    def complete(
        self,
        name: str,
        src: str,
        dst: str,
        completed: dict[str, Any] | None = None,
        *,
        release: bool = True,
    ) -> FakeDomain:
        """Finish a migration: the instance moves and runs on `dst`.

        `release=False` leaves the migrate call blocked (a call whose connection died).
        """
        dom = self.hosts[src].domains.pop(name)
        moved = self.hosts[dst].add(
            name,
            uuid=dom.uuid,
            xml=dom.xml,
            labels_xml=dom.labels_xml,
            disk_sizes=dict(dom.disk_sizes),
        )
        moved.state = (C.VIR_DOMAIN_RUNNING, C.VIR_DOMAIN_RUNNING_MIGRATED)
        moved.completed = completed
        dom.job = {"type": 0}
        if release:
            dom.release.set()
        return moved

    def fail(self, name: str, src: str, message: str, code: int = 9) -> None:
        dom = self.hosts[src].domains[name]
        dom.job = {"type": 0}
        dom.outcome = libvirtError(message, code)
        dom.release.set()


class _FakeImpl:
    def __init__(self, loop: Any = None) -> None:
        self.loop = loop

    def register(self) -> _FakeImpl:
        return self
