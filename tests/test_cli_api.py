"""The CLI against a real API server (aiohttp) over the real engine, in virtual time."""

from __future__ import annotations

import io
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from clitools import TOKEN, Cli, accepted_id, served
from neutral import HYPERVISOR_WORDS

from lmwatch import cli
from lmwatch.model import State

INVENTORY = """
hosts:
  - {name: a, memory: 512GiB}
  - {name: b, memory: 512GiB}
links:
  - {between: [a, b], bandwidth: 1GiB/s}
instances:
  - {name: idle, host: a, memory: 4GiB, working_set: 64MiB, change_rate: 1MiB/s}
  - name: busy-db
    host: a
    memory: 16GiB
    working_set: 4GiB
    change_rate: 1500MiB/s
    labels: {tier: database}
  - {name: busy-plain, host: a, memory: 16GiB, working_set: 4GiB, change_rate: 1500MiB/s}
  - {name: busy-strict, host: a, memory: 16GiB, working_set: 4GiB, change_rate: 1500MiB/s,
     labels: {tier: strict}}
"""

PROFILES = """
profiles:
  - name: db
    match: {labels: {tier: database}}
    max_blackout: 300ms
    handover: allowed
    max_degraded: 60s
    deadline: 20m
    on_deadline: complete
  - name: strict
    match: {labels: {tier: strict}}
    max_blackout: 300ms
    deadline: 1h
    on_deadline: cancel
  - name: default
    max_blackout: 500ms
    may_pause: true
    max_pause: 10s
    deadline: 1h
    on_deadline: cancel
"""


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Cli]:
    async with served(tmp_path, INVENTORY, PROFILES) as served_api:
        yield served_api


async def test_migrate_prints_the_acceptedaccepted_id(api: Cli) -> None:
    result = await api.run("migrate", "idle", "--from", "a", "--to", "b")
    assert result.code == 0, result.err
    migration_id = accepted_id(result)
    assert api.engine.get(migration_id).instance == "idle"
    assert len(result.out.splitlines()) == 1


async def test_migrate_follow_runs_to_completion_and_exits_zero(api: Cli) -> None:
    result = await api.run_with_time("migrate", "idle", "--from", "a", "--to", "b", "--follow")
    assert result.code == 0, result.out + result.err
    migration_id = accepted_id(result)
    lines = result.out.splitlines()
    assert lines[1].startswith("profile default:")
    assert lines[-1].startswith("completed (converged)")
    assert "blackout" in lines[-1] and "passes" in lines[-1]
    # Timeline entries appear once each, with offsets since creation.
    entries = [line for line in lines if re.match(r"\+\d+\.\d+s ", line)]
    events = api.engine.events(migration_id)
    assert len(entries) == len(events)
    assert entries[0].startswith("+0.0s state queued")
    assert entries[-1].split(": ")[0].endswith("state completed")


async def test_follow_of_a_cancelled_migration_exits_non_zero(api: Cli) -> None:
    result = await api.run_with_time(
        "migrate", "busy-strict", "--from", "a", "--to", "b", "--follow"
    )
    assert result.code == 1, result.out + result.err
    assert result.out.splitlines()[-1].startswith("cancelled (cancelled)")
    assert any(" decision cancel: " in line for line in result.out.splitlines())


async def test_follow_shows_progress_lines_as_they_change(api: Cli) -> None:
    result = await api.run_with_time("migrate", "busy-db", "--from", "a", "--to", "b", "--follow")
    assert result.code == 0, result.out + result.err
    progress = [line for line in result.out.splitlines() if " copied  pass " in line]
    assert progress, result.out
    assert all("ETA" in line and "transfer" in line for line in progress)
    assert result.out.splitlines()[-1].startswith("completed (handover)")


