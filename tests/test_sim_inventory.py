"""Loading the simulator's inventory: units, patterns, defaults and errors."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from lmwatch.drivers.inventory import (
    UUID_NAMESPACE,
    BurstyRate,
    ConstantRate,
    GrowingRate,
    InventoryError,
    default_inventory,
    load_inventory,
    load_inventory_text,
)
from lmwatch.model import GIB, MIB

BASE = """
hosts:
  - {name: host-a, memory: 256GiB}
  - {name: host-b, memory: 128GiB, handover: false}
links:
  - {between: [host-a, host-b], bandwidth: 1250MiB/s}
default_bandwidth: 1GiB/s
instances:
"""


def inventory(instances: str) -> str:
    return BASE + instances


def test_units_and_defaults() -> None:
    inv = load_inventory_text(
        inventory("""
  - name: web-1
    host: host-a
    memory: 4GiB
    working_set: 512MiB
    change_rate: 50MiB/s
    labels: {tier: web}
  - name: idle
    host: host-b
    memory: 1GiB
""")
    )
    web = inv.instance("web-1")
    assert web is not None
    assert (web.memory, web.working_set) == (4 * GIB, 512 * MIB)
    assert web.change_rate == ConstantRate(rate=50 * MIB)
    assert web.labels == {"tier": "web"}
    assert web.uuid == str(uuid.uuid5(UUID_NAMESPACE, "web-1"))
    idle = inv.instance("idle")
    assert idle is not None and idle.working_set == idle.memory
    assert idle.change_rate.at(0) == 0
    assert inv.instance(web.uuid) == web
    host_b = inv.host("host-b")
    assert host_b is not None and not host_b.handover and host_b.slow_down
    assert inv.bandwidth("host-b", "host-a") == 1250 * MIB
    assert inv.bandwidth("host-a", "host-c") == 1 * GIB


def test_explicit_uuid_is_kept_canonical() -> None:
    given = "6F1A0D0E-1111-4222-8333-444455556666"
    inv = load_inventory_text(
        inventory(f"  - {{name: x, uuid: {given}, host: host-a, memory: 1GiB}}\n")
    )
    assert inv.instances[0].uuid == given.lower()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("50MiB/s", ConstantRate(rate=50 * MIB)),
        ("{rate: 8Gbit/s}", ConstantRate(rate=1e9)),
        (
            "{pattern: bursty, base: 20MiB/s, peak: 400MiB/s, period: 30s, duty: 0.2}",
            BurstyRate(pattern="bursty", base=20 * MIB, peak=400 * MIB, period=30, duty=0.2),
        ),
        (
            "{pattern: growing, start: 10MiB/s, per_minute: 50MiB/s, max: 2GiB/s}",
            GrowingRate(pattern="growing", start=10 * MIB, per_minute=50 * MIB, max=2 * GIB),
        ),
    ],
)
def test_change_rate_forms(text: str, expected: object) -> None:
    inv = load_inventory_text(
        inventory(f"  - {{name: x, host: host-a, memory: 1GiB, change_rate: {text}}}\n")
    )
    assert inv.instances[0].change_rate == expected


@pytest.mark.parametrize(
    ("instances", "message"),
    [
        ("  - {name: x, host: host-a, memory: 4 gigs}\n", "instances[0].memory"),
        ("  - {name: x, host: host-a, memory: 1GiB, change_rate: fast}\n", "not a rate"),
        ("  - {name: x, host: host-a, memory: 1GiB, colour: red}\n", "colour"),
        ("  - {name: x, host: host-z, memory: 1GiB}\n", "unknown host 'host-z'"),
        ("  - {name: x, host: host-a, memory: 1GiB, working_set: 2GiB}\n", "larger than memory"),
        (
            "  - {name: x, host: host-a, memory: 1GiB}\n"
            "  - {name: x, host: host-b, memory: 1GiB}\n",
            "used twice",
        ),
        ("  - {name: x, host: host-a, memory: 1GiB, uuid: nope}\n", "not a uuid"),
        (
            "  - {name: x, host: host-a, memory: 1GiB, change_rate: {pattern: wavy}}\n",
            "change_rate",
        ),
        ("  - {name: x, host: host-a, memory: 0}\n", "memory"),
    ],
)
def test_bad_instances_are_reported_with_their_place(instances: str, message: str) -> None:
    with pytest.raises(InventoryError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_inventory_text(inventory(instances))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("hosts: []\n", "hosts"),
        ("- a\n- b\n", "expected a mapping"),
        ("hosts: [{name: a, memory: 1GiB}\n", "not valid YAML"),
        (
            "hosts: [{name: a, memory: 1GiB}]\nlinks: [{between: [a, b], bandwidth: 1GiB/s}]\n",
            "unknown host 'b'",
        ),
        (
            "hosts: [{name: a, memory: 1GiB}]\nlinks: [{between: [a, a], bandwidth: 1GiB/s}]\n",
            "itself",
        ),
        ("hosts: [{name: a, memory: 1GiB}]\ndefault_bandwidth: 0\n", "default_bandwidth"),
        ("hosts: [{name: a, memory: 1GiB}]\nflavour: x\n", "flavour"),
    ],
)
def test_bad_files(text: str, message: str) -> None:
    with pytest.raises(InventoryError, match=message):
        load_inventory_text(text)


def test_load_from_path_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text(inventory("  - {name: x, host: host-a, memory: 1GiB}\n"))
    assert load_inventory(path).instances[0].name == "x"
    with pytest.raises(InventoryError, match="cannot read"):
        load_inventory(tmp_path / "missing.yaml")


def test_inventory_is_immutable() -> None:
    inv = default_inventory()
    with pytest.raises(ValueError):
        inv.hosts[0].memory = 1  # type: ignore[misc]


def test_default_inventory_covers_the_example_profiles() -> None:
    inv = default_inventory()
    assert [h.name for h in inv.hosts] == ["host-a", "host-b", "host-c"]
    assert 6 <= len(inv.instances) <= 8
    tiers = {i.labels.get("tier") for i in inv.instances}
    assert {"database", "batch", "web", None} <= tiers
    assert {i.host for i in inv.instances} <= {"host-a", "host-b"}
    sizes = [i.memory for i in inv.instances]
    assert min(sizes) >= 1 * GIB and max(sizes) <= 64 * GIB
    speeds = {inv.bandwidth(a.name, b.name) for a in inv.hosts for b in inv.hosts if a != b}
    assert min(speeds) < max(speeds)  # at least one slower link
    assert all(1e9 / 8 <= s <= 10e9 / 8 for s in speeds)  # 1 to 10 Gbit/s
    # from idle to never converging on the fast link
    fast = inv.bandwidth("host-a", "host-b")
    rates = [i.change_rate.at(3600) for i in inv.instances]
    assert min(rates) < 0.01 * fast and max(rates) > fast


def test_pinning_and_definitions_are_optional_and_parsed() -> None:
    """Old inventories stay valid (nothing pinned, nothing modelled); the new fields
    take "0-3,^2,8", a number or a list."""
    plain = load_inventory_text(inventory("  - {name: x, host: host-a, memory: 1GiB}\n"))
    host = plain.hosts[0]
    assert (host.cpus, host.numa_nodes, host.defined) == (None, None, ())
    assert (host.cpu_ids, host.node_ids) == (None, None)
    x = plain.instances[0]
    assert (x.pinned_cpus, x.pinned_nodes) == (frozenset(), frozenset())
    text = """
