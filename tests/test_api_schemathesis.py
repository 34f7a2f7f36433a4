"""Schemathesis against the real daemon (issue 10): every check, the stateful phase
following the document's links, no server error and no answer the document does not
describe. The daemon runs in a child process on 127.0.0.1 (simulator driver, embedded
inventory, a token of the test's own); schemathesis runs as its CLI."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

TOKEN = "schemathesis-token-0123456789"
HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def daemon_url(tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    log = (tmp_path / "daemon.log").open("w")
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmwatch.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--store",
            str(tmp_path / "lmwatch.db"),
            "--token",
            TOKEN,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                if child.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        "the daemon did not start:\n" + (tmp_path / "daemon.log").read_text()
                    ) from None
                time.sleep(0.2)
        yield url
    finally:
        child.terminate()
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        log.close()


def _schemathesis() -> list[str]:
    found = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]')")
    return [found]


def _run(daemon_url: str, tmp_path: Path, phases: str, max_time: int) -> str:
    """One schemathesis run of `phases` within `max_time` seconds; its output, once it
    passed with no failure in its summary."""
    command = [
        *_schemathesis(),
        "run",
        f"{daemon_url}/openapi.json",
        "--checks",
        "all",
        "--phases",
        phases,
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--max-examples",
        "25",
        "--seed",
        "10",
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--request-timeout",
        "10",
        "--max-time",
        str(max_time),
        "--no-color",
    ]
    environment = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "st_hooks",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=max_time + 120,
        check=False,
        cwd=tmp_path,
        env=environment,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "failed" not in output.split("SUMMARY")[-1], output
    return output


def test_schemathesis_finds_no_server_error_and_no_nonconformance(
    daemon_url: str, tmp_path: Path
) -> None:
    """The single-call phases, then the stateful phase in a run of its own: the time
    budget covers a whole run, and fuzzing repeats until it is spent, so in one run a
    slower machine left the stateful phase no time at all (0 scenarios)."""
    _run(daemon_url, tmp_path, "examples,coverage,fuzzing", 40)
    output = _run(daemon_url, tmp_path, "stateful", 20)
    assert "Stateful" in output, output
    links = re.search(r"API Links:\s+(\d+) covered", output)
    assert links is not None and int(links.group(1)) > 0, output  # calls were chained
