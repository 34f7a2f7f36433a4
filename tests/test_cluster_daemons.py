"""Several `lmwatch serve` processes on one PostgreSQL database (issue 11), driving one
simulated world kept in that database: every migration supervised to its end exactly
once, through a SIGKILL of its owner, a daemon cut off from the database and a
restart of the database. The engine-level tests (tests/test_cluster_engines.py)
check the same rules in one process with a shared driver; these run the real
daemons, their own simulators, and reach them over HTTP only.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pgtools import PgCluster, TcpProxy
from storetools import on_disk

from lmwatch.bench.cluster_daemons import (
    FINISHED,
    PROFILES,
    Daemon,
    call,
    lease_holder,
)

LEASE = 2.0
POLL = 0.2


def inventory(sources: int, per_source: int, *, memory: str, link: str) -> str:
    """Hosts s<k> -> d<k>; on each source, idle instances and busy ones (handed over)."""
    lines = ["hosts:"]
    for k in range(sources):
        lines += [f"  - {{name: s{k}, memory: 4TiB}}", f"  - {{name: d{k}, memory: 4TiB}}"]
    lines.append("links:")
    lines += [f"  - {{between: [s{k}, d{k}], bandwidth: {link}}}" for k in range(sources)]
    lines += [f"default_bandwidth: {link}", "instances:"]
    for k in range(sources):
        for i in range(per_source):
            busy = i % 2 == 1
            rate = "2GiB/s" if busy else "1MiB/s"
            lines.append(
                f"  - {{name: vm-{k}-{i}, host: s{k}, memory: {memory}, working_set: 128MiB, "
                f"change_rate: {rate}, labels: {{kind: {'busy' if busy else 'idle'}}}}}"
            )
    return "\n".join(lines) + "\n"


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []
    (tmp_path / "profiles.yaml").write_text(PROFILES)

    def start(member: str, store_url: str, lease: float = LEASE) -> Daemon:
        daemon = Daemon(tmp_path, member, store_url, lease, POLL)
        started.append(daemon)
        daemon.start()
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


WRITTEN_WITHIN = 10.0  # seconds a daemon's store may take to write what it answered


def submit(daemon: Daemon, instance: str, source: str, destination: str) -> str:
    status, answer = call(
        daemon.base,
        "POST",
        "/v1/migrations",
        {"instance": instance, "source": source, "destination": destination},
    )
    assert status == 202, answer
    return str(answer["id"])


def record(daemon: Daemon, migration_id: str) -> dict[str, Any]:
    status, answer = call(daemon.base, "GET", f"/v1/migrations/{migration_id}")
    assert status == 200, answer
    return dict(answer)


def wait_all_finished(daemon: Daemon, ids: list[str], timeout: float) -> None:
    give_up = time.monotonic() + timeout
    while True:
        _, answer = call(daemon.base, "GET", "/v1/migrations")
        states = {m["id"]: m["state"] for m in answer["migrations"]}
        left = [i for i in ids if states.get(i) not in FINISHED]
        if not left:
            return
        assert time.monotonic() < give_up, f"{len(left)} unfinished, e.g. {record(daemon, left[0])}"
        time.sleep(0.2)


def assert_exactly_once(url: str, daemon: Daemon, ids: list[str]) -> None:
    """One final state each, in the database and in the timeline; no pause, handover
    or cancel decided twice; every claim retired."""
    # The daemon answers from memory; its store writes behind: read the database
    # once it has written every final state (or give up after `WRITTEN_WITHIN`).
    give_up = time.monotonic() + WRITTEN_WITHIN
    while True:
        rows = on_disk(
            url,
            "SELECT migration_id, count(*) FROM events WHERE kind = 'state' "
            "AND state IN (?, ?, ?) GROUP BY migration_id",
            *FINISHED,
        )
        counts = {str(r[0]): int(r[1]) for r in rows}
        if set(ids) <= set(counts) or time.monotonic() > give_up:
            break
        time.sleep(0.1)
    assert sorted(counts) == sorted(ids)
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v != 1}
    for migration_id in ids:
        actions = [
            e["action"] for e in record(daemon, migration_id)["timeline"] if e["kind"] == "decision"
        ]
        for action in ("pause", "handover", "cancel"):
            assert actions.count(action) <= 1, (migration_id, actions)
    assert on_disk(url, "SELECT key FROM cluster_leases WHERE kind = 'migration'") == []


def where(url: str, instance: str) -> str:
    (row,) = on_disk(url, "SELECT host FROM sim_instances WHERE name = ?", instance)
    return str(row[0])


@pytest.mark.parametrize("members", [2, 3])
def test_100_migrations_through_several_daemons_finish_exactly_once(
    tmp_path: Path, pg_url: str, daemons: Callable[..., Daemon], members: int
) -> None:
    (tmp_path / "inventory.yaml").write_text(inventory(10, 10, memory="256MiB", link="4Gbit/s"))
    nodes = [daemons(f"m{n}", pg_url) for n in range(members)]
    through = itertools.cycle(nodes)  # accepted by any daemon, supervised by its owner
    ids = [
        submit(next(through), f"vm-{k}-{i}", f"s{k}", f"d{k}") for k in range(10) for i in range(10)
    ]
    owners: set[str] = set()
    give_up = time.monotonic() + 120
    while time.monotonic() < give_up:
        owners |= {
            str(name)
            for (name,) in on_disk(
                pg_url,
                "SELECT m.name FROM cluster_leases l JOIN cluster_members m ON m.id = l.owner "
                "WHERE l.kind = 'migration'",
            )
        }
        _, answer = call(nodes[0].base, "GET", "/v1/migrations")
        if all(m["state"] in FINISHED for m in answer["migrations"]):
            break
        time.sleep(0.1)
    wait_all_finished(nodes[0], ids, 30)
    assert owners == {n.member for n in nodes}  # the work was spread over all of them
    assert_exactly_once(pg_url, nodes[-1], ids)
    for k in range(10):
        for i in range(10):
            state = record(nodes[0], ids[k * 10 + i])["state"]
            assert where(pg_url, f"vm-{k}-{i}") == (f"d{k}" if state == "completed" else f"s{k}")


def owner_gone(
    pg_url: str, nodes: dict[str, Daemon], how: Callable[[Daemon], None], within: float
) -> tuple[list[str], Daemon, dict[str, float]]:
    """Four long migrations through m1; the daemon holding the first is ended with
    `how`, and each of its migrations must be held by another within `within`
    seconds. The ids, a surviving daemon, and those seconds by migration."""
    ids = [submit(nodes["m1"], f"vm-{k}-1", f"s{k}", f"d{k}") for k in range(4)]
    time.sleep(3 * POLL)
    holders = {i: lease_holder(pg_url, i) for i in ids}
    assert all(h in nodes for h in holders.values()), holders
    victim = holders[ids[0]]
    assert victim is not None
    mine = [i for i, h in holders.items() if h == victim]
    how(nodes[victim])
    ended = time.monotonic()
    taken: dict[str, float] = {}
    while len(taken) < len(mine) and time.monotonic() < ended + within:
        for migration_id in mine:
            holder = lease_holder(pg_url, migration_id)
            if migration_id not in taken and holder not in (None, victim):
                taken[migration_id] = time.monotonic() - ended
        time.sleep(0.02)
    assert sorted(taken) == sorted(mine)
    survivor = next(d for m, d in nodes.items() if m != victim)
    return ids, survivor, taken


def all_completed_once(pg_url: str, survivor: Daemon, ids: list[str]) -> None:
    wait_all_finished(survivor, ids, 240)
    assert_exactly_once(pg_url, survivor, ids)
    for migration_id in ids:
        assert record(survivor, migration_id)["state"] == "completed"


def test_a_sigkilled_owner_is_taken_over_within_the_lease_and_a_poll(
    tmp_path: Path, pg_url: str, daemons: Callable[..., Daemon]
) -> None:
    # 4 GiB over 1 Gbit/s: a first pass of about half a minute.
    (tmp_path / "inventory.yaml").write_text(inventory(4, 2, memory="4GiB", link="1Gbit/s"))
    nodes = {m: daemons(m, pg_url) for m in ("m1", "m2", "m3")}
    ids, survivor, taken = owner_gone(pg_url, nodes, Daemon.kill, LEASE + 10)
    # Within the lease plus a poll; a little more for two processes on a busy machine.
    assert max(taken.values()) <= LEASE + POLL + 1.0, taken
    all_completed_once(pg_url, survivor, ids)


def test_a_daemon_stopped_cleanly_hands_its_migrations_over_at_once(
    tmp_path: Path, pg_url: str, daemons: Callable[..., Daemon]
) -> None:
    """SIGTERM (a planned stop: a rolling upgrade) ends the daemon's lease once its
    changes are written: the others take its migrations over at their next round, not
    a lease later."""
    lease = 20.0
    (tmp_path / "inventory.yaml").write_text(inventory(4, 2, memory="4GiB", link="1Gbit/s"))
    nodes = {m: daemons(m, pg_url, lease) for m in ("m1", "m2")}
    ids, survivor, taken = owner_gone(pg_url, nodes, Daemon.stop, lease)
    assert max(taken.values()) <= 5 * POLL + 1.0, taken  # a lease is 20 s here
    all_completed_once(pg_url, survivor, ids)


def test_a_daemon_cut_off_from_the_database_stops_acting_and_another_finishes(
    tmp_path: Path, pg_cluster: PgCluster, pg_url: str, daemons: Callable[..., Daemon]
) -> None:
    (tmp_path / "inventory.yaml").write_text(inventory(6, 2, memory="4GiB", link="1Gbit/s"))
    port = int(pg_url.split("@127.0.0.1:")[1].split("/")[0])
    proxy = TcpProxy(port)
    try:
        cut_off = daemons("m1", pg_url.replace(f":{port}/", f":{proxy.port}/"))
        other = daemons("m2", pg_url)
        ids = [submit(other, f"vm-{k}-1", f"s{k}", f"d{k}") for k in range(6)]
        time.sleep(3 * POLL)
        owned = [i for i in ids if lease_holder(pg_url, i) == "m1"]
        assert owned  # the hosts are shared out by name: m1 gets some of the six sources
        proxy.cut()
        cut_at = time.monotonic()
        # It stops acting on its own clock before the database could give its work away.
        acting = True
        while acting and time.monotonic() < cut_at + LEASE:
            status, body = call(cut_off.base, "GET", "/readyz")
            acting = bool(body.get("role", {}).get("may_act", True))
            time.sleep(0.05)
        stopped_after = time.monotonic() - cut_at
        assert not acting and stopped_after < LEASE, stopped_after
        assert status == 503
        # The other takes its migrations over and finishes them; once back, the cut-off
        # one writes nothing for them (its claims are stale).
        wait_all_finished(other, ids, 240)
        # The API shows an outcome as soon as it is decided; the lease goes with the
        # outcome's write to the database, a moment later.
        released_by = time.monotonic() + 10 * POLL + 5.0
        while any(lease_holder(pg_url, i) for i in owned) and time.monotonic() < released_by:
            time.sleep(POLL)
        for migration_id in owned:
            assert lease_holder(pg_url, migration_id) is None
        proxy.restore()
        time.sleep(LEASE + 5 * POLL)
        assert_exactly_once(pg_url, other, ids)
    finally:
        proxy.close()


def test_the_database_restarted_mid_run_loses_nothing(
    tmp_path: Path, pg_cluster: PgCluster, pg_url: str, daemons: Callable[..., Daemon]
) -> None:
    (tmp_path / "inventory.yaml").write_text(inventory(4, 4, memory="1GiB", link="1Gbit/s"))
    nodes = [daemons(m, pg_url) for m in ("m1", "m2")]
    ids = [
        submit(nodes[k % 2], f"vm-{k}-{i}", f"s{k}", f"d{k}") for k in range(4) for i in range(4)
    ]
    time.sleep(1.0)
    pg_cluster.restart()
    wait_all_finished(nodes[0], ids, 240)
    assert_exactly_once(pg_url, nodes[1], ids)
