"""The libvirt driver against a fake libvirt module (tests/fakelibvirt.py)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmwatch import daemon
from lmwatch.clock import VirtualClock
from lmwatch.config import Settings
from lmwatch.drivers import libvirt_conn, libvirt_events
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
    UnknownHost,
    UnknownInstance,
)
from lmwatch.drivers.libvirt_conn import HostBusy, HostLost, backoff_delay, in_daemon_thread
from lmwatch.drivers.libvirt_driver import HostConfig, LibvirtDriver, build_libvirt_driver
from lmwatch.drivers.libvirt_mapping import (
    UNLIMITED_MIB_S,
    DiskFacts,
    ErrorCause,
    Where,
    decide_outcome,
    disk_progress,
    disk_rate_between,
    disks_uri,
    domain_facts,
    error_cause,
    host_topology,
    listen_host,
    local_disks,
    migrate_call,
    neutral_text,
    parse_labels,
    stats_to_sample,
    writable_disks,
)
from lmwatch.drivers.preflight import format_cpuset, parse_cpuset, parse_cpuset_strict
from lmwatch.model import MIB, ChangeRate, MigrationRequest, Phase, StartPlan

sys.path.insert(0, str(Path(__file__).parent))
import itertools
import re

from fakelibvirt import ABORTED, C, FakeCloud, FakePool, disk_xml, domain_xml

NS = "https://lmwatch.dev/xmlns/labels/1"
LABELS = (
    f'<lmw:labels xmlns:lmw="{NS}"><lmw:label name="tier">database</lmw:label>'
    f'<lmw:label name="team">pay</lmw:label></lmw:labels>'
)
PLAN = StartPlan(arm_handover=False, arm_slow_down=False, blackout_budget=0.3)
REQ = MigrationRequest(instance="vm1", source="a", destination="b")
RUNNING_STATS = {
    "type": C.VIR_DOMAIN_JOB_UNBOUNDED,
    "operation": C.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT,
    "memory_total": 128 * MIB,
    "memory_remaining": 40 * MIB,
    "memory_processed": 100 * MIB,
    "memory_bps": 16 * MIB,
    "memory_dirty_rate": 2048,
    "memory_page_size": 4096,
    "memory_iteration": 3,
    "downtime": 250,
    "auto_converge_throttle": 30,
}


# --------------------------------------------------------------------------- mapping


@pytest.mark.parametrize(
    ("stats", "passes", "change_rate", "expected_blackout", "slowdown"),
    [
        ({"memory_iteration": 0, "memory_dirty_rate": 0}, 1, 0.0, None, 0.0),
        ({"memory_iteration": 1, "memory_dirty_rate": 0, "downtime": 300}, 1, 0.0, 0.3, 0.0),
        (RUNNING_STATS, 3, 8 * MIB, 0.25, 0.3),
        (
            {"memory_iteration": 5, "memory_dirty_rate": 10, "auto_converge_throttle": 99},
            5,
            40960,
            None,
            0.99,
        ),
        ({"memory_dirty_rate": 10, "memory_page_size": 65536}, 1, 655360, None, 0.0),
    ],
)
def test_stats_to_sample(
    stats: dict[str, Any],
    passes: int,
    change_rate: float,
    expected_blackout: float | None,
    slowdown: float,
) -> None:
    sample = stats_to_sample(stats, now=5.0, phase=Phase.COPYING, blackout_budget=0.5)
    assert sample.passes == passes
    assert sample.change_rate == change_rate
    assert sample.expected_blackout == expected_blackout
    assert sample.slowdown == pytest.approx(slowdown)
    assert (sample.time, sample.blackout_budget) == (5.0, 0.5)


def test_setup_sample_counts_all_memory_as_remaining() -> None:
    setup = {"type": 2, "memory_iteration": 0, "memory_total": 0, "memory_remaining": 0}
    sample = stats_to_sample(
        setup, now=0, phase=Phase.COPYING, blackout_budget=0.3, memory_bytes=128 * MIB
    )
    assert (sample.memory_total, sample.memory_remaining, sample.passes) == (
        128 * MIB,
        128 * MIB,
        1,
    )


async def test_first_sample_during_setup(cloud: FakeCloud, driver: LibvirtDriver) -> None:
    dom = cloud.hosts["a"].domains["vm1"]
    dom.job = {"type": C.VIR_DOMAIN_JOB_UNBOUNDED, "operation": 5, "memory_iteration": 0}
    await driver.start("m1", REQ, PLAN)
    sample = await driver.sample("m1")
    assert sample.memory_remaining == 128 * MIB
    assert sample.passes == 1


def test_stats_to_sample_sizes() -> None:
    sample = stats_to_sample(RUNNING_STATS, now=0, phase=Phase.HANDOVER, blackout_budget=0.1)
    assert (sample.memory_total, sample.memory_remaining, sample.memory_transferred) == (
        128 * MIB,
        40 * MIB,
        100 * MIB,
    )
    assert sample.transfer_rate == 16 * MIB
    assert sample.phase is Phase.HANDOVER


@given(
    total=st.integers(0, 2**40),
    remaining=st.integers(0, 2**41),
    iteration=st.integers(0, 1000),
    seen=st.integers(0, 1000),
    throttle=st.integers(-5, 200),
)
def test_sample_invariants(
    total: int, remaining: int, iteration: int, seen: int, throttle: int
) -> None:
    stats = {
        "memory_total": total,
        "memory_remaining": remaining,
        "memory_iteration": iteration,
        "auto_converge_throttle": throttle,
    }
    sample = stats_to_sample(
        stats, now=0, phase=Phase.COPYING, blackout_budget=0.3, passes_seen=seen
    )
    assert sample.passes >= 1
    assert sample.passes >= seen
    assert 0.0 <= sample.slowdown <= 1.0
    if total:
        assert sample.memory_remaining <= total


BASE = (
    C.VIR_MIGRATE_LIVE
    | C.VIR_MIGRATE_PEER2PEER
    | C.VIR_MIGRATE_PERSIST_DEST
    | C.VIR_MIGRATE_UNDEFINE_SOURCE
)


@pytest.mark.parametrize(
    ("plan", "flags"),
    [
        (PLAN, BASE),
        (
            StartPlan(arm_handover=True, arm_slow_down=False, blackout_budget=0.3),
            BASE | C.VIR_MIGRATE_POSTCOPY,
        ),
        (
            StartPlan(arm_handover=False, arm_slow_down=True, blackout_budget=0.3),
            BASE | C.VIR_MIGRATE_AUTO_CONVERGE,
        ),
        (
            StartPlan(arm_handover=True, arm_slow_down=True, blackout_budget=0.3),
            BASE | C.VIR_MIGRATE_POSTCOPY | C.VIR_MIGRATE_AUTO_CONVERGE,
        ),
    ],
)
def test_flags_follow_the_plan(plan: StartPlan, flags: int) -> None:
    call = migrate_call(C, plan, instance="vm1", migration_address=None, link_bandwidth=None)
    assert call.flags == flags
    assert (C.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL in call.params) == plan.arm_slow_down
    assert C.VIR_MIGRATE_PARAM_URI not in call.params


def test_params_from_plan_and_host() -> None:
    plan = StartPlan(
        arm_handover=False,
        arm_slow_down=True,
        blackout_budget=0.25,
        slow_down_initial=0.4,
        slow_down_step=0.15,
        bandwidth=50 * MIB,
    )
    call = migrate_call(
        C, plan, instance="vm1", migration_address="tcp://127.0.0.1", link_bandwidth=16.5 * MIB
    )
    assert call.params == {
        "destination_name": "vm1",
        "auto_converge.initial": 40,
        "auto_converge.increment": 15,
        "migrate_uri": "tcp://127.0.0.1",
        "listen_address": "127.0.0.1",
        "bandwidth": 16,
    }
    assert call.max_downtime_ms == 250


@pytest.mark.parametrize(
    ("address", "host"),
    [
        ("tcp://127.0.0.1", "127.0.0.1"),
        ("tcp://10.0.0.2:49152", "10.0.0.2"),
        ("tcp://[::1]:49152", "::1"),
        ("rdma://host-b", "host-b"),
    ],
)
def test_listen_host(address: str, host: str) -> None:
    assert listen_host(address) == host


@pytest.mark.parametrize(
    ("xml", "labels"),
    [
        (LABELS, {"tier": "database", "team": "pay"}),
        (f'<labels xmlns="{NS}"><label name="tier">web</label></labels>', {"tier": "web"}),
        (f"<domain><metadata>{LABELS}</metadata></domain>", {"tier": "database", "team": "pay"}),
        ('<x:labels xmlns:x="urn:other"><x:label name="tier">no</x:label></x:labels>', {}),
        ("<lmw:labels", {}),
        (None, {}),
        (f'<lmw:labels xmlns:lmw="{NS}"><lmw:label>unnamed</lmw:label></lmw:labels>', {}),
    ],
)
def test_parse_labels(xml: str | None, labels: dict[str, str]) -> None:
    assert parse_labels(xml) == labels


def test_domain_facts() -> None:
    hostdev = (
        "<hostdev mode='subsystem' type='pci'>"
        "<source><address bus='0x01' slot='0x00'/></source></hostdev>"
    )
    facts = domain_facts(
        domain_xml("vm1", virt="kvm", devices=hostdev, cpu="<cpu mode='host-model'/>")
    )
    assert facts.virt_type == "kvm"
    assert facts.hostdevs == ("pci bus=0x01 slot=0x00",)
    assert facts.cpu_mode == "host-model"
    assert domain_facts(domain_xml("vm1")).hostdevs == ()


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("0-3,^2,8", {0, 1, 3, 8}),
        ("^2,0-3", {0, 1, 3}),
        ("5", {5}),
        ("0-7,^2-5", {0, 1, 6, 7}),
        (" 1, 3 ", {1, 3}),
        ("", set()),
        ("x,2", {2}),
    ],
)
def test_parse_cpuset(text: str, ids: set[int]) -> None:
    assert parse_cpuset(text) == ids


@pytest.mark.parametrize("text", ["", "x", "3-1", "0-3,^0-3", "1,,2"])
def test_parse_cpuset_strict_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpuset_strict(text)


def test_format_cpuset() -> None:
    assert format_cpuset({8, 9, 10, 11}) == "8-11"
    assert format_cpuset({0, 1, 2, 3, 5, 7, 8}) == "0-3,5,7-8"
    assert format_cpuset(set()) == ""


PINNED = (
    "<vcpu placement='static' cpuset='1-2'>2</vcpu>"
    "<cputune><vcpupin vcpu='0' cpuset='8-11,^9'/><vcpupin vcpu='1' cpuset='3'/>"
    "<emulatorpin cpuset='12'/><iothreadpin iothread='1' cpuset='13'/></cputune>"
    "<numatune><memory mode='strict' nodeset='0-1'/>"
    "<memnode cellid='0' mode='strict' nodeset='3'/></numatune>"
)


def test_domain_facts_pinning() -> None:
    facts = domain_facts(domain_xml("vm1", cpu=PINNED))
    assert facts.pinned_cpus == {1, 2, 3, 8, 10, 11, 12, 13}
    assert facts.pinned_nodes == {0, 1, 3}
    plain = domain_facts(domain_xml("vm1", cpu="<vcpu>2</vcpu><numatune/>"))
    assert (plain.pinned_cpus, plain.pinned_nodes) == (frozenset(), frozenset())


def test_host_topology_from_capabilities() -> None:
    caps = (
        "<capabilities><host><cpu><arch>x86_64</arch></cpu><topology><cells num='2'>"
        "<cell id='0'><cpus num='2'><cpu id='0'/><cpu id='2'/></cpus></cell>"
        "<cell id='1'><cpus num='2'><cpu id='1'/><cpu id='3'/></cpus></cell>"
        "</cells></topology></host></capabilities>"
    )
    topo = host_topology(caps)
    assert topo is not None
    assert (topo.cpus, topo.nodes) == ({0, 1, 2, 3}, {0, 1})
    assert host_topology("<capabilities><host><cpu/></host></capabilities>") is None


S, D = "a", "b"


@pytest.mark.parametrize(
    ("src", "dst", "cancel", "error", "phase", "running_on", "resume_on"),
    [
        (Where.ABSENT, Where.RUNNING, False, None, Phase.COMPLETED, D, None),
        (Where.UNKNOWN, Where.RUNNING, False, "End of file", Phase.COMPLETED, D, None),
        (Where.OFF, Where.PAUSED, False, None, Phase.COMPLETED, D, D),
        (Where.RUNNING, Where.ABSENT, True, ABORTED, Phase.CANCELLED, S, None),
        (Where.RUNNING, Where.ABSENT, False, "Lost connection", Phase.FAILED, S, None),
        (Where.PAUSED, Where.ABSENT, False, "Lost connection", Phase.FAILED, S, S),
        (Where.ABSENT, Where.ABSENT, False, None, Phase.FAILED, None, None),
        (Where.OFF, Where.OFF, False, None, Phase.FAILED, None, None),
    ],
)
def test_outcome_from_where_it_runs(
    src: Where,
    dst: Where,
    cancel: bool,
    error: str | None,
    phase: Phase,
    running_on: str | None,
    resume_on: str | None,
) -> None:
    outcome = decide_outcome(S, D, src, dst, error=error, cancel_requested=cancel, we_paused=True)
    assert (outcome.phase, outcome.running_on, outcome.resume_on) == (phase, running_on, resume_on)
    assert not outcome.undecided
    if phase is Phase.FAILED:
        assert outcome.error
        if error:
            assert error in outcome.error


@pytest.mark.parametrize(
    ("src", "dst"),
    [(Where.UNKNOWN, Where.ABSENT), (Where.ABSENT, Where.UNKNOWN), (Where.OFF, Where.UNKNOWN)],
)
def test_outcome_undecided_when_a_host_is_silent(src: Where, dst: Where) -> None:
    outcome = decide_outcome(S, D, src, dst, error=None, cancel_requested=False, we_paused=False)
    assert outcome.undecided


def test_backoff_grows_and_caps() -> None:
    delays = [backoff_delay(n) for n in range(1, 10)]
    assert delays[0] == 0.5
    assert all(b >= a for a, b in itertools.pairwise(delays))
    assert delays[-1] == 30.0


def test_build_from_daemon_config() -> None:
    driver = build_libvirt_driver(
        {
            "a": {"uri": "qemu+unix:///system?socket=/x/a"},
            "b": {
                "uri": "qemu+tcp://b/system",
                "migration_address": "tcp://10.0.0.2",
                "bandwidth": "16MiB/s",
            },
        },
        VirtualClock(),
    )
    assert driver._hosts["b"] == HostConfig(
        uri="qemu+tcp://b/system", migration_address="tcp://10.0.0.2", bandwidth=16
    )
    assert driver._hosts["b"].bandwidth == 16 * MIB
    assert HostConfig(uri="x", bandwidth=8).bandwidth == 8 * MIB
    with pytest.raises(ValueError):
        HostConfig.model_validate({"url": "oops"})


# --------------------------------------------------------------------------- driver


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> FakeCloud:
    fake = FakeCloud("a", "b")
    monkeypatch.setitem(sys.modules, "libvirt", fake.libvirt)
    monkeypatch.setitem(sys.modules, "libvirtaio", fake.libvirtaio)
    monkeypatch.setattr(libvirt_events, "_registered", {})
    fake.hosts["a"].add("vm1", labels_xml=LABELS)
    return fake


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
async def driver(cloud: FakeCloud, clock: VirtualClock) -> AsyncIterator[LibvirtDriver]:
    hosts = {
        name: HostConfig(uri=host.uri, migration_address="tcp://127.0.0.1")
        for name, host in cloud.hosts.items()
    }
    drv = LibvirtDriver(hosts, clock)
    yield drv
    for host in cloud.hosts.values():
        for dom in host.domains.values():
            dom.release.set()
    await drv.close()


async def until(clock: VirtualClock, condition: Callable[[], Any]) -> None:
    assert await clock.run_until(condition, limit=120, real_timeout=10)


async def run(clock: VirtualClock, coro: Any) -> Any:
    """Drive a coroutine that sleeps on the virtual clock."""
    task = asyncio.ensure_future(coro)
    await until(clock, task.done)
    return task.result()


async def started(cloud: FakeCloud, driver: LibvirtDriver, plan: StartPlan = PLAN) -> Any:
    dom = cloud.hosts["a"].domains["vm1"]
    dom.job = dict(RUNNING_STATS)
    await driver.start("m1", REQ, plan)
    return dom


def lifecycle(cloud: FakeCloud, host: str, dom: Any, event: int, detail: int) -> None:
    """A lifecycle event of `dom` from `host` (stopped, resumed, and why)."""
    cloud.fire(host, C.VIR_DOMAIN_EVENT_ID_LIFECYCLE, dom, event, detail)


async def finished(driver: LibvirtDriver, clock: VirtualClock) -> Any:
    async def done() -> bool:
        return (await driver.sample("m1")).phase.finished

    await until(clock, done)
    return await driver.result("m1")


async def finished_through_errors(driver: LibvirtDriver, clock: VirtualClock) -> Any:
    """Like `finished`, but samples through hypervisor errors, a second apart (as the
    engine does)."""
    for _ in range(60):
        with contextlib.suppress(DriverError):
            if (await driver.sample("m1")).phase.finished:
                return await driver.result("m1")
        await clock.advance(1.0)
    raise AssertionError("the migration did not end within a minute")


async def test_describe_reads_labels_and_memory(driver: LibvirtDriver) -> None:
    info = await driver.describe("vm1")
    assert (info.host, info.memory_bytes) == ("a", 128 * MIB)
    assert info.labels == {"tier": "database", "team": "pay"}
    with pytest.raises(UnknownInstance):
        await driver.describe("nope")
    with pytest.raises(UnknownInstance):
        await driver.describe("vm1", "b")


async def test_preflight_passes(driver: LibvirtDriver) -> None:
    info = await driver.preflight(REQ)
    assert info.name == "vm1"
    assert info.labels["tier"] == "database"


def _down(c: FakeCloud) -> None:
    c.hosts["b"].up = False


def _too_small(c: FakeCloud) -> None:
    c.hosts["b"].free = 64 * MIB


def _on_destination(c: FakeCloud) -> None:
    c.hosts["b"].add("vm1")


def _moved(c: FakeCloud) -> None:
    c.hosts["b"].domains["vm1"] = c.hosts["a"].domains.pop("vm1")
    c.hosts["b"].domains["vm1"].host = c.hosts["b"]


def _shut_off(c: FakeCloud) -> None:
    c.hosts["a"].domains["vm1"].state = (C.VIR_DOMAIN_SHUTOFF, 1)


def _hostdev(c: FakeCloud) -> None:
    c.hosts["a"].domains["vm1"].xml = domain_xml(
        "vm1", devices="<hostdev type='pci'><source><address bus='0x3'/></source></hostdev>"
    )


def _cpu(c: FakeCloud) -> None:
    c.hosts["a"].domains["vm1"].xml = domain_xml(
        "vm1", virt="kvm", cpu="<cpu mode='custom'><model>Icelake-Server</model></cpu>"
    )
    c.hosts["b"].cpu_compare = C.VIR_CPU_COMPARE_INCOMPATIBLE


def _cpu_tcg(c: FakeCloud) -> None:
    c.hosts["a"].domains["vm1"].xml = domain_xml(
        "vm1", virt="qemu", cpu="<cpu mode='custom'><model>Icelake-Server</model></cpu>"
    )
    c.hosts["b"].cpu_compare = C.VIR_CPU_COMPARE_INCOMPATIBLE


OTHER_UUID = "0badc0de-0000-4000-8000-000000000002"


def _name_taken_running(c: FakeCloud) -> None:
    c.hosts["b"].add("vm1", uuid=OTHER_UUID)


def _name_taken_defined(c: FakeCloud) -> None:
    c.hosts["b"].add("vm1", uuid=OTHER_UUID, state=(C.VIR_DOMAIN_SHUTOFF, 1))


def _identity_taken(c: FakeCloud) -> None:
    c.hosts["b"].add("vm1-old", state=(C.VIR_DOMAIN_SHUTOFF, 1))  # vm1's uuid


def _defined_from_before(c: FakeCloud) -> None:
    c.hosts["b"].add("vm1", state=(C.VIR_DOMAIN_SHUTOFF, 1))  # same name and uuid


def _pin(c: FakeCloud, tune: str) -> None:
    c.hosts["a"].domains["vm1"].xml = domain_xml("vm1", cpu=tune)


def _pinned_beyond_cpus(c: FakeCloud) -> None:
    _pin(c, "<cputune><vcpupin vcpu='0' cpuset='8-11'/></cputune>")


def _emulator_beyond_cpus(c: FakeCloud) -> None:
    _pin(c, "<cputune><emulatorpin cpuset='0-3,^1,9'/></cputune>")


def _vcpu_cpuset_beyond_cpus(c: FakeCloud) -> None:
    _pin(c, "<vcpu placement='static' cpuset='6-9'>2</vcpu>")


def _pinned_beyond_nodes(c: FakeCloud) -> None:
    _pin(c, "<numatune><memory mode='strict' nodeset='1'/></numatune>")


def _memnode_beyond_nodes(c: FakeCloud) -> None:
    _pin(c, "<numatune><memnode cellid='0' mode='strict' nodeset='0-1'/></numatune>")


def _pinned_beyond_cpus_no_cells(c: FakeCloud) -> None:
    c.hosts["b"].describes_cells = False
    c.hosts["b"].cpus = 4
    _pin(c, "<cputune><vcpupin vcpu='0' cpuset='4-5'/></cputune>")


def _pinned_within(c: FakeCloud) -> None:
    c.hosts["b"].nodes = 2
    _pin(
        c,
        "<vcpu cpuset='0-7'>2</vcpu><cputune><vcpupin vcpu='0' cpuset='0-3,^2'/>"
        "<emulatorpin cpuset='7'/></cputune>"
        "<numatune><memory mode='strict' nodeset='0-1'/></numatune>",
    )


@pytest.mark.parametrize(
    ("arrange", "request_", "refusal"),
    [
        (None, MigrationRequest("vm1", "a", "z"), UnknownHost),
        (None, MigrationRequest("vm1", "z", "b"), UnknownHost),
        (None, MigrationRequest("ghost", "a", "b"), UnknownInstance),
        (_down, REQ, HostUnreachable),
        (_too_small, REQ, InsufficientResources),
        (_on_destination, REQ, AlreadyOnDestination),
        (_moved, REQ, AlreadyOnDestination),
        (_shut_off, REQ, NotOnSource),
        (_hostdev, REQ, Incompatible),
        (_cpu, REQ, Incompatible),
        (_cpu_tcg, REQ, None),
        (_name_taken_running, REQ, NameTaken),
        (_name_taken_defined, REQ, NameTaken),
        (_identity_taken, REQ, NameTaken),
        (_defined_from_before, REQ, None),
        (_pinned_beyond_cpus, REQ, Incompatible),
        (_emulator_beyond_cpus, REQ, Incompatible),
        (_vcpu_cpuset_beyond_cpus, REQ, Incompatible),
        (_pinned_beyond_nodes, REQ, Incompatible),
        (_memnode_beyond_nodes, REQ, Incompatible),
        (_pinned_beyond_cpus_no_cells, REQ, Incompatible),
        (_pinned_within, REQ, None),
    ],
)
async def test_preflight_refusals(
    cloud: FakeCloud,
    driver: LibvirtDriver,
    arrange: Callable[[FakeCloud], None] | None,
    request_: MigrationRequest,
    refusal: type[Exception] | None,
) -> None:
    if arrange:
        arrange(cloud)
    if refusal is None:
        await driver.preflight(request_)
        return
    with pytest.raises(refusal) as caught:
        await driver.preflight(request_)
    assert str(caught.value)


async def test_force_skips_the_free_memory_check_only(
    cloud: FakeCloud, driver: LibvirtDriver
) -> None:
    _too_small(cloud)
    with pytest.raises(InsufficientResources):
        await driver.preflight(REQ)
    info = await driver.preflight(dataclasses.replace(REQ, force=True))
    assert info.name == "vm1"
    _hostdev(cloud)
    with pytest.raises(Incompatible):
        await driver.preflight(dataclasses.replace(REQ, force=True))


async def test_host_info_reports_free_memory_and_running_instances(
    cloud: FakeCloud, driver: LibvirtDriver
) -> None:
    cloud.hosts["a"].free = 3 * 1024**3
    cloud.hosts["a"].add("vm2", uuid="6c6d7761-0000-4000-8000-000000000002", max_kib=2048)
    cloud.hosts["a"].add(
        "off", uuid="6c6d7761-0000-4000-8000-000000000003", state=(C.VIR_DOMAIN_SHUTOFF, 1)
    )
    info = await driver.host_info("a")
    assert info.name == "a" and info.free_memory == 3 * 1024**3
    found = {i.name: i for i in info.instances}
    assert set(found) == {"vm1", "vm2"}  # running ones only
    assert found["vm1"].labels["tier"] == "database"
    assert found["vm2"].memory_bytes == 2048 * 1024 and found["vm2"].host == "a"
    # what a running job of ours to b copied so far is already reserved by the engine
    await driver.start("m1", REQ, PLAN)
    job = driver._jobs["m1"]
    job.memory_bytes, job.transferred_seen = 128 * MIB, 300 * MIB  # passes re-send pages
    assert (await driver.host_info("b")).free_memory == cloud.hosts["b"].free + 128 * MIB
    cloud.hosts["b"].up = False
    with pytest.raises(HostUnreachable):
        await driver.host_info("b")
    with pytest.raises(UnknownHost):
        await driver.host_info("z")


@pytest.mark.parametrize(
    ("arrange", "says"),
    [
        (
            _name_taken_defined,
            f"host b already defines an instance named 'vm1' with another identity "
            f"(uuid {OTHER_UUID}); remove or rename it there first",
        ),
        (_identity_taken, "host b already defines the identity of instance 'vm1'"),
        (_pinned_beyond_cpus, "instance 'vm1' is pinned to host CPUs 8-11, host b has CPUs 0-7"),
        (_emulator_beyond_cpus, "pinned to host CPUs 9, host b has CPUs 0-7"),
        (_pinned_beyond_nodes, "pinned to host memory nodes 1, host b has nodes 0"),
        (_pinned_beyond_cpus_no_cells, "pinned to host CPUs 4-5, host b has CPUs 0-3"),
    ],
)
async def test_preflight_refusal_reasons(
    cloud: FakeCloud, driver: LibvirtDriver, arrange: Callable[[FakeCloud], None], says: str
) -> None:
    """The reason names what is in the way, in neutral words, and nothing started."""
    arrange(cloud)
    with pytest.raises((NameTaken, Incompatible)) as caught:
        await driver.preflight(REQ)
    assert says in str(caught.value)
    assert not FORBIDDEN.search(str(caught.value))
    assert caught.value.status == 409
    assert not any(call[0] == "migrateToURI3" for call in cloud.hosts["a"].domains["vm1"].calls)


async def test_capabilities_from_versions(cloud: FakeCloud, driver: LibvirtDriver) -> None:
    caps = await driver.capabilities("a", "b")
    assert (caps.handover, caps.slow_down, caps.measure_change_rate) == (True, True, True)
    cloud.hosts["b"].hv_version = 2_005_000
    fresh = LibvirtDriver(driver._hosts, VirtualClock())
    caps = await fresh.capabilities("a", "b")
    assert (caps.handover, caps.slow_down, caps.measure_change_rate) == (False, False, True)
    await fresh.close()


async def test_capabilities_report_the_destination_cap(cloud: FakeCloud) -> None:
    hosts = {
        name: HostConfig(uri=host.uri, bandwidth="16MiB/s" if name == "b" else None)
        for name, host in cloud.hosts.items()
    }
    drv = LibvirtDriver(hosts, VirtualClock())
    assert (await drv.capabilities("a", "b")).bandwidth == 16 * MIB
    assert (await drv.capabilities("b", "a")).bandwidth is None
    await drv.close()


async def test_start_refuses_unsupported_handover(cloud: FakeCloud, driver: LibvirtDriver) -> None:
    cloud.hosts["b"].hv_version = 2_005_000
    with pytest.raises(Incompatible, match="hand over"):
        await driver.start(
            "m1", REQ, StartPlan(arm_handover=True, arm_slow_down=False, blackout_budget=0.3)
        )
    assert not any(c[0] == "migrateToURI3" for c in cloud.hosts["a"].domains["vm1"].calls)


async def test_start_sets_budget_then_migrates(cloud: FakeCloud, driver: LibvirtDriver) -> None:
    plan = StartPlan(
        arm_handover=True, arm_slow_down=False, blackout_budget=0.3, bandwidth=16 * MIB
    )
    dom = await started(cloud, driver, plan)
    names = [c[0] for c in dom.calls]
    assert names.index("migrateSetMaxDowntime") < names.index("migrateToURI3")
    assert ("migrateSetMaxDowntime", 300) in dom.calls
    _, uri, params, flags = next(c for c in dom.calls if c[0] == "migrateToURI3")
    assert uri == cloud.hosts["b"].uri
    assert flags == BASE | C.VIR_MIGRATE_POSTCOPY
    assert params["migrate_uri"] == "tcp://127.0.0.1"
    assert params["bandwidth"] == 16


async def test_sample_while_copying(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    await started(cloud, driver)
    sample = await driver.sample("m1")
    assert sample.phase is Phase.COPYING
    assert (sample.passes, sample.memory_remaining, sample.transfer_rate) == (3, 40 * MIB, 16 * MIB)
    assert sample.change_rate == 2048 * 4096
    assert sample.blackout_budget == 0.3
    assert sample.time == clock.now()


async def test_actions_map_to_calls(cloud: FakeCloud, driver: LibvirtDriver) -> None:
    dom = await started(cloud, driver)
    await driver.set_blackout_budget("m1", 1.25)
    await driver.set_bandwidth("m1", 32 * MIB)
    await driver.set_bandwidth("m1", None)
    assert ("migrateSetMaxDowntime", 1250) in dom.calls
    assert ("migrateSetMaxSpeed", 32) in dom.calls
    assert ("migrateSetMaxSpeed", UNLIMITED_MIB_S) in dom.calls
    assert (await driver.sample("m1")).blackout_budget == 1.25
    with pytest.raises(ActionRefused, match="not armed"):
        await driver.handover("m1")
    await driver.pause("m1")
    assert ("suspend",) in dom.calls
    assert (await driver.sample("m1")).phase is Phase.COMPLETING


async def test_link_cap_bounds_bandwidth(cloud: FakeCloud, clock: VirtualClock) -> None:
    hosts = {n: HostConfig(uri=h.uri, bandwidth="16MiB/s") for n, h in cloud.hosts.items()}
    drv = LibvirtDriver(hosts, clock)
    dom = await started(cloud, drv)
    await drv.set_bandwidth("m1", None)
    await drv.set_bandwidth("m1", 100 * MIB)
    assert [c for c in dom.calls if c[0] == "migrateSetMaxSpeed"] == [
        ("migrateSetMaxSpeed", 16)
    ] * 2
    dom.release.set()
    await drv.close()


async def test_handover_then_cancel_refused(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    plan = StartPlan(arm_handover=True, arm_slow_down=False, blackout_budget=0.3)
    dom = await started(cloud, driver, plan)
    await driver.handover("m1")
    assert ("migrateStartPostCopy",) in dom.calls
    assert (await driver.sample("m1")).phase is Phase.HANDOVER
    with pytest.raises(ActionRefused):
        await driver.cancel("m1")
    with pytest.raises(ActionRefused):
        await driver.pause("m1")
    cloud.complete("vm1", "a", "b", {"type": C.VIR_DOMAIN_JOB_COMPLETED, "downtime": 12})
    result = await finished(driver, clock)
    assert result.phase is Phase.COMPLETED
    assert result.handed_over
    assert result.blackout_seconds == pytest.approx(0.012)


@pytest.mark.parametrize("handover", [True, False], ids=["handover", "last-copy"])
async def test_a_completion_whose_statistics_are_gone_measures_its_blackout_from_events(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock, handover: bool
) -> None:
    """The migrate call can return before the source's job-completed event, and the
    source's completed statistics are gone with its definition: the stop still has a
    length, from the source's stop event to the destination's resume event."""
    plan = StartPlan(arm_handover=handover, arm_slow_down=False, blackout_budget=0.3)
    dom = await started(cloud, driver, plan)
    if handover:
        await driver.handover("m1")
    stopped, resumed = (
        (C.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY, C.VIR_DOMAIN_EVENT_RESUMED_POSTCOPY)
        if handover
        else (C.VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED, C.VIR_DOMAIN_EVENT_RESUMED_MIGRATED)
    )
    lifecycle(cloud, "a", dom, C.VIR_DOMAIN_EVENT_SUSPENDED, stopped)
    await clock.advance(0.04)
    lifecycle(cloud, "b", dom, C.VIR_DOMAIN_EVENT_RESUMED, resumed)
    await clock.advance(0.5)
    cloud.complete("vm1", "a", "b", None)  # no completed statistics on either host
    result = await finished(driver, clock)
    assert result.phase is Phase.COMPLETED and result.handed_over is handover
    assert result.blackout_seconds == pytest.approx(0.04)


async def test_hypervisor_refusal_is_action_refused(
    cloud: FakeCloud, driver: LibvirtDriver
) -> None:
    dom = await started(cloud, driver)
    dom.fail_with["abortJob"] = cloud.libvirt.libvirtError(
        "operation invalid: no job", C.VIR_ERR_OPERATION_INVALID
    )
    with pytest.raises(ActionRefused):
        await driver.cancel("m1")


async def test_completion_uses_completed_stats(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    await started(cloud, driver)
    await driver.sample("m1")
    completed = {
        "type": C.VIR_DOMAIN_JOB_COMPLETED,
        "downtime": 240,
        "memory_processed": 130 * MIB,
        "memory_iteration": 4,
    }
    cloud.complete("vm1", "a", "b", completed)
    result = await finished(driver, clock)
    assert result.phase is Phase.COMPLETED
    assert result.running_on == "b"
    assert result.blackout_seconds == pytest.approx(0.24)
    assert (result.transferred, result.passes) == (130 * MIB, 4)
    assert not result.paused and result.error is None
    sample = await driver.sample("m1")
    assert (sample.phase, sample.memory_remaining) == (Phase.COMPLETED, 0)


async def test_job_completed_event_keeps_stats(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    dom = await started(cloud, driver)
    cloud.fire("a", C.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION, dom, 7)
    assert (await driver.sample("m1")).passes == 7
    lifecycle(cloud, "a", dom, C.VIR_DOMAIN_EVENT_SUSPENDED, C.VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED)
    assert (await driver.sample("m1")).phase is Phase.COMPLETING
    cloud.fire("a", C.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, dom, {"type": 3, "downtime": 180})
    cloud.complete("vm1", "a", "b", None)  # completed stats not readable afterwards
    result = await finished(driver, clock)
    assert result.blackout_seconds == pytest.approx(0.18)
    assert result.passes == 7


async def test_forced_pause_completion_resumes_paused_destination(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    await started(cloud, driver)
    await driver.pause("m1")
    await clock.advance(3.0)
    moved = cloud.complete("vm1", "a", "b", {"type": 3, "downtime": 900})
    moved.state = (C.VIR_DOMAIN_PAUSED, C.VIR_DOMAIN_PAUSED_USER)
    result = await finished(driver, clock)
    assert result.phase is Phase.COMPLETED and result.paused
    assert ("resume",) in moved.calls
    assert result.blackout_seconds is not None and result.blackout_seconds >= 3.0
    assert any("instance-resumed" in r.getMessage() for r in caplog.records)


async def test_cancel_leaves_instance_on_source(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    dom = await started(cloud, driver)
    await driver.sample("m1")
    await driver.cancel("m1")
    assert ("abortJob",) in dom.calls
    result = await finished(driver, clock)
    assert (result.phase, result.running_on) == (Phase.CANCELLED, "a")
    assert result.transferred == 100 * MIB  # the most seen, not the reset statistics


async def test_a_cancelled_migration_starts_again_under_the_same_id(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    """A restart with a higher slow-down start level: the abort's job has ended (its
    migrate call returned), then the same id starts a new job on the same domain."""
    dom = await started(cloud, driver)
    await driver.sample("m1")
    await driver.cancel("m1")
    assert (await finished(driver, clock)).phase is Phase.CANCELLED
    # libvirt has no job on the domain any more: the next migrate call is a new job.
    dom.release, dom.outcome = threading.Event(), None
    dom.job = dict(RUNNING_STATS)
    slowed = StartPlan(
        arm_handover=False, arm_slow_down=True, blackout_budget=0.6, slow_down_initial=0.8
    )
    await driver.start("m1", REQ, slowed)
    calls = [c for c in dom.calls if c[0] == "migrateToURI3"]
    assert len(calls) == 2
    _, _, params, flags = calls[-1]
    assert flags & C.VIR_MIGRATE_AUTO_CONVERGE
    assert params[C.VIR_MIGRATE_PARAM_AUTO_CONVERGE_INITIAL] == 80
    sample = await driver.sample("m1")
    assert sample.phase is Phase.COPYING  # the new job, not the cancelled one
    moved = cloud.complete("vm1", "a", "b", {"type": 3, "downtime": 200})
    assert moved is not None
    result = await finished(driver, clock)
    assert (result.phase, result.running_on) == (Phase.COMPLETED, "b")


async def test_failure_keeps_the_error(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    await started(cloud, driver)
    cloud.fail("vm1", "a", "operation failed: Lost connection to destination host")
    result = await finished(driver, clock)
    assert (result.phase, result.running_on) == (Phase.FAILED, "a")
    assert "Lost connection to destination host" in (result.error or "")


async def test_a_handover_asked_that_the_failure_came_before_is_not_handed_over(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    """The handover was asked, but the link broke before the hosts switched: the job
    fails with the instance running on the source. It was not handed over (so a new
    job may start; before, the result said handed over and none did)."""
    plan = StartPlan(arm_handover=True, arm_slow_down=False, blackout_budget=0.3)
    await started(cloud, driver, plan)
    await driver.handover("m1")
    assert (await driver.sample("m1")).phase is Phase.HANDOVER  # asked
    cloud.fail("vm1", "a", "operation failed: Lost connection to destination host")
    result = await finished(driver, clock)
    assert (result.phase, result.running_on) == (Phase.FAILED, "a")
    assert not result.handed_over


async def test_failed_pause_resumes_the_source(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    dom = await started(cloud, driver)
    await driver.pause("m1")
    cloud.fail("vm1", "a", "operation failed: migration failed")
    result = await finished(driver, clock)
    assert result.phase is Phase.FAILED
    assert ("resume",) in dom.calls
    assert dom.state[0] == C.VIR_DOMAIN_RUNNING


@pytest.mark.parametrize("resume_event", [True, False])
async def test_a_final_stop_that_fails_reports_how_long_the_instance_was_stopped(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock, resume_event: bool
) -> None:
    """The hypervisor stops the instance for its final copy and the link breaks under
    it: the job fails and the instance runs on the source again. The statistics call
    waits through such a stop, so no sample saw it; the result says how long it lasted,
    from the stop's event to the source's resume event (or to our resume, when the
    instance was left paused). Before, a failed job reported no stop at all."""
    dom = await started(cloud, driver)
    await clock.advance(1.0)
    lifecycle(cloud, "a", dom, C.VIR_DOMAIN_EVENT_SUSPENDED, C.VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED)
    dom.state = (C.VIR_DOMAIN_PAUSED, C.VIR_DOMAIN_PAUSED_MIGRATION)
    await clock.advance(15.0)  # t = 16: the link's timeout ends the job
    if resume_event:
        dom.state = (C.VIR_DOMAIN_RUNNING, C.VIR_DOMAIN_RUNNING_MIGRATION_CANCELED)
        lifecycle(cloud, "a", dom, C.VIR_DOMAIN_EVENT_RESUMED, C.VIR_DOMAIN_EVENT_RESUMED_MIGRATED)
    cloud.fail("vm1", "a", "operation failed: Lost connection to destination host")
    await clock.advance(2.0)  # t = 18: we learn of the end a little later
    result = await finished(driver, clock)
    assert (result.phase, result.running_on) == (Phase.FAILED, "a")
    assert result.blackout_seconds == pytest.approx(15.0 if resume_event else 17.0)
    assert (("resume",) in dom.calls) is not resume_event


async def test_a_cancelled_copy_that_never_stopped_reports_no_stop(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    await started(cloud, driver)
    await driver.cancel("m1")
    result = await finished(driver, clock)
    assert result.phase is Phase.CANCELLED and result.blackout_seconds is None


async def test_start_failure_raises(cloud: FakeCloud, driver: LibvirtDriver) -> None:
    dom = cloud.hosts["a"].domains["vm1"]
    dom.fail_with["migrateToURI3"] = cloud.libvirt.libvirtError(
        "internal error: unable to execute QEMU command", 1
    )
    with pytest.raises(DriverError, match="unable to execute"):
        await driver.start("m1", REQ, PLAN)


async def test_wait_event_returns_early_on_event(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    dom = await started(cloud, driver)
    await driver.sample("m1")
    waiter = asyncio.ensure_future(driver.wait_event("m1", 30.0))
    await clock.advance(1.0)
    assert not waiter.done()
    cloud.fire("a", C.VIR_DOMAIN_EVENT_ID_MIGRATION_ITERATION, dom, 4)
    await clock.advance(0)
    assert waiter.done()
    await driver.sample("m1")
    waiter = asyncio.ensure_future(driver.wait_event("m1", 5.0))
    await clock.advance(5.0)
    assert waiter.done()


async def test_lost_host_is_driver_error_then_backoff(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    await started(cloud, driver)
    cloud.hosts["a"].up = False
    with pytest.raises(DriverError, match="lost the connection"):
        await driver.sample("m1")
    opens = cloud.hosts["a"].opens
    with pytest.raises(DriverError, match="unreachable"):
        await driver.sample("m1")
    with pytest.raises(DriverError, match="next attempt"):
        await driver.sample("m1")
    # the first sample tried to reconnect once (to ask where the instance runs); the
    # later failures wait out the backoff
    assert cloud.hosts["a"].opens == opens
    cloud.hosts["a"].up = True
    await clock.advance(5.0)
    assert (await driver.sample("m1")).phase is Phase.COPYING  # followed on a new connection
    assert cloud.hosts["a"].opens == opens + 1
    assert await driver.reachable() == {"a": True, "b": True}
    cloud.hosts["b"].up = False
    assert (await driver.reachable())["b"] is False


async def test_measure_change_rate(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    dom = cloud.hosts["a"].domains["vm1"]
    dom.dirty_readings = [10.0, 30.0]
    rate = await run(clock, driver.measure_change_rate("vm1", "a"))
    # One reading over the window the simulator and the benchmark's model of the
    # daemon measure over: the policy reads the figure with its window.
    assert rate == ChangeRate(10.0 * MIB, float(CHANGE_RATE_WINDOW))
    assert [c for c in dom.calls if c[0] == "startDirtyRateCalc"] == [
        ("startDirtyRateCalc", CHANGE_RATE_WINDOW)
    ]


async def test_measure_change_rate_averages_several_readings(
    cloud: FakeCloud, clock: VirtualClock
) -> None:
    hosts = {name: HostConfig(uri=host.uri) for name, host in cloud.hosts.items()}
    driver = LibvirtDriver(hosts, clock, change_rate_readings=2, change_rate_period=1)
    dom = cloud.hosts["a"].domains["vm1"]
    dom.dirty_readings = [10.0, 30.0]
    try:
        rate = await run(clock, driver.measure_change_rate("vm1", "a"))
    finally:
        await driver.close()
    assert rate == ChangeRate(20.0 * MIB, 1.0)  # each reading covers one second
    assert [c for c in dom.calls if c[0] == "startDirtyRateCalc"] == [("startDirtyRateCalc", 1)] * 2


async def test_measure_change_rate_unsupported(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    dom = cloud.hosts["a"].domains["vm1"]
    dom.fail_with["startDirtyRateCalc"] = cloud.libvirt.libvirtError(
        "unsupported", C.VIR_ERR_OPERATION_UNSUPPORTED
    )
    assert await run(clock, driver.measure_change_rate("vm1", "a")) is None


# --------------------------------------------------------------------------- reattach


async def test_reattach_adopts_a_running_job(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    dom = cloud.hosts["a"].domains["vm1"]
    dom.job = dict(RUNNING_STATS)
    assert await driver.reattach("m1", REQ, PLAN) is None
    assert (await driver.sample("m1")).phase is Phase.COPYING
    await driver.set_blackout_budget("m1", 2.0)
    assert ("migrateSetMaxDowntime", 2000) in dom.calls
    cloud.complete("vm1", "a", "b", {"type": 3, "downtime": 300})
    result = await finished(driver, clock)
    assert (result.phase, result.running_on) == (Phase.COMPLETED, "b")
    assert result.blackout_seconds == pytest.approx(0.3)


async def test_reattach_reports_the_budget_the_hypervisor_holds(
    cloud: FakeCloud, driver: LibvirtDriver
) -> None:
    """Restarted during the first pass, the daemon finds the first pass's budget in
    force, not the plan's: its samples say what the hypervisor compares with."""
    dom = cloud.hosts["a"].domains["vm1"]
    dom.job = dict(RUNNING_STATS)
    dom.max_downtime = 50
    held = dataclasses.replace(PLAN, blackout_budget=0.3, first_pass_budget=0.05)
    assert await driver.reattach("m1", REQ, held) is None
    assert (await driver.sample("m1")).blackout_budget == pytest.approx(0.05)


