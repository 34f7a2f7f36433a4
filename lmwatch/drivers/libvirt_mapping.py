"""Pure translations between libvirt's vocabulary and lmwatch's neutral model.

No connections and no I/O here: job statistics become `Sample`s, a `StartPlan`
becomes migrateToURI3 flags and parameters, domain XML becomes labels and
migration blockers, and the states of an instance on both hosts become the
outcome of a migration; libvirt's error text becomes neutral words. The libvirt
module is passed in (as `lv`) only to read its constants, so everything here runs
against a fake module in tests.
"""

from __future__ import annotations

import math
import posixpath
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from lmwatch.drivers.preflight import parse_cpuset, pinning_refusal
from lmwatch.model import MIB, Phase, Sample, StartPlan

LABELS_NS = "https://lmwatch.dev/xmlns/labels/1"
DEFAULT_PAGE_SIZE = 4096
# libvirt's own "no limit" for migrateSetMaxSpeed: INT64_MAX bytes expressed in MiB/s.
UNLIMITED_MIB_S = (2**63 - 1) >> 20
DIRTYRATE_MEASURED = 2  # VIR_DOMAIN_DIRTYRATE_MEASURED


# --------------------------------------------------------------------------- statistics


def _num(stats: Mapping[str, Any], key: str, default: float = 0) -> float:
    value = stats.get(key, default)
    return float(value) if isinstance(value, int | float) else float(default)


def passes_from(stats: Mapping[str, Any]) -> int:
    """1 during the first pass: QEMU counts its first bitmap sync at setup."""
    return max(1, int(_num(stats, "memory_iteration")))


def change_rate_from(stats: Mapping[str, Any]) -> float:
    """Bytes/s rewritten: pages/s × page size (0 during the first pass)."""
    page = _num(stats, "memory_page_size", DEFAULT_PAGE_SIZE) or DEFAULT_PAGE_SIZE
    return _num(stats, "memory_dirty_rate") * page


def stats_to_sample(
    stats: Mapping[str, Any],
    *,
    now: float,
    phase: Phase,
    blackout_budget: float,
    passes_seen: int = 0,
    memory_bytes: int = 0,
    disk_bytes: int = 0,
) -> Sample:
    """Map a `jobStats()` dictionary to a neutral `Sample`.

    While the job sets up, the statistics carry no sizes yet (all zero): the
    instance's memory then counts as all remaining, not as nothing left. The same
    holds for local disks (`disk_bytes` > 0), see `disk_progress`.
    """
    total = int(_num(stats, "memory_total"))
    remaining = int(_num(stats, "memory_remaining"))
    if total == 0 and memory_bytes > 0:
        total = remaining = memory_bytes
    downtime_ms = stats.get("downtime")
    disk_total, disk_remaining, disk_rate = disk_progress(stats, disk_bytes)
    return Sample(
        time=now,
        memory_total=total,
        memory_remaining=min(remaining, total) if total else remaining,
        memory_transferred=int(_num(stats, "memory_processed")),
        transfer_rate=_num(stats, "memory_bps"),
        change_rate=change_rate_from(stats),
        passes=max(passes_from(stats), passes_seen),
        phase=phase,
        blackout_budget=blackout_budget,
        slowdown=slowdown_from(stats),
        expected_blackout=(
            float(downtime_ms) / 1000.0 if isinstance(downtime_ms, int | float) else None
        ),
        disk_total=disk_total,
        disk_remaining=disk_remaining,
        disk_rate=disk_rate,
    )


