"""Rig harness: the gate, the real daemon as a subprocess, its HTTP API, the summary.

Every test under tests/rig is marked `rig`. When the rig is not there (rig/setup.sh,
rig/up.sh) such tests are skipped with the rig's own reason, except under CI=true,
where they fail: CI can never pass by skipping them.

The `daemon` fixture runs `python -m lmwatch.cli serve --config <tmp>/config.yaml`
with the libvirt driver on rig hosts a and b, a fixed token, a private store and
profiles file, a short poll interval and a free port. `Daemon` talks to it over
HTTP only. Scenario outcomes recorded with `record_outcome` are printed as a table
at the end of the session (figures from the daemon's outcome JSON).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "rig"))
# One rig per pytest-xdist worker (gw0 uses slot 0, gw1 slot 1: rig/lib.sh), unless
# LMWATCH_RIG_SLOT says which; rigctl reads it once, on import.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _WORKER.startswith("gw") and "LMWATCH_RIG_SLOT" not in os.environ:
    os.environ["LMWATCH_RIG_SLOT"] = _WORKER.removeprefix("gw")
import rigctl  # noqa: E402
from rigchecks import timeline_text  # noqa: E402

RIG_DIR = Path(__file__).resolve().parent
TOKEN = "scn-rig-token"
LINK = "16MiB/s"  # the busy guest (32 MiB rewritten at 40 MiB/s) never converges over it
POLL_INTERVAL = 0.5
PROBE_TIMEOUT = 20.0  # seconds the rig's hosts have to answer before each test

JsonDict = dict[str, Any]

# -- gate ------------------------------------------------------------------------------

_AVAILABLE: tuple[bool, str] | None = None


def rig_status() -> tuple[bool, str]:
    """rigctl.rig_available(), asked once per session."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = rigctl.rig_available()
    return _AVAILABLE


def _in_rig_dir(item: pytest.Item) -> bool:
    return RIG_DIR in Path(str(item.fspath)).resolve().parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rig_items = [item for item in items if _in_rig_dir(item)]
    if not rig_items:
        return
    ok, why = rig_status()
    for item in rig_items:
        item.add_marker(pytest.mark.rig)
        if not ok and os.environ.get("CI") != "true":
            item.add_marker(pytest.mark.skip(reason=f"rig not available: {why}"))


def rig_answers(timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """rigctl.rig_available() within `timeout` seconds: asked again while a host refuses
    (its daemon may be coming back from a restart), and given up when an answer does not
    come (a daemon that takes the socket and never answers keeps a plain open waiting)."""
    deadline = time.monotonic() + timeout
    while True:
        answer: list[tuple[bool, str]] = []
        probe = threading.Thread(target=_probe, args=(answer,), name="rig-probe", daemon=True)
        probe.start()
        probe.join(max(0.1, deadline - time.monotonic()))
        if not answer:
            return False, f"the rig's hosts did not answer within {timeout:.0f} s"
        ok, why = answer[0]
        if ok or time.monotonic() >= deadline:
            return ok, why
        time.sleep(1.0)


def _probe(answer: list[tuple[bool, str]]) -> None:
    answer.append(rigctl.rig_available())


@pytest.fixture(autouse=True)
def _rig_gate(request: pytest.FixtureRequest) -> None:
    """Under CI a missing rig is a failure, never a skip. Each test asks the rig again
    (bounded): after a test that hung on it, the rest fail at once instead of each
    hanging until its own timeout."""
    if not _in_rig_dir(request.node):
        return
    ok, why = rig_status()
    if ok:
        ok, why = rig_answers()
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"rig not available under CI=true: {why}")
        pytest.skip(f"rig not available: {why}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """What the test gave the summary travels with its report: under pytest-xdist the
    test runs in a worker and the summary is printed by the controller."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    if _PENDING:
        report.user_properties.append((SUMMARY_PROPERTY, list(_PENDING)))
        _PENDING.clear()
    if report.when == "call" or (report.when == "setup" and not report.passed):
        scenario = item.get_closest_marker("scenario")
        if scenario is not None:
            verdict = "passed" if report.passed else ("skipped" if report.skipped else "FAILED")
            report.user_properties.append((VERDICT_PROPERTY, (str(scenario.args[0]), verdict)))
    return report


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for name, value in report.user_properties:
        if name == SUMMARY_PROPERTY:
            for scenario, text in value:  # type: ignore[attr-defined]
                if scenario is None:
                    FIGURES.append(text)
                else:
                    _row(scenario).outcomes.append(text)
        elif name == VERDICT_PROPERTY:
            scenario, verdict = value  # type: ignore[misc]
            _row(scenario).verdict = verdict


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "scenario(name): one end-to-end rig scenario")


