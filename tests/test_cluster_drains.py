"""Drains with several engines on one database (tests/clustertools.py): a drain is run
by the member holding its host and by no other, another member takes it over when
that one dies, and a cancel through any member stops it."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from clustertools import Cluster, Node, inventory
from storetools import on_disk

from lmwatch.policies.leases import assign_hosts
from lmwatch.store import DrainState, ItemState


def holder(cluster: Cluster, host: str) -> Node | None:
    """The live member whose last round holds `host`."""
    found = [
        n
        for n in cluster.live()
        if n.membership.last is not None and host in n.membership.last.hosts
    ]
    assert len(found) <= 1, f"{host} held by {[n.name for n in found]}"
    return found[0] if found else None


def runners(cluster: Cluster, drain_id: str) -> list[str]:
    return [n.name for n in cluster.live() if drain_id in n.engine.drains._live]


async def balanced(cluster: Cluster) -> None:
    """Until every live member holds exactly the hosts assigned to it (a member that
    joins later takes some of them from the first only over a round or two)."""
    names = [n.name for n in cluster.live()]
    expected = assign_hosts(await cluster.driver.hosts(), names)

    def settled() -> bool:
        rounds = {n.name: n.membership.last for n in cluster.live()}
        return all(
            r is not None and set(r.hosts) == {h for h, m in expected.items() if m == name}
            for name, r in rounds.items()
        )

    await cluster.wait(settled, 10)


def migrations_per_instance(url: str) -> Counter[str]:
    rows = on_disk(url, "SELECT instance FROM migrations WHERE state = ?", "completed")
    return Counter(str(r[0]) for r in rows)


async def test_a_drain_runs_on_the_member_holding_its_host_and_moves_on_when_it_dies(
    tmp_path: Path, pg_url: str
) -> None:
    # 1 GiB guests over 4 Gbit/s, one at a time per source: a drain of 3 takes seconds.
    text = inventory(2, 3, memory="1GiB")
    cluster = Cluster(tmp_path, pg_url, text, lease=2.0, poll=0.1, per_source=1)
    try:
        a = await cluster.add("a")
        b = await cluster.add("b")
        await balanced(cluster)
        # Both submitted through `a`: each is run by its host's holder alone.
        drains = {h: (await a.engine.drains.submit(h)).id for h in ("s0", "s1")}
        for host, drain_id in drains.items():
            await cluster.wait(lambda d=drain_id: bool(runners(cluster, d)), 5)
            owner = holder(cluster, host)
            assert owner is not None and runners(cluster, drain_id) == [owner.name]
        victim = holder(cluster, "s0")
        assert victim is not None
        survivor = b if victim is a else a
        s0 = drains["s0"]

        def moved(node: Node) -> int:
            got = node.engine.drains.get(s0)
            return sum(1 for i in got.items if i.state is ItemState.MOVED)

        await cluster.wait(lambda: moved(victim) >= 1, 60)
        await victim.kill()
        await cluster.wait(lambda: runners(cluster, s0) == [survivor.name], 10)
        for drain_id in drains.values():
            await cluster.wait(lambda d=drain_id: survivor.engine.drains.get(d).state.finished, 120)
            assert survivor.engine.drains.get(drain_id).state is DrainState.COMPLETED
        assert await cluster.driver.instances_on("s0") == []
        # The drains read the migrations' ends in memory; the store's writer may still
        # hold them: read the database once it has written them.
        assert survivor.engine.store.settle(10)
        counts = migrations_per_instance(pg_url)
        assert sorted(counts) == sorted(f"vm-{i}-{n}" for i in range(2) for n in range(3))
        assert set(counts.values()) == {1}, counts  # every instance moved once
        assert cluster.counted.most("start") == 1
    finally:
        await cluster.close()


async def test_a_drain_cancelled_through_another_member_stops_starting_migrations(
    tmp_path: Path, pg_url: str
) -> None:
    text = inventory(1, 4, memory="1GiB")
    cluster = Cluster(tmp_path, pg_url, text, lease=2.0, poll=0.1, per_source=1)
    try:
        a = await cluster.add("a")
        b = await cluster.add("b")
        await balanced(cluster)
        owner = holder(cluster, "s0")
        assert owner is not None
        other = b if owner is a else a
        drain = await other.engine.drains.submit("s0")
        await cluster.wait(lambda: runners(cluster, drain.id) == [owner.name], 5)
        await cluster.wait(
            lambda: any(
                i.state is ItemState.MIGRATING for i in owner.engine.drains.get(drain.id).items
            ),
            30,
        )
        cancelled = await other.engine.drains.cancel(drain.id)
        assert cancelled.state in (DrainState.CANCELLING, DrainState.CANCELLED)
        assert drain.id not in other.engine.drains._live  # nothing run there
        await cluster.wait(lambda: owner.engine.drains.get(drain.id).state.finished, 60)
        final = owner.engine.drains.get(drain.id)
        assert final.state is DrainState.CANCELLED, final
        started = [i for i in final.items if i.migration_id is not None]
        assert len(started) == 1, final.items  # nothing started after the cancel
        assert sum(1 for i in final.items if i.state is ItemState.CANCELLED) == 3
    finally:
        await cluster.close()