def disk_progress(stats: Mapping[str, Any], disk_bytes: int) -> tuple[int, int, float]:
    """(total, remaining, bytes/s) of the local disks' copy from `jobStats()`.

    libvirt reports the disk mirror as `disk_total`, `disk_remaining`, `disk_bps`,
    and starts copying memory only once every mirror is ready (in sync; from then
    on each guest write goes to both copies and the rest is flushed in the final
    stop). So: before memory moves, the disks count as all remaining until the
    mirror reports (`disk_bytes`, the local disks' capacity: never "in sync" by a
    missing key); once memory moves, they are in sync whatever small rest the
    mirror still shows. Without local disks (`disk_bytes` 0) only reported numbers
    count.
    """
    rate = _num(stats, "disk_bps")
    total = int(_num(stats, "disk_total"))
    remaining = int(_num(stats, "disk_remaining"))
    memory_moves = _num(stats, "memory_processed") > 0 or _num(stats, "memory_total") > 0
    if disk_bytes > 0:
        if total == 0:
            total = remaining = disk_bytes  # the mirror has not reported yet
        if memory_moves:
            remaining = 0
    return total, min(remaining, total) if total else remaining, rate


MIN_RATE_WINDOW = 0.5  # seconds: a rate from readings closer together says little


def disk_rate_between(before: tuple[float, int] | None, now: float, processed: int) -> float | None:
    """Bytes/s of the disk copy between two readings of `disk_processed` (libvirt
    11 reports no `disk_bps` for the mirror); None when it cannot be told: no earlier
    reading, readings under `MIN_RATE_WINDOW` apart, or a counter that went back."""
    if before is None:
        return None
    then, done = before
    if now - then < MIN_RATE_WINDOW or processed < done:
        return None
    return (processed - done) / (now - then)


def slowdown_from(stats: Mapping[str, Any]) -> float:
    return min(1.0, max(0.0, _num(stats, "auto_converge_throttle") / 100.0))


def measured_blackout(completed: Mapping[str, Any] | None) -> float | None:
    """Seconds of the final stop from completed statistics (`downtime`, ms)."""
    if not completed:
        return None
    value = completed.get("downtime")
    return float(value) / 1000.0 if isinstance(value, int | float) else None


def transferred_from(completed: Mapping[str, Any] | None, last: Mapping[str, Any]) -> int:
    for stats in (completed or {}, last):
        value = stats.get("memory_processed")
        if isinstance(value, int | float) and value > 0:
            return int(value)
    return 0


# --------------------------------------------------------------------------- starting


@dataclass(frozen=True, slots=True)
class MigrateCall:
    """Everything migrateToURI3 is called with, chosen before the call."""

    flags: int
    params: Mapping[str, Any]
    max_downtime_ms: int


def bandwidth_mib_s(*caps: float | None) -> int | None:
    """The tightest of several bytes/s caps, in whole MiB/s (at least 1); None = no cap."""
    given = [c for c in caps if c is not None and c > 0]
    if not given:
        return None
    return max(1, math.floor(min(given) / MIB))


def migrate_call(
    lv: Any,
    plan: StartPlan,
    *,
    instance: str,
    migration_address: str | None,
    link_bandwidth: float | None,
    disks: Sequence[str] = (),
    disks_address: str | None = None,
) -> MigrateCall:
    """Flags and parameters for a peer-to-peer live migration under `plan`.

    `disks`: targets ('vda', ...) of the instance's local disks; they are copied
    with it (non-shared disk mode, only these disks). Their copy goes to
    `disks_address` ('tcp://HOST[:PORT]'), by default the host of
    `migration_address`, so that disk data takes the same network as memory.
    """
    flags = (
        lv.VIR_MIGRATE_LIVE
        | lv.VIR_MIGRATE_PEER2PEER
        | lv.VIR_MIGRATE_PERSIST_DEST
        | lv.VIR_MIGRATE_UNDEFINE_SOURCE
    )
    params: dict[str, Any] = {lv.VIR_MIGRATE_PARAM_DEST_NAME: instance}
    if plan.arm_handover:
        flags |= lv.VIR_MIGRATE_POSTCOPY
    if plan.arm_slow_down:
        flags |= lv.VIR_MIGRATE_AUTO_CONVERGE
        params[lv.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] = _percent(plan.slow_down_initial)
        params[lv.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INCREMENT] = _percent(plan.slow_down_step)
    if migration_address:
        params[lv.VIR_MIGRATE_PARAM_URI] = migration_address
        host = listen_host(migration_address)
        if host:
            params[lv.VIR_MIGRATE_PARAM_LISTEN_ADDRESS] = host
    if disks:
        flags |= lv.VIR_MIGRATE_NON_SHARED_DISK
        params[lv.VIR_MIGRATE_PARAM_MIGRATE_DISKS] = list(disks)
        target = disks_address or disks_uri(migration_address)
        if target:
            params[lv.VIR_MIGRATE_PARAM_DISKS_URI] = target
    mib = bandwidth_mib_s(plan.bandwidth, link_bandwidth)
    if mib is not None:
        params[lv.VIR_MIGRATE_PARAM_BANDWIDTH] = mib
    return MigrateCall(
        flags=flags, params=params, max_downtime_ms=downtime_ms(plan.starting_budget)
    )