# -- summary ---------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    outcomes: list[str] = field(default_factory=list)
    verdict: str = "not run"


SUMMARY: dict[str, Row] = {}  # the controller's (or the only process's)
FIGURES: list[str] = []  # tables of figures, printed whole after the summary
# what this process's tests gave the summary and have not yet sent with a report:
# (scenario, line), or (None, a table of figures)
_PENDING: list[tuple[str | None, str]] = []
SUMMARY_PROPERTY = "rig-summary"
VERDICT_PROPERTY = "rig-verdict"


def _row(scenario: str) -> Row:
    return SUMMARY.setdefault(scenario, Row(scenario))


class Summary:
    """What the scenarios report for the end-of-session table."""

    def outcome(self, scenario: str, migration: JsonDict, note: str = "") -> None:
        """Add one finished migration (the daemon's JSON) to the scenario's row."""
        outcome = migration.get("outcome") or {}
        blackout = outcome.get("blackout_seconds")
        total = outcome.get("total_seconds")
        parts = [
            f"{migration.get('state')}/{outcome.get('method', '-')}",
            f"total {total:.1f}s" if isinstance(total, int | float) else "total -",
            f"blackout {blackout * 1000:.0f}ms"
            if isinstance(blackout, int | float)
            else "blackout -",
            f"passes {outcome.get('passes', '-')}",
        ]
        text = ", ".join(parts)
        _PENDING.append((scenario, f"{note}: {text}" if note else text))
        print(f"\n[{scenario}] {note} {text}\n{timeline_text(migration)}")

    def note(self, scenario: str, note: str) -> None:
        _PENDING.append((scenario, note))

    def figures(self, text: str) -> None:
        """A table of figures, printed whole at the end of the session."""
        _PENDING.append((None, text))


@pytest.fixture(scope="session")
def summary() -> Summary:
    return Summary()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    tr = terminalreporter
    if FIGURES:
        tr.section("rig figures")
        for text in FIGURES:
            tr.write_line(text)
    if not SUMMARY:
        return
    tr.section("rig scenarios")
    width = max(len(r.scenario) for r in SUMMARY.values())
    for row in SUMMARY.values():
        lines = row.outcomes or ["-"]
        tr.write_line(f"{row.scenario:<{width}}  {row.verdict:<7}  {lines[0]}")
        for extra in lines[1:]:
            tr.write_line(f"{'':<{width}}  {'':<7}  {extra}")


# -- the daemon ------------------------------------------------------------------------


class ApiError(AssertionError):
    pass


def free_port() -> int:
    """A free port for a daemon, outside every rig's migration ports (which
    `rigctl.stall_migration_streams` stalls, and QEMU listens on)."""
    low, high = rigctl.ALL_MIGRATION_PORTS
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not low <= port <= high:
            return port


