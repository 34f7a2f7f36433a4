"""What only the PostgreSQL store has (lmwatch/pgstore.py), against a real server
(tests/pgtools.py): one daemon per database (the advisory lock), a database that
cannot be reached or is restarted while migrations run, acceptances flushed and
transitions not, `store_url` in the configuration, and `lmwatch serve` on it.

The behaviour both kinds of store share is tested on both by the store suite
(test_store_writer.py, test_store_health.py, test_store_drains.py, and the
store parts of test_scale.py, test_engine.py and test_engine_restart.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from apitools import SMALL_PROFILES
from enginerig import EngineRig
from pgtools import PgCluster, TcpProxy
from storetools import on_disk

from lmwatch.cluster.pg import LOCK_WAIT, connect
from lmwatch.config import ConfigError, load_settings
from lmwatch.model import State
from lmwatch.store import MigrationRecord, Store, StoreError, StoreUnwritable


def _record(number: int) -> MigrationRecord:
    return MigrationRecord(
        id=f"m{number:04d}",
        instance=f"vm{number}",
        source="a",
        destination="b",
        labels={},
        requested_profile=None,
        profile_name="default",
        profile_reason="the default",
        profile={},
        memory_bytes=64 * 1024**3,  # beyond 32 bits
        state=State.QUEUED,
        created_at=1_800_000_000.123456,  # needs double precision
    )


def _database(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?", 1)[0]


# --- several daemons per database ------------------------------------------------


def test_two_stores_open_one_database_at_once(pg_url: str) -> None:
    first = Store.open(pg_url)
    try:
        second = Store.open(pg_url)  # no lock: the daemons share it (docs/cluster.md)
        try:
            first.insert(_record(1), "accepted")
            assert second.get("m0001") == _record(1)
        finally:
            second.close()
    finally:
        first.close()
    held = "SELECT count(*) FROM pg_locks WHERE locktype='advisory' AND granted"
    assert on_disk(pg_url, held) == [(0,)]
    tables = "SELECT table_name FROM information_schema.tables WHERE table_name LIKE ?"
    found = sorted(t for (t,) in on_disk(pg_url, tables, "cluster%"))
    assert found == [
        "cluster_commands",
        "cluster_leases",
        "cluster_members",
        "cluster_slots",
    ]  # commands, members, leases, slots: made at open


# --- values and durability ---------------------------------------------------------


def test_values_read_back_exactly(pg_url: str) -> None:
    store = Store.open(pg_url)
    try:
        store.insert(_record(1), "accepted")
    finally:
        store.close()
    reopened = Store.open(pg_url)
    try:
        assert reopened.get("m0001") == _record(1)
    finally:
        reopened.close()


def test_acceptances_are_flushed_and_transitions_are_not(pg_url: str) -> None:
    store = Store.open(pg_url)
    statements: list[str] = []

    class Recording:
        def __init__(self, connection: Any) -> None:
            self.connection = connection

        def execute(self, sql: str, *args: Any) -> Any:
            statements.append(sql)
            return self.connection.execute(sql, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.connection, name)

    try:
        assert store._db.execute("SHOW synchronous_commit").fetchone() == {
            "synchronous_commit": "off"
        }
        store._db = Recording(store._db)
        record = _record(1)
        store.insert(record, "accepted")
        assert "SET synchronous_commit TO on" in statements
        assert statements.index("SET synchronous_commit TO on") < statements.index("COMMIT")
        statements.clear()
        store.update(record, event=("state", "now copying", None), state=State.COPYING)
        assert store.settle(5)
        assert "COMMIT" in statements
        assert "SET synchronous_commit TO on" not in statements
    finally:
        store.close()


# --- a database that cannot be reached ---------------------------------------------


def test_an_unreachable_database_keeps_the_writes_and_says_where(
    pg_cluster: PgCluster, pg_url: str
) -> None:
    proxy = TcpProxy(pg_cluster.port)
    store = Store.open(pg_cluster.url(_database(pg_url), port=proxy.port))
    try:
        store.insert(_record(1), "accepted")
        proxy.cut()
        copying = store.update(
            _record(1), event=("state", "copying", None), at=2.0, state=State.COPYING
        )
        store.add_event("m0001", 3.0, "note", "while away")
        assert store.settle(5) and store.failing()
        problem = store.problem() or ""
        assert problem.startswith(
            f"the database at 127.0.0.1:{proxy.port}/{_database(pg_url)} cannot be reached: "
        ), problem
        assert "2 changes kept in memory until it can; retry later" in problem
        assert store.get("m0001") == copying  # reads of what waits go on from memory
        with pytest.raises(StoreUnwritable, match="cannot be reached"):
            store.insert(_record(2), "accepted")
        assert not store.healthy()
        assert not store.flush(4.0)  # still away: nothing written, nothing lost

        proxy.restore()
        store.retry(5.0)
        assert store.settle(5) and not store.failing() and store.problem() is None
        assert store.healthy()
        assert on_disk(pg_url, "SELECT reason FROM events ORDER BY seq") == [
            ("accepted",),
            ("copying",),
            ("while away",),
        ]
        assert on_disk(pg_url, "SELECT id, state FROM migrations") == [("m0001", "copying")]
    finally:
        store.close()
        proxy.close()


# --- what other sessions hold ---------------------------------------------------------


def test_a_write_another_session_holds_up_is_kept_and_written_once_it_lets_go(
    pg_url: str,
) -> None:
    store = Store.open(pg_url)
    try:
        store.insert(_record(1), "accepted")
        assert store.settle(5)
        with psycopg.connect(pg_url, autocommit=True) as other:  # an operator's psql, say
            other.execute("BEGIN")
            other.execute("SELECT 1 FROM migrations WHERE id = 'm0001' FOR UPDATE")
            copying = store.update(
                _record(1), event=("state", "copying", None), at=2.0, state=State.COPYING
            )
            # The write gives up after LOCK_WAIT and is kept (unbounded, it waited as
            # long as the other session held the row, and so did all that waits for it).
            assert store.settle(LOCK_WAIT + 10) and store.failing()
            problem = store.problem() or ""
            assert "another session holds what the write needs" in problem, problem
            assert store.get("m0001") == copying
            other.execute("ROLLBACK")
        store.retry(5.0)
        assert store.settle(5) and not store.failing()
        assert on_disk(pg_url, "SELECT id, state FROM migrations") == [("m0001", "copying")]
    finally:
        store.close()


def test_a_session_of_lmwatch_frozen_inside_a_transaction_lets_go_of_its_locks(
    pg_url: str,
) -> None:
    frozen = connect(pg_url, idle_in_transaction=1.0)  # a daemon stopped mid-transaction
    try:
        frozen.execute("BEGIN")
        frozen.execute("SELECT pg_advisory_xact_lock(4242)")
        with psycopg.connect(pg_url, autocommit=True) as member:
            member.execute("SET lock_timeout = '8s'")  # the test's own bound
            member.execute("BEGIN")
            member.execute("SELECT pg_advisory_xact_lock(4242)")  # the server ended frozen's
            member.execute("ROLLBACK")
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
            frozen.execute("SELECT 1")
    finally:
        frozen.close()


INVENTORY = """
hosts:
  - {name: a, memory: 512GiB}
  - {name: b, memory: 512GiB}