hosts:
  - name: host-a
    memory: 64GiB
    cpus: 16
    numa_nodes: 2
    defined: [{name: old, uuid: 0BADC0DE-0000-4000-8000-000000000001}]
instances:
  - {name: x, host: host-a, memory: 1GiB, pinned_cpus: "0-3,^2,8", pinned_nodes: 1}
  - {name: y, host: host-a, memory: 1GiB, pinned_cpus: [4, 5]}
"""
    inv = load_inventory_text(text)
    host = inv.hosts[0]
    assert (host.cpu_ids, host.node_ids) == (frozenset(range(16)), frozenset({0, 1}))
    assert host.defined[0].uuid == "0badc0de-0000-4000-8000-000000000001"
    assert inv.instances[0].pinned_cpus == {0, 1, 3, 8}
    assert inv.instances[0].pinned_nodes == {1}
    assert inv.instances[1].pinned_cpus == {4, 5}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "hosts: [{name: a, memory: 1GiB, cpus: 4}]\n"
            "instances: [{name: x, host: a, memory: 1GiB, pinned_cpus: 2-5}]\n",
            "pinned to CPUs 4-5 that its host 'a' lacks",
        ),
        (
            "hosts: [{name: a, memory: 1GiB, numa_nodes: 1}]\n"
            "instances: [{name: x, host: a, memory: 1GiB, pinned_nodes: '1'}]\n",
            "pinned to memory nodes 1 that its host 'a' lacks",
        ),
        (
            "hosts: [{name: a, memory: 1GiB}]\n"
            "instances: [{name: x, host: a, memory: 1GiB, pinned_cpus: 3-1}]\n",
            r"instances\[0\].pinned_cpus",
        ),
        (
            "hosts: [{name: a, memory: 1GiB}]\n"
            "instances: [{name: x, host: a, memory: 1GiB, pinned_cpus: true}]\n",
            r"instances\[0\].pinned_cpus",
        ),
        ("hosts: [{name: a, memory: 1GiB, cpus: 0}]\n", r"hosts\[0\].cpus"),
        ("hosts: [{name: a, memory: 1GiB, defined: [{name: x, uuid: nope}]}]\n", "not a uuid"),
    ],
)
def test_bad_pinning_and_definitions(text: str, message: str) -> None:
    with pytest.raises(InventoryError, match=message):
        load_inventory_text(text)


def test_local_disks_and_host_storage_are_read_in_bytes() -> None:
    inv = load_inventory_text("""
