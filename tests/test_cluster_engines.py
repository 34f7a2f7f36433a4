"""Several engines on one PostgreSQL database, one simulated world (issue 11):
each migration supervised by exactly one of them, taken over when its owner dies or
is cut off, written and acted on only under its claim (docs/cluster.md)."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

import pytest
from clustertools import Cluster, inventory
from pgtools import PgCluster, TcpProxy
from storetools import on_disk, run_sql

from lmwatch.engine.effects import NotOwner
from lmwatch.errors import Conflict
from lmwatch.model import Action, Decision, State

FINISHED = ("completed", "failed", "cancelled")


def finished_once(url: str, ids: list[str]) -> None:
    """Every migration's final state is in the database, written once."""
    rows = on_disk(
        url,
        "SELECT migration_id, count(*) FROM events WHERE state IN (?, ?, ?) GROUP BY migration_id",
        *FINISHED,
    )
    counts = {str(r[0]): int(r[1]) for r in rows}
    assert sorted(counts) == sorted(ids)
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}
    states = on_disk(url, "SELECT state FROM migrations")
    assert {s for (s,) in states} == {"completed"}
    # Every claim was retired with its outcome, every destination slot freed.
    assert on_disk(url, "SELECT key FROM cluster_leases WHERE kind = 'migration'") == []
    assert on_disk(url, "SELECT migration_id FROM cluster_slots") == []


@pytest.mark.parametrize("members", [2, 3])
async def test_100_migrations_spread_across_engines_finish_exactly_once(
    tmp_path: Path, pg_url: str, members: int
) -> None:
    sources = 10
    cluster = Cluster(tmp_path, pg_url, inventory(sources, 10))
    try:
        nodes = [await cluster.add(f"m{n}") for n in range(members)]
        submitting = itertools.cycle(nodes)  # accepted by any, supervised by the owner
        ids = [
            await cluster.submit(next(submitting), f"vm-{i}-{n}", f"s{i}", f"d{(i + n) % 2}")
            for i in range(sources)
            for n in range(10)
        ]
        seen: dict[str, set[str]] = {i: set() for i in ids}

        def done() -> bool:
            for node in cluster.live():
                for migration_id in node.engine.supervised():
                    seen[migration_id].add(node.name)
            return all(n.engine.store.get(i).state.finished for i in ids for n in nodes[:1])

        await cluster.wait(done, 120)
        for node in nodes:
            assert node.engine.store.settle(10)
        # Work was spread: every member supervised some, none a migration another did.
        owners = {next(iter(names)) for names in seen.values() if names}
        assert owners == {n.name for n in nodes}
        assert all(len(names) <= 1 for names in seen.values())
        finished_once(pg_url, ids)
        assert cluster.counted.count("start") == len(ids)
        assert cluster.counted.most("start") == 1
        for action in ("pause", "handover", "cancel"):
            assert cluster.counted.most(action) <= 1
    finally:
        await cluster.close()


async def test_an_engine_killed_mid_migration_is_taken_over_within_lease_and_a_poll(
    tmp_path: Path, pg_url: str
) -> None:
    # Slow, never-converging guests: decisions (slow-down, pause, handover) are due.
    text = inventory(4, 2, memory="1GiB", rate="600MiB/s")
    cluster = Cluster(tmp_path, pg_url, text, lease=2.0, poll=0.1)
    try:
        a = await cluster.add("a")
        b = await cluster.add("b")
        ids = [
            await cluster.submit(a, f"vm-{i}-{n}", f"s{i}", "d0" if n == 0 else "d1")
            for i in range(4)
            for n in range(2)
        ]

        def copying(node_name: str) -> list[str]:
            node = {n.name: n for n in cluster.nodes}[node_name]
            return [
                i for i in node.engine.supervised() if node.engine.get(i).state is State.COPYING
            ]

        await cluster.wait(lambda: bool(copying("a")), 30)
        victims = copying("a")
        killed_at = time.monotonic()
        await a.kill()
        took = await cluster.wait(lambda: all(cluster.owner_of(i) is b for i in victims), 10)
        print(f"takeover after {took:.2f}s (lease 2s, poll 0.1s)")
        assert time.monotonic() - killed_at < cluster.lease + cluster.poll + 0.5
        await cluster.wait(lambda: all(b.engine.get(i).state.finished for i in ids), 120)
        assert b.store.settle(10)
        finished_once(pg_url, ids)
        assert cluster.counted.most("start") == 1  # re-attached, never started again
        for action in ("pause", "handover", "cancel"):
            assert cluster.counted.most(action) <= 1
        for migration_id in victims:
            reasons = [e.reason for e in b.store.events(migration_id)]
            assert "supervision resumed after a restart" in reasons
    finally:
        await cluster.close()