async def test_status_lists_migrations_and_shows_one_in_detail(api: Cli) -> None:
    migration_id = accepted_id(await api.run("migrate", "idle", "--from", "a", "--to", "b"))
    await api.until_state(migration_id, State.COMPLETED)

    listing = await api.run("status")
    assert listing.code == 0, listing.err
    header, row = listing.out.splitlines()[:2]
    assert header.split() == ["ID", "INSTANCE", "ROUTE", "STATE", "COPIED", "ETA", "METHOD"]
    assert row.split()[:6] == [migration_id[:8], "idle", "a", "->", "b", "completed"]
    assert row.split()[-1] == "converged"

    detail = await api.run("status", migration_id[:8])
    assert detail.code == 0, detail.err
    assert f"migration  {migration_id}" in detail.out
    assert "timeline" in detail.out
    assert re.search(r"\+\d+\.\ds state completed: completed \(converged\)", detail.out)


async def test_status_with_an_empty_filter(api: Cli) -> None:
    result = await api.run("status", "--state", "failed")
    assert (result.code, result.out.strip()) == (0, "no migrations in state failed")


async def test_force_complete_prints_the_decision(api: Cli) -> None:
    migration_id = accepted_id(await api.run("migrate", "busy-db", "--from", "a", "--to", "b"))
    await api.until_state(migration_id, State.COPYING)
    await api.clock.advance(3)
    result = await api.run("force-complete", migration_id)
    assert result.code == 0, result.err
    action, _, reason = result.out.splitlines()[0].partition(": ")
    assert action == "handover"
    assert reason
    assert f"migration {migration_id} is " in result.out


async def test_force_complete_refused_reports_the_problem(api: Cli) -> None:
    migration_id = accepted_id(await api.run("migrate", "busy-strict", "--from", "a", "--to", "b"))
    await api.until_state(migration_id, State.COPYING)
    await api.clock.advance(3)
    result = await api.run("force-complete", migration_id)
    assert result.code == 1
    assert result.err.lower().startswith("error: conflict: ")
    assert "profile 'strict'" in result.err
    assert result.out == ""

    accepted = await api.run("force-complete", migration_id, "--accept-pause")
    assert accepted.code == 0, accepted.err
    assert accepted.out.splitlines()[0].startswith("pause: ")
    assert "predicted blackout " in accepted.out


async def test_cancel_stops_a_running_migration(api: Cli) -> None:
    migration_id = accepted_id(await api.run("migrate", "busy-plain", "--from", "a", "--to", "b"))
    await api.until_state(migration_id, State.COPYING)
    result = await api.run("cancel", migration_id)
    assert result.code == 0, result.err
    assert migration_id in result.out
    assert "cancelled by an operator" in result.out
    await api.until_state(migration_id, State.CANCELLED)


async def test_cancel_after_it_finished_is_refused(api: Cli) -> None:
    migration_id = accepted_id(await api.run("migrate", "idle", "--from", "a", "--to", "b"))
    await api.until_state(migration_id, State.COMPLETED)
    result = await api.run("cancel", migration_id)
    assert result.code == 1
    assert "completed" in result.err


@pytest.mark.parametrize(
    "argv",
    [
        ("status", "0000000-no-such-id"),
        ("cancel", "0000000-no-such-id"),
        ("force-complete", "0000000-no-such-id"),
    ],
)
async def test_unknown_id_is_an_error_with_the_message(api: Cli, argv: tuple[str, ...]) -> None:
    result = await api.run(*argv)
    assert result.code == 1
    assert "no migration with id '0000000-no-such-id'" in result.err


async def test_refused_request_shows_the_problem_detail(api: Cli) -> None:
    result = await api.run("migrate", "nobody", "--from", "a", "--to", "b")
    assert result.code == 1
    assert "nobody" in result.err


