"""The daemon entry point and its configuration: start-up failures, token handling,
serving, SIGHUP reload and graceful SIGTERM shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from apitools import SMALL_PROFILES

from lmwatch import daemon
from lmwatch.clock import VirtualClock
from lmwatch.config import ConfigError, Settings, load_settings
from lmwatch.store import Store
from lmwatch.units import parse_rate


def lmwatch_serve(*args: str) -> subprocess.CompletedProcess[str]:
    """`lmwatch serve ...` in a child process (only start-up failures: it must exit)."""
    return subprocess.run(
        [sys.executable, "-m", "lmwatch.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def read_only_file(tmp_path: Path) -> Iterator[Path]:
    """A store file without write bits: read-only for lmwatch, even when run as root."""
    path = tmp_path / "lmwatch.db"
    Store.open(path).close()
    path.chmod(0o444)
    yield path
    path.chmod(0o644)


def test_serve_exits_2_when_the_store_directory_is_missing(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "lmwatch.db"
    done = lmwatch_serve("--store", str(missing), "--port", "0")
    assert done.returncode == 2, done.stderr
    assert "cannot open the store" in done.stderr
    assert str(missing.parent) in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_exits_2_when_the_store_is_read_only(read_only_file: Path) -> None:
    done = lmwatch_serve("--store", str(read_only_file), "--port", "0")
    assert done.returncode == 2, done.stderr
    assert "not writable" in done.stderr
    assert str(read_only_file) in done.stderr


def test_invalid_profiles_at_start_name_line_and_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(SMALL_PROFILES.replace("max_blackout: 500ms", "max_blackout: 500"))
    line = SMALL_PROFILES.splitlines().index("    max_blackout: 500ms") + 1
    code = daemon.main({"store": str(tmp_path / "x.db"), "profiles": str(profiles), "port": 0})
    assert code == 2
    err = capsys.readouterr().err
    assert "invalid profiles file" in err
    assert f"{profiles}:{line}:19" in err


def test_invalid_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "lmwatch.yaml"
    config.write_text("prot: 8080\n")
    assert daemon.main({"config": str(config)}) == 2
    assert "prot" in capsys.readouterr().err


# --- configuration ---------------------------------------------------------------------


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LMWATCH_"):
            monkeypatch.delenv(name)
    settings = load_settings()
    assert settings.listen_host == "127.0.0.1"
    assert settings.port == 8787
    assert settings.driver == "sim"
    assert settings.token is None and settings.token_file is None
    assert settings.store_path == Path("lmwatch.db")
    assert settings.profiles_path is None


def test_precedence_file_then_environment_then_explicit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "lmwatch.yaml"
    config.write_text(
        "port: 9000\nlisten_host: 0.0.0.0\npoll_interval: 2s\nmax_per_source: 3\n"
        "hosts:\n  h1: {uri: 'x+ssh://h1/system', bandwidth: 10Gbit/s}\n"
    )
    monkeypatch.setenv("LMWATCH_CONFIG", str(config))
    monkeypatch.setenv("LMWATCH_PORT", "9100")
    monkeypatch.setenv("LMWATCH_TOKEN", "from-env")
    settings = load_settings(max_per_source=None)
    assert settings.port == 9100  # environment over file
    assert settings.listen_host == "0.0.0.0"
    assert settings.poll_interval == 2.0
    assert settings.max_per_source == 3
    assert settings.hosts["h1"].bandwidth == 1.25e9
    assert settings.token is not None and settings.token.get_secret_value() == "from-env"
    assert "from-env" not in repr(settings)
    assert load_settings(port=9200).port == 9200  # explicit over environment


@pytest.mark.parametrize(
    "values",
    [
        {"token": "t", "token_file": "/tmp/x"},
        {"driver": "remote"},  # a real driver needs hosts
        {"port": 70000},
        {"poll_interval": "soon"},
        {"driver": "Not a name"},
    ],
)
def test_invalid_settings_are_refused(values: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        load_settings(**values)


def test_missing_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.yaml")


def test_an_unknown_driver_is_a_startup_error(tmp_path: Path) -> None:
    settings = Settings(driver="teleport", hosts={"h1": {"uri": "x://h1"}})
    with pytest.raises(daemon.StartupError, match=r"unknown driver 'teleport'.*sim"):
        daemon._make_driver(settings, VirtualClock())


def test_real_drivers_are_found_by_module_name() -> None:
    names = daemon.real_drivers()
    assert "sim" not in names
    assert all(name.isidentifier() for name in names)


def test_host_rates_reach_the_driver_in_bytes_per_second() -> None:
    settings = Settings(driver="remote", hosts={"h1": {"uri": "x://h1", "bandwidth": "1Gbit/s"}})
    options = daemon._host_options(settings)
    assert options == {"h1": {"uri": "x://h1", "bandwidth": "125000000.0B/s"}}
    assert parse_rate(options["h1"]["bandwidth"]) == 125e6


def test_token_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("secret-from-file\n")
    path.chmod(0o600)
    settings = Settings(token_file=path, store_path=tmp_path / "x.db")
    assert daemon.resolve_token(settings) == "secret-from-file"
    path.chmod(0o640)  # group read: how container platforms hand secrets to a non-root user
    assert daemon.resolve_token(settings) == "secret-from-file"


def test_a_configured_token_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("secret-from-file\n")
    path.chmod(0o644)
    settings = Settings(token_file=path, store_path=tmp_path / "x.db")
    with pytest.raises(daemon.StartupError, match=r"readable by others.*mode 0644.*chmod 600"):
        daemon.resolve_token(settings)


def test_generated_token_is_written_0600_and_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(store_path=tmp_path / "x.db")
    with caplog.at_level(logging.DEBUG):
        token = daemon.resolve_token(settings)
    path = tmp_path / "lmwatch.token"
    assert path.read_text().strip() == token
    assert len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert str(path) in caplog.text
    assert token not in caplog.text


def test_generated_token_is_kept_across_restarts(tmp_path: Path) -> None:
    settings = Settings(store_path=tmp_path / "x.db")
    first = daemon.resolve_token(settings)
    assert daemon.resolve_token(settings) == first
    assert (tmp_path / "lmwatch.token").read_text().strip() == first


def test_generated_token_is_kept_when_the_umask_is_loose(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        token = daemon.resolve_token(Settings(store_path=tmp_path / "x.db"))
    finally:
        os.umask(old)
    path = tmp_path / "lmwatch.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert daemon.resolve_token(Settings(store_path=tmp_path / "x.db")) == token


def test_a_symlink_at_the_token_path_is_refused_and_its_target_untouched(
    tmp_path: Path,
) -> None:
    target = tmp_path / "precious"
    target.write_text("do not overwrite\n")
    target.chmod(0o644)
    (tmp_path / "lmwatch.token").symlink_to(target)
    settings = Settings(store_path=tmp_path / "x.db")
    with pytest.raises(daemon.StartupError, match="is a symbolic link"):
        daemon.resolve_token(settings)
    assert target.read_text() == "do not overwrite\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_a_dangling_symlink_at_the_token_path_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    (tmp_path / "lmwatch.token").symlink_to(target)
    with pytest.raises(daemon.StartupError, match="is a symbolic link"):
        daemon.resolve_token(Settings(store_path=tmp_path / "x.db"))
    assert not target.exists()


def test_a_token_file_group_or_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lmwatch.token"
    path.write_text("someone-else-knows-this\n")
    path.chmod(0o644)
    with pytest.raises(daemon.StartupError) as caught:
        daemon.resolve_token(Settings(store_path=tmp_path / "x.db"))
    message = str(caught.value)
    assert "readable or writable by group or others (mode 0644)" in message
    assert f"chmod 600 {path}" in message
    assert path.read_text() == "someone-else-knows-this\n"  # not replaced either


def test_a_token_file_owned_by_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "lmwatch.token"
    path.write_text("planted\n")
    path.chmod(0o600)
    owner = path.stat().st_uid
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)
    with pytest.raises(daemon.StartupError, match=f"owned by uid {owner}, not by the daemon"):
        daemon.resolve_token(Settings(store_path=tmp_path / "x.db"))


def test_an_empty_token_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "lmwatch.token"
    path.touch(mode=0o600)
    path.chmod(0o600)
    with pytest.raises(daemon.StartupError, match="is empty"):
        daemon.resolve_token(Settings(store_path=tmp_path / "x.db"))


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """The settings `lmwatch serve` would run the daemon with (nothing is served)."""
    for name in list(os.environ):
        if name.startswith("LMWATCH_"):
            monkeypatch.delenv(name)
    seen: list[Settings] = []

    def fake_serve(settings: Settings) -> int:
        seen.append(settings)
        return 0

    monkeypatch.setattr(daemon, "serve", fake_serve)
    return seen


@pytest.mark.parametrize(
    "argv",
    [
        ["--token", "from-the-command-line", "serve", "--port", "0"],
        ["serve", "--port", "0", "--token", "from-the-command-line"],
    ],
)
def test_serve_uses_the_token_given_on_the_command_line(
    argv: list[str], served: list[Settings]
) -> None:
    from lmwatch import cli

    assert cli.main(argv) == 0
    (settings,) = served
    assert settings.token is not None
    assert settings.token.get_secret_value() == "from-the-command-line"
    assert daemon.resolve_token(settings) == "from-the-command-line"


def test_serve_token_file_on_the_command_line_replaces_the_configured_token(
    tmp_path: Path, served: list[Settings]
) -> None:
    from lmwatch import cli

    config = tmp_path / "lmwatch.yaml"
    config.write_text("token: from-the-config\n")
    path = tmp_path / "token"
    path.write_text("from-a-file\n")
    path.chmod(0o600)
    assert cli.main(["--token-file", str(path), "serve", "--config", str(config)]) == 0
    (settings,) = served
    assert settings.token is None
    assert daemon.resolve_token(settings) == "from-a-file"


# --- serving ---------------------------------------------------------------------------


async def test_the_daemon_serves_reloads_on_sighup_and_stops_on_sigterm(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(SMALL_PROFILES)
    settings = Settings(
        port=0,
        store_path=tmp_path / "lmwatch.db",
        profiles_path=profiles,
        profile_check_interval=3600,
    )
    ready: asyncio.Queue[list[tuple[str, int]]] = asyncio.Queue()
    with caplog.at_level(logging.INFO):
        task = asyncio.create_task(daemon.run(settings, on_ready=ready.put_nowait))
        host, port = (await asyncio.wait_for(ready.get(), 30))[0]
        token = (tmp_path / "lmwatch.token").read_text().strip()
        base = f"http://{host}:{port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/healthz") as response:
                assert response.status == 200
            body = {"instance": "web-1", "source": "host-a", "destination": "host-b"}
            async with session.post(f"{base}/v1/migrations", json=body) as response:
                assert response.status == 401
            headers = {"Authorization": f"Bearer {token}"}
            async with session.post(f"{base}/v1/migrations", json=body, headers=headers) as r:
                assert r.status == 202, await r.text()
                migration_id = (await r.json())["id"]
            profiles.write_text(SMALL_PROFILES.replace("max_pause: 3s", "max_pause: 4s"))
            os.kill(os.getpid(), signal.SIGHUP)
            generation = 1
            for _ in range(1000):  # loop turns, not time: the handler runs on the loop
                async with session.get(f"{base}/v1/profiles") as response:
                    generation = (await response.json())["generation"]
                if generation == 2:
                    break
            assert generation == 2
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, 30)
    assert token not in caplog.text
    store = Store.open(tmp_path / "lmwatch.db")
    try:
        record = store.get(migration_id)
        assert record is not None
        assert record.state.value != "cancelled"  # a daemon stop does not cancel migrations
        assert [e for e in store.events(migration_id) if e.action == "cancel"] == []
    finally:
        store.close()


async def test_a_busy_port_is_a_startup_error(tmp_path: Path) -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        settings = Settings(port=port, store_path=tmp_path / "lmwatch.db", token="t")
        with pytest.raises(daemon.StartupError, match="cannot listen"):
            await daemon.run(settings, handle_signals=False)
    finally:
        blocker.close()
        await blocker.wait_closed()


# --- one daemon per store ------------------------------------------------------------------

# One instance whose first pass alone takes minutes (64 GiB over 1 Gbit/s): it is
# still copying whenever the test looks.
SLOW_INVENTORY = """
hosts:
  - {name: a, memory: 256GiB}
  - {name: b, memory: 256GiB}
