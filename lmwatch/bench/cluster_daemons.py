"""`python -m lmwatch.bench.cluster_daemons`: several daemons on one PostgreSQL database.

    python -m lmwatch.bench.cluster_daemons --trials 20

Real `lmwatch serve` subprocesses on the simulator, all members of one cluster on
one database (a throwaway server started here, or `--store-url` to an empty
database), the simulated world kept in that database, so that every daemon drives
the same hosts. It prints the figures issue 11 asks for:

- **throughput**: migrations accepted per second through `POST /v1/migrations`,
  with 1, 2 and 3 daemons (the requests spread over the daemons by 8 clients);
- **takeover after SIGKILL**: per trial, a migration is submitted, the daemon that
  holds its lease is killed with SIGKILL a random moment after it started
  supervising it, and the time from the kill until another member holds the lease
  (read from the database's lease table) is measured; the killed daemon is started
  again (a new incarnation) for the next trial;
- **exactly once**: once every migration has ended, each must have exactly one
  final state and at most one pause, one handover and one cancel decision in its
  timeline ("duplicate actions", which must be 0), and none may be left unfinished.

Figures, not a timed test; see docs/cluster.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmwatch.bench.pgserver import availability, free_port, running_cluster

TOKEN = "cluster-bench-token"
FINISHED = ("completed", "cancelled", "failed")
PAIRS = 6  # source/destination host pairs: work to spread over the daemons

PROFILES = """
profiles:
  - name: handover
    match: {labels: {kind: busy}}
    max_blackout: 300ms
    handover: allowed
    max_degraded: 120s
    deadline: 10m
    on_deadline: complete
  - name: plain
    max_blackout: 300ms
    deadline: 10m
    on_deadline: cancel
"""


def inventory(per_pair: int) -> str:
    """Host pairs s<k> -> d<k> on links of 200 MiB/s; on each source host, idle
    instances (they converge) and busy ones (they are handed over)."""
    lines = ["hosts:"]
    for k in range(PAIRS):
        lines += [f"  - {{name: s{k}, memory: 4TiB}}", f"  - {{name: d{k}, memory: 4TiB}}"]
    lines.append("links:")
    lines += [f"  - {{between: [s{k}, d{k}], bandwidth: 200MiB/s}}" for k in range(PAIRS)]
    lines += ["default_bandwidth: 200MiB/s", "instances:"]
    for k in range(PAIRS):
        for i in range(per_pair):
            kind = "busy" if i % 2 else "idle"
            rate = "400MiB/s" if kind == "busy" else "2MiB/s"
            lines.append(
                f"  - {{name: vm-{k}-{i}, host: s{k}, memory: 2GiB, working_set: 1GiB, "
                f"change_rate: {rate}, labels: {{kind: {kind}}}}}"
            )
    return "\n".join(lines) + "\n"


@dataclass
class Daemon:
    """One `lmwatch serve` of the cluster, reached over HTTP."""

    root: Path
    member: str
    store_url: str
    lease: float
    poll: float
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    runs: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        self.runs += 1
        self.port = free_port()
        config = {
            "driver": "sim",
            "inventory_path": str(self.root / "inventory.yaml"),
            "profiles_path": str(self.root / "profiles.yaml"),
            "store_url": self.store_url,
            "member": self.member,
            "lease": self.lease,
            "token": TOKEN,
            "port": self.port,
            "poll_interval": self.poll,
            "log_level": "WARNING",
        }
        path = self.root / f"{self.member}.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        log = (self.root / f"{self.member}-{self.runs}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmwatch.cli", "serve", "--config", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
        )
        log.close()
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon {self.member} exited: see {log.name}")
            with contextlib.suppress(OSError, ValueError):
                if call(self.base, "GET", "/readyz")[0] == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"daemon {self.member} not ready within {timeout}s: see {log.name}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def call(base: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {TOKEN}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


@contextlib.contextmanager
def cluster(
    root: Path, store_url: str, count: int, lease: float, poll: float
) -> Iterator[list[Daemon]]:
    daemons = [Daemon(root, f"m{n + 1}", store_url, lease, poll) for n in range(count)]
    try:
        for daemon in daemons:
            daemon.start()
        yield daemons
    finally:
        for daemon in daemons:
            daemon.stop()


def lease_holder(store_url: str, migration_id: str) -> str | None:
    """The member holding the migration's lease while its lease runs, by the database."""
    import psycopg

    with psycopg.connect(store_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT m.name FROM cluster_leases l JOIN cluster_members m ON m.id = l.owner "
            "WHERE l.kind = 'migration' AND l.key = %s AND m.expires_at > now()",
            (migration_id,),
        ).fetchone()
    return None if row is None else str(row[0])


