"""`python -m lmwatch.bench.drain`: how soon a drain empties a host, ordered longest
expected move first (lmwatch's order) against the naive order (as the host lists
its instances).

Each seed draws a host population: 8 to 24 instances of 1 to 64 GiB, most quiet, some
rewriting a fair part of their memory, a few writing about as fast as the link copies;
three destinations with room for all of them, on links of 2 to 25 Gbit/s. Each
population is drained twice through the real engine, placement, policies and
simulator, in virtual time (in-memory store, `VirtualClock`), once per order, with
the engine's per-source limit of parallel moves (2 and 3 are both run); a third run
orders longest first but sends each instance where placement itself would (without
the drain's `quickest` choice among the hosts placement accepts). The figure is the
virtual time from the drain's acceptance until its last instance has left.
Nothing is asserted; docs/drain.md has the figures and how to read them.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmwatch.clock import VirtualClock
from lmwatch.drivers.inventory import load_inventory_text
from lmwatch.drivers.sim import SimDriver
from lmwatch.engine import Engine, EngineSettings
from lmwatch.metrics import Metrics
from lmwatch.policies import drain as policy
from lmwatch.profiles import ProfileRegistry
from lmwatch.store import DrainState, ItemState, Store

# Every instance finishes: slowed, paused or completed at its deadline if it must, so
# that the time to empty the host is defined for both orders.
PROFILES = """
profiles:
  - name: drain-bench
    max_blackout: 500ms
    may_slow_down: true
    may_pause: true
    max_pause: 10s
    deadline: {per_gib: 60s, min: 5m}
    on_deadline: complete
