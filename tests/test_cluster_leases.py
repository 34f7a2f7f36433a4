"""Leases with fencing against a real PostgreSQL (tests/pgtools.py): members claim
disjoint work, take over a silent member's work within the lease, refuse stale
writes, stop acting when cut off before their lease runs out, and ride out a
restart of the database."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator

import psycopg
import pytest
from pgtools import PgCluster, TcpProxy, wait_for

from lmwatch.cluster import leases
from lmwatch.cluster.keeper import LeaseKeeper
from lmwatch.cluster.pg import Connection, Unreachable, connect
from lmwatch.cluster.schema import ensure_schema
from lmwatch.policies.leases import LeaseTerms

TERMS = LeaseTerms(lease=2.0, renew_every=0.5, margin=0.4, retry_after=0.1)
POLL = 0.1  # how often a member looks for free work in these tests


@pytest.fixture
def db(pg_url: str) -> Iterator[Connection]:
    conn = connect(pg_url)
    ensure_schema(conn)
    conn.execute("CREATE TABLE work_log (key text NOT NULL, member text NOT NULL, token bigint)")
    yield conn
    conn.close()


@pytest.fixture
def keepers(pg_url: str) -> Iterator[list[LeaseKeeper]]:
    """Keepers a test starts (append to the list); all stopped at the end."""
    started: list[LeaseKeeper] = []
    yield started
    for keeper in started:
        keeper.stop()


def start_keeper(
    keepers: list[LeaseKeeper], url: str, name: str, terms: LeaseTerms = TERMS
) -> LeaseKeeper:
    keeper = LeaseKeeper(url, name, terms)
    keepers.append(keeper)
    keeper.start()
    wait_for(keeper.may_act, 10)
    return keeper


def do_work(conn: Connection, claim: leases.Claim, name: str) -> None:
    """The unit's work: one row in the log, written and retired under the claim."""
    with leases.fenced(conn, claim):
        conn.execute(
            "INSERT INTO work_log (key, member, token) VALUES (%s, %s, %s)",
            (claim.key, name, claim.token),
        )
        leases.retire(conn, claim)


# -- claims ----------------------------------------------------------------------------


