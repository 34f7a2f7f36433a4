"""`lmwatch drain` against a real API server over the real engine, in virtual time."""

from __future__ import annotations

import io
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from clitools import Cli, accepted_id, served

INVENTORY = """
hosts:
  - {name: a, memory: 512GiB}
  - {name: b, memory: 512GiB}
  - {name: c, memory: 64GiB}
  - {name: tiny, memory: 1GiB}
links:
  - {between: [a, b], bandwidth: 1GiB/s}
  - {between: [a, c], bandwidth: 512MiB/s}
default_bandwidth: 256MiB/s
instances:
  - {name: one, host: a, memory: 4GiB, working_set: 64MiB, change_rate: 1MiB/s}
  - {name: two, host: a, memory: 8GiB, working_set: 64MiB, change_rate: 1MiB/s}
  - {name: three, host: a, memory: 2GiB, working_set: 64MiB, change_rate: 1MiB/s}
"""

PROFILES = """
profiles:
  - name: default
    max_blackout: 500ms
    deadline: 1h
    on_deadline: cancel
"""


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Cli]:
    async with served(tmp_path, INVENTORY, PROFILES) as served_api:
        yield served_api


async def test_drain_follow_shows_each_instance_and_the_total_until_empty(api: Cli) -> None:
    result = await api.run_with_time("drain", "a", "--follow")
    assert result.code == 0, result.err
    drain_id = accepted_id(result)
    lines = result.out.splitlines()
    for name in ("one", "two", "three"):
        assert any(line.startswith(f"{name}  migrating") for line in lines), result.out
        assert any(line.startswith(f"{name}  moved") for line in lines), result.out
    totals = [line for line in lines if line.startswith("drain a: ")]
    assert totals[0].startswith("drain a: running, 0/3 moved")
    assert any("3/3 moved" in line for line in totals)
    assert lines[-1].startswith("drain completed: a is empty")
    assert api.engine.drains.get(drain_id).state.value == "completed"


async def test_drain_with_destinations_and_status(api: Cli) -> None:
    started = await api.run("drain", "a", "--destinations", "c")
    assert started.code == 0, started.err
    drain_id = accepted_id(started)
    drain = api.engine.drains.get(drain_id)
    assert drain.destinations == ("c",)
    listed = await api.run("drain", "--status")
    assert listed.code == 0 and drain_id[:8] in listed.out and "running" in listed.out
    shown = await api.run("drain", "--status", drain_id[:8])
    assert shown.code == 0, shown.err
    assert f"drain {drain_id}" in shown.out and "destinations: c" in shown.out
    for name in ("one", "two", "three"):
        assert f"  {name}  " in shown.out


async def test_drain_blocked_instances_are_printed_and_a_failed_drain_exits_1(
    api: Cli,
) -> None:
    result = await api.run("drain", "a", "--destinations", "tiny")
    assert result.code == 1
    blocked = [line for line in result.out.splitlines() if line.startswith("blocked: ")]
    assert len(blocked) == 3 and all("tiny has 1.0GiB free" in line for line in blocked)
    assert "failed" in result.out


async def test_drain_of_an_empty_host_says_so(api: Cli) -> None:
    result = await api.run("drain", "c")
    assert result.code == 0, result.err
    assert "already empty" in result.out


async def test_drain_cancel(api: Cli) -> None:
    drain_id = accepted_id(await api.run("drain", "a"))
    result = await api.run("drain", "--cancel", drain_id[:8])
    assert result.code == 0, result.err
    assert f"drain {drain_id} " in result.out
    assert re.search(r"(cancelling|cancelled)", result.out)


async def test_drain_refusals_and_usage(api: Cli) -> None:
    unknown = await api.run("drain", "nowhere")
    assert unknown.code == 1 and "nowhere" in unknown.err
    itself = await api.run("drain", "a", "--destinations", "a")
    assert itself.code == 1 and "itself" in itself.err
    nothing = await api.run("drain")
    assert nothing.code == 2
    both = await api.run("drain", "a", "--cancel", "x")
    assert both.code == 2


def test_the_live_view_on_a_terminal_draws_a_line_per_instance_and_a_total() -> None:
    from lmwatch.render import LiveDrain, Output

    sink = io.StringIO()
    out = Output(sink, terminal=True)
    drain = {
        "host": "a",
        "state": "running",
        "instances_total": 2,
        "instances_moved": 1,
        "blocked": [],
        "eta_seconds": 42.0,
        "instances": [
            {
                "instance": "one",
                "state": "moved",
                "progress": 1.0,
                "destination": "b",
                "migration_id": "m1",
                "reason": "moved to b",
            },
            {
                "instance": "two",
                "state": "migrating",
                "progress": 0.5,
                "destination": "b",
                "migration_id": "m2",
                "migration_state": "copying",
                "eta_seconds": 40.0,
                "reason": "",
            },
        ],
    }
    with LiveDrain(out) as live:
        live.update(drain)
    text = sink.getvalue()
    assert "one" in text and "two" in text and "50%" in text
    assert "1/2 moved" in text and "total" in text