def _percent(fraction: float) -> int:
    return min(100, max(1, round(fraction * 100)))


def downtime_ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def disks_uri(migration_address: str | None) -> str | None:
    """'tcp://127.0.0.1:49152' -> 'tcp://127.0.0.1' (the port is the hypervisor's choice)."""
    host = listen_host(migration_address) if migration_address else None
    if not host:
        return None
    return f"tcp://[{host}]" if ":" in host else f"tcp://{host}"


def listen_host(migration_address: str) -> str | None:
    """'tcp://127.0.0.1:49152' -> '127.0.0.1'; '[::1]' keeps its address."""
    rest = migration_address.split("://", 1)[-1]
    if rest.startswith("["):
        return rest[1:].split("]", 1)[0] or None
    return rest.split(":", 1)[0].split("/", 1)[0] or None


# --------------------------------------------------------------------------- domain XML


@dataclass(frozen=True, slots=True)
class DomainFacts:
    """What preflight needs from a domain's XML."""

    virt_type: str  # 'kvm', 'qemu' (software emulation), ...
    hostdevs: tuple[str, ...]  # passthrough devices that cannot migrate
    cpu_xml: str | None  # the <cpu> element, when it names a model
    cpu_mode: str | None
    arch: str | None
    machine: str | None
    # Host CPUs and host memory (NUMA) nodes the instance is pinned to; empty: none.
    pinned_cpus: frozenset[int] = frozenset()
    pinned_nodes: frozenset[int] = frozenset()


def _pinning(root: ET.Element) -> tuple[frozenset[int], frozenset[int]]:
    """(host CPUs, host NUMA nodes) a domain is pinned to: `<vcpu cpuset>`,
    `<cputune>` vcpupin/emulatorpin/iothreadpin, `<numatune>` memory/memnode."""
    cpus: set[int] = set()
    nodes: set[int] = set()
    vcpu = root.find("./vcpu")
    if vcpu is not None and vcpu.get("cpuset"):
        cpus |= parse_cpuset(vcpu.get("cpuset", ""))
    for path in ("./cputune/vcpupin", "./cputune/emulatorpin", "./cputune/iothreadpin"):
        for pin in root.findall(path):
            cpus |= parse_cpuset(pin.get("cpuset", ""))
    for path in ("./numatune/memory", "./numatune/memnode"):
        for tune in root.findall(path):
            nodes |= parse_cpuset(tune.get("nodeset", ""))
    return frozenset(cpus), frozenset(nodes)