async def test_reattach_sees_handover_in_progress(cloud: FakeCloud, driver: LibvirtDriver) -> None:
    dom = cloud.hosts["a"].domains["vm1"]
    dom.job = dict(RUNNING_STATS)
    dom.state = (C.VIR_DOMAIN_PAUSED, C.VIR_DOMAIN_PAUSED_POSTCOPY)
    assert await driver.reattach("m1", REQ, PLAN) is None
    assert (await driver.sample("m1")).phase is Phase.HANDOVER
    with pytest.raises(ActionRefused):
        await driver.cancel("m1")


def _ended_on_destination(c: FakeCloud) -> None:
    c.complete("vm1", "a", "b", {"type": 3, "downtime": 222})


def _ended_on_source(c: FakeCloud) -> None:
    pass


def _source_shut_off_destination_runs(c: FakeCloud) -> None:
    c.complete("vm1", "a", "b", None)
    c.hosts["a"].add("vm1").state = (C.VIR_DOMAIN_SHUTOFF, 0)


def _runs_nowhere(c: FakeCloud) -> None:
    c.hosts["a"].domains["vm1"].state = (C.VIR_DOMAIN_SHUTOFF, 2)


def _source_gone_destination_runs(c: FakeCloud) -> None:
    c.complete("vm1", "a", "b", None)
    c.hosts["a"].up = False