links:
  - {between: [a, b], bandwidth: 10Gbit/s}
default_bandwidth: 10Gbit/s
instances:
  - {name: vm1, host: a, memory: 8GiB, working_set: 256MiB, change_rate: 4MiB/s}
  - {name: vm2, host: a, memory: 16GiB, working_set: 512MiB, change_rate: 8MiB/s}
  - {name: vm3, host: a, memory: 8GiB, working_set: 128MiB, change_rate: 1MiB/s}
  - {name: vm4, host: a, memory: 32GiB, working_set: 1GiB, change_rate: 16MiB/s}
"""

PROFILES = """
profiles:
  - name: default
    max_blackout: 2s
    deadline: 2h
    on_deadline: cancel
"""


async def test_the_database_restarted_mid_run_loses_nothing(
    tmp_path: Path, pg_cluster: PgCluster, pg_url: str
) -> None:
    rig = EngineRig(tmp_path, INVENTORY, PROFILES, durable_world=True, store_location=pg_url)
    await rig.engine.start()
    try:
        ids = [await rig.migrate(f"vm{n}") for n in range(1, 5)]
        assert await rig.clock.run_until(
            lambda: any(rig.engine.get(i).state is State.COPYING for i in ids)
        )
        pg_cluster.restart()  # every connection of the store and the world is closed
        await rig.finish(*ids)
        assert rig.store.settle(10)
        await rig.engine.stop()
        assert not rig.store.failing() and rig.store.pending() == 0
        for migration_id in ids:
            shown = [(e.at, e.kind, e.reason, e.action) for e in rig.store.events(migration_id)]
            stored = on_disk(
                pg_url,
                "SELECT at, kind, reason, action FROM events WHERE migration_id=? ORDER BY seq",
                migration_id,
            )
            assert stored == shown  # every entry, once, in order
            ended = [e for e in rig.store.events(migration_id) if e.state == "completed"]
            assert len(ended) == 1  # supervised to its end once
            final = on_disk(pg_url, "SELECT state FROM migrations WHERE id=?", migration_id)
            assert final == [(rig.engine.get(migration_id).state.value,)]
            assert rig.engine.get(migration_id).state is State.COMPLETED
    finally:
        rig.store.close()


# --- configuration ---------------------------------------------------------------


def test_store_url_is_chosen_by_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "postgresql://lmwatch@db.example:5432/lmwatch"
    assert load_settings().store_url is None  # the SQLite file stays the default
    assert load_settings(store_url=url).store_url == url
    monkeypatch.setenv("LMWATCH_STORE_URL", url)
    assert load_settings().store_url == url


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"store_url": "postgresql://h/db", "store_path": "/tmp/x.db"},
            "set store_path or store_url, not both",
        ),
        ({"store_url": "sqlite:///tmp/x.db"}, "store_url must be a postgresql:// URL"),
        ({"store_url": "db.example:5432"}, "store_url must be a postgresql:// URL"),
    ],
)
def test_a_store_url_that_cannot_be_used_is_refused(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(**values)


def test_store_path_from_the_environment_and_a_store_url_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LMWATCH_STORE_PATH", "/tmp/x.db")
    with pytest.raises(ConfigError, match="not both"):
        load_settings(store_url="postgresql://h/db")


# --- the daemon --------------------------------------------------------------------

DAEMON_INVENTORY = """
hosts:
  - {name: a, memory: 256GiB}
  - {name: b, memory: 256GiB}