# -- throughput ---------------------------------------------------------------------


def throughput(daemons: Sequence[Daemon], requests: list[dict[str, Any]]) -> tuple[int, float]:
    """Submit `requests` through the daemons (8 clients, round robin); (accepted, per s)."""
    pending = list(enumerate(requests))
    lock = threading.Lock()
    accepted = [0]

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                n, body = pending.pop()
            status, _ = call(daemons[n % len(daemons)].base, "POST", "/v1/migrations", body)
            if status == 202:
                with lock:
                    accepted[0] += 1

    began = time.monotonic()
    clients = [threading.Thread(target=client) for _ in range(8)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    return accepted[0], accepted[0] / (time.monotonic() - began)


# -- takeover -----------------------------------------------------------------------


@dataclass
class Takeovers:
    seconds: list[float] = field(default_factory=list)
    not_taken: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)


def takeover_trials(
    daemons: list[Daemon], store_url: str, trials: int, per_pair: int, rng: random.Random
) -> Takeovers:
    result = Takeovers()
    instances = [(f"vm-{k}-{i}", k) for i in range(per_pair) for k in range(PAIRS)]
    for n in range(trials):
        instance, pair = instances[n % len(instances)]
        live = [d for d in daemons if d.proc is not None and d.proc.poll() is None]
        status, answer = call(
            rng.choice(live).base,
            "POST",
            "/v1/migrations",
            {"instance": instance, "source": f"s{pair}", "destination": f"d{pair}"},
        )
        if status != 202:
            raise RuntimeError(f"trial {n}: POST answered {status}: {answer}")
        migration_id = answer["id"]
        result.accepted.append(migration_id)
        holder = None
        give_up = time.monotonic() + 30
        while holder is None and time.monotonic() < give_up:
            holder = lease_holder(store_url, migration_id)
            time.sleep(0.05)
        if holder is None:
            raise RuntimeError(f"trial {n}: nobody took migration {migration_id} within 30s")
        time.sleep(rng.uniform(0.2, 3.0))  # somewhere in its supervision
        owner = next(d for d in daemons if d.member == holder)
        owner.kill()
        killed = time.monotonic()
        taken = None
        while time.monotonic() < killed + 120:
            now_holder = lease_holder(store_url, migration_id)
            if now_holder is not None and now_holder != holder:
                taken = time.monotonic() - killed
                break
            status, record = call(
                next(d for d in daemons if d is not owner).base,
                "GET",
                f"/v1/migrations/{migration_id}",
            )
            if status == 200 and record["state"] in FINISHED:
                break  # it ended before anyone needed to take it over
            time.sleep(0.02)
        if taken is None:
            result.not_taken.append(migration_id)
        else:
            result.seconds.append(taken)
        owner.start()
    return result


# -- exactly once -------------------------------------------------------------------


