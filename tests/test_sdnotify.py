"""systemd's notify protocol: readiness, the watchdog and stopping, against a real unix
datagram socket as $NOTIFY_SOCKET and the real `lmwatch serve` process."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmwatch import daemon
from lmwatch.clock import VirtualClock
from lmwatch.drivers.sim import SimDriver
from lmwatch.engine import Engine
from lmwatch.model import MigrationRequest
from lmwatch.sdnotify import Notifier, watchdog_interval


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket with a short path (sun_path holds 108 bytes)."""
    directory = tempfile.mkdtemp(prefix="lmw-", dir="/tmp")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(directory)


def receive(sock: socket.socket, timeout: float) -> dict[str, str] | None:
    """One notify message as a dict, or None when nothing arrives in `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return None
    return dict(line.split("=", 1) for line in data.decode().splitlines())


def test_the_daemon_is_ready_after_healthz_answers_then_feeds_the_watchdog_and_says_stopping(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}  # a ping per 0.1 s
    env.pop("WATCHDOG_PID", None)
    command = [sys.executable, "-m", "lmwatch.cli", "serve", "--port", "0"]
    process = subprocess.Popen(
        [*command, "--store", str(tmp_path / "lmwatch.db")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = receive(sock, 60)
        assert ready is not None, "no READY=1 within 60 s"
        assert ready.get("READY") == "1", ready
        assert ready["MAINPID"] == str(process.pid)
        found = re.search(r"listening on 127\.0\.0\.1:(\d+)", ready["STATUS"])
        assert found, ready
        # Ready means ready: the API answers at once, with no retry.
        url = f"http://127.0.0.1:{found.group(1)}/healthz"
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert answer.status == 200

        pings = 0
        deadline = time.monotonic() + 10
        while pings < 5 and time.monotonic() < deadline:
            message = receive(sock, 2)
            assert message is not None, "the watchdog pings stopped"
            assert "READY" not in message
            pings += message.get("WATCHDOG") == "1"
        assert pings == 5

        process.send_signal(signal.SIGTERM)
        stopping = None
        deadline = time.monotonic() + 30
        while stopping is None and time.monotonic() < deadline:
            message = receive(sock, 30)
            assert message is not None, "no STOPPING=1 after SIGTERM"
            if message.get("STOPPING") == "1":
                stopping = message
        assert stopping is not None
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stderr is not None
        stderr = process.stderr.read()
        process.stderr.close()
    assert "Traceback" not in stderr, stderr


def test_without_watchdog_usec_the_daemon_only_says_ready_and_stopping(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_")}
    env["NOTIFY_SOCKET"] = path
    command = [sys.executable, "-m", "lmwatch.cli", "serve", "--port", "0"]
    process = subprocess.Popen(
        [*command, "--store", str(tmp_path / "lmwatch.db")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ready = receive(sock, 60)
        assert ready is not None and ready.get("READY") == "1"
        assert receive(sock, 0.5) is None  # no watchdog pings
        process.send_signal(signal.SIGTERM)
        stopping = receive(sock, 30)
        assert stopping is not None and stopping.get("STOPPING") == "1"
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_an_abstract_socket_name_starts_with_an_at_sign() -> None:
    name = f"lmwatch-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.enabled
        assert notifier.ready("listening")
        message = receive(sock, 5)
    assert message is not None
    assert message["READY"] == "1"
    assert message["STATUS"] == "listening"


def test_no_notify_socket_means_nothing_is_sent() -> None:
    notifier = Notifier({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog is None
    assert not notifier.ready("x")
    assert not notifier.beat(None)
    asyncio.run(notifier.feed(lambda: None))  # returns at once


def test_a_vanished_socket_is_logged_not_raised(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.enabled
    assert notifier.send("READY=1") is False


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # someone else's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    environ: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(environ) == expected


async def test_a_hung_supervision_withholds_the_watchdog(
    engine: Engine,
    driver: SimDriver,
    clock: VirtualClock,
    notify_socket: tuple[socket.socket, str],
) -> None:
    sock, path = notify_socket
    alive = SimpleNamespace(engine=engine, settings=SimpleNamespace(poll_interval=1.0))
    record, _ = await engine.submit(MigrationRequest("quiet", "a", "b"))
    await clock.advance(0.5)
    assert daemon.supervisor_problem(alive) is None  # type: ignore[arg-type]

    hang = asyncio.Event()

    async def never_answers(migration_id: str) -> None:
        await hang.wait()

    driver.sample = never_answers  # type: ignore[method-assign,assignment]
    await clock.advance(daemon.STALL_AFTER + 5)
    problem = daemon.supervisor_problem(alive)  # type: ignore[arg-type]
    assert problem is not None and record.id in problem

    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"})
    assert notifier.beat(problem) is False
    withheld = receive(sock, 5)
    assert withheld is not None and "WATCHDOG" not in withheld
    assert record.id in withheld["STATUS"]
    hang.set()
    assert notifier.beat(None) is True
    messages = [receive(sock, 5), receive(sock, 5)]
    assert {"STATUS": "supervising"} in messages
    assert {"WATCHDOG": "1"} in messages