def domain_facts(xml: str) -> DomainFacts:
    root = ET.fromstring(xml)
    hostdevs = []
    for dev in root.findall("./devices/hostdev"):
        address = dev.find("./source/address")
        where = " ".join(
            f"{k}={v}" for k, v in (address.attrib if address is not None else {}).items()
        )
        hostdevs.append(f"{dev.get('type', 'hostdev')} {where}".strip())
    cpu = root.find("./cpu")
    os_type = root.find("./os/type")
    cpu_mode = cpu.get("mode", "custom") if cpu is not None else None
    cpu_xml = None
    if cpu is not None and (cpu.find("./model") is not None or cpu_mode != "custom"):
        cpu_xml = ET.tostring(cpu, encoding="unicode")
    pinned_cpus, pinned_nodes = _pinning(root)
    return DomainFacts(
        virt_type=root.get("type", ""),
        hostdevs=tuple(hostdevs),
        cpu_xml=cpu_xml,
        cpu_mode=cpu_mode,
        arch=os_type.get("arch") if os_type is not None else None,
        machine=os_type.get("machine") if os_type is not None else None,
        pinned_cpus=pinned_cpus,
        pinned_nodes=pinned_nodes,
    )


@dataclass(frozen=True, slots=True)
class DiskFacts:
    """A writable file or block disk of a domain: what may have to move with it."""

    target: str  # 'vda'
    path: str  # the file or device on the host
    kind: str  # 'file' or 'block'


def writable_disks(xml: str) -> list[DiskFacts]:
    """The domain's disks that hold its own data on a host path: `<disk type='file'|
    'block' device='disk'>` with a source, not read-only and not shareable.

    Network disks (and pool volumes, whose path is not in the XML) are storage that
    other hosts reach too; CD-ROMs, floppies and read-only disks need no copy.
    """
    disks = []
    for disk in ET.fromstring(xml).findall("./devices/disk"):
        kind = disk.get("type", "file")
        if kind not in ("file", "block") or disk.get("device", "disk") not in ("disk", "lun"):
            continue
        if disk.find("./readonly") is not None or disk.find("./shareable") is not None:
            continue
        source, target = disk.find("./source"), disk.find("./target")
        path = source.get("file" if kind == "file" else "dev") if source is not None else None
        dev = target.get("dev") if target is not None else None
        if path and dev:
            disks.append(DiskFacts(target=dev, path=path, kind=kind))
    return disks


def under(path: str, prefixes: Sequence[str]) -> bool:
    """Whether `path` lies in one of the directories `prefixes` (or is one)."""
    norm = posixpath.normpath(path)
    for prefix in prefixes:
        p = posixpath.normpath(prefix)
        if norm == p or norm.startswith(p.rstrip("/") + "/"):
            return True
    return False


def local_disks(disks: Sequence[DiskFacts], *shared: Sequence[str]) -> list[DiskFacts]:
    """The disks that must be copied: those not on storage every host involved
    declares shared (a path counts as shared only when it lies under a shared
    directory of each of `shared`, one list per host)."""
    return [d for d in disks if not (shared and all(under(d.path, s) for s in shared))]


def pool_target(pool_xml: str) -> str | None:
    """The directory of a storage pool (`<target><path>`), normalised; None without one."""
    path = ET.fromstring(pool_xml).findtext("./target/path")
    return posixpath.normpath(path) if path else None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_labels(xml: str | None) -> dict[str, str]:
    """Labels from `<lmw:labels><lmw:label name="k">v</lmw:label></lmw:labels>`.

    Accepts the element alone (what metadata() returns) or a whole domain XML.
    Malformed XML or foreign elements give no labels rather than an error.
    """
    if not xml:
        return {}
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}
    labels: dict[str, str] = {}
    containers = [root] if _local(root.tag) == "labels" else []
    containers += [el for el in root.iter(f"{{{LABELS_NS}}}labels") if el is not root]
    for container in containers:
        if container.tag not in (f"{{{LABELS_NS}}}labels", "labels"):
            continue
        for el in container:
            name = el.get("name")
            if _local(el.tag) == "label" and name:
                labels[name] = (el.text or "").strip()
    return labels


def host_cpu_xml(capabilities_xml: str) -> str | None:
    """The host's <cpu> element from getCapabilities()."""
    cpu = ET.fromstring(capabilities_xml).find("./host/cpu")
    return ET.tostring(cpu, encoding="unicode") if cpu is not None else None