links:
  - {between: [a, b], bandwidth: 10Gbit/s}
default_bandwidth: 10Gbit/s
instances:  # copies for about 15 s: long enough to start a second daemon meanwhile
  - {name: slow, host: a, memory: 16GiB, working_set: 64MiB, change_rate: 1MiB/s}
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
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_serve_two_members_on_one_store_url_both_ready_and_a_killed_one_is_taken_over(
    tmp_path: Path, pg_url: str
) -> None:
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(DAEMON_INVENTORY)
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(SMALL_PROFILES)
    options = ["--profiles", str(profiles), "--inventory", str(inventory), "--port", "0"]
    # No password on a command line; a short lease, so that a killed member's hosts
    # are free again soon.
    environment = {**os.environ, "LMWATCH_STORE_URL": pg_url, "LMWATCH_LEASE": "2"}

    def serve(log: Path, member: str) -> tuple[subprocess.Popen[bytes], str]:
        with log.open("w") as output:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "lmwatch.cli", "serve", *options, "--member", member],
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=tmp_path,  # the generated token is written here
                env=environment,
            )
        listening = _wait_for(
            "the daemon to listen",
            lambda: (
                re.search(r"listening addresses=([\d.]+):(\d+)", log.read_text())
                or daemon.poll() is not None
            ),
        )
        assert daemon.poll() is None, log.read_text()
        return daemon, f"http://{listening.group(1)}:{listening.group(2)}"

    # Two members together: neither exits, both ready, each showing its role, the
    # source hosts shared out between them.
    daemons = [serve(tmp_path / f"{name}.log", name) for name in ("a", "b")]
    try:
        for (_, base), name in zip(daemons, ("a", "b"), strict=True):
            status, ready = _http("GET", f"{base}/readyz")
            assert status == 200 and ready["ready"] is True, ready
            assert ready["role"]["member"] == name and ready["role"]["may_act"] is True

        def hosts_held() -> bool:
            roles = [_http("GET", f"{base}/readyz")[1]["role"] for _, base in daemons]
            return sum(r["leases"]["host"] for r in roles) == 2 and all(
                r["database_reachable"] for r in roles
            )

        _wait_for("the hosts to be shared out", hosts_held, timeout=30)
        import urllib.request

        with urllib.request.urlopen(f"{daemons[0][1]}/metrics", timeout=10) as response:
            metrics = response.read().decode()
        assert 'lmwatch_member_leases{kind="host",member="a"}' in metrics
        assert "lmwatch_migrations_owned 0.0" in metrics
        assert "lmwatch_store_reachable 1.0" in metrics
    finally:
        for daemon, _ in daemons:
            daemon.send_signal(signal.SIGTERM)
        for daemon, _ in daemons:
            assert daemon.wait(timeout=30) == 0
    assert "another lmwatch daemon" not in (tmp_path / "b.log").read_text()

    # One member alone (each daemon's simulated world is its own until the world is
    # shared): killed mid-migration, its next incarnation takes the migration over.
    first, base = serve(tmp_path / "first.log", "a")
    try:
        assert "store=postgresql://127.0.0.1:" in (tmp_path / "first.log").read_text()
        token = (tmp_path / "lmwatch.token").read_text().strip()
        body = {"instance": "slow", "source": "a", "destination": "b"}
        status, accepted = _http("POST", f"{base}/v1/migrations", token, body)
        assert status == 202, accepted
        migration_id = accepted["id"]
        _wait_for(
            "the migration to copy",
            lambda: _http("GET", f"{base}/v1/migrations/{migration_id}")[1]["state"] == "copying",
        )
    finally:
        first.send_signal(signal.SIGKILL)  # as a crash: the next one re-attaches
        first.wait(timeout=30)

    third, base = serve(tmp_path / "third.log", "a")
    try:
        status, ready = _http("GET", f"{base}/readyz")
        assert status == 200, ready
        _wait_for(
            "the migration to end",
            lambda: (
                _http("GET", f"{base}/v1/migrations/{migration_id}")[1]["state"]
                in ("completed", "failed", "cancelled")
            ),
            timeout=120,
        )
        status, shown = _http("GET", f"{base}/v1/migrations/{migration_id}")
        assert shown["state"] == "completed", shown["outcome"]
        assert any("resumed after a restart" in e["reason"] for e in shown["timeline"])
    finally:
        third.send_signal(signal.SIGTERM)
        assert third.wait(timeout=30) == 0


