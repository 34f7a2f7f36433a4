"""Rigs side by side (rig slots): the shell scripts (rig/lib.sh) and the tests' helper
(rig/rigctl.py) agree on each slot's state directory, migration ports and stall table,
and no two slots share a port. Needs no rig: both are only read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RIG = ROOT / "rig"


def in_slot(slot: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """`argv` run with LMWATCH_RIG_SLOT=slot (and a state directory of the test's own)."""
    env = {**os.environ, "LMWATCH_RIG_SLOT": slot, "LMWATCH_RIG_DIR": "/run/rigs"}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, check=False)


def from_lib_sh(slot: str) -> subprocess.CompletedProcess[str]:
    script = f'. "{RIG}/lib.sh"; host_ports a; host_ports b; echo "$BASE"; echo "$STALL_TABLE"'
    return in_slot(slot, ["bash", "-c", script])


def from_rigctl(slot: str) -> subprocess.CompletedProcess[str]:
    code = (
        f"import sys, json; sys.path.insert(0, {str(RIG)!r}); import rigctl; "
        "print(json.dumps([rigctl.MIGRATION_PORTS, rigctl.ALL_MIGRATION_PORTS, "
        "rigctl.RIG_DIR, rigctl.STALL_TABLE]))"
    )
    return in_slot(slot, [sys.executable, "-c", code])


@pytest.mark.parametrize("slot", [0, 1, 2, 3])
def test_the_scripts_and_rigctl_agree_on_a_slots_directory_ports_and_stall_table(
    slot: int,
) -> None:
    shell = from_lib_sh(str(slot))
    assert shell.returncode == 0, shell.stderr
    a_ports, b_ports, base, table = shell.stdout.splitlines()
    a_low, a_high = map(int, a_ports.split())
    b_low, b_high = map(int, b_ports.split())
    python = from_rigctl(str(slot))
    assert python.returncode == 0, python.stderr
    ports, all_ports, rig_dir, stall_table = json.loads(python.stdout)
    assert (a_low, b_high) == tuple(ports)
    assert a_high + 1 == b_low  # a's ports, then b's, in the slot's range
    assert all_ports[0] <= a_low and b_high <= all_ports[1]
    assert rig_dir == base == ("/run/rigs" if slot == 0 else f"/run/rigs-{slot}")
    assert (
        stall_table == table == ("lmwatch_rig_stall" if slot == 0 else f"lmwatch_rig_stall_{slot}")
    )


def test_no_two_slots_share_a_migration_port() -> None:
    ranges = []
    for slot in range(4):
        low, high = json.loads(from_rigctl(str(slot)).stdout)[0]
        ranges.append(set(range(low, high + 1)))
    for i, one in enumerate(ranges):
        for other in ranges[i + 1 :]:
            assert not one & other


def test_a_slot_out_of_range_is_refused_by_both() -> None:
    shell = from_lib_sh("4")
    assert shell.returncode != 0 and "LMWATCH_RIG_SLOT must be 0-3" in shell.stderr
    python = from_rigctl("4")
    assert python.returncode != 0 and "LMWATCH_RIG_SLOT must be 0-3" in python.stderr