def duplicates(daemon: Daemon, accepted: Sequence[str], timeout: float) -> tuple[list[str], ...]:
    """Wait until every accepted migration ended; (unfinished, duplicated)."""
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        _, answer = call(daemon.base, "GET", "/v1/migrations")
        states = {m["id"]: m["state"] for m in answer["migrations"]}
        if all(states.get(mid) in FINISHED for mid in accepted):
            break
        time.sleep(1.0)
    unfinished, duplicated = [], []
    for mid in accepted:
        status, record = call(daemon.base, "GET", f"/v1/migrations/{mid}")
        if status != 200 or record["state"] not in FINISHED:
            unfinished.append(mid)
            continue
        timeline = record.get("timeline", [])
        ends = [e for e in timeline if e["kind"] == "state" and e["state"] in FINISHED]
        actions = [e["action"] for e in timeline if e["kind"] == "decision"]
        if len(ends) != 1 or any(actions.count(a) > 1 for a in ("pause", "handover", "cancel")):
            duplicated.append(f"{mid}: {len(ends)} ends, decisions {actions}")
    return unfinished, duplicated


def _quantiles(values: Sequence[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"median {ordered[len(ordered) // 2]:.2f}s, max {ordered[-1]:.2f}s"


def run(args: argparse.Namespace, new_database: Any) -> int:
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="lmwatch-cluster-"))
    (root / "profiles.yaml").write_text(PROFILES)
    per_pair = max(args.submit // PAIRS, args.trials // PAIRS + 1)
    (root / "inventory.yaml").write_text(inventory(per_pair))
    print(f"lease {args.lease}s, poll {args.poll}s, {PAIRS} source hosts, seed {args.seed}")
    print("daemons  accepted  accepted/s")
    for count in (1, 2, 3):
        url = new_database()
        requests = [
            {"instance": f"vm-{k}-{i}", "source": f"s{k}", "destination": f"d{k}"}
            for i in range(per_pair)
            for k in range(PAIRS)
        ][: args.submit]
        with cluster(root, url, count, args.lease, args.poll) as daemons:
            accepted, per_s = throughput(daemons, requests)
        print(f"{count:<8} {accepted:<9} {per_s:.0f}")
    url = new_database()
    with cluster(root, url, args.daemons, args.lease, args.poll) as daemons:
        result = takeover_trials(daemons, url, args.trials, per_pair, rng)
        unfinished, duplicated = duplicates(daemons[0], result.accepted, timeout=600)
    print(
        f"takeover after SIGKILL ({args.daemons} daemons, {len(result.seconds)} trials): "
        f"{_quantiles(result.seconds)}; ended before a takeover was needed: "
        f"{len(result.not_taken)}"
    )
    print(f"migrations accepted in the trials  {len(result.accepted)}")
    print(f"unfinished                         {len(unfinished)}")
    print(f"duplicated (ends or actions)       {len(duplicated)}")
    for problem in [*unfinished, *duplicated]:
        print(f"  {problem}")
    print(f"work directory: {root}")
    return 0 if not (unfinished or duplicated) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmwatch.bench.cluster_daemons", description=__doc__
    )
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--daemons", type=int, default=3, help="daemons in the takeover trials")
    parser.add_argument("--submit", type=int, default=300, help="migrations per throughput run")
    parser.add_argument("--lease", type=float, default=3.0, help="lease seconds")
    parser.add_argument("--poll", type=float, default=0.5, help="poll interval seconds")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--store-url",
        help="an empty PostgreSQL database's server (postgresql://user@host:port); "
        "default: a throwaway server started here",
    )
    args = parser.parse_args(argv)
    if args.store_url:
        import psycopg

        names = iter(range(1, 1000))

        def new_database() -> str:
            name = f"lmwatch_cluster_bench_{next(names)}"
            with psycopg.connect(args.store_url, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
                conn.execute(f'CREATE DATABASE "{name}"')
            return f"{args.store_url.rstrip('/')}/{name}"

        return run(args, new_database)
    ok, why = availability()
    if not ok:
        print(f"no PostgreSQL to run on: {why}", file=sys.stderr)
        return 2
    with running_cluster() as server:
        return run(args, server.database)


if __name__ == "__main__":
    sys.exit(main())