@dataclass(frozen=True, slots=True)
class HostTopology:
    """The CPUs and memory (NUMA) nodes a host has."""

    cpus: frozenset[int]
    nodes: frozenset[int]


def host_topology(capabilities_xml: str) -> HostTopology | None:
    """CPUs and NUMA cells from getCapabilities()'s `<host><topology><cells>`; None
    when the host does not describe them."""
    cells = ET.fromstring(capabilities_xml).findall("./host/topology/cells/cell")
    nodes: set[int] = set()
    cpus: set[int] = set()
    for cell in cells:
        if (cell.get("id") or "").isdigit():
            nodes.add(int(cell.get("id", "")))
        cpus.update(
            int(cpu.get("id", ""))
            for cpu in cell.findall("./cpus/cpu")
            if cpu.get("id", "").isdigit()
        )
    if not nodes or not cpus:
        return None
    return HostTopology(frozenset(cpus), frozenset(nodes))


def topology_from_info(info: Sequence[Any]) -> HostTopology:
    """The fallback from getInfo() ([model, memory MiB, cpus, MHz, nodes, ...]): CPUs
    0..cpus-1 and nodes 0..nodes-1."""
    return HostTopology(frozenset(range(int(info[2]))), frozenset(range(max(1, int(info[4])))))


def pinning_missing(
    instance: str, facts: DomainFacts, host: str, topology: HostTopology
) -> str | None:
    """Why `instance` cannot run on `host` because of its pinning; None when it can."""
    return pinning_refusal(
        instance,
        host,
        pinned_cpus=facts.pinned_cpus,
        pinned_nodes=facts.pinned_nodes,
        host_cpus=topology.cpus,
        host_nodes=topology.nodes,
    )


# --------------------------------------------------------------------------- outcomes


class Where(StrEnum):
    """An instance's state on one host, as far as migration outcomes care."""

    RUNNING = "running"
    PAUSED = "paused"  # exists and is active but stopped
    OFF = "off"  # defined but not active
    ABSENT = "absent"
    UNKNOWN = "unknown"  # the host did not answer


def handover_broke(lv: Any, at_source: Where, source_reason: int | None) -> bool:
    """Whether a handover lost its link: the source holds the rest of the instance's
    memory, stopped for good (`PAUSED/POSTCOPY_FAILED`), while the instance runs on the
    destination waiting for it (`RUNNING/POSTCOPY_FAILED`). The source's job still
    shows as migrating, but nothing moves until the move is resumed."""
    failed = getattr(lv, "VIR_DOMAIN_PAUSED_POSTCOPY_FAILED", 13)
    return at_source is Where.PAUSED and source_reason == failed


def where_from_state(lv: Any, state: int | None) -> Where:
    if state is None:
        return Where.ABSENT
    if state == lv.VIR_DOMAIN_RUNNING:
        return Where.RUNNING
    if state in (lv.VIR_DOMAIN_PAUSED, getattr(lv, "VIR_DOMAIN_PMSUSPENDED", 7)):
        return Where.PAUSED
    if state in (getattr(lv, "VIR_DOMAIN_BLOCKED", 2),):
        return Where.RUNNING
    return Where.OFF


@dataclass(frozen=True, slots=True)
class Outcome:
    phase: Phase
    running_on: str | None
    error: str | None = None
    resume_on: str | None = None  # host where a paused instance must be resumed
    undecided: bool = False  # a host did not answer; ask again later


