"""Operator commands through the database against a real PostgreSQL
(tests/pgtools.py): post, take, record, wait; two takers never take one command; a
command whose taker stopped is offered again only after `retake_after`; a
notification wakes a waiter at once, and polling delivers when it is lost."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from lmwatch.cluster import commands
from lmwatch.cluster.commands import Outcome
from lmwatch.cluster.pg import Connection, connect
from lmwatch.cluster.schema import ensure_schema


@pytest.fixture
def db(pg_url: str) -> Iterator[Connection]:
    conn = connect(pg_url)
    ensure_schema(conn)
    yield conn
    conn.close()


def test_post_take_record_and_read_back(db: Connection, pg_url: str) -> None:
    posted = commands.post(db, "m1", "force-complete", {"accept_pause": True}, "daemon b")
    other = commands.post(db, "m2", "cancel", {}, "daemon b")
    assert (posted.migration_id, posted.kind, posted.params) == (
        "m1",
        "force-complete",
        {"accept_pause": True},
    )
    assert posted.taken_by is None and posted.takes == 0

    owner = connect(pg_url)
    taken = commands.take(owner, ["m1", "m3"], "owner a", retake_after=30)
    assert [(c.id, c.taken_by, c.takes) for c in taken] == [(posted.id, "owner a", 1)]
    assert commands.take(owner, ["m1"], "owner a", retake_after=30) == []  # its own: not again
    assert commands.outcome_of(db, posted.id) is None

    decided = Outcome.accepted("owner a", {"action": "pause", "reason": "r"})
    assert commands.record(owner, taken[0], "owner a", decided)
    assert commands.outcome_of(db, posted.id) == decided
    # Once only: a second outcome, or one from a taker that does not hold it, is refused.
    assert not commands.record(owner, taken[0], "owner a", Outcome.accepted("owner a"))
    late = commands.take(owner, ["m2"], "owner a", retake_after=30)
    refused = Outcome.refused("owner c", 409, "conflict", "migration m2 has already completed")
    assert not commands.record(owner, late[0], "owner c", refused)
    assert commands.outcome_of(db, other.id) is None
    assert [c.id for c in commands.pending(db, "m2")] == [other.id]
    owner.close()


def test_unknown_kind_is_refused(db: Connection) -> None:
    with pytest.raises(ValueError):
        commands.post(db, "m1", "pause", {}, "x")  # type: ignore[arg-type]


def test_two_takers_never_take_the_same_command(db: Connection, pg_url: str) -> None:
    ids = [f"m{i}" for i in range(20)]
    posted = [commands.post(db, m, "cancel", {}, "api") for m in ids for _ in range(10)]
    taken: dict[str, list[int]] = {"a": [], "b": []}
    start = threading.Barrier(2)

    def taker(name: str) -> None:
        conn = connect(pg_url)
        start.wait()
        while True:
            batch = commands.take(conn, ids, name, retake_after=30, limit=7)
            if not batch:
                break
            taken[name].extend(c.id for c in batch)
            for command in batch:
                assert commands.record(conn, command, name, Outcome.accepted(name))
        conn.close()

    threads = [threading.Thread(target=taker, args=(name,)) for name in taken]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    everything = taken["a"] + taken["b"]
    assert sorted(everything) == sorted(c.id for c in posted)  # all of them, each once
    assert taken["a"] and taken["b"]
    rows = db.execute("SELECT count(*) FROM cluster_commands WHERE takes <> 1").fetchone()
    assert rows is not None and rows[0] == 0


def test_a_stopped_takers_command_is_taken_again_after_retake_after(
    db: Connection, pg_url: str
) -> None:
    posted = commands.post(db, "m1", "cancel", {}, "api")
    first = commands.take(db, ["m1"], "owner a#1", retake_after=0.5)
    assert [c.id for c in first] == [posted.id]
    # Another owner does not take it while the first may still be applying it ...
    assert commands.take(db, ["m1"], "owner b#1", retake_after=0.5) == []
    time.sleep(0.6)
    # ... but does once that has passed, and knows it was taken before.
    again = commands.take(db, ["m1"], "owner b#1", retake_after=0.5)
    assert [(c.id, c.takes, c.taken_by) for c in again] == [(posted.id, 2, "owner b#1")]
    # The first taker's late outcome is not recorded; the new taker's is.
    assert not commands.record(db, first[0], "owner a#1", Outcome.accepted("owner a#1"))
    assert commands.record(db, again[0], "owner b#1", Outcome.accepted("owner b#1"))
    found = commands.outcome_of(db, posted.id)
    assert found is not None and found.applied_by == "owner b#1"


def test_a_notification_wakes_a_waiter_at_once(db: Connection, pg_url: str) -> None:
    posted = commands.post(db, "m1", "cancel", {}, "api")
    waiter = connect(pg_url)
    got: list[tuple[Outcome | None, float]] = []

    def wait() -> None:
        began = time.monotonic()
        found = commands.wait_outcome(waiter, posted, 20, poll=10)
        got.append((found, time.monotonic() - began))

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.3)  # the waiter listens and sleeps in its 10 s poll
    taken = commands.take(db, ["m1"], "owner", retake_after=30)
    assert commands.record(db, taken[0], "owner", Outcome.accepted("owner"))
    thread.join(20)
    waiter.close()
    (found, waited), *_ = got
    assert found == Outcome.accepted("owner")
    assert waited < 2.0, waited  # woken by the notification, not by the 10 s poll


def test_polling_delivers_when_the_notification_is_lost(db: Connection, pg_url: str) -> None:
    posted = commands.post(db, "m1", "cancel", {}, "api")
    waiter = connect(pg_url)
    got: list[tuple[Outcome | None, float]] = []

    def wait() -> None:
        began = time.monotonic()
        got.append((commands.wait_outcome(waiter, posted, 20, poll=0.3), time.monotonic() - began))

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.2)
    # The outcome is written without its notification (as if sent while the waiter's
    # connection was down).
    db.execute(
        "UPDATE cluster_commands SET outcome = 'accepted', status = 202, applied_by = 'x',"
        " taken_by = 'x', takes = 1 WHERE id = %s",
        (posted.id,),
    )
    thread.join(20)
    waiter.close()
    (found, waited), *_ = got
    assert found is not None and found.applied_by == "x"
    assert waited < 2.0


def test_a_wait_nobody_answers_ends_in_time(db: Connection, pg_url: str) -> None:
    posted = commands.post(db, "m1", "cancel", {}, "api")
    began = time.monotonic()
    assert commands.wait_outcome(db, posted, 0.5, poll=0.2) is None
    assert 0.5 <= time.monotonic() - began < 1.5


def test_an_owner_listening_hears_a_post(db: Connection, pg_url: str) -> None:
    owner = connect(pg_url)
    commands.listen(owner, commands.CHANNEL_POSTED)
    began = time.monotonic()
    poster = threading.Timer(0.3, lambda: commands.post(db, "m9", "cancel", {}, "api"))
    poster.start()
    assert commands.wait_notified(owner, 10, "m9")
    assert time.monotonic() - began < 2.0
    poster.join()
    owner.close()