async def test_an_engine_cut_off_from_the_database_stops_acting_before_its_lease_expires(
    tmp_path: Path, pg_url: str, pg_cluster: PgCluster
) -> None:
    text = inventory(4, 2, memory="1GiB", rate="600MiB/s")
    cluster = Cluster(tmp_path, pg_url, text, lease=2.0, poll=0.1)
    proxy = TcpProxy(pg_cluster.port)
    try:
        database = pg_url.rsplit("/", 1)[1].split("?", 1)[0]
        a = await cluster.add("a", pg_cluster.url(database, port=proxy.port))
        b = await cluster.add("b")
        ids = [
            await cluster.submit(b, f"vm-{i}-{n}", f"s{i}", "d0" if n == 0 else "d1")
            for i in range(4)
            for n in range(2)
        ]
        await cluster.wait(lambda: bool(a.engine.supervised()) and bool(b.engine.supervised()), 30)
        member = a.membership.keeper.member
        assert member is not None
        proxy.hold()  # packets go nowhere: its renewals and writes hang
        calls_before: dict[tuple[str, str], int] = {}
        await cluster.wait(lambda: not a.membership.may_act(), 5, step=0.01)
        stopped_at_db = on_disk(pg_url, "SELECT clock_timestamp()")[0][0]
        expires = on_disk(pg_url, "SELECT expires_at FROM cluster_members WHERE id = ?", member.id)
        assert expires and stopped_at_db < expires[0][0]  # it stopped before its lease ended
        await cluster.wait(lambda: not a.engine.supervised(), 2)
        calls_before = dict(cluster.counted.calls)
        # Every migration is b's now: supervised by it, or finished under it (its own
        # first ones may complete while a's lease runs out, and leave its supervision).
        await cluster.wait(
            lambda: all(cluster.owner_of(i) is b or b.engine.get(i).state.finished for i in ids),
            10,
        )
        proxy.restore()  # what it kept in memory must not be written with its old claims
        await cluster.wait(lambda: all(b.engine.get(i).state.finished for i in ids), 120)
        assert b.store.settle(10)
        await asyncio.sleep(1.0)
        a.store.settle(10)
        finished_once(pg_url, ids)
        assert cluster.counted.most("start") == 1
        for action in ("pause", "handover", "cancel"):
            assert cluster.counted.most(action) <= 1
        # Its writes kept in memory since the cut were dropped, not written late.
        assert a.store.pending() == 0
        assert calls_before
    finally:
        await cluster.close()
        proxy.close()


async def test_the_database_restarted_mid_run_loses_nothing(
    tmp_path: Path, pg_url: str, pg_cluster: PgCluster
) -> None:
    cluster = Cluster(tmp_path, pg_url, inventory(4, 4, memory="1GiB"))
    try:
        nodes = [await cluster.add(f"m{n}") for n in range(2)]
        ids = [
            await cluster.submit(nodes[(i + n) % 2], f"vm-{i}-{n}", f"s{i}", f"d{n % 2}")
            for i in range(4)
            for n in range(4)
        ]
        await cluster.wait(
            lambda: any(n.engine.get(i).state is State.COPYING for n in nodes for i in ids), 30
        )
        pg_cluster.restart()
        await cluster.wait(
            lambda: all(nodes[0].engine.store.get(i).state.finished for i in ids), 120
        )
        for node in nodes:
            assert node.store.settle(10)
        finished_once(pg_url, ids)
        assert cluster.counted.most("start") == 1
    finally:
        await cluster.close()


async def test_the_destination_limit_holds_across_engines(tmp_path: Path, pg_url: str) -> None:
    cluster = Cluster(tmp_path, pg_url, inventory(4, 3, memory="512MiB"), per_destination=1)
    try:
        nodes = [await cluster.add(f"m{n}") for n in range(2)]
        ids = [
            await cluster.submit(nodes[0], f"vm-{i}-{n}", f"s{i}", "d0")
            for i in range(4)
            for n in range(3)
        ]
        await cluster.wait(lambda: all(nodes[0].store.get(i).state.finished for i in ids), 120)
        for node in nodes:
            assert node.store.settle(10)
        rows = on_disk(pg_url, "SELECT started_at, finished_at FROM migrations")
        edges = sorted([(float(s), 1) for s, _ in rows] + [(float(f), -1) for _, f in rows])
        running = most = 0
        for _, step in edges:
            running += step
            most = max(most, running)
        assert most == 1, f"{most} migrations arrived at d0 at once (limit 1)"
        finished_once(pg_url, ids)
    finally:
        await cluster.close()