def decide_outcome(
    source: str,
    destination: str,
    at_source: Where,
    at_destination: Where,
    *,
    error: str | None,
    cancel_requested: bool,
    we_paused: bool,
    after_restart: bool = False,
) -> Outcome:
    """Where the instance runs decides how an ended migration finished."""
    suffix = " (outcome read back after a restart)" if after_restart else ""
    if at_destination is Where.RUNNING:
        return Outcome(Phase.COMPLETED, destination)
    if at_destination is Where.PAUSED and at_source in (Where.OFF, Where.ABSENT):
        return Outcome(Phase.COMPLETED, destination, resume_on=destination)
    if at_source in (Where.RUNNING, Where.PAUSED):
        resume = source if (at_source is Where.PAUSED and we_paused) else None
        if cancel_requested:
            note = f"cancelled; the instance keeps running on {source}{suffix}"
            return Outcome(
                Phase.CANCELLED, source, error=note if after_restart else None, resume_on=resume
            )
        why = error or "the migration ended without moving the instance"
        return Outcome(
            Phase.FAILED,
            source,
            error=f"{why}; the instance is still on {source}{suffix}",
            resume_on=resume,
        )
    if Where.UNKNOWN in (at_source, at_destination):
        return Outcome(Phase.FAILED, None, error=error, undecided=True)
    why = error or "the migration ended"
    return Outcome(
        Phase.FAILED,
        None,
        error=f"{why}; the instance runs on neither {source} nor {destination}{suffix}",
    )


# --------------------------------------------------------------------------- error text

# Words lmwatch never shows its users (the vocabulary contract), as one pattern.
UNSAID = re.compile(
    r"post.?copy|suspend|downtime|auto.?converge|xbzrle|libvirt|qemu|virDomain", re.IGNORECASE
)


def _keep_case(word: str) -> Callable[[re.Match[str]], str]:
    """A replacement that follows the matched text's case (lower, Capital, UPPER)."""

    def replace(match: re.Match[str]) -> str:
        found = match.group(0)
        letters = [c for c in found if c.isalpha()]
        if len(letters) > 1 and all(c.isupper() for c in letters):
            return word.upper()
        if found[:1].isupper():
            return word[:1].upper() + word[1:]
        return word

    return replace


def _pause(match: re.Match[str]) -> str:
    word = {"": "pause", "ed": "paused", "ing": "pausing", "s": "pauses"}[
        (match.group(1) or "").lower()
    ]
    return _keep_case(word)(match)


def _hypervisor(match: re.Match[str]) -> str:
    """'hypervisor', capitalised only where it opens the text."""
    return "Hypervisor" if match.start() == 0 and match.group(0)[0].isupper() else "hypervisor"


_IGNORE = re.IGNORECASE
# Order matters: API names go first, so removing one cannot leave a word behind.
_TRANSLATIONS: tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...] = (
    (re.compile(r"\w*virdomain\w*(?:\(\))?", _IGNORE), ""),
    (re.compile(r"\bvir[A-Z]\w*(?:\(\))?"), ""),
    (re.compile(r"post.?copy", _IGNORE), _keep_case("handover")),
    (re.compile(r"suspend(ed|ing|s)?", _IGNORE), _pause),
    (re.compile(r"downtime", _IGNORE), _keep_case("blackout")),
    (re.compile(r"auto.?converge", _IGNORE), _keep_case("slow-down")),
    (re.compile(r"xbzrle", _IGNORE), _keep_case("page compression")),
    (re.compile(r"libvirtd?|qemu", _IGNORE), _hypervisor),
    (re.compile(r"\b(hypervisor)(?:[ -]+hypervisor\b)+", _IGNORE), r"\1"),
    (re.compile(r"[ \t]{2,}"), " "),
    (re.compile(r"[ \t]+([,.:;)])"), r"\1"),
)


def neutral_text(raw: str) -> str:
    """Hypervisor text in lmwatch's words: post-copy -> handover, suspend -> pause,
    downtime -> blackout, auto-converge -> slow-down, QEMU/libvirt -> hypervisor; the
    API's function names (virDomain...) are dropped. No result matches `UNSAID`."""
    text = raw
    for _ in range(8):  # removals can join fragments into a new word: repeat until stable
        before = text
        for pattern, replacement in _TRANSLATIONS:
            text = pattern.sub(replacement, text)
        if text == before:
            break
    return UNSAID.sub("hypervisor", text).strip()


