"""The owner's side of operator commands through the database (engine/commands.py),
against a real PostgreSQL: an engine supervising a migration carries out a command
another daemon posted, through the same method its API uses, records the outcome
once, shows it on the timeline, and does not carry out again a command whose
earlier owner stopped after acting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_engine import Rig

from lmwatch.cluster import commands
from lmwatch.cluster.commands import Command, Outcome
from lmwatch.cluster.pg import connect
from lmwatch.cluster.schema import ensure_schema
from lmwatch.engine.commands import COMMAND, earlier_outcome
from lmwatch.model import State
from lmwatch.store import Event


@pytest.fixture
async def rig(tmp_path: Path, pg_url: str) -> AsyncIterator[Rig]:
    rig = Rig(tmp_path, store_location=pg_url, command_poll=0.2, command_retake_after=1.0)
    await rig.engine.start()
    yield rig
    await rig.engine.stop()
    rig.store.close()


def post(url: str, migration_id: str, kind: commands.Kind, **params: object) -> Command:
    """Another daemon's API posting a command, on a connection of its own."""
    with connect(url) as conn:
        ensure_schema(conn)
        return commands.post(conn, migration_id, kind, dict(params), "daemon b")


async def outcome(url: str, command: Command, timeout: float = 10.0) -> Outcome:
    """The recorded outcome, while the event loop (and the engine on it) runs on."""
    deadline = time.monotonic() + timeout
    with connect(url) as conn:
        while time.monotonic() < deadline:
            found = commands.outcome_of(conn, command.id)
            if found is not None:
                return found
            await asyncio.sleep(0.02)
    raise AssertionError(f"no outcome for command {command.id} within {timeout}s")


def row(url: str, command: Command) -> tuple[object, ...]:
    with connect(url) as conn:
        found = conn.execute(
            "SELECT takes, outcome, taken_by FROM cluster_commands WHERE id = %s", (command.id,)
        ).fetchone()
    assert found is not None
    return tuple(found)


def notes(events: list[Event], command: Command) -> list[Event]:
    return [e for e in events if e.data.get(COMMAND) == command.id]


async def copying(rig: Rig, instance: str) -> str:
    mid = await rig.migrate(instance)
    await rig.clock.run_until(lambda: rig.engine.get(mid).state is State.COPYING)
    return mid


async def test_a_cancel_posted_elsewhere_is_carried_out_by_the_owner_once(
    rig: Rig, pg_url: str
) -> None:
    mid = await copying(rig, "big")
    command = post(pg_url, mid, "cancel")
    found = await outcome(pg_url, command)
    assert found.outcome == "accepted" and found.status == 202
    assert found.applied_by == commands_name(rig)
    takes, recorded, _ = row(pg_url, command)
    assert (takes, recorded) == (1, "accepted")
    # The timeline says who asked, through which daemon, and how it ended; the
    # cancel itself is the operator's decision, as for a local cancel.
    events = rig.store.events(mid)
    intent, said = notes(events, command)
    assert "asked through daemon b" in intent.reason and intent.data["posted_by"] == "daemon b"
    assert said.reason == f"cancel (command {command.id}) accepted"
    decision = next(e for e in events if e.action == "cancel")
    assert decision.data["origin"] == "operator" and intent.seq < decision.seq < said.seq
    await rig.finish(mid)
    assert rig.engine.get(mid).state is State.CANCELLED
    assert rig.driver.where("big") == "a"
    assert rig.actions(mid) == ["cancel"]


async def test_a_refused_force_complete_comes_back_with_the_refusal(rig: Rig, pg_url: str) -> None:
    mid = await copying(rig, "big")
    await rig.engine.cancel(mid)  # being cancelled: the state machine refuses to finish
    command = post(pg_url, mid, "force-complete", accept_pause=True)
    found = await outcome(pg_url, command)
    assert found == Outcome.refused(
        commands_name(rig), 409, "conflict", f"migration {mid} is being cancelled"
    )
    said = notes(rig.store.events(mid), command)[-1]
    assert said.reason.endswith(f"refused: migration {mid} is being cancelled")
    assert rig.actions(mid) == ["cancel"]


async def test_an_accepted_force_complete_carries_its_decision(rig: Rig, pg_url: str) -> None:
    mid = await copying(rig, "busy-plain")
    await rig.clock.advance(3.0)
    refused = await outcome(pg_url, post(pg_url, mid, "force-complete"))
    assert refused.outcome == "refused" and refused.status == 409 and refused.detail
    found = await outcome(pg_url, post(pg_url, mid, "force-complete", accept_pause=True))
    assert found.outcome == "accepted" and found.result is not None
    assert found.result["action"] == "pause"
    assert rig.actions(mid) == ["pause"]


async def test_commands_for_migrations_supervised_elsewhere_are_left_alone(
    rig: Rig, pg_url: str
) -> None:
    mid = await copying(rig, "big")
    other = post(pg_url, "not-here", "cancel")
    mine = post(pg_url, mid, "cancel")
    await outcome(pg_url, mine)
    assert row(pg_url, other) == (0, None, None)