"""
MEMORY_GIB = (1, 2, 4, 8, 16, 32, 64)
MEMORY_WEIGHTS = (4, 6, 6, 5, 3, 2, 1)
LINKS_GBIT = (2, 5, 10, 25)
DESTINATIONS = ("d1", "d2", "d3")
LIMIT = 7 * 24 * 3600.0  # virtual seconds


@dataclass(frozen=True)
class Row:
    seed: int
    instances: int
    memory_gib: int
    slots: int
    naive: float  # seconds to empty, inventory order
    lpt: float  # seconds to empty, longest expected first
    moved_naive: int
    moved_lpt: int
    placement_pick: float  # longest first, each to placement's own pick

    @property
    def gain(self) -> float:
        return 1.0 - self.lpt / self.naive if self.naive > 0 else 0.0


def population(seed: int) -> tuple[str, int, int]:
    """A simulator inventory for one seed: (YAML text, instance count, total GiB)."""
    rng = random.Random(seed)
    count = rng.randint(8, 24)
    lines = ["instances:"]
    total = 0
    for n in range(count):
        memory = rng.choices(MEMORY_GIB, MEMORY_WEIGHTS)[0]
        total += memory
        kind = rng.random()
        if kind < 0.6:  # quiet
            rate = f"{rng.randint(1, 20)}MiB/s"
            working = f"{rng.choice((64, 128, 256, 512))}MiB"
        elif kind < 0.9:  # rewrites a fair part of its memory
            rate = f"{rng.randint(50, 300)}MiB/s"
            working = f"{max(64, memory * 1024 // rng.choice((2, 4, 8)))}MiB"
        else:  # about as fast as a link copies
            rate = f"{rng.randint(300, 1500)}MiB/s"
            working = f"{max(64, memory * 1024 // 4)}MiB"
        lines.append(
            f"  - {{name: vm{n:02d}, host: src, memory: {memory}GiB, "
            f"working_set: {working}, change_rate: {rate}}}"
        )
    room = max(64, total)  # each destination could take them all: time, not room, counts
    hosts = ["hosts:", f"  - {{name: src, memory: {4 * room}GiB}}"]
    hosts += [f"  - {{name: {d}, memory: {room}GiB}}" for d in DESTINATIONS]
    links = ["links:"]
    for d in DESTINATIONS:
        links.append(f"  - {{between: [src, {d}], bandwidth: {rng.choice(LINKS_GBIT)}Gbit/s}}")
    text = "\n".join([*hosts, *links, "default_bandwidth: 1Gbit/s", *lines]) + "\n"
    return text, count, total


async def drain_once(
    inventory: str, profiles: Path, *, lpt: bool, slots: int, quickest: bool = True
) -> tuple[float, int]:
    """Drain `src` once; (virtual seconds until it was empty, instances moved)."""
    clock = VirtualClock()
    driver = SimDriver(load_inventory_text(inventory), clock)
    store = Store.open(":memory:")
    # Ids from a seeded generator: a migration's id sets the phase of its polls, so
    # random ids made the same drain take different times from run to run.
    ids = random.Random(f"lmwatch-drain-ids:{inventory}")
    engine = Engine(
        new_id=lambda: str(uuid.UUID(int=ids.getrandbits(128), version=4)),
        driver=driver,
        store=store,
        profiles=ProfileRegistry(profiles, clock=clock),
        clock=clock,
        metrics=Metrics(),
        settings=EngineSettings(poll_interval=1.0, max_per_source=slots, max_per_destination=2),
    )
    engine.drains.order = policy.lpt_order if lpt else policy.inventory_order
    engine.drains.quickest = quickest
    try:
        await engine.start()
        drain = await engine.drains.submit("src")
        finished = await clock.run_until(
            lambda: engine.drains.get(drain.id).state.finished, limit=LIMIT, real_timeout=600
        )
        final = engine.drains.get(drain.id)
        if not finished or final.finished_at is None:
            return float("nan"), 0
        moved = sum(1 for i in final.items if i.state is ItemState.MOVED)
        if final.state is not DrainState.COMPLETED:
            print(f"  note: drain ended {final.state.value}: {final.reason}", file=sys.stderr)
        return final.finished_at - final.created_at, moved
    finally:
        await engine.stop()
        await driver.close()
        store.close()


async def run(seeds: Sequence[int], slots: Sequence[int]) -> list[Row]:
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as folder:
        profiles = Path(folder) / "profiles.yaml"
        profiles.write_text(PROFILES)
        for seed in seeds:
            inventory, count, total = population(seed)
            for parallel in slots:
                naive, moved_naive = await drain_once(
                    inventory, profiles, lpt=False, slots=parallel
                )
                lpt, moved_lpt = await drain_once(inventory, profiles, lpt=True, slots=parallel)
                picked, _ = await drain_once(
                    inventory, profiles, lpt=True, slots=parallel, quickest=False
                )
                rows.append(
                    Row(seed, count, total, parallel, naive, lpt, moved_naive, moved_lpt, picked)
                )
    return rows


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| seed | instances | GiB | parallel | naive order | longest first | gain "
        "| longest first, placement's pick |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.seed} | {r.instances} | {r.memory_gib} | {r.slots} | "
            f"{r.naive:.0f} s | {r.lpt:.0f} s | {100 * r.gain:+.1f}% | {r.placement_pick:.0f} s |"
        )
    gains = [r.gain for r in rows if r.naive == r.naive and r.lpt == r.lpt]
    if gains:
        wins = sum(1 for g in gains if g > 0.005)
        losses = sum(1 for g in gains if g < -0.005)
        lines.append("")
        lines.append(
            f"median gain {100 * statistics.median(gains):+.1f}%, mean "
            f"{100 * statistics.mean(gains):+.1f}%, best {100 * max(gains):+.1f}%, worst "
            f"{100 * min(gains):+.1f}%; longest-first sooner in {wins} of {len(gains)} runs, "
            f"later in {losses} (a difference under 0.5% counts as a tie)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmwatch.bench.drain",
        description="Time to empty a host: longest expected move first against inventory order.",
    )
    parser.add_argument("--seeds", type=int, default=12, help="populations (seeds 1..N)")
    parser.add_argument("--first-seed", type=int, default=1)
    parser.add_argument(
        "--parallel", type=int, nargs="+", default=[2, 3], help="moves off the host at once"
    )
    args = parser.parse_args(argv)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    rows = asyncio.run(run(list(seeds), args.parallel))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
