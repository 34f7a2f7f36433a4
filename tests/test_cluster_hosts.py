"""Spreading source hosts across members, on a real PostgreSQL: every host held by
exactly one member, shares even, a joining member gets its share, a silent member's
hosts go to the others once its lease has run out."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import pytest

from lmwatch.cluster import leases
from lmwatch.cluster.hosts import balance_hosts
from lmwatch.cluster.pg import Connection, connect
from lmwatch.cluster.schema import ensure_schema

HOSTS = [f"host-{i:02d}" for i in range(30)]


@pytest.fixture
def db(pg_url: str) -> Iterator[Connection]:
    conn = connect(pg_url)
    ensure_schema(conn)
    yield conn
    conn.close()


def rounds(db: Connection, members: list[leases.Member], count: int = 3) -> dict[str, set[str]]:
    """`count` rounds of every member in turn; what each holds after the last. After
    every single step no host is held by two members."""
    held: dict[str, set[str]] = {}
    for _ in range(count):
        for member in members:
            result = balance_hosts(db, member, HOSTS)
            held[member.name] = {c.key for c in result.held}
            every = [h for hosts in held.values() for h in hosts]
            assert len(every) == len(set(every)), f"a host held twice: {held}"
    return held


def test_members_share_the_hosts_evenly_and_a_joining_member_takes_its_share(
    db: Connection,
) -> None:
    members = [leases.register(db, name, 30.0) for name in ("a", "b", "c")]
    held = rounds(db, members)
    assert set().union(*held.values()) == set(HOSTS)
    assert all(len(hosts) <= 10 for hosts in held.values())

    members.append(leases.register(db, "d", 30.0))
    first = balance_hosts(db, members[-1], HOSTS)
    # Its share is still held by live members: it waits for them to release it.
    assert first.claimed == () and len(first.waiting) >= 6
    after = rounds(db, members)
    assert set().union(*after.values()) == set(HOSTS)
    assert all(len(hosts) <= math.ceil(30 / 4) for hosts in after.values())
    assert len(after["d"]) >= 6
    kept = sum(len(held[name] & after[name]) for name in ("a", "b", "c"))
    assert kept >= 30 - len(after["d"]) - 3  # the others keep nearly all they had


def test_a_silent_members_hosts_go_to_the_others_once_its_lease_has_run_out(
    db: Connection,
) -> None:
    stays = [leases.register(db, name, 30.0) for name in ("a", "b")]
    silent = leases.register(db, "silent", 2.0)
    held = rounds(db, [*stays, silent], count=2)
    assert len(held["silent"]) == 10
    # Still live: its hosts are not taken.
    assert rounds(db, stays, count=1)["a"].isdisjoint(held["silent"])
    time.sleep(2.1)  # its lease runs out
    after = rounds(db, stays, count=2)
    assert after["a"] | after["b"] == set(HOSTS)
    assert after["a"].isdisjoint(after["b"])
    assert len(after["a"]) == len(after["b"]) == 15


def test_a_restarted_member_gets_its_hosts_back(db: Connection) -> None:
    members = [leases.register(db, name, 30.0) for name in ("a", "b")]
    held = rounds(db, members, count=2)
    again = leases.register(db, "a", 30.0)  # a new incarnation of a
    assert {c.key for c in balance_hosts(db, again, HOSTS).held} == held["a"]