links:
  - {between: [a, b], bandwidth: 1Gbit/s}
default_bandwidth: 1Gbit/s
instances:
  - {name: slow, host: a, memory: 64GiB, working_set: 64MiB, change_rate: 1MiB/s}
"""


def _wait_for(what: str, condition: Any, timeout: float = 60.0) -> Any:
    import time

    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _http(method: str, url: str, token: str | None = None, body: Any = None) -> Any:
    import json
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_a_second_daemon_on_the_same_store_exits_and_changes_nothing(tmp_path: Path) -> None:
    import re

    store = tmp_path / "lmwatch.db"
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(SLOW_INVENTORY)
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(SMALL_PROFILES)
    options = ["--store", str(store), "--profiles", str(profiles), "--inventory", str(inventory)]
    log = tmp_path / "first.log"
    with log.open("w") as output:
        first = subprocess.Popen(
            [sys.executable, "-m", "lmwatch.cli", "serve", "--port", "0", *options],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        listening = _wait_for(
            "the first daemon to listen",
            lambda: re.search(r"listening addresses=([\d.]+):(\d+)", log.read_text()),
        )
        base = f"http://{listening.group(1)}:{listening.group(2)}"
        token_file = tmp_path / "lmwatch.token"
        token = token_file.read_text().strip()
        body = {"instance": "slow", "source": "a", "destination": "b"}
        migration_id = _http("POST", f"{base}/v1/migrations", token, body)["id"]
        _wait_for(
            "the migration to copy",
            lambda: _http("GET", f"{base}/v1/migrations/{migration_id}")["state"] == "copying",
        )
        events_before = _http("GET", f"{base}/v1/migrations/{migration_id}")["timeline"]

        # As an operator would: the same store and port (before the lock, this one
        # re-attached to the first one's migration and rewrote the token, and only
        # then failed to bind).
        second = lmwatch_serve("--port", listening.group(2), *options)

        assert token_file.read_text().strip() == token  # not overwritten
        on_disk = Store.open(store)  # what a restart of the first daemon would find
        try:
            record = on_disk.get(migration_id)
            assert record is not None and record.state.value == "copying"
            assert not [e for e in on_disk.events(migration_id) if e.state == "failed"]
        finally:
            on_disk.close()
        assert first.poll() is None  # the first one serves on
        migration = _http("GET", f"{base}/v1/migrations/{migration_id}")
        assert migration["state"] == "copying"
        timeline = migration["timeline"]
        assert timeline[: len(events_before)] == events_before
        assert not [e for e in timeline if "restart" in e["reason"]]
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr
        assert (
            f"another lmwatch daemon (pid {first.pid}) is using the store {store}" in second.stderr
        )
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=30)
    # The lock went with the first daemon: the store is usable again.
    from lmwatch.store import StoreLock

    StoreLock.acquire(store).release()


def test_the_store_lock_is_exclusive_follows_links_and_is_released(tmp_path: Path) -> None:
    from lmwatch.store import StoreLock, StoreLocked

    store = tmp_path / "lmwatch.db"
    link = tmp_path / "alias.db"
    link.symlink_to(store)
    held = StoreLock.acquire(store)
    try:
        assert held.path == tmp_path / "lmwatch.db.lock"
        for path in (store, link):
            with pytest.raises(StoreLocked, match=f"pid {os.getpid()}"):
                StoreLock.acquire(path)
    finally:
        held.release()
    StoreLock.acquire(link).release()


def test_a_corrupt_store_row_is_a_clear_startup_error(tmp_path: Path) -> None:
    import sqlite3

    from lmwatch.model import State
    from lmwatch.store import MigrationRecord

    store_path = tmp_path / "lmwatch.db"
    store = Store.open(store_path)
    record = MigrationRecord(
        id="m-1",
        instance="web-1",
        source="host-a",
        destination="host-b",
        labels={},
        requested_profile=None,
        profile_name="default",
        profile_reason="fallback",
        profile={"name": "default"},
        memory_bytes=1 << 30,
        state=State.QUEUED,
        created_at=1_800_000_000.0,
    )
    store.insert(record, "accepted")
    store.close()
    db = sqlite3.connect(store_path)
    db.execute("UPDATE migrations SET labels='{\"tier\": ' WHERE id='m-1'")
    db.commit()
    db.close()
    done = lmwatch_serve("--store", str(store_path), "--port", "0")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "lmwatch: store row for migration m-1 cannot be read: column labels:" in done.stderr
    assert "refuses to start" in done.stderr
    assert f"sqlite3 {store_path} \"SELECT * FROM migrations WHERE id='m-1'\"" in done.stderr
    assert "listening" not in done.stderr


MOVING_INVENTORY = """
hosts:
  - {name: a, memory: 256GiB}
  - {name: b, memory: 256GiB}