async def test_missing_token_is_refused(api: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LMWATCH_TOKEN", raising=False)
    result = await api.run("migrate", "idle", "--from", "a", "--to", "b", token=None)
    assert result.code == 1
    assert "a bearer token is required" in result.err


async def test_token_from_file_and_environment(
    api: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    result = await api.run(
        "migrate", "idle", "--from", "a", "--to", "b", "--token-file", str(token_file), token=None
    )
    assert result.code == 0, result.err
    await api.until_state(accepted_id(result), State.COMPLETED)
    monkeypatch.setenv("LMWATCH_TOKEN", TOKEN)
    again = await api.run("migrate", "idle", "--from", "b", "--to", "a", token=None)
    assert again.code == 0, again.err


async def test_unreachable_daemon_is_a_clear_error() -> None:
    err = io.StringIO()
    code = await cli.run(
        ["--url", "http://127.0.0.1:9", "status"], stdout=io.StringIO(), stderr=err
    )
    assert code == 1
    assert "cannot reach lmwatch at http://127.0.0.1:9" in err.getvalue()


async def test_profiles_explain_names_the_profile_and_every_candidate(api: Cli) -> None:
    result = await api.run("profiles", "explain", "busy-plain", "--label", "tier=database")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == "busy-plain: profile 'db'"
    assert lines[1].startswith("  why: ")
    candidates = [line.strip() for line in lines[3:]]
    assert sorted(c.split(":")[0] for c in candidates) == ["db", "default", "strict"]

    plain = await api.run("profiles", "explain", "busy-plain")
    assert plain.out.splitlines()[0] == "busy-plain: profile 'default'"


async def test_profiles_list_shows_the_loaded_profiles(api: Cli) -> None:
    result = await api.run("profiles", "list")
    assert result.code == 0, result.err
    names = [line.split()[0] for line in result.out.splitlines()[2:]]
    assert names == ["db", "strict", "default"]
    assert "tier=database" in result.out


async def test_no_output_uses_hypervisor_words(
    api: Cli, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs: list[str] = []
    for argv in (
        ("migrate", "busy-db", "--from", "a", "--to", "b", "--follow"),
        ("migrate", "busy-strict", "--from", "a", "--to", "b", "--follow"),
        ("migrate", "idle", "--from", "a", "--to", "b", "--follow"),
    ):
        result = await api.run_with_time(*argv)
        outputs += [result.out, result.err]
    for migration in api.engine.list():
        result = await api.run("status", migration.id)
        outputs += [result.out, result.err]
    for argv in (("status",), ("profiles", "list"), ("profiles", "explain", "busy-db")):
        result = await api.run(*argv)
        outputs += [result.out, result.err]
    for argv in (
        ("--help",),
        ("migrate", "--help"),
        ("force-complete", "--help"),
        ("simulate", "--help"),
        ("profiles", "explain", "--help"),
    ):
        assert await cli.run(argv) == 0
    captured = capsys.readouterr()
    outputs += [captured.out, captured.err]
    text = "\n".join(outputs)
    assert "handover" in text  # the check reads real output
    assert HYPERVISOR_WORDS.search(text) is None, HYPERVISOR_WORDS.search(text)


async def test_place_shows_the_choice_and_every_host(api: Cli) -> None:
    before = api.engine.list()
    result = await api.run("place", "idle")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == "idle on a: b"
    assert lines[1].startswith("  why: b: the only one of 1 candidates")
    assert lines[2].split() == [
        "host",
        "free",
        "reserved",
        "available",
        "link",
        "in/out",
        "verdict",
    ]
    assert lines[3].split()[0] == "b" and lines[3].endswith("chosen")
    assert api.engine.list() == before  # nothing moved
    none = await api.run("place", "idle", "--destinations", "a")
    assert none.code == 1
    assert none.out.splitlines()[0] == "idle on a: no host"
    unknown = await api.run("place", "idle", "--destinations", "z")
    assert unknown.code == 1 and "z" in unknown.err


async def test_migrate_without_destination_says_where_and_why(api: Cli) -> None:
    await api.run("migrate", "busy-plain", "--from", "a", "--to", "b")
    result = await api.run("migrate", "idle", "--from", "a")
    assert result.code == 0, result.err
    migration_id = accepted_id(result)
    assert api.engine.get(migration_id).destination == "b"
    assert result.out.splitlines()[1].startswith("to b: b: the only one")
    status = await api.run("status", migration_id)
    assert "placement  chosen: b: the only one" in status.out
    forced = await api.run("migrate", "busy-db", "--from", "a", "--force")
    assert forced.code == 1 and "force needs a named destination" in forced.err