class Daemon:
    """The real lmwatch daemon in a subprocess, reached over its HTTP API only."""

    def __init__(
        self,
        workdir: Path,
        profiles_text: str,
        *,
        store_url: str | None = None,
        member: str | None = None,
        lease: float | None = None,
    ) -> None:
        self.workdir = workdir
        self.member = member
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "daemon.log"
        self.config_path = workdir / "config.yaml"
        (workdir / "profiles.yaml").write_text(profiles_text)
        hosts = {
            h: {
                "uri": rigctl.host_uri(h),
                "migration_address": "tcp://127.0.0.1",
                "bandwidth": LINK,
            }
            for h in rigctl.HOSTS
        }
        config: JsonDict = {
            "driver": "libvirt",
            "hosts": hosts,
            "token": TOKEN,
            "profiles_path": str(workdir / "profiles.yaml"),
            "poll_interval": POLL_INTERVAL,
            "port": self.port,
            "log_level": "INFO",
        }
        if store_url is None:
            config["store_path"] = str(workdir / "lmwatch.db")
        else:  # a member of a cluster of daemons on one PostgreSQL database
            config["store_url"] = store_url
            config["member"] = member
            config["lease"] = lease
        self.config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_offset = 0

    # lifecycle

    def start(self, timeout: float = 60.0) -> None:
        assert self.proc is None or self.proc.poll() is not None
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMWATCH_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmwatch.cli", "serve", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=env,
        )
        log.close()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> JsonDict:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, body = self.request("GET", "/readyz")
                last = (status, body)
                if status == 200:
                    return body
            except OSError as error:
                last = error
            time.sleep(0.2)
        raise TimeoutError(f"daemon not ready within {timeout}s (last: {last}):\n{self.log()}")

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"daemon ignored SIGTERM for {timeout}s") from None

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, "daemon not running"
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def log(self, since_mark: bool = False) -> str:
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return "<no log>"
        if since_mark:
            data = data[self.log_offset :]
        return data.decode(errors="replace")

    def mark_log(self) -> None:
        self.log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0

    # HTTP

    def request(self, method: str, path: str, body: JsonDict | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {TOKEN}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as answer:
                return answer.status, json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                return error.code, json.loads(raw)
            except ValueError:
                return error.code, raw.decode(errors="replace")

    def expect(self, status: int, method: str, path: str, body: JsonDict | None = None) -> Any:
        got, answer = self.request(method, path, body)
        if got != status:
            raise ApiError(f"{method} {path} {body}: expected {status}, got {got}: {answer}")
        return answer

    def submit(
        self,
        instance: str,
        source: str,
        destination: str,
        profile: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> JsonDict:
        body: JsonDict = {"instance": instance, "source": source, "destination": destination}
        if profile is not None:
            body["profile"] = profile
        if labels:
            body["labels"] = labels
        answer: JsonDict = self.expect(202, "POST", "/v1/migrations", body)
        return answer

    def get(self, migration_id: str) -> JsonDict:
        answer: JsonDict = self.expect(200, "GET", f"/v1/migrations/{migration_id}")
        return answer

    def list(self) -> list[JsonDict]:
        answer = self.expect(200, "GET", "/v1/migrations")
        return list(answer["migrations"])

    def wait_until(
        self,
        migration_id: str,
        predicate: Callable[[JsonDict], bool],
        timeout: float,
        what: str = "condition",
    ) -> JsonDict:
        deadline = time.monotonic() + timeout
        while True:
            migration = self.get(migration_id)
            if predicate(migration) or migration["state"] in FINISHED:
                return migration
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{what} not reached within {timeout}s: state {migration['state']}, "
                    f"progress {migration['progress']}, timeline:\n" + timeline_text(migration)
                )
            time.sleep(0.2)

    def wait_finished(self, migration_id: str, timeout: float = 120.0) -> JsonDict:
        return self.wait_until(migration_id, lambda m: False, timeout, "a final state")

    def force_complete(self, migration_id: str, accept_pause: bool = False) -> JsonDict:
        answer: JsonDict = self.expect(
            202,
            "POST",
            f"/v1/migrations/{migration_id}/force-complete",
            {"accept_pause": accept_pause},
        )
        return answer

    def cancel(self, migration_id: str) -> JsonDict:
        answer: JsonDict = self.expect(202, "POST", f"/v1/migrations/{migration_id}/cancel")
        return answer


FINISHED = ("completed", "cancelled", "failed")


@pytest.fixture(scope="module")
def daemon_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Daemon]]:
    """Start real daemons with a given profiles text; all stopped (SIGTERM) at the end."""
    started: list[Daemon] = []

    def make(profiles_text: str, **cluster: Any) -> Daemon:
        """`cluster`: store_url, member and lease of a daemon in a cluster."""
        d = Daemon(tmp_path_factory.mktemp("lmwatch"), profiles_text, **cluster)
        started.append(d)
        d.start()
        return d

    yield make
    for d in started:
        code = d.stop()
        if code not in (None, 0):
            print(f"\ndaemon exited with {code} on SIGTERM; log:\n{d.log()}")


@pytest.fixture(autouse=True)
def _daemon_log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print what the daemon logged during a failed test."""
    if "daemon" not in request.fixturenames:
        yield
        return
    daemon: Daemon = request.getfixturevalue("daemon")
    daemon.mark_log()
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(f"\n--- daemon log during {request.node.name} ---\n{daemon.log(since_mark=True)}")