links:
  - {between: [a, b], bandwidth: 10Gbit/s}
default_bandwidth: 10Gbit/s
instances:
  - {name: small, host: a, memory: 1GiB, working_set: 16MiB, change_rate: 1MiB/s}
  - {name: big-1, host: a, memory: 8GiB, working_set: 16MiB, change_rate: 1MiB/s}
  - {name: big-2, host: a, memory: 8GiB, working_set: 16MiB, change_rate: 1MiB/s}
  - {name: big-3, host: a, memory: 8GiB, working_set: 16MiB, change_rate: 1MiB/s}
"""


def test_the_simulated_world_survives_a_sigkill_of_the_daemon(tmp_path: Path) -> None:
    """The embedded default keeps its world in the store, as real hosts keep theirs:
    after SIGKILL mid-migration a restarted daemon re-attaches to the running jobs and
    they complete (before, they failed as "no longer known to the hypervisor"), and an
    instance that had moved is still where it moved to."""
    import re

    store = tmp_path / "lmwatch.db"
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(MOVING_INVENTORY)
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(SMALL_PROFILES)
    options = ["--store", str(store), "--profiles", str(profiles), "--inventory", str(inventory)]

    def serve(log: Path) -> tuple[subprocess.Popen[bytes], str]:
        with log.open("w") as output:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "lmwatch.cli", "serve", "--port", "0", *options],
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        listening = _wait_for(
            "the daemon to listen",
            lambda: re.search(r"listening addresses=([\d.]+):(\d+)", log.read_text()),
        )
        return daemon, f"http://{listening.group(1)}:{listening.group(2)}"

    first, base = serve(tmp_path / "first.log")
    try:
        token = (tmp_path / "lmwatch.token").read_text().strip()

        def submit(instance: str, source: str, destination: str) -> str:
            body = {"instance": instance, "source": source, "destination": destination}
            return str(_http("POST", f"{base}/v1/migrations", token, body)["id"])

        def state(migration_id: str) -> str:
            return str(_http("GET", f"{base}/v1/migrations/{migration_id}")["state"])

        moved = submit("small", "a", "b")
        _wait_for("the small instance to move", lambda: state(moved) == "completed")
        running = [submit(name, "a", "b") for name in ("big-1", "big-2", "big-3")]
        _wait_for("a migration to copy", lambda: "copying" in [state(m) for m in running])
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)

    second, base = serve(tmp_path / "second.log")
    try:
        _wait_for(
            "every migration to end",
            lambda: all(state(m) in ("completed", "failed", "cancelled") for m in running),
            timeout=120,
        )
        outcomes = {m: _http("GET", f"{base}/v1/migrations/{m}")["outcome"] for m in running}
        assert {m: state(m) for m in running} == dict.fromkeys(running, "completed"), outcomes
        # The instance that moved before the kill is on b: moving it back is accepted.
        back = submit("small", "b", "a")
        _wait_for("the small instance to move back", lambda: state(back) == "completed")
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=30)