class ErrorCause(StrEnum):
    """Why a hypervisor call failed, classified from libvirt's error code and domain."""

    CONNECTION_LOST = "the connection to the host was lost"
    UNREACHABLE = "the host is unreachable"
    INVALID_STATE = "not possible in the instance's current state"
    NO_INSTANCE = "no such instance"
    TIMED_OUT = "timed out"
    REFUSED = "refused by the hypervisor"
    UNSUPPORTED = "not supported by the hypervisor"
    ABORTED = "cancelled on request"
    INTERNAL = "internal hypervisor error"
    FAILED = "the hypervisor reported a failure"


_CAUSES: tuple[tuple[ErrorCause, tuple[str, ...]], ...] = (
    (ErrorCause.CONNECTION_LOST, ("VIR_ERR_SYSTEM_ERROR", "VIR_ERR_RPC")),
    (
        ErrorCause.UNREACHABLE,
        ("VIR_ERR_NO_CONNECT", "VIR_ERR_UNKNOWN_HOST", "VIR_ERR_AUTH_FAILED", "VIR_ERR_NO_SERVER"),
    ),
    (ErrorCause.NO_INSTANCE, ("VIR_ERR_NO_DOMAIN",)),
    (ErrorCause.INVALID_STATE, ("VIR_ERR_OPERATION_INVALID",)),
    (
        ErrorCause.TIMED_OUT,
        ("VIR_ERR_OPERATION_TIMEOUT", "VIR_ERR_AGENT_UNRESPONSIVE", "VIR_ERR_RESOURCE_BUSY"),
    ),
    (ErrorCause.ABORTED, ("VIR_ERR_OPERATION_ABORTED", "VIR_ERR_AUTH_CANCELLED")),
    (
        ErrorCause.UNSUPPORTED,
        (
            "VIR_ERR_NO_SUPPORT",
            "VIR_ERR_OPERATION_UNSUPPORTED",
            "VIR_ERR_ARGUMENT_UNSUPPORTED",
            "VIR_ERR_CONFIG_UNSUPPORTED",
        ),
    ),
    (
        ErrorCause.REFUSED,
        (
            "VIR_ERR_OPERATION_DENIED",
            "VIR_ERR_ACCESS_DENIED",
            "VIR_ERR_MIGRATE_UNSAFE",
            "VIR_ERR_CPU_INCOMPATIBLE",
        ),
    ),
    (ErrorCause.INTERNAL, ("VIR_ERR_INTERNAL_ERROR",)),
)


def error_cause(lv: Any, code: int | None, domain: int | None = None) -> ErrorCause:
    """The cause of a libvirt error by its code (and the RPC domain: a lost link)."""
    for cause, names in _CAUSES:
        if code is not None and code in {getattr(lv, n) for n in names if hasattr(lv, n)}:
            return cause
    if domain is not None and domain == getattr(lv, "VIR_FROM_RPC", None):
        return ErrorCause.CONNECTION_LOST
    if code == 1:  # VIR_ERR_INTERNAL_ERROR, also when the module lacks the name
        return ErrorCause.INTERNAL
    return ErrorCause.FAILED


def job_has_ended(lv: Any, code: int | None) -> bool:
    """Whether an error while reading a job's statistics says the job has ended.

    Only two answers mean that: the instance is no longer running where the job
    ran ("domain is not running", no active job: VIR_ERR_OPERATION_INVALID) or it
    is gone from that host (VIR_ERR_NO_DOMAIN). Every other error (an internal
    error, a timeout, a busy daemon, a lost connection) says only that the
    statistics could not be read this time; the job may well go on.
    """
    return error_cause(lv, code) in (ErrorCause.INVALID_STATE, ErrorCause.NO_INSTANCE)