@pytest.mark.parametrize(
    ("arrange", "phase", "running_on", "blackout"),
    [
        (_ended_on_destination, Phase.COMPLETED, "b", 0.222),
        (_source_shut_off_destination_runs, Phase.COMPLETED, "b", None),
        (_source_gone_destination_runs, None, None, None),
        (_ended_on_source, Phase.FAILED, "a", None),
        (_runs_nowhere, Phase.FAILED, None, None),
    ],
)
async def test_reattach_decision_table(
    cloud: FakeCloud,
    driver: LibvirtDriver,
    arrange: Callable[[FakeCloud], None],
    phase: Phase | None,
    running_on: str | None,
    blackout: float | None,
) -> None:
    arrange(cloud)
    if phase is None:  # the source does not answer: no truthful answer yet
        with pytest.raises(DriverError, match="does not answer"):
            await driver.reattach("m1", REQ, PLAN)
        return
    result = await driver.reattach("m1", REQ, PLAN)
    assert result is not None
    assert (result.phase, result.running_on) == (phase, running_on)
    if blackout is None:
        assert result.blackout_seconds is None
    else:
        assert result.blackout_seconds == pytest.approx(blackout)
    if phase is Phase.FAILED:
        assert "read back after a restart" in (result.error or "")


@pytest.mark.parametrize("paused_by_us", [True, False])
async def test_reattach_resumes_an_instance_lmwatch_paused_whose_job_ended(
    cloud: FakeCloud, driver: LibvirtDriver, paused_by_us: bool
) -> None:
    """lmwatch paused the instance and stopped its job (a pause the link stretched),
    then restarted before seeing the end. Some hypervisors leave the instance paused
    on the source after an abort: the record's word that the pause was lmwatch's lets
    the new driver resume it, as the old one would have. An instance lmwatch did not
    pause is left as it is."""
    cloud.hosts["a"].domains["vm1"].state = (C.VIR_DOMAIN_PAUSED, C.VIR_DOMAIN_PAUSED_USER)
    result = await driver.reattach("m1", REQ, PLAN, paused=paused_by_us)
    assert result is not None and result.running_on == "a"
    state = tuple(cloud.hosts["a"].domains["vm1"].state)
    if paused_by_us:
        assert state[0] == C.VIR_DOMAIN_RUNNING
        assert result.note is not None and "resumed there" in result.note
    else:
        assert state == (C.VIR_DOMAIN_PAUSED, C.VIR_DOMAIN_PAUSED_USER)


