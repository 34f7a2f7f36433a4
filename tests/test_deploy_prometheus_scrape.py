"""A real Prometheus scrapes a running daemon while it migrates on the simulator, and a
query through Prometheus's HTTP API returns the daemon's series.

Needs the `prometheus` binary (Debian package prometheus; `.ci/run` installs it):
skipped without it, a failure under CI=true.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

TOKEN = "scrape-test-token"


def prometheus() -> str:
    path = shutil.which("prometheus")
    if path is None:
        message = "prometheus not found (Debian package prometheus; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str, *, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


def wait_for(what: str, probe: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except OSError as error:  # not listening yet
            last = error
        else:
            if last:
                return last
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout:.0f}s; last: {last!r}")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_prometheus_scrapes_a_migrating_daemon(
    tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    binary = prometheus()
    api_port, prom_port = free_port(), free_port()
    env = {**os.environ, "LMWATCH_TOKEN": TOKEN}
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmwatch.cli",
            "serve",
            "--port",
            str(api_port),
            "--store",
            str(tmp_path / "lmwatch.db"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    processes.append(daemon)
    api = f"http://127.0.0.1:{api_port}"
    wait_for("the daemon answering", lambda: get_json(f"{api}/healthz"), 60)

    # A migration that keeps copying for a while (never converges on its own).
    body = json.dumps({"instance": "batch-1", "source": "host-a", "destination": "host-b"})
    request = urllib.request.Request(
        f"{api}/v1/migrations",
        data=body.encode(),
        method="POST",
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 202
        migration = json.loads(answer.read())["id"]

    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: lmwatch\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{api_port}']}}]\n"
    )
    server = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    processes.append(server)
    prom = f"http://127.0.0.1:{prom_port}"

    def query(expression: str) -> list[dict[str, Any]]:
        url = f"{prom}/api/v1/query?{urllib.parse.urlencode({'query': expression})}"
        answer = get_json(url)
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    up = wait_for("the lmwatch target up", lambda: query('up{job="lmwatch"} == 1'), 60)
    assert up[0]["metric"]["job"] == "lmwatch"
    started = wait_for(
        "lmwatch_migrations_started_total",
        lambda: query("lmwatch_migrations_started_total"),
        30,
    )
    assert started[0]["metric"]["profile"] == "batch"
    assert float(started[0]["value"][1]) >= 1
    remaining = wait_for(
        "the migration's remaining bytes",
        lambda: query(f'lmwatch_migration_remaining_bytes{{migration="{migration}"}}'),
        30,
    )
    # The daemon's `instance` label meets Prometheus's own and arrives as exported_instance.
    assert remaining[0]["metric"]["exported_instance"] == "batch-1"
    assert float(remaining[0]["value"][1]) > 0
    # No _created series reach Prometheus.
    assert query('{__name__=~"lmwatch_.*_created"}') == []
