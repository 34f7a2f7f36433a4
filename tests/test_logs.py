"""Log lines: the text format as before, and `log_format: json` with the migration's
context (migration, instance, hosts) as fields of their own on every line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from apitools import SMALL_PROFILES

from lmwatch import daemon, logs
from lmwatch.clock import VirtualClock
from lmwatch.config import Settings
from lmwatch.engine import Engine
from lmwatch.model import MigrationRequest


@pytest.fixture
def capture() -> Iterator[tuple[io.StringIO, list[logging.Handler]]]:
    """lmwatch's log records at INFO, into a buffer through the handler(s) a test adds."""
    buffer = io.StringIO()
    added: list[logging.Handler] = []
    logger = logging.getLogger("lmwatch")
    level = logger.level
    logger.setLevel(logging.INFO)
    yield buffer, added
    for handler in added:
        logger.removeHandler(handler)
    logger.setLevel(level)


def attach(
    capture: tuple[io.StringIO, list[logging.Handler]], log_format: logs.LogFormat
) -> io.StringIO:
    buffer, added = capture
    handler = logs.handler(log_format, buffer)
    logging.getLogger("lmwatch").addHandler(handler)
    added.append(handler)
    return buffer


async def migrate(engine: Engine, clock: VirtualClock) -> str:
    record, _ = await engine.submit(MigrationRequest("quiet", "a", "b"))
    assert await clock.run_until(lambda: engine.finished([record.id]), limit=3600)
    return record.id


async def test_json_lines_carry_migration_and_instance(
    engine: Engine,
    clock: VirtualClock,
    capture: tuple[io.StringIO, list[logging.Handler]],
) -> None:
    buffer = attach(capture, "json")
    migration_id = await migrate(engine, clock)
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert lines, "nothing was logged"
    for line in lines:
        assert {"time", "level", "logger", "event"} <= line.keys()
        assert line["time"].endswith("Z")
    mine = [line for line in lines if line.get("migration") == migration_id]
    events = {line["event"] for line in mine}
    assert {"accepted", "finished"} <= events, events
    for line in mine:
        assert line["instance"] == "quiet"
    accepted = next(line for line in mine if line["event"] == "accepted")
    assert accepted["source"] == "a" and accepted["destination"] == "b"
    assert accepted["logger"] == "lmwatch.engine" and accepted["level"] == "INFO"
    finished = next(line for line in mine if line["event"] == "finished")
    assert finished["state"] == "completed"
    assert isinstance(finished["blackout"], float)  # numbers stay numbers


async def test_the_text_format_is_unchanged(
    engine: Engine,
    clock: VirtualClock,
    capture: tuple[io.StringIO, list[logging.Handler]],
) -> None:
    buffer = attach(capture, "text")
    migration_id = await migrate(engine, clock)
    pattern = (
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO lmwatch.engine accepted "
        rf"migration={migration_id} instance=quiet source=a destination=b profile=\S+$"
    )
    assert any(re.match(pattern, line) for line in buffer.getvalue().splitlines()), (
        buffer.getvalue()
    )


def test_json_for_exceptions_other_loggers_and_odd_values() -> None:
    buffer = io.StringIO()
    handler = logs.handler("json", buffer)
    logger = logging.getLogger("lmwatch.test-json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        bound = logs.get_logger("lmwatch.test-json", migration="m-1").bind(instance="db 1")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            bound.exception("crashed", level="clash", rate=float("inf"), none=None, n=3)
        logger.warning("plain %s message", "library")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    first, second = (json.loads(line) for line in buffer.getvalue().splitlines())
    assert first["event"] == "crashed"
    assert first["field_level"] == "clash"  # a field never hides the line's own keys
    assert first["migration"] == "m-1" and first["instance"] == "db 1"
    assert first["rate"] == "inf" and first["n"] == 3 and "none" not in first
    assert "RuntimeError: boom" in first["exception"]
    assert second == {**second, "event": "plain library message", "level": "WARNING"}


def test_serve_configures_the_log_format(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Any, ...]] = []
    monkeypatch.setattr(daemon, "configure", lambda *args: seen.append(args))

    async def nothing(settings: Settings, **_: Any) -> None:
        return None

    monkeypatch.setattr(daemon, "run", nothing)
    assert daemon.serve(Settings(log_format="json", log_level="DEBUG", token="t")) == 0
    assert seen == [("DEBUG", "json")]


async def test_lmwatch_serve_with_log_format_json_writes_json_lines(tmp_path: Path) -> None:
    """The real command: every line it writes to standard error is a JSON object, and
    a migration's lines name the migration and the instance."""
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(SMALL_PROFILES)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMWATCH_")}
    env.update(LMWATCH_LOG_FORMAT="json", LMWATCH_TOKEN="json-log-token")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lmwatch.cli", "serve", "--port", "0",
        "--store", str(tmp_path / "lmwatch.db"), "--profiles", str(profiles),
        stderr=asyncio.subprocess.PIPE, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert process.stderr is not None
    lines: list[dict[str, Any]] = []

    async def until(event: str) -> dict[str, Any]:
        assert process.stderr is not None
        while True:
            raw = await asyncio.wait_for(process.stderr.readline(), 30)
            assert raw, "the daemon ended early: " + repr(lines)
            line = json.loads(raw)
            lines.append(line)
            if line["event"] == event:
                return line

    try:
        listening = await until("listening")
        address = listening["addresses"].split()[0]
        body = {"instance": "web-1", "source": "host-a", "destination": "host-b"}
        headers = {"Authorization": "Bearer json-log-token"}
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"http://{address}/v1/migrations", json=body, headers=headers) as r,
        ):
            assert r.status == 202, await r.text()
            migration_id = (await r.json())["id"]
        accepted = await until("accepted")
        assert accepted["migration"] == migration_id
        assert accepted["instance"] == "web-1"
        assert accepted["source"] == "host-a" and accepted["destination"] == "host-b"
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(process.stderr.read(), 30)
        await asyncio.wait_for(process.wait(), 30)
    for raw in rest.decode().splitlines():
        json.loads(raw)  # every line, to the last
    assert "json-log-token" not in json.dumps(lines) + rest.decode()