async def test_unknown_migration_is_driver_error(driver: LibvirtDriver) -> None:
    with pytest.raises(DriverError):
        await driver.sample("nope")
    await driver.wait_event("nope", 1.0)  # nothing to wait for: returns at once


async def test_incoming_instance_is_not_resumed(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    await started(cloud, driver)
    moved = cloud.complete("vm1", "a", "b", None)
    moved.state = (C.VIR_DOMAIN_PAUSED, C.VIR_DOMAIN_PAUSED_MIGRATION)
    await until(
        clock, lambda: driver._jobs["m1"].task is not None and driver._jobs["m1"].task.done()
    )
    with pytest.raises(DriverError, match="still arriving"):
        await driver.sample("m1")
    assert ("resume",) not in moved.calls
    moved.state = (C.VIR_DOMAIN_RUNNING, C.VIR_DOMAIN_RUNNING_MIGRATED)
    assert (await driver.sample("m1")).phase is Phase.COMPLETED


# --------------------------------------------------------------------------- cancel twice


def _no_job() -> Exception:
    return cast(
        Exception,
        FakeCloud("x").libvirt.libvirtError(
            "Requested operation is not valid: no job is active on the domain",
            C.VIR_ERR_OPERATION_INVALID,
        ),
    )


async def test_refused_second_cancel_keeps_the_first(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    dom = await started(cloud, driver)
    await driver.sample("m1")
    await driver.cancel("m1")
    dom.fail_with["abortJob"] = _no_job()  # the first abort is already ending the job
    await driver.cancel("m1")  # not an error
    result = await finished(driver, clock)
    assert (result.phase, result.running_on, result.error) == (Phase.CANCELLED, "a", None)
    await driver.cancel("m1")  # after the end: still nothing to report


async def test_concurrent_cancels_count_once(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    dom = await started(cloud, driver)
    aborts: list[int] = []
    first_abort = dom.abortJob

    def abort_once() -> int:
        aborts.append(1)
        if len(aborts) > 1:
            raise _no_job()
        return first_abort()

    dom.abortJob = abort_once
    answers = await asyncio.gather(driver.cancel("m1"), driver.cancel("m1"), return_exceptions=True)
    assert answers == [None, None]
    assert len(aborts) == 2
    result = await finished(driver, clock)
    assert (result.phase, result.running_on) == (Phase.CANCELLED, "a")


async def test_refused_first_cancel_is_no_cancel(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    dom = await started(cloud, driver)
    dom.fail_with["abortJob"] = _no_job()
    with pytest.raises(ActionRefused):
        await driver.cancel("m1")
    cloud.fail("vm1", "a", "operation failed: Lost connection to destination host")
    result = await finished(driver, clock)
    assert (result.phase, result.running_on) == (Phase.FAILED, "a")


# --------------------------------------------------------------------------- source restart


def _job_died_with_the_daemon(c: FakeCloud) -> None:
    c.hosts["a"].domains["vm1"].job = {"type": 0}


def _finished_source_shut_off(c: FakeCloud) -> None:
    c.complete("vm1", "a", "b", None, release=False)
    c.hosts["a"].add("vm1").state = (C.VIR_DOMAIN_SHUTOFF, 0)  # reason UNKNOWN


def _finished_while_source_down(c: FakeCloud) -> None:
    c.complete("vm1", "a", "b", None, release=False)


@pytest.mark.parametrize(
    ("arrange", "paused", "back_up", "phase", "running_on"),
    [
        (_job_died_with_the_daemon, False, True, Phase.FAILED, "a"),
        (_job_died_with_the_daemon, True, True, Phase.FAILED, "a"),
        (_finished_source_shut_off, False, True, Phase.COMPLETED, "b"),
        (_finished_source_shut_off, True, True, Phase.COMPLETED, "b"),
        (_finished_while_source_down, False, False, Phase.COMPLETED, "b"),
    ],
)
async def test_source_daemon_restart_with_a_stuck_migrate_call(
    cloud: FakeCloud,
    driver: LibvirtDriver,
    clock: VirtualClock,
    arrange: Callable[[FakeCloud], None],
    paused: bool,
    back_up: bool,
    phase: Phase,
    running_on: str,
) -> None:
    dom = await started(cloud, driver)
    await driver.sample("m1")
    if paused:
        await driver.pause("m1")
    cloud.hosts["a"].up = False  # the source daemon stops; the migrate call never returns
    with pytest.raises(DriverError):
        await driver.sample("m1")
    arrange(cloud)
    cloud.hosts["a"].up = back_up
    result = await finished_through_errors(driver, clock)
    assert (result.phase, result.running_on) == (phase, running_on)
    assert not dom.release.is_set()  # decided without the migrate call
    if phase is Phase.FAILED:
        assert "connection was lost" in (result.error or "")
        assert (("resume",) in dom.calls) == paused
        assert dom.state[0] == C.VIR_DOMAIN_RUNNING


async def test_lost_connection_keeps_following_a_running_job(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    dom = await started(cloud, driver)
    cloud.hosts["a"].up = False
    with pytest.raises(DriverError):
        await driver.sample("m1")
    cloud.hosts["a"].up = True  # the job survived: follow it on the new connection
    await clock.advance(5.0)
    assert (await driver.sample("m1")).phase is Phase.COPYING
    await driver.pause("m1")  # actions reach the job through the new connection
    assert dom.calls.count(("suspend",)) == 1
    cloud.complete("vm1", "a", "b", {"type": 3, "downtime": 400}, release=False)
    result = await finished(driver, clock)
    assert (result.phase, result.running_on) == (Phase.COMPLETED, "b")


async def test_migrate_call_runs_in_a_daemon_thread(
    cloud: FakeCloud, driver: LibvirtDriver
) -> None:
    await started(cloud, driver)
    threads = [t for t in threading.enumerate() if t.name.startswith("lmw-migrate")]
    assert threads
    assert all(t.daemon for t in threads)  # a stuck call never holds up the exit


async def test_in_daemon_thread_delivers_results_and_errors() -> None:
    def fail() -> None:
        raise ValueError("boom")

    assert await in_daemon_thread(lambda: 42) == 42
    with pytest.raises(ValueError, match="boom"):
        await in_daemon_thread(fail)
    gate = threading.Event()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(in_daemon_thread(gate.wait), 0.05)
    gate.set()


# --------------------------------------------------------------------------- pause blackout


@pytest.mark.parametrize(
    ("resumed_at", "elapsed_ms", "downtime_ms", "blackout"),
    [
        (3.0, 3200, 1900, 2.0),  # the destination's resume event
        (None, 3200, 1900, 2.2),  # the job's end by its completed statistics
        (None, None, 1900, 3.5),  # the source's job-completed event
        (3.0, 3200, 2600, 2.6),  # never below the hypervisor's own figure
    ],
)
async def test_pause_blackout_ends_when_the_instance_resumes(
    cloud: FakeCloud,
    driver: LibvirtDriver,
    clock: VirtualClock,
    resumed_at: float | None,
    elapsed_ms: int | None,
    downtime_ms: int,
    blackout: float,
) -> None:
    dom = await started(cloud, driver)
    await clock.advance(1.0)
    await driver.pause("m1")  # t = 1
    completed: dict[str, Any] = {"type": C.VIR_DOMAIN_JOB_COMPLETED, "downtime": downtime_ms}
    if elapsed_ms is not None:
        completed["time_elapsed"] = elapsed_ms
    await clock.advance(2.0)  # t = 3
    moved = cloud.complete("vm1", "a", "b", completed, release=False)
    if resumed_at is not None:
        lifecycle(
            cloud, "b", moved, C.VIR_DOMAIN_EVENT_RESUMED, C.VIR_DOMAIN_EVENT_RESUMED_MIGRATED
        )
    await clock.advance(1.5)  # t = 4.5: the source confirms; the migrate call returns later
    cloud.fire("a", C.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, dom, completed)
    lifecycle(cloud, "a", dom, C.VIR_DOMAIN_EVENT_STOPPED, C.VIR_DOMAIN_EVENT_STOPPED_MIGRATED)
    await clock.advance(1.0)
    dom.release.set()
    result = await finished(driver, clock)
    assert result.phase is Phase.COMPLETED and result.paused
    assert result.blackout_seconds == pytest.approx(blackout)


@pytest.mark.parametrize("resume_event", [True, False])
async def test_pause_blackout_of_a_reattached_job(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock, resume_event: bool
) -> None:
    dom = cloud.hosts["a"].domains["vm1"]
    dom.job = {**RUNNING_STATS, "time_elapsed": 5000}  # the job started 5 s before we came
    assert await driver.reattach("m1", REQ, PLAN) is None
    await clock.advance(1.0)
    await driver.pause("m1")  # t = 1
    await clock.advance(1.0)  # t = 2: the instance resumes on the destination
    completed = {"type": C.VIR_DOMAIN_JOB_COMPLETED, "downtime": 700, "time_elapsed": 7000}
    moved = cloud.complete("vm1", "a", "b", completed)
    if resume_event:
        lifecycle(
            cloud, "b", moved, C.VIR_DOMAIN_EVENT_RESUMED, C.VIR_DOMAIN_EVENT_RESUMED_MIGRATED
        )
    await clock.advance(1.5)  # t = 3.5: the source confirms
    cloud.fire("a", C.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, dom, completed)
    result = await finished(driver, clock)
    assert (result.phase, result.running_on) == (Phase.COMPLETED, "b")
    assert result.blackout_seconds == pytest.approx(1.0)


async def test_a_job_ending_by_our_abort_is_not_completing(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    dom = await started(cloud, driver)

    def abort_slowly() -> int:  # the job is gone; the migrate call has not returned yet
        dom.job = {"type": 0}
        return 0

    dom.abortJob = abort_slowly
    await driver.cancel("m1")
    assert (await driver.sample("m1")).phase is Phase.COPYING
    dom.outcome = cloud.libvirt.libvirtError(ABORTED, C.VIR_ERR_OPERATION_ABORTED)
    dom.release.set()
    result = await finished(driver, clock)
    assert (result.phase, result.running_on) == (Phase.CANCELLED, "a")


# --------------------------------------------------------------------------- neutral error text

# The vocabulary contract's pattern (tests/test_vocabulary.py), repeated on purpose:
# the driver's own `UNSAID` must not be the thing that checks itself.
FORBIDDEN = re.compile(
    r"post.?copy|suspend|downtime|auto.?converge|xbzrle|libvirt|qemu|virDomain", re.IGNORECASE
)
POSTCOPY_FAILED = "unable to execute QEMU command 'migrate-start-postcopy'"


@pytest.mark.parametrize(
    ("raw", "neutral"),
    [
        (POSTCOPY_FAILED, "unable to execute hypervisor command 'migrate-start-handover'"),
        (ABORTED, ABORTED),
        (
            "Requested operation is not valid: domain is not running",
            "Requested operation is not valid: domain is not running",
        ),
        (
            "internal error: migration was active, but no RAM info was set",
            "internal error: migration was active, but no RAM info was set",
        ),
        (
            "Requested operation is not valid: cannot abort migration in post-copy mode",
            "Requested operation is not valid: cannot abort migration in handover mode",
        ),
        (
            "argument unsupported: post-copy migration is not supported by the destination",
            "argument unsupported: handover migration is not supported by the destination",
        ),
        (
            "Timed out during operation: cannot acquire state change lock "
            "(held by monitor=remoteDispatchDomainMigratePerform3Params)",
            "Timed out during operation: cannot acquire state change lock "
            "(held by monitor=remoteDispatchDomainMigratePerform3Params)",
        ),
        (
            "operation failed: job 'migration out' failed: Postcopy is not supported",
            "operation failed: job 'migration out' failed: Handover is not supported",
        ),
        (
            "Requested operation is not valid: domain is already suspended",
            "Requested operation is not valid: domain is already paused",
        ),
        (
            "Unable to set downtime: QEMU does not support auto-converge or xbzrle",
            "Unable to set blackout: hypervisor does not support slow-down or page compression",
        ),
        (
            "Failed to connect socket to '/var/run/libvirt/libvirt-sock': No such file",
            "Failed to connect socket to '/var/run/hypervisor/hypervisor-sock': No such file",
        ),
        (
            "libvirtd QEMU process exited while suspending",
            "hypervisor process exited while pausing",
        ),
        (
            "virDomainMigrateToURI3() failed: POSTCOPY_ACTIVE",
            "failed: HANDOVER_ACTIVE",
        ),
        ("QEMU guest agent is not connected", "Hypervisor guest agent is not connected"),
    ],
)
def test_neutral_text_translates_real_messages(raw: str, neutral: str) -> None:
    assert neutral_text(raw) == neutral
    assert not FORBIDDEN.search(neutral_text(raw))


FRAGMENTS = st.sampled_from(
    ["post", "copy", "-", "_", " ", "Post-Copy", "suspend", "SUSPENDED", "down", "time",
     "auto", "converge", "xbzrle", "lib", "virt", "libvirtd", "QEMU", "qemu", "vir",
     "Domain", "virDomainFoo()", "x", "(", ")", "\n", ":"]
)  # fmt: skip


@given(st.lists(FRAGMENTS, max_size=12).map("".join))
def test_neutral_text_never_says_a_forbidden_word(raw: str) -> None:
    assert not FORBIDDEN.search(neutral_text(raw)), raw


@given(st.from_regex(r"[A-Za-z0-9ÄéΩ_/ -]{0,40}", fullmatch=True))
def test_neutral_text_leaves_neutral_text_alone(raw: str) -> None:
    """Words and single spaces pass unchanged (punctuation spacing is tidied, by design)."""
    neutral = " ".join(raw.split())
    if FORBIDDEN.search(neutral) or re.search(r"vir[A-Z]|hypervisor", neutral, re.IGNORECASE):
        return
    assert neutral_text(neutral) == neutral.strip()


@pytest.mark.parametrize(
    ("code", "domain", "cause"),
    [
        (C.VIR_ERR_OPERATION_INVALID, C.VIR_FROM_QEMU, ErrorCause.INVALID_STATE),
        (C.VIR_ERR_NO_DOMAIN, C.VIR_FROM_QEMU, ErrorCause.NO_INSTANCE),
        (C.VIR_ERR_OPERATION_ABORTED, C.VIR_FROM_QEMU, ErrorCause.ABORTED),
        (C.VIR_ERR_OPERATION_UNSUPPORTED, C.VIR_FROM_QEMU, ErrorCause.UNSUPPORTED),
        (C.VIR_ERR_ARGUMENT_UNSUPPORTED, C.VIR_FROM_QEMU, ErrorCause.UNSUPPORTED),
        (C.VIR_ERR_SYSTEM_ERROR, C.VIR_FROM_RPC, ErrorCause.CONNECTION_LOST),
        (C.VIR_ERR_OPERATION_FAILED, C.VIR_FROM_RPC, ErrorCause.CONNECTION_LOST),
        (C.VIR_ERR_OPERATION_FAILED, C.VIR_FROM_QEMU, ErrorCause.FAILED),
        (1, C.VIR_FROM_QEMU, ErrorCause.INTERNAL),
        (None, None, ErrorCause.FAILED),
    ],
)
def test_error_cause_from_code_and_domain(
    code: int | None, domain: int | None, cause: ErrorCause
) -> None:
    assert error_cause(C, code, domain) is cause


def _neutral(message: str) -> str:
    assert not FORBIDDEN.search(message), message
    return message


async def test_failed_migration_reports_neutral_text(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock, caplog: pytest.LogCaptureFixture
) -> None:
    await started(cloud, driver)
    cloud.fail("vm1", "a", POSTCOPY_FAILED, code=1)
    result = await finished(driver, clock)
    assert result.phase is Phase.FAILED
    error = _neutral(result.error or "")
    assert "internal hypervisor error" in error
    assert "migrate-start-handover" in error
    raw_lines = [r.getMessage() for r in caplog.records if "hypervisor-error" in r.getMessage()]
    assert any("migrate-start-postcopy" in line and "m1" in line for line in raw_lines)


async def test_refused_action_reports_neutral_text(cloud: FakeCloud, driver: LibvirtDriver) -> None:
    dom = await started(cloud, driver, dataclasses.replace(PLAN, arm_handover=True))
    dom.fail_with["migrateStartPostCopy"] = cloud.libvirt.libvirtError(
        "Requested operation is not valid: post-copy migration is not supported by the destination",
        C.VIR_ERR_OPERATION_INVALID,
    )
    with pytest.raises(ActionRefused) as refused:
        await driver.handover("m1")
    message = _neutral(str(refused.value))
    assert "handing over failed" in message and str(ErrorCause.INVALID_STATE) in message


async def test_start_failure_reports_neutral_text(cloud: FakeCloud, driver: LibvirtDriver) -> None:
    dom = cloud.hosts["a"].domains["vm1"]
    dom.fail_with["migrateToURI3"] = cloud.libvirt.libvirtError(
        "Timed out during operation: cannot acquire state change lock "
        "(held by monitor=remoteDispatchDomainMigratePerform3Params) virDomainSuspend",
        68,
    )
    with pytest.raises(DriverError) as failed:
        await driver.start("m1", REQ, PLAN)
    assert "state change lock" in _neutral(str(failed.value))


async def test_unreachable_host_reports_neutral_text(
    cloud: FakeCloud, driver: LibvirtDriver
) -> None:
    def refuse(uri: str) -> Any:
        raise cloud.libvirt.libvirtError(
            "Failed to connect socket to '/var/run/libvirt/virtqemud-sock': Connection refused",
            38,
            7,
        )

    cloud.libvirt.open = refuse  # type: ignore[attr-defined]
    with pytest.raises(HostUnreachable) as unreachable:
        await driver.preflight(REQ)
    assert "Connection refused" in _neutral(str(unreachable.value))


# --------------------------------------------------------------------------- transient errors


def test_only_not_running_or_gone_means_the_job_ended() -> None:
    from lmwatch.drivers.libvirt_mapping import job_has_ended

    assert job_has_ended(C, C.VIR_ERR_OPERATION_INVALID)
    assert job_has_ended(C, C.VIR_ERR_NO_DOMAIN)
    for code in (
        C.VIR_ERR_INTERNAL_ERROR,
        C.VIR_ERR_OPERATION_FAILED,
        C.VIR_ERR_OPERATION_TIMEOUT,
        C.VIR_ERR_SYSTEM_ERROR,
        C.VIR_ERR_RPC,
        None,
    ):
        assert not job_has_ended(C, code), code


TRANSIENT = [
    ("internal error: cannot read job statistics", C.VIR_ERR_INTERNAL_ERROR),
    ("operation failed: job statistics unavailable", C.VIR_ERR_OPERATION_FAILED),
    ("Timed out during operation: cannot acquire state change lock", C.VIR_ERR_OPERATION_TIMEOUT),
]


@pytest.mark.parametrize(("message", "code"), TRANSIENT)
async def test_a_transient_statistics_error_is_an_error_not_the_end(
    cloud: FakeCloud, driver: LibvirtDriver, message: str, code: int
) -> None:
    dom = await started(cloud, driver)
    dom.fail_with["jobStats"] = cloud.libvirt.libvirtError(message, code)
    with pytest.raises(DriverError, match="job statistics failed"):
        await driver.sample("m1")
    del dom.fail_with["jobStats"]
    assert (await driver.sample("m1")).phase is Phase.COPYING
    await driver.pause("m1")
    assert ("suspend",) in dom.calls


async def test_the_job_still_ends_when_the_instance_stops_running(
    cloud: FakeCloud, driver: LibvirtDriver
) -> None:
    dom = await started(cloud, driver)
    dom.fail_with["jobStats"] = cloud.libvirt.libvirtError(
        "Requested operation is not valid: domain is not running", C.VIR_ERR_OPERATION_INVALID
    )
    assert (await driver.sample("m1")).phase is Phase.COMPLETING


async def test_a_transient_error_while_reattaching_is_retried_not_concluded(
    cloud: FakeCloud, driver: LibvirtDriver
) -> None:
    dom = cloud.hosts["a"].domains["vm1"]
    dom.job = dict(RUNNING_STATS)
    dom.fail_with["jobStats"] = cloud.libvirt.libvirtError(
        "internal error", C.VIR_ERR_INTERNAL_ERROR
    )
    with pytest.raises(DriverError, match="job statistics failed"):
        await driver.reattach("m1", REQ, PLAN)
    del dom.fail_with["jobStats"]
    assert await driver.reattach("m1", REQ, PLAN) is None  # adopted: still migrating
    assert (await driver.sample("m1")).phase is Phase.COPYING


@pytest.mark.parametrize(("message", "code"), TRANSIENT[:1])
async def test_the_engine_rides_out_a_transient_statistics_error_and_can_force_complete(
    cloud: FakeCloud,
    driver: LibvirtDriver,
    clock: VirtualClock,
    tmp_path: Path,
    message: str,
    code: int,
) -> None:
    from lmwatch.engine import Engine, EngineSettings
    from lmwatch.model import State
    from lmwatch.profiles import ProfileRegistry
    from lmwatch.store import Store

    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(
        "profiles:\n  - name: pausable\n    max_blackout: 300ms\n    may_pause: true\n"
        "    max_pause: 10s\n    deadline: 1h\n    on_deadline: cancel\n"
    )
    store = Store.open(tmp_path / "lmwatch.db")
    engine = Engine(
        driver=driver,
        store=store,
        profiles=ProfileRegistry(profiles),
        clock=clock,
        settings=EngineSettings(measure_change_rate=False),
    )
    await engine.start()
    try:
        dom = cloud.hosts["a"].domains["vm1"]
        dom.job = dict(RUNNING_STATS)
        record, _ = await engine.submit(REQ)
        await until(clock, lambda: engine.get(record.id).state is State.COPYING)
        dom.fail_with["jobStats"] = cloud.libvirt.libvirtError(message, code)
        await clock.advance(3.0)  # a few samples fail
        assert engine.get(record.id).state is State.COPYING
        del dom.fail_with["jobStats"]
        for _ in range(3):  # the job moves (a job whose bytes stand still is a still link)
            dom.job["memory_processed"] += 16 * MIB
            await clock.advance(1.0)
        assert engine.get(record.id).state is State.COPYING
        reasons = [e.reason for e in store.events(record.id)]
        assert any("hypervisor error, retrying" in r for r in reasons)
        # The command goes to the migration's inbox: its supervision task carries it
        # out once its current hypervisor call returns, so virtual time must go on.
        forcing = asyncio.ensure_future(engine.force_complete(record.id))
        await until(clock, forcing.done)
        decision = forcing.result()
        assert decision.action.value == "pause"
        assert ("suspend",) in dom.calls
    finally:
        await engine.stop()
        store.close()


# --------------------------------------------------------------------------- threads per host


class Blocker:
    """A call that blocks its thread until `gate` opens; counts how many run at once."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.ran = 0

    def __call__(self, conn: Any) -> str:
        with self.lock:
            self.running += 1
            self.ran += 1
            self.most = max(self.most, self.running)
        try:
            self.gate.wait()
            return threading.current_thread().name
        finally:
            with self.lock:
                self.running -= 1


def blocked_call(driver: LibvirtDriver, host: str, fn: Callable[[Any], Any]) -> asyncio.Task[Any]:
    return asyncio.ensure_future(driver._link(host).call(fn, what="a test call"))


async def real_until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    """Wait real time (threads are real) until `condition` holds."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


def host_threads(host: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"lmw-call-{host}/")]


async def settle(tasks: list[asyncio.Task[Any]]) -> list[Any]:
    return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)


async def test_many_calls_to_one_host_use_at_most_four_threads(
    cloud: FakeCloud, driver: LibvirtDriver
) -> None:
    await driver._link("a").connection()
    await real_until(lambda: not host_threads("a"))  # the thread that opened it has ended
    before = threading.active_count()
    block = Blocker()
    tasks = [blocked_call(driver, "a", block) for _ in range(40)]
    await real_until(lambda: block.running >= 4)
    await asyncio.sleep(0.2)  # no fifth call starts while four hang
    assert block.running == 4
    assert threading.active_count() - before == 4
    assert len(host_threads("a")) == 4
    assert all(t.daemon for t in host_threads("a"))
    block.gate.set()  # the waiting calls run on the same four threads, in turn
    names = await settle(tasks)
    assert block.ran == 40 and block.most == 4
    assert len(set(names)) <= 4
    await real_until(lambda: not host_threads("a"))  # an idle host keeps no thread


async def test_a_caller_given_its_answer_finds_the_thread_free(clock: VirtualClock) -> None:
    """One thread, no queue: the next call right after an answer is run, not refused
    because the thread that answered had not yet let go of its place."""
    executor = libvirt_conn.HostExecutor("a", clock, workers=1, queue_limit=0)
    try:
        for n in range(300):
            assert await executor.submit(lambda n=n: n) == n
    finally:
        executor.shutdown()


async def test_waiting_calls_are_served_when_only_set_aside_threads_come_back(
    clock: VirtualClock,
) -> None:
    """Two threads hang and are set aside; the spare one hangs too, with a call
    waiting behind it. When the first two come back, one serves the waiting call
    (nothing else would start a thread for it)."""
    executor = libvirt_conn.HostExecutor(
        "a", clock, workers=2, queue_limit=5, hang_after=10.0, spare=1
    )
    first, spare = Blocker(), Blocker()
    try:
        hung = [executor.submit(first, None) for _ in range(2)]
        await real_until(lambda: first.running == 2)
        await clock.advance(11.0)
        stuck = executor.submit(spare, None)  # the two are set aside; a third thread
        await real_until(lambda: spare.running == 1)
        waiting = executor.submit(lambda: "served")
        assert executor.depth == 1
        await clock.advance(11.0)
        with pytest.raises(HostBusy, match="have not answered"):
            executor.submit(lambda: 0)  # sets the third aside too: none serves the queue
        first.gate.set()
        assert await asyncio.wait_for(waiting, 2) == "served"
        await asyncio.wait_for(asyncio.gather(*hung), 2)
    finally:
        first.gate.set()
        spare.gate.set()
        executor.shutdown()
    await asyncio.wait_for(stuck, 2)


async def test_the_bound_is_set_per_host(cloud: FakeCloud, clock: VirtualClock) -> None:
    hosts = {
        "a": HostConfig(uri=cloud.hosts["a"].uri, call_threads=2, call_queue=3),
        "b": HostConfig(uri=cloud.hosts["b"].uri),
    }
    driver = LibvirtDriver(hosts, clock)
    block = Blocker()
    try:
        await driver._link("a").connection()
        tasks = [blocked_call(driver, "a", block) for _ in range(5)]
        # 2 running and 3 waiting (the tasks enqueue in their own time on a busy machine)
        executor = driver._link("a").executor
        await real_until(lambda: block.running == 2 and executor.depth >= 3)
        with pytest.raises(HostBusy, match="host a: 3 calls already waiting; it is not answering"):
            await driver._link("a").call(lambda c: 1, what="a test call")
        block.gate.set()
        await settle(tasks)
        assert block.most == 2
    finally:
        block.gate.set()
        await driver.close()
    with pytest.raises(ValueError):
        HostConfig(uri="x", call_threads=0)


async def test_a_full_queue_fails_fast_with_a_clear_error(
    cloud: FakeCloud, driver: LibvirtDriver
) -> None:
    await driver._link("a").connection()
    block = Blocker()
    tasks = [blocked_call(driver, "a", block) for _ in range(4 + 64)]  # 4 run, 64 wait
    executor = driver._link("a").executor
    await real_until(lambda: block.running >= 4 and executor.depth >= 64)
    try:
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(DriverError) as refused:
            await asyncio.wait_for(driver._link("a").call(lambda c: 1, what="a test call"), 2)
        assert loop.time() - began < 1.0
        assert str(refused.value) == "host a: 64 calls already waiting; it is not answering"
        assert driver._link("a").current is not None  # refusing is no reason to reconnect
    finally:
        block.gate.set()
        await settle(tasks)
    assert block.ran == 68
    assert await driver._link("a").call(lambda c: 1, what="a test call") == 1


async def test_a_hung_host_does_not_delay_calls_to_another(
    cloud: FakeCloud, driver: LibvirtDriver
) -> None:
    await driver._link("a").connection()
    block = Blocker()
    tasks = [blocked_call(driver, "a", block) for _ in range(4 + 64)]  # a: all full
    executor = driver._link("a").executor
    await real_until(lambda: block.running >= 4 and executor.depth >= 64)
    try:
        loop = asyncio.get_running_loop()
        began = loop.time()
        answer = await asyncio.wait_for(
            driver._link("b").call(lambda c: c.getLibVersion(), what="version check"), 2
        )
        assert answer and loop.time() - began < 1.0
        began = loop.time()
        assert await driver.reachable() == {"a": False, "b": True}  # a refused at once
        assert loop.time() - began < 1.0
    finally:
        block.gate.set()
        await settle(tasks)
    assert len(host_threads("b")) <= 4


async def test_a_host_whose_calls_hang_past_the_timeout_is_refused_at_once(
    cloud: FakeCloud, clock: VirtualClock
) -> None:
    hosts = {"a": HostConfig(uri=cloud.hosts["a"].uri, call_threads=2)}
    driver = LibvirtDriver(hosts, clock)
    first, second = Blocker(), Blocker()
    try:
        await driver._link("a").connection()
        tasks = [blocked_call(driver, "a", first) for _ in range(2)]
        await real_until(lambda: first.running == 2)
        waiting = blocked_call(driver, "a", lambda c: "waited")
        await clock.advance(61.0)  # longer than the call timeout: these two are set aside
        tasks += [blocked_call(driver, "a", second) for _ in range(2)]  # on two new threads
        assert await asyncio.wait_for(waiting, 2) == "waited"  # the oldest call goes first
        await real_until(lambda: second.running == 2)
        assert len(host_threads("a")) == 4
        await clock.advance(61.0)  # all four hung, no room for more threads
        with pytest.raises(HostBusy, match="host a: 4 calls have not answered for over 60 s"):
            await driver._link("a").call(lambda c: 1, what="a test call")
        assert len(host_threads("a")) == 4
        first.gate.set()  # two answer at last: their threads end, two new may start
        await real_until(lambda: len(host_threads("a")) == 2)
        assert await driver._link("a").call(lambda c: 1, what="a test call") == 1
    finally:
        first.gate.set()
        second.gate.set()
        await driver.close()


async def test_a_waiting_call_that_timed_out_never_runs(
    cloud: FakeCloud, clock: VirtualClock
) -> None:
    hosts = {"a": HostConfig(uri=cloud.hosts["a"].uri, call_threads=1)}
    driver = LibvirtDriver(hosts, clock)
    block, late = Blocker(), Blocker()
    late.gate.set()
    try:
        link = driver._link("a")
        await link.connection()
        tasks = [blocked_call(driver, "a", block)]
        await real_until(lambda: block.running == 1)
        with pytest.raises(HostLost, match="did not answer in time"):
            await link.call(late, what="a test call", timeout=0.05)
        assert link.executor.depth == 0
        block.gate.set()
        await settle(tasks)
        assert late.ran == 0
    finally:
        block.gate.set()
        await driver.close()


async def test_close_does_not_wait_for_a_hung_call_or_a_hung_close(
    cloud: FakeCloud, clock: VirtualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(libvirt_conn, "CLOSE_TIMEOUT", 0.2, raising=False)
    hosts = {"a": HostConfig(uri=cloud.hosts["a"].uri)}
    driver = LibvirtDriver(hosts, clock)
    forever = threading.Event()  # never set: the host's daemon is gone
    block = Blocker()
    link = driver._link("a")
    conn = await link.connection()
    monkeypatch.setattr(conn, "close", lambda: forever.wait())
    tasks = [blocked_call(driver, "a", block) for _ in range(6)]  # 4 hang, 2 wait
    try:
        await real_until(lambda: block.running >= 4)
        loop = asyncio.get_running_loop()
        began = loop.time()
        await asyncio.wait_for(driver.close(), 3)
        assert loop.time() - began < 1.5
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks[4:], return_exceptions=True), 1)
        assert all(isinstance(o, HostBusy) and "shutting down" in str(o) for o in outcomes)
        assert block.ran == 4
        assert all(t.daemon for t in host_threads("a"))
    finally:
        for task in tasks:
            task.cancel()
        block.gate.set()
        forever.set()


async def test_an_open_that_never_answers_is_given_up_and_its_late_connection_closed(
    cloud: FakeCloud, clock: VirtualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon that takes the socket and never answers: the open is bounded, the host
    counts as unreachable (with its backoff), and nothing waits for it for good."""
    monkeypatch.setattr(libvirt_conn, "OPEN_TIMEOUT", 0.2)
    driver = LibvirtDriver({"a": HostConfig(uri=cloud.hosts["a"].uri)}, clock)
    host = cloud.hosts["a"]
    host.open_gate = threading.Event()
    try:
        with pytest.raises(HostLost, match="opening the connection did not answer within"):
            await asyncio.wait_for(driver._link("a").call(lambda c: 1, what="a call"), 3)
        with pytest.raises(HostLost, match="next attempt in"):  # backoff, no second open
            await driver._link("a").call(lambda c: 1, what="a call")
        assert host.opens == 1
        host.open_gate.set()  # the daemon answers at last: that connection is not kept
        await real_until(lambda: host.closes == 1)
        assert driver._link("a").current is None
        await clock.advance(1.0)
        assert await driver._link("a").call(lambda c: 1, what="a call") == 1
    finally:
        host.open_gate.set()
        await driver.close()


async def test_a_call_whose_open_hangs_ends_within_its_own_timeout(
    cloud: FakeCloud, clock: VirtualClock
) -> None:
    driver = LibvirtDriver({"a": HostConfig(uri=cloud.hosts["a"].uri)}, clock)
    host = cloud.hosts["a"]
    host.open_gate = threading.Event()
    try:
        with pytest.raises(HostLost, match="version check did not answer in time"):
            await asyncio.wait_for(
                driver._link("a").call(lambda c: 1, what="version check", timeout=0.2), 3
            )
        host.open_gate.set()
        await real_until(lambda: host.closes == 1)  # given up, so closed when it came
    finally:
        host.open_gate.set()
        await driver.close()


SHUTDOWN_SCRIPT = """
import asyncio, sys, threading
sys.path.insert(0, {tests!r})
from fakelibvirt import FakeCloud
fake = FakeCloud("a")
sys.modules["libvirt"] = fake.libvirt
sys.modules["libvirtaio"] = fake.libvirtaio
from lmwatch.clock import WallClock
from lmwatch.drivers.libvirt_driver import HostConfig, LibvirtDriver

async def main() -> None:
    driver = LibvirtDriver({{"a": HostConfig(uri=fake.hosts["a"].uri)}}, WallClock())
    forever = threading.Event()
    link = driver._link("a")
    await link.connection()
    call = asyncio.ensure_future(link.call(lambda c: forever.wait(), what="stuck"))
    await asyncio.sleep(0.2)
    await driver.close()
    call.cancel()
    print("closed", flush=True)

asyncio.run(main())
"""


def test_the_process_exits_while_a_call_hangs(tmp_path: Path) -> None:
    import subprocess

    script = tmp_path / "hang.py"
    script.write_text(SHUTDOWN_SCRIPT.format(tests=str(Path(__file__).parent)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr
    assert "closed" in done.stdout


async def test_pinning_refusal_names_the_instance_asked_by_uuid(
    cloud: FakeCloud, driver: LibvirtDriver
) -> None:
    _pinned_beyond_cpus(cloud)
    by_uuid = MigrationRequest(cloud.hosts["a"].domains["vm1"].uuid, "a", "b")
    with pytest.raises(Incompatible, match="instance 'vm1' is pinned to host CPUs 8-11"):
        await driver.preflight(by_uuid)


async def test_instances_on_lists_running_domains_of_one_host(
    cloud: FakeCloud, driver: LibvirtDriver
) -> None:
    a = cloud.hosts["a"]
    a.add("vm0", uuid="6c6d7761-0000-4000-8000-000000000010", max_kib=262144)
    a.add("off", uuid="6c6d7761-0000-4000-8000-000000000011", state=(5, 1))  # shut off
    a.add("held", uuid="6c6d7761-0000-4000-8000-000000000012", state=(3, 1))  # user-paused
    a.add("incoming", uuid="6c6d7761-0000-4000-8000-000000000013", state=(3, 2))  # mid-move
    cloud.hosts["b"].add("elsewhere", uuid="6c6d7761-0000-4000-8000-000000000014")
    found = await driver.instances_on("a")
    assert [i.name for i in found] == ["held", "vm0", "vm1"]
    assert {i.host for i in found} == {"a"}
    assert next(i for i in found if i.name == "vm0").memory_bytes == 256 * MIB
    assert next(i for i in found if i.name == "vm1").labels["tier"] == "database"
    assert [i.name for i in await driver.instances_on("b")] == ["elsewhere"]


async def test_instances_on_unknown_or_silent_host(cloud: FakeCloud, driver: LibvirtDriver) -> None:
    with pytest.raises(UnknownHost):
        await driver.instances_on("nowhere")
    cloud.hosts["b"].up = False
    with pytest.raises(HostUnreachable):
        await driver.instances_on("b")


# --------------------------------------------------------------------------- local disks

IMAGES = "/srv/images"  # a path is user data, shown as it is: keep this one neutral
DISK_STATS = {  # the disk phase: the mirror copies, memory has not started
    "type": C.VIR_DOMAIN_JOB_UNBOUNDED,
    "operation": C.VIR_DOMAIN_JOB_OPERATION_MIGRATION_OUT,
    "memory_total": 0,
    "memory_remaining": 0,
    "memory_processed": 0,
    "memory_iteration": 0,
    "disk_total": 64 * MIB,
    "disk_remaining": 48 * MIB,
    "disk_processed": 16 * MIB,
    "disk_bps": 8 * MIB,
}


def _with_disks(c: FakeCloud, *extra: str) -> Any:
    """vm1 with a 64 MiB local file disk (vda), a 1 GiB file disk on shared storage
    (vdb), a cdrom, a read-only disk and a network disk; b has a pool for the images."""
    devices = (
        disk_xml("vda", f"{IMAGES}/vm1.img")
        + disk_xml("vdb", "/mnt/shared/vm1-data.img")
        + "<disk type='file' device='cdrom'><source file='/iso/boot.iso'/>"
        "<target dev='hdc' bus='ide'/><readonly/></disk>"
        + disk_xml("vdc", f"{IMAGES}/base.img", extra="<readonly/>")
        + "<disk type='network' device='disk'><source protocol='rbd' name='pool/vm1'/>"
        "<target dev='vdd' bus='virtio'/></disk>" + "".join(extra)
    )
    dom = c.hosts["a"].domains["vm1"]
    dom.xml = domain_xml("vm1", devices=devices)
    dom.disk_sizes = {"vda": 64 * MIB, "vdb": 1024 * MIB, "vdc": 32 * MIB, "vdd": 10 * MIB}
    c.hosts["b"].pools[IMAGES] = FakePool("images", available=1024 * MIB)
    return dom


@pytest.fixture
async def shared_driver(cloud: FakeCloud, clock: VirtualClock) -> AsyncIterator[LibvirtDriver]:
    """Both hosts declare /mnt/shared shared (only b declares /srv/b)."""
    hosts = {
        name: HostConfig(
            uri=host.uri,
            migration_address="tcp://127.0.0.1",
            shared_storage=["/mnt/shared"] + (["/srv/b"] if name == "b" else []),
        )
        for name, host in cloud.hosts.items()
    }
    drv = LibvirtDriver(hosts, clock)
    yield drv
    for host in cloud.hosts.values():
        for dom in host.domains.values():
            dom.release.set()
    await drv.close()


def test_writable_disks_keep_only_file_and_block_disks_the_guest_writes() -> None:
    xml = domain_xml(
        "x",
        devices=disk_xml("vda", "/img/x.img")
        + disk_xml("vdb", "/dev/vg/x", kind="block")
        + disk_xml("vdc", "/img/shared.img", extra="<shareable/>")
        + disk_xml("vdd", "/img/ro.img", extra="<readonly/>")
        + "<disk type='file' device='cdrom'><target dev='hdc'/></disk>"
        + "<disk type='network' device='disk'><source protocol='nbd'/><target dev='vde'/></disk>"
        + "<disk type='volume' device='disk'><source pool='p' volume='v'/><target dev='vdf'/>"
        "</disk>",
    )
    assert writable_disks(xml) == [
        DiskFacts("vda", "/img/x.img", "file"),
        DiskFacts("vdb", "/dev/vg/x", "block"),
    ]
    assert writable_disks(domain_xml("y")) == []


@pytest.mark.parametrize(
    ("path", "shared", "local"),
    [
        ("/img/x.img", (), True),  # nothing declared: local
        ("/mnt/nfs/x.img", (["/mnt/nfs"],), False),  # one host (describe)
        ("/mnt/nfs/x.img", (["/mnt/nfs"], ["/mnt/nfs/"]), False),  # both hosts
        ("/mnt/nfs/x.img", (["/mnt/nfs"], []), True),  # the destination does not see it
        ("/mnt/nfs/x.img", (["/mnt/nfs"], ["/mnt"]), False),
        ("/mnt/nfs2/x.img", (["/mnt/nfs"], ["/mnt/nfs"]), True),  # a prefix, not a directory
        ("/mnt/nfs/../img/x.img", (["/mnt/nfs"], ["/mnt/nfs"]), True),
    ],
)
def test_local_disks_need_both_hosts_to_share_the_directory(
    path: str, shared: tuple[list[str], ...], local: bool
) -> None:
    disk = DiskFacts("vda", path, "file")
    assert local_disks([disk], *shared) == ([disk] if local else [])


@pytest.mark.parametrize(
    ("stats", "disk_bytes", "expected"),
    [
        ({}, 0, (0, 0, 0.0)),  # no local disk
        ({"memory_total": 0}, 64 * MIB, (64 * MIB, 64 * MIB, 0.0)),  # setup: all remaining
        (DISK_STATS, 64 * MIB, (64 * MIB, 48 * MIB, 8 * MIB)),
        ({**DISK_STATS, "disk_total": 0}, 64 * MIB, (64 * MIB, 64 * MIB, 8 * MIB)),
        # memory moves: the mirrors are ready, a rest written meanwhile is not "behind"
        (
            {**RUNNING_STATS, "disk_total": 70 * MIB, "disk_remaining": MIB},
            64 * MIB,
            (70 * MIB, 0, 0.0),
        ),
        ({**RUNNING_STATS}, 64 * MIB, (64 * MIB, 0, 0.0)),
    ],
)
def test_disk_progress(stats: dict[str, Any], disk_bytes: int, expected: tuple[Any, ...]) -> None:
    assert disk_progress(stats, disk_bytes) == expected
    sample = stats_to_sample(
        stats, now=0, phase=Phase.COPYING, blackout_budget=0.3, disk_bytes=disk_bytes
    )
    assert (sample.disk_total, sample.disk_remaining, sample.disk_rate) == expected
    assert sample.disks_in_sync == (expected[1] == 0)


def test_migrate_call_copies_only_the_named_disks() -> None:
    plain = migrate_call(
        C, PLAN, instance="vm1", migration_address="tcp://127.0.0.1", link_bandwidth=None
    )
    assert not plain.flags & C.VIR_MIGRATE_NON_SHARED_DISK
    assert "migrate_disks" not in plain.params and "disks_uri" not in plain.params
    call = migrate_call(
        C,
        PLAN,
        instance="vm1",
        migration_address="tcp://127.0.0.1:49152",
        link_bandwidth=None,
        disks=["vda", "vdb"],
    )
    assert call.flags == plain.flags | C.VIR_MIGRATE_NON_SHARED_DISK
    assert call.params["migrate_disks"] == ["vda", "vdb"]
    assert call.params["disks_uri"] == "tcp://127.0.0.1"
    own = migrate_call(
        C,
        PLAN,
        instance="vm1",
        migration_address=None,
        link_bandwidth=None,
        disks=["vda"],
        disks_address="tcp://10.1.0.2:50000",
    )
    assert own.params["disks_uri"] == "tcp://10.1.0.2:50000"
    nowhere = migrate_call(
        C, PLAN, instance="vm1", migration_address=None, link_bandwidth=None, disks=["vda"]
    )
    assert "disks_uri" not in nowhere.params  # the hypervisor's default address
    assert disks_uri("tcp://[::1]:4000") == "tcp://[::1]"


def test_shared_storage_must_be_absolute() -> None:
    assert HostConfig(uri="x", shared_storage="/mnt/nfs").shared_storage == ("/mnt/nfs",)
    with pytest.raises(ValueError, match="absolute"):
        HostConfig(uri="x", shared_storage=["mnt/nfs"])


async def test_describe_and_preflight_report_local_disk_bytes(
    cloud: FakeCloud, driver: LibvirtDriver, shared_driver: LibvirtDriver
) -> None:
    _with_disks(cloud)
    # nothing declared shared: vda and vdb are local (the read-only, cdrom and network
    # disks never are)
    assert (await driver.describe("vm1")).local_disk_bytes == (64 + 1024) * MIB
    cloud.hosts["b"].pools["/mnt/shared"] = FakePool("shared", available=2048 * MIB)
    assert (await driver.preflight(REQ)).local_disk_bytes == (64 + 1024) * MIB
    # /mnt/shared is shared by both: only vda moves
    assert (await shared_driver.describe("vm1")).local_disk_bytes == 64 * MIB
    assert (await shared_driver.preflight(REQ)).local_disk_bytes == 64 * MIB
    assert (await driver.describe("vm1", "a")).local_disk_bytes > 0


async def test_instance_without_disks_has_no_local_disk(driver: LibvirtDriver) -> None:
    assert (await driver.describe("vm1")).local_disk_bytes == 0
    assert (await driver.preflight(REQ)).local_disk_bytes == 0


def _no_pool(c: FakeCloud) -> None:
    _with_disks(c)
    c.hosts["b"].pools.clear()


def _pool_too_small(c: FakeCloud) -> None:
    _with_disks(c)
    c.hosts["b"].pools[IMAGES].available = 40 * MIB


def _pool_inactive(c: FakeCloud) -> None:
    _with_disks(c)
    c.hosts["b"].pools[IMAGES].state = C.VIR_STORAGE_POOL_INACTIVE


def _two_disks_one_pool(c: FakeCloud) -> None:
    dom = _with_disks(c, disk_xml("vde", f"{IMAGES}/vm1-b.img"))
    dom.disk_sizes["vde"] = 64 * MIB
    c.hosts["b"].pools[IMAGES].available = 100 * MIB  # room for one, not for both


@pytest.mark.parametrize(
    ("arrange", "says"),
    [
        (
            _no_pool,
            f"b has no storage pool for {IMAGES}, where instance 'vm1' keeps 64 MiB of "
            f"local disk; define and start a storage pool with that target on b",
        ),
        (
            _pool_too_small,
            f"b has 40 MiB free in storage pool 'images' ({IMAGES}); instance "
            "'vm1' needs 64 MiB for its local disks there",
        ),
        (_pool_inactive, f"storage pool 'images' for {IMAGES} on b is not active"),
        (_two_disks_one_pool, "needs 128 MiB for its local disks there"),
    ],
)
async def test_preflight_refuses_when_the_destination_cannot_hold_the_disks(
    cloud: FakeCloud,
    shared_driver: LibvirtDriver,
    arrange: Callable[[FakeCloud], None],
    says: str,
) -> None:
    arrange(cloud)
    with pytest.raises(InsufficientResources) as caught:
        await shared_driver.preflight(REQ)
    assert says in str(caught.value)
    assert caught.value.status == 409
    assert not FORBIDDEN.search(str(caught.value))
    assert not any(call[0] == "migrateToURI3" for call in cloud.hosts["a"].domains["vm1"].calls)


async def test_preflight_passes_with_room_in_the_pool(
    cloud: FakeCloud, shared_driver: LibvirtDriver
) -> None:
    _with_disks(cloud)
    cloud.hosts["b"].pools[IMAGES].available = 64 * MIB
    assert (await shared_driver.preflight(REQ)).local_disk_bytes == 64 * MIB
    assert cloud.hosts["b"].pools[IMAGES].refreshed == 1  # free space read fresh


async def test_start_copies_the_local_disks(
    cloud: FakeCloud, shared_driver: LibvirtDriver, clock: VirtualClock
) -> None:
    dom = _with_disks(cloud)
    dom.job = dict(DISK_STATS)
    await shared_driver.start("m1", REQ, PLAN)
    _, _, params, flags = next(c for c in dom.calls if c[0] == "migrateToURI3")
    assert flags == BASE | C.VIR_MIGRATE_NON_SHARED_DISK
    assert params["migrate_disks"] == ["vda"]  # not the shared vdb, not the read-only ones
    assert params["disks_uri"] == "tcp://127.0.0.1"
    # the disk phase: memory statistics are all zero
    sample = await shared_driver.sample("m1")
    assert (sample.phase, sample.passes) == (Phase.COPYING, 1)
    assert (sample.disk_total, sample.disk_remaining, sample.disk_rate) == (
        64 * MIB,
        48 * MIB,
        8 * MIB,
    )
    assert not sample.disks_in_sync
    assert (sample.memory_total, sample.memory_remaining) == (128 * MIB, 128 * MIB)
    # the mirror stops reporting for a moment: still not in sync
    dom.job = {k: v for k, v in DISK_STATS.items() if not k.startswith("disk_")}
    assert (await shared_driver.sample("m1")).disk_remaining == 48 * MIB
    # memory moves: in sync, passes counted from memory
    dom.job = {**RUNNING_STATS, "disk_total": 66 * MIB, "disk_remaining": 0, "disk_bps": 0}
    sample = await shared_driver.sample("m1")
    assert sample.disks_in_sync and sample.passes == 3
    assert sample.memory_remaining == 40 * MIB
    # completed statistics carry the disk keys as 0 (libvirt 11): the last figures stay
    cloud.complete("vm1", "a", "b", {"type": 3, "downtime": 300, "disk_total": 0})
    result = await finished(shared_driver, clock)
    assert (result.phase, result.running_on) == (Phase.COMPLETED, "b")
    final = await shared_driver.sample("m1")
    assert (final.disk_total, final.disk_remaining) == (66 * MIB, 0)


async def test_start_without_local_disks_copies_none(
    cloud: FakeCloud, shared_driver: LibvirtDriver
) -> None:
    dom = cloud.hosts["a"].domains["vm1"]
    dom.xml = domain_xml("vm1", devices=disk_xml("vda", "/mnt/shared/vm1.img"))
    dom.disk_sizes = {"vda": 64 * MIB}
    dom.job = dict(RUNNING_STATS)
    await shared_driver.start("m1", REQ, PLAN)
    _, _, params, flags = next(c for c in dom.calls if c[0] == "migrateToURI3")
    assert flags == BASE and "migrate_disks" not in params
    sample = await shared_driver.sample("m1")
    assert (sample.disk_total, sample.disk_remaining) == (0, 0)


async def test_reattach_during_the_disk_copy(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    dom = _with_disks(cloud)
    dom.job = {k: v for k, v in DISK_STATS.items() if not k.startswith("disk_")}
    assert await driver.reattach("m1", REQ, PLAN) is None
    sample = await driver.sample("m1")
    # the mirror has not reported: the local disks (vda and vdb, nothing shared) remain
    assert (sample.disk_total, sample.disk_remaining) == ((64 + 1024) * MIB,) * 2
    dom.job = dict(DISK_STATS)
    assert (await driver.sample("m1")).disk_remaining == 48 * MIB
    cloud.complete("vm1", "a", "b", {"type": 3, "downtime": 300})
    result = await finished(driver, clock)
    assert (result.phase, result.running_on) == (Phase.COMPLETED, "b")


@pytest.mark.parametrize(
    ("before", "now", "processed", "rate"),
    [
        (None, 5.0, 10 * MIB, None),
        ((4.0, 2 * MIB), 5.0, 10 * MIB, 8 * MIB),
        ((4.8, 2 * MIB), 5.0, 10 * MIB, None),  # too close together
        ((4.0, 12 * MIB), 5.0, 10 * MIB, None),  # the counter went back
        ((3.0, 10 * MIB), 5.0, 10 * MIB, 0.0),
    ],
)
def test_disk_rate_between(
    before: tuple[float, int] | None, now: float, processed: int, rate: float | None
) -> None:
    assert disk_rate_between(before, now, processed) == rate


async def test_disk_rate_measured_when_the_statistics_give_none(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock
) -> None:
    """libvirt 11 reports the mirror's progress but no `disk_bps`: the rate comes
    from `disk_processed` between samples."""
    dom = _with_disks(cloud)
    phase = {k: v for k, v in DISK_STATS.items() if k != "disk_bps"}
    dom.job = dict(phase)
    await driver.start("m1", REQ, PLAN)
    assert (await driver.sample("m1")).disk_rate == 0.0  # one reading: unknown yet
    await clock.advance(1.0)
    dom.job = {**phase, "disk_processed": 28 * MIB, "disk_remaining": 36 * MIB}
    sample = await driver.sample("m1")
    assert sample.disk_rate == pytest.approx(12 * MIB)
    assert sample.disk_remaining == 36 * MIB
    await clock.advance(0.1)  # too soon for a new figure: the last one stays
    dom.job = {**phase, "disk_processed": 29 * MIB, "disk_remaining": 35 * MIB}
    assert (await driver.sample("m1")).disk_rate == pytest.approx(12 * MIB)
    await clock.advance(0.9)
    dom.job = {**phase, "disk_processed": 36 * MIB, "disk_remaining": 28 * MIB}
    assert (await driver.sample("m1")).disk_rate == pytest.approx(8 * MIB)


def test_shared_storage_and_disks_address_from_the_daemon_config() -> None:
    settings = Settings(
        driver="libvirt",
        hosts={
            "a": {"uri": "x://a", "shared_storage": ["/mnt/nfs"]},
            "b": {"uri": "x://b", "disks_address": "tcp://10.1.0.2"},
            "c": {"uri": "x://c", "call_threads": 2, "call_queue": 8},
        },
    )
    drv = build_libvirt_driver(daemon._host_options(settings), VirtualClock())
    assert drv._hosts["a"].shared_storage == ("/mnt/nfs",)
    assert drv._hosts["b"].shared_storage == ()
    assert drv._hosts["b"].disks_address == "tcp://10.1.0.2"
    # the call pool's size, as the README documents it
    assert (drv._hosts["c"].call_threads, drv._hosts["c"].call_queue) == (2, 8)
    assert drv._hosts["a"].call_threads == 4 and drv._hosts["a"].call_queue == 64


async def test_host_info_and_instances_on_count_local_disks(
    cloud: FakeCloud, driver: LibvirtDriver
) -> None:
    _with_disks(cloud)
    info = await driver.host_info("a")
    assert next(i for i in info.instances if i.name == "vm1").local_disk_bytes == 1088 * MIB
    found = await driver.instances_on("a")
    assert next(i for i in found if i.name == "vm1").local_disk_bytes == 1088 * MIB


BROKE_IN_HANDOVER = "operation failed: job 'migration in' failed in post-copy phase"


def _break_handover(cloud: FakeCloud, dom: Any) -> None:
    """What libvirt 11.3 with QEMU 10 showed on the rig when the link broke after the
    switch to the destination: the source's job stays open (migrating out), the source
    is paused POSTCOPY_FAILED, the destination runs POSTCOPY_FAILED, and the migrate
    call fails."""
    moved = cloud.hosts["b"].add("vm1", uuid=dom.uuid)
    moved.state = (C.VIR_DOMAIN_RUNNING, C.VIR_DOMAIN_RUNNING_POSTCOPY_FAILED)
    dom.state = (C.VIR_DOMAIN_PAUSED, C.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED)
    dom.outcome = cloud.libvirt.libvirtError(BROKE_IN_HANDOVER, 9)
    dom.release.set()


@pytest.mark.parametrize("call_returns", [True, False])
async def test_a_handover_whose_link_broke_ends_failed_on_neither_host(
    cloud: FakeCloud, driver: LibvirtDriver, clock: VirtualClock, call_returns: bool
) -> None:
    """The job still looks alive on the source, so the migration was adopted and shown
    as handed over for ever, nothing moving. It ends failed now, the instance counted
    on neither host (its memory is split), with what the operator must know; also when
    the migrate call has not returned (seen only in the source's state)."""
    plan = StartPlan(arm_handover=True, arm_slow_down=False, blackout_budget=0.3)
    dom = await started(cloud, driver, plan)
    await driver.handover("m1")
    lifecycle(cloud, "a", dom, C.VIR_DOMAIN_EVENT_SUSPENDED, C.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY)
    assert (await driver.sample("m1")).phase is Phase.HANDOVER
    if call_returns:
        _break_handover(cloud, dom)
    else:
        dom.state = (C.VIR_DOMAIN_PAUSED, C.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED)
    result = await finished(driver, clock)
    assert result.phase is Phase.FAILED and result.handed_over
    assert result.running_on is None
    assert result.error is not None
    assert "the link broke during the handover" in result.error
    assert "keep a running" in result.error
    assert not FORBIDDEN.search(result.error)
    dom.release.set()


async def test_reattach_finds_a_handover_whose_link_broke(
    cloud: FakeCloud, driver: LibvirtDriver
) -> None:
    dom = cloud.hosts["a"].domains["vm1"]
    dom.job = dict(RUNNING_STATS)  # still migrating out, as far as the job says
    dom.state = (C.VIR_DOMAIN_PAUSED, C.VIR_DOMAIN_PAUSED_POSTCOPY_FAILED)
    result = await driver.reattach("m1", REQ, PLAN)
    assert result is not None
    assert result.phase is Phase.FAILED and result.handed_over and result.running_on is None
    assert (await driver.sample("m1")).phase is Phase.FAILED