@pytest.mark.parametrize("members", [2, 3])
def test_members_claim_disjoint_work_and_all_of_it(
    db: Connection, pg_url: str, members: int
) -> None:
    keys = [f"m{i:03d}" for i in range(90)]
    leases.offer(db, "migration", keys)
    claimed: dict[str, list[leases.Claim]] = {}
    gate = threading.Barrier(members)

    def member(name: str) -> None:
        with connect(pg_url) as conn:
            me = leases.register(conn, name, 30.0)
            mine: list[leases.Claim] = []
            gate.wait()
            while batch := leases.claim(conn, me, "migration", limit=7):
                mine += batch
                time.sleep(0.02)  # works the batch before it asks for more
            claimed[name] = mine

    threads = [threading.Thread(target=member, args=(f"d{i}",)) for i in range(members)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    every = [c.key for mine in claimed.values() for c in mine]
    assert sorted(every) == keys  # all of it, and nothing twice
    assert all(c.token == 1 for mine in claimed.values() for c in mine)
    assert all(claimed[name] for name in claimed), "a member got no work at all"
    owners = dict(db.execute("SELECT key, owner FROM cluster_leases").fetchall())
    for mine in claimed.values():
        assert {owners[c.key] for c in mine} == {mine[0].member}


def test_claims_are_limited_to_the_keys_asked_for_and_need_a_running_lease(
    db: Connection,
) -> None:
    leases.offer(db, "host", ["a", "b", "c"])
    assert leases.offer(db, "host", ["a", "d"]) == 1  # a is known already
    me = leases.register(db, "d1", 30.0)
    assert [c.key for c in leases.claim(db, me, "host", keys=["b", "d", "zz"])] == ["b", "d"]
    assert [c.key for c in leases.held(db, me, "host")] == ["b", "d"]
    assert leases.claim(db, me, "migration") == []  # another kind
    short = leases.register(db, "d2", 0.05)
    time.sleep(0.1)
    assert leases.claim(db, short, "host") == []  # its own lease has run out


# -- takeover --------------------------------------------------------------------------


def test_a_member_that_stops_renewing_loses_its_work_to_another_within_the_lease(
    db: Connection, pg_url: str, keepers: list[LeaseKeeper]
) -> None:
    keys = [f"m{i:02d}" for i in range(20)]
    leases.offer(db, "migration", keys)
    first = start_keeper(keepers, pg_url, "first")
    second = start_keeper(keepers, pg_url, "second")
    assert first.member is not None and second.member is not None
    assert len(leases.claim(db, first.member, "migration")) == 20
    assert leases.claim(db, second.member, "migration") == []  # held, and live

    first.stop()  # it dies: no release, no more renewals
    stopped = time.monotonic()
    taken: list[leases.Claim] = []

    def all_taken() -> bool:
        assert second.member is not None
        taken.extend(leases.claim(db, second.member, "migration"))
        return len(taken) == 20

    took = wait_for(all_taken, TERMS.lease + 5, step=POLL) - stopped
    assert took <= TERMS.lease + POLL + 0.5
    assert {c.key for c in taken} == set(keys)
    assert {c.token for c in taken} == {2}  # each claim fences the one before


def test_a_member_that_resigns_hands_its_work_over_at_once(
    db: Connection, pg_url: str, keepers: list[LeaseKeeper]
) -> None:
    """A clean stop ends the lease: the work is free now, not once the lease ran out."""
    terms = LeaseTerms(lease=30.0, renew_every=5.0, margin=2.0, retry_after=0.1)
    keys = [f"m{i:02d}" for i in range(5)]
    leases.offer(db, "migration", keys)
    first = start_keeper(keepers, pg_url, "first", terms)
    second = start_keeper(keepers, pg_url, "second", terms)
    assert first.member is not None and second.member is not None
    assert len(leases.claim(db, first.member, "migration")) == 5
    assert leases.claim(db, second.member, "migration") == []
    assert first.resign()
    assert not first.may_act() and first.member is None
    assert [m.name for m in leases.live_members(db)] == ["second"]
    assert {c.key for c in leases.claim(db, second.member, "migration")} == set(keys)
    assert not first.resign()  # once


# -- fencing ---------------------------------------------------------------------------


def test_a_write_with_a_stale_token_is_refused_and_writes_nothing(db: Connection) -> None:
    leases.offer(db, "migration", ["m1"])
    old = leases.register(db, "old", 1.0)
    (stale,) = leases.claim(db, old, "migration")
    with leases.fenced(db, stale):  # current: the write goes through
        db.execute("INSERT INTO work_log VALUES ('m1', 'old', %s)", (stale.token,))
    time.sleep(1.1)  # the lease runs out (by the database's clock)
    with pytest.raises(leases.StaleClaim, match="lease has run out"):
        do_work(db, stale, "old")

    new = leases.register(db, "new", 30.0)
    (current,) = leases.claim(db, new, "migration")
    assert current.token == stale.token + 1
    with pytest.raises(leases.StaleClaim, match=r"now claimed by member new .* token 2"):
        do_work(db, stale, "old")
    with pytest.raises(leases.StaleClaim):
        leases.release(db, stale)
    assert db.execute("SELECT member FROM work_log").fetchall() == [("old",)]

    do_work(db, current, "new")
    assert db.execute("SELECT member, token FROM work_log ORDER BY token").fetchall() == [
        ("old", 1),
        ("new", 2),
    ]
    with pytest.raises(leases.StaleClaim, match="retired"):
        do_work(db, current, "new")


def test_a_renewal_after_the_lease_ran_out_is_refused(db: Connection) -> None:
    member = leases.register(db, "late", 1.0)
    assert leases.renew(db, member, 0.5).id == member.id
    time.sleep(0.6)
    with pytest.raises(leases.LeaseExpired):
        leases.renew(db, member, 30.0)
    again = leases.register(db, "late", 30.0)  # a new incarnation replaces the old
    assert again.id != member.id
    assert [m.id for m in leases.live_members(db)] == [again.id]


def test_no_member_claims_a_unit_while_its_owner_writes_under_its_claim(
    db: Connection, pg_url: str
) -> None:
    leases.offer(db, "migration", ["m1"])
    slow = leases.register(db, "slow", 1.0)
    (claim,) = leases.claim(db, slow, "migration")
    other = leases.register(db, "other", 30.0)
    with connect(pg_url) as writer, leases.fenced(writer, claim):
        time.sleep(1.2)  # the lease runs out while the transaction is open
        assert leases.claim(db, other, "migration") == []  # skipped, not waited for
        writer.execute("INSERT INTO work_log VALUES ('m1', 'slow', 1)")
    assert [c.token for c in leases.claim(db, other, "migration")] == [2]


# -- cut off ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["cut", "hold"])
def test_a_member_cut_off_from_the_database_stops_acting_before_its_lease_expires(
    db: Connection, pg_cluster: PgCluster, pg_url: str, keepers: list[LeaseKeeper], how: str
) -> None:
    """cut: its connections are closed and new ones refused (its renewals fail);
    hold: nothing it sends arrives, nothing comes back (its renewal hangs)."""
    database = pg_url.rsplit("/", 1)[1].split("?")[0]
    proxy = TcpProxy(pg_cluster.port)
    try:
        cut_off = start_keeper(keepers, pg_cluster.url(database, port=proxy.port), "cut")
        other = start_keeper(keepers, pg_url, "other")
        leases.offer(db, "migration", ["m1", "m2"])
        member = cut_off.member
        assert member is not None
        held = leases.claim(db, member, "migration")
        assert len(held) == 2

        if how == "cut":
            proxy.cut()
        else:
            proxy.hold()
        time.sleep(0.05)
        before = time.monotonic()
        (remaining,) = db.execute(
            "SELECT extract(epoch FROM expires_at - clock_timestamp())"
            " FROM cluster_members WHERE id = %s",
            (member.id,),
        ).fetchone() or (None,)
        after = time.monotonic()
        assert remaining is not None
        # The lease ends between these two, as the database read its clock between.
        expires, expires_at_most = before + float(remaining), after + float(remaining)

        until = cut_off.tenure().acting_until
        assert until is not None and until <= expires_at_most - TERMS.margin
        stopped = wait_for(lambda: not cut_off.may_act(), TERMS.lease + 1, step=0.005)
        assert stopped < expires
        if how == "hold":
            assert cut_off.failures == 0  # its renewal still hangs: the clock stopped it
        took: list[leases.Claim] = []

        def all_taken() -> bool:
            assert other.member is not None
            took.extend(leases.claim(db, other.member, "migration"))
            return len(took) == 2

        wait_for(all_taken, TERMS.lease + 2, step=0.02)
        assert time.monotonic() >= expires - 0.05  # not before the cut-off lease ran out
        # Let it back: its old claims write nothing; it registers again and may act.
        proxy.cut()
        proxy.restore()
        wait_for(cut_off.may_act, 10)
        assert cut_off.incarnations == 2 and cut_off.member is not None
        assert cut_off.member.id != member.id
        for stale in held:
            with pytest.raises(leases.StaleClaim):
                do_work(db, stale, "cut")
        assert db.execute("SELECT count(*) FROM work_log").fetchone() == (0,)
    finally:
        proxy.close()


# -- the database restarted ------------------------------------------------------------


class Worker(threading.Thread):
    """A member working through units: claims a few, does each while it may act,
    reconnects when the database is away."""

    def __init__(self, url: str, keeper: LeaseKeeper, total: int, done: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.keeper = keeper
        self.total = total
        self.done = done
        self.reconnects = 0
        self.errors: list[BaseException] = []

    def run(self) -> None:
        conn: Connection | None = None
        mine: list[leases.Claim] = []
        while not self.done.is_set():
            try:
                if conn is None:
                    conn = connect(self.url)
                member = self.keeper.member
                if member is None or not self.keeper.may_act():
                    time.sleep(0.02)
                    continue
                mine = [c for c in mine if c.member == member.id]
                if not mine:
                    mine = leases.claim(conn, member, "migration", limit=3)
                    if not mine:
                        time.sleep(POLL)
                        continue
                time.sleep(0.02)  # the work takes a while
                with contextlib.suppress(leases.StaleClaim):
                    do_work(conn, mine[0], self.keeper.name)
                mine.pop(0)
            except Unreachable:
                if conn is not None:
                    conn.close()
                conn = None
                self.reconnects += 1
                time.sleep(0.05)
            except BaseException as error:  # reported by the test
                self.errors.append(error)
                return
        if conn is not None:
            conn.close()


def test_the_database_restarted_mid_run_members_reconnect_and_nothing_is_lost(
    db: Connection, pg_cluster: PgCluster, pg_url: str, keepers: list[LeaseKeeper]
) -> None:
    terms = LeaseTerms.for_lease(6.0)  # outlives the restart
    keys = [f"m{i:03d}" for i in range(90)]
    leases.offer(db, "migration", keys)
    done = threading.Event()
    workers = [
        Worker(pg_url, start_keeper(keepers, pg_url, f"d{i}", terms), len(keys), done)
        for i in range(3)
    ]
    for w in workers:
        w.start()
    counted = [0]

    def log_count() -> int:
        with psycopg.connect(pg_url) as conn:
            row = conn.execute("SELECT count(*) FROM work_log").fetchone()
            counted[0] = int(row[0]) if row else 0
            return counted[0]

    try:
        wait_for(lambda: log_count() >= 20, 30, step=0.05)
        db.close()
        pg_cluster.restart()
        wait_for(lambda: log_count() == len(keys), 60, step=0.1)
    finally:
        done.set()
        for w in workers:
            w.join(10)
    assert not [e for w in workers for e in w.errors]
    assert all(w.reconnects >= 1 for w in workers)  # every one saw the restart
    assert all(k.incarnations == 1 for k in keepers)  # their leases outlived it
    with psycopg.connect(pg_url) as conn:
        logged = Counter(k for (k,) in conn.execute("SELECT key FROM work_log"))
        assert conn.execute("SELECT count(*) FROM cluster_leases").fetchone() == (0,)
    assert sorted(logged) == keys
    assert set(logged.values()) == {1}  # each exactly once
