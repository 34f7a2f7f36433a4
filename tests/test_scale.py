"""The cost of one call does not grow with the number of migrations (issue 8).

No timings: these count the work a call does (model advances, rows decoded,
links scanned), which is what grows with N when something is quadratic.
"""

from __future__ import annotations

from typing import Any

import pytest

from lmwatch.clock import VirtualClock
from lmwatch.drivers import simphysics
from lmwatch.drivers.inventory import Inventory, load_inventory_text
from lmwatch.drivers.sim import SimDriver
from lmwatch.model import MigrationRequest, StartPlan

PLAN = StartPlan(arm_handover=False, arm_slow_down=False, blackout_budget=0.3)


def _inventory(pairs: int, per_link: int) -> Inventory:
    lines = ["hosts:"]
    for p in range(pairs):
        lines += [f"  - {{name: s{p}, memory: 1TiB}}", f"  - {{name: d{p}, memory: 1TiB}}"]
    lines.append("links:")
    lines += [f"  - {{between: [s{p}, d{p}], bandwidth: 1GiB/s}}" for p in range(pairs)]
    lines.append("instances:")
    for p in range(pairs):
        for k in range(per_link):
            lines.append(
                f"  - {{name: vm{p}-{k}, host: s{p}, memory: 8GiB, working_set: 64MiB, "
                "change_rate: 1MiB/s}"
            )
    return load_inventory_text("\n".join(lines) + "\n")


async def _started(pairs: int, per_link: int) -> tuple[SimDriver, VirtualClock, list[str]]:
    clock = VirtualClock()
    driver = SimDriver(_inventory(pairs, per_link), clock)
    ids = []
    for p in range(pairs):
        for k in range(per_link):
            mid = f"m{p}-{k}"
            request = MigrationRequest(instance=f"vm{p}-{k}", source=f"s{p}", destination=f"d{p}")
            await driver.start(mid, request, PLAN)
            ids.append(mid)
    return driver, clock, ids


@pytest.fixture
def advances(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts calls of the model's advance (one job moved forward once)."""
    counter = [0]
    original = simphysics.Migration.advance

    def counted(self: simphysics.Migration, dt: float) -> None:
        counter[0] += 1
        original(self, dt)

    monkeypatch.setattr(simphysics.Migration, "advance", counted)
    return counter


@pytest.mark.parametrize("pairs", [5, 50])
async def test_a_sample_advances_only_the_jobs_of_its_link(pairs: int, advances: list[int]) -> None:
    driver, clock, ids = await _started(pairs, per_link=2)
    await clock.advance(0.5)
    advances[0] = 0
    await driver.sample(ids[0])
    assert advances[0] == 2  # its own job and the one sharing its link; not 2 x pairs


async def test_polls_in_wall_clock_time_cost_linear_work(advances: list[int]) -> None:
    driver, clock, ids = await _started(20, per_link=1)
    advances[0] = 0
    for mid in ids:  # each poll sees a later clock, as under the daemon
        await clock.advance(0.01)
        await driver.sample(mid)
        await driver.sample(mid)  # same instant: nothing to advance
    assert advances[0] == len(ids)  # N polls cost N advances, not N x N


def test_link_lookups_do_not_scan_the_links() -> None:
    inventory = _inventory(30, per_link=1)
    scans = [0]

    class Counting(tuple[Any, ...]):
        def __iter__(self) -> Any:
            scans[0] += 1
            return super().__iter__()

    object.__setattr__(inventory, "links", Counting(inventory.links))
    for p in range(30):
        assert inventory.bandwidth(f"s{p}", f"d{p}") == 1024**3
        assert inventory.bandwidth(f"d{p}", f"s{p}") == 1024**3
        assert inventory.link(f"s{p}", f"s{(p + 1) % 30}") is None
    assert scans[0] <= 1