# --- readiness -----------------------------------------------------------------------


@pytest.fixture
def proxy(pg_cluster: PgCluster) -> Any:
    between = TcpProxy(pg_cluster.port)
    yield between
    between.close()


@pytest.fixture
def store(pg_cluster: PgCluster, pg_url: str, proxy: TcpProxy) -> Any:
    """The engine and API fixtures' store in this module: a database reached through
    a proxy the test can cut."""
    opened = Store.open(pg_cluster.url(_database(pg_url), port=proxy.port))
    yield opened
    opened.close()


async def test_readyz_says_the_database_cannot_be_reached_and_recovers(
    api: Any, store: Store, proxy: TcpProxy, pg_url: str
) -> None:
    ready = await api.get("/readyz")
    assert ready.status == 200, ready.body
    proxy.cut()
    ready = await api.get("/readyz")
    assert ready.status == 503 and ready.body["store"] is False
    assert ready.body["detail"].startswith(
        f"the database at 127.0.0.1:{proxy.port}/{_database(pg_url)} cannot be reached: "
    ), ready.body["detail"]
    assert ready.body["detail"].endswith("; retry later")
    refused = await api.post(
        "/v1/migrations", {"instance": "quiet", "source": "a", "destination": "b"}
    )
    assert refused.status == 503 and "cannot be reached" in refused.body["detail"]
    proxy.restore()
    ready = await api.get("/readyz")
    assert ready.status == 200, ready.body
    accepted = await api.post(
        "/v1/migrations", {"instance": "quiet", "source": "a", "destination": "b"}
    )
    assert accepted.status == 202, accepted.text


def test_without_psycopg_a_store_url_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the extra were not installed
    monkeypatch.delitem(sys.modules, "lmwatch.pgstore", raising=False)
    with pytest.raises(StoreError, match=r"needs psycopg .*install lmwatch\[postgres\]"):
        Store.open("postgresql://lmwatch@127.0.0.1:1/none")