async def test_no_action_unless_its_intent_was_written_under_a_current_claim(
    tmp_path: Path, pg_url: str
) -> None:
    cluster = Cluster(tmp_path, pg_url, inventory(1, 1, memory="4GiB", rate="600MiB/s"))
    try:
        node = await cluster.add("a")
        migration_id = await cluster.submit(node, "vm-0-0", "s0", "d0")
        engine = node.engine
        await cluster.wait(lambda: engine.get(migration_id).state is State.COPYING, 30)
        supervision = engine._supervisions[migration_id]
        held = node.membership.fencing.claim_of(migration_id)
        assert held is not None
        # Another claim, as if another member had taken it over meanwhile.
        run_sql(pg_url, f"UPDATE cluster_leases SET token = token + 1 WHERE key = '{migration_id}'")
        with pytest.raises(NotOwner):
            await engine._effects.apply(
                supervision, Decision(Action.PAUSE, "pause now"), origin="operator"
            )
        assert cluster.counted.calls[("pause", migration_id)] == 0
        decided = on_disk(
            pg_url,
            "SELECT count(*) FROM events WHERE migration_id = ? AND action = 'pause'",
            migration_id,
        )
        assert decided == [(0,)]  # its intent was dropped with the stale claim
        # That supervision stopped; the member, owner under the new token here, takes
        # it back through the restart path.
        await cluster.wait(lambda: engine._supervisions.get(migration_id) is not supervision, 5)

        def again() -> bool:
            claim = node.membership.fencing.claim_of(migration_id)
            return claim is not None and claim.token == held.token + 1

        await cluster.wait(again, 5)
    finally:
        await cluster.close()


async def test_a_command_for_a_migration_another_member_supervises_is_refused_saying_so(
    tmp_path: Path, pg_url: str
) -> None:
    cluster = Cluster(tmp_path, pg_url, inventory(2, 1, memory="4GiB"))
    try:
        nodes = [await cluster.add(f"m{n}") for n in range(2)]
        ids = [await cluster.submit(nodes[0], f"vm-{i}-0", f"s{i}", "d0") for i in range(2)]
        await cluster.wait(lambda: all(cluster.owner_of(i) is not None for i in ids), 10)
        for migration_id in ids:
            owner = cluster.owner_of(migration_id)
            other = next(n for n in nodes if n is not owner)
            with pytest.raises(Conflict, match="supervised by another lmwatch daemon"):
                await other.engine.cancel(migration_id)
            with pytest.raises(Conflict, match="supervised by another lmwatch daemon"):
                await other.engine.force_complete(migration_id)
    finally:
        await cluster.close()


async def test_an_engine_stopped_just_after_a_submission_woke_its_rounds_stops(
    tmp_path: Path, pg_url: str
) -> None:
    """A submission wakes the ownership rounds (its source's holder supervises it) and
    the engine is stopped in the same step, as a drain's next start and a member's
    end can fall together: the rounds stop at once, not a poll (5 s here) later.
    (asyncio.wait_for in Python 3.11 returns the wake-up and drops the cancel when
    both come at once: the rounds ran on, and a killed member of a drain test went
    on for most of a minute, its drains taken over and finished by the other.)"""
    poll = 5.0
    cluster = Cluster(tmp_path, pg_url, inventory(1, 1), lease=10.0, poll=poll)
    try:
        node = await cluster.add("a")
        ownership = node.engine._ownership
        assert ownership is not None
        await cluster.wait(lambda: ownership.rounds >= 1, 10)
        await asyncio.sleep(0.1)  # the rounds wait for their next poll
        node.alive = False
        ownership.wake()
        stopping = asyncio.create_task(node.engine.stop())  # its first step is next
        await asyncio.wait({stopping}, timeout=poll / 2)
        assert stopping.done(), "the rounds did not stop"
        node.store.close()
        node.membership.stop()
    finally:
        await cluster.close()