async def test_a_command_whose_owner_stopped_after_acting_is_not_carried_out_again(
    rig: Rig, pg_url: str
) -> None:
    mid = await copying(rig, "big")
    command = post(pg_url, mid, "cancel")
    # An earlier owner took it, wrote its intent, cancelled, and stopped before
    # recording the outcome ...
    await rig.engine.stop()
    with connect(pg_url) as conn:
        [taken] = commands.take(conn, [mid], "stopped #1", retake_after=1.0)
    rig.engine = rig.new_engine()
    await rig.engine.start()
    rig.engine.note(mid, "intent", {COMMAND: command.id})
    await rig.engine.cancel(mid)
    # ... the next owner (no memory of the cancel sent) takes it again once
    # `retake_after` has passed, and records it from the timeline.
    await rig.restart()
    found = await outcome(pg_url, command)
    assert found.outcome == "accepted"
    assert row(pg_url, command)[0] == 2
    assert rig.actions(mid) == ["cancel"]  # the hypervisor was asked once
    assert taken.taken_by == "stopped #1"


async def test_a_command_whose_owner_stopped_before_acting_is_carried_out(
    rig: Rig, pg_url: str
) -> None:
    mid = await copying(rig, "big")
    command = post(pg_url, mid, "cancel")
    await rig.engine.stop()
    with connect(pg_url) as conn:
        commands.take(conn, [mid], "stopped #1", retake_after=1.0)
    await rig.restart()
    found = await outcome(pg_url, command)
    assert found.outcome == "accepted"
    assert row(pg_url, command)[0] == 2
    assert rig.actions(mid) == ["cancel"]


def commands_name(rig: Rig) -> str:
    from lmwatch.engine.commands import daemon_name

    return daemon_name()


def test_earlier_outcome_reads_the_timeline() -> None:
    command = Command(7, "m", "force-complete", {}, "b", None, "a #1", 2)  # type: ignore[arg-type]

    def event(seq: int, kind: str, data: dict[str, object], action: str | None = None) -> Event:
        return Event(seq, "m", 0.0, kind, f"r{seq}", action=action, data=data)

    intent = event(1, "note", {COMMAND: 7})
    policy = event(2, "decision", {"origin": "policy"}, "raise-blackout")
    operator = event(3, "decision", {"origin": "operator", "prediction": None}, "pause")
    assert earlier_outcome([], command) is None
    assert earlier_outcome([intent, policy], command) is None
    assert earlier_outcome([operator, intent], command) is None  # before the intent
    found = earlier_outcome([intent, policy, operator], command)
    assert found is not None and found.result == {
        "action": "pause",
        "reason": "r3",
        "predicted_blackout_seconds": None,
    }
    said = event(
        4,
        "note",
        {
            COMMAND: 7,
            "outcome": "refused",
            "status": 409,
            "applied_by": "a",
            "detail": "no",
            "problem": "conflict",
        },
    )
    assert earlier_outcome([intent, said], command) == Outcome.refused("a", 409, "conflict", "no")


async def test_a_command_that_failed_to_apply_is_taken_again_after_retake_after(
    rig: Rig, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    mid = await copying(rig, "big")
    real_note = rig.engine.note
    failures: list[int] = []

    def note_failing_once(migration_id: str, text: str, data: dict[str, object]) -> None:
        if not failures:
            failures.append(1)
            raise RuntimeError("the store refused the entry")
        real_note(migration_id, text, data)

    monkeypatch.setattr(rig.engine, "note", note_failing_once)
    command = post(pg_url, mid, "cancel")
    began = time.monotonic()
    found = await outcome(pg_url, command)
    assert failures and time.monotonic() - began >= 1.0  # retake_after of this rig
    assert found.outcome == "accepted"
    assert row(pg_url, command)[0] == 2
    assert rig.actions(mid) == ["cancel"]


async def test_a_command_whose_notification_was_lost_is_taken_by_polling(
    rig: Rig, pg_url: str
) -> None:
    mid = await copying(rig, "big")
    with connect(pg_url) as conn:  # a row without its NOTIFY
        ensure_schema(conn)
        found = conn.execute(
            "INSERT INTO cluster_commands (migration_id, kind, posted_by)"
            " VALUES (%s, 'cancel', 'daemon b') RETURNING id, posted_at",
            (mid,),
        ).fetchone()
    assert found is not None
    command = Command(int(found[0]), mid, "cancel", {}, "daemon b", found[1])
    began = time.monotonic()
    assert (await outcome(pg_url, command)).outcome == "accepted"
    assert time.monotonic() - began < 2.0  # command_poll is 0.2 s here
    assert rig.actions(mid) == ["cancel"]


async def test_a_command_for_a_migration_that_ended_first_is_answered_as_one_daemon_would(
    rig: Rig, pg_url: str
) -> None:
    """Posted for a migration that ended before any owner took the command (no daemon
    supervises it any more): answered with the refusal one daemon's API gives, by
    whichever daemon takes it, and nothing goes on the ended migration's timeline."""
    mid = await copying(rig, "big")
    await rig.engine.cancel(mid)
    await rig.finish(mid)
    assert mid not in rig.engine.supervised()
    await rig.store.written()
    entries = len(rig.store.events(mid))
    expected = {
        "cancel": f"migration {mid} has already cancelled",
        "force-complete": f"cannot force-complete: migration {mid} has cancelled",
    }
    for kind, detail in expected.items():
        command = post(pg_url, mid, kind)
        found = await outcome(pg_url, command)
        assert found == Outcome.refused(commands_name(rig), 409, "conflict", detail)
        assert row(pg_url, command)[:2] == (1, "refused")
    assert len(rig.store.events(mid)) == entries
    assert rig.actions(mid) == ["cancel"]