hosts:
  - {name: a, memory: 8GiB, disk: 2TiB}
  - {name: b, memory: 8GiB}
instances:
  - {name: f, host: a, memory: 1GiB, disk: 40GiB, disk_writes: 20MiB/s}
  - {name: g, host: a, memory: 1GiB}
""")
    assert inv.host("a") is not None and inv.host("a").disk == 2 * 1024**4  # type: ignore[union-attr]
    assert inv.host("b") is not None and inv.host("b").disk is None  # type: ignore[union-attr]
    f, g = inv.instance("f"), inv.instance("g")
    assert f is not None and f.disk == 40 * GIB and f.disk_writes == 20 * 1024**2
    assert g is not None and g.disk == 0 and g.disk_writes == 0


def test_jitter_is_a_share_and_absent_by_default() -> None:
    inv = load_inventory_text("""
hosts: [{name: a, memory: 8GiB}]
instances:
  - {name: f, host: a, memory: 1GiB, jitter: 0.05}
  - {name: g, host: a, memory: 1GiB}
""")
    assert inv.instance("f").jitter == 0.05  # type: ignore[union-attr]
    assert inv.instance("g").jitter == 0.0  # type: ignore[union-attr]
    with pytest.raises(InventoryError, match="jitter"):
        load_inventory_text("""
hosts: [{name: a, memory: 8GiB}]
instances: [{name: f, host: a, memory: 1GiB, jitter: 0.9}]
""")


def test_disk_writes_without_a_disk_are_refused() -> None:
    with pytest.raises(InventoryError, match="disk_writes is given but the instance has no disk"):
        load_inventory_text("""
hosts: [{name: a, memory: 8GiB}]
instances: [{name: f, host: a, memory: 1GiB, disk_writes: 20MiB/s}]
""")


def test_default_inventory_has_an_instance_with_a_local_disk() -> None:
    inv = default_inventory()
    with_disks = [i for i in inv.instances if i.disk]
    assert with_disks and all(h.disk for h in inv.hosts)
    for instance in with_disks:
        seconds = instance.disk / inv.bandwidth("host-a", "host-b")
        assert 5 < seconds < 60  # visibly longer than memory alone, but not slow
        assert instance.disk_writes < inv.bandwidth("host-a", "host-b")
