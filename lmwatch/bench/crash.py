"""Crash trials: SIGKILL the daemon at random moments, restart it, and check that every
accepted migration was supervised to its true end exactly once.

    python -m lmwatch.bench.crash --kills 200 --seed 1

One store and one simulated world (kept in the store) live through every kill. The
harness submits migrations through the HTTP API, kills the daemon (SIGKILL) a random
0.2-2.5 s after it is ready, notes the state of every migration at that moment, and
starts it again; new migrations are submitted after each restart until every
instance has been asked to move. After the last kill the daemon runs until every
migration has ended, is stopped, and the store and the kept world are compared:

- lost: a migration the API accepted (202) that the store does not have, or that
  never ended;
- duplicated: a migration recorded as ended more than once, or with a pause or a
  handover applied more than once;
- wrong end: the store's end differs from what the simulated hypervisor did (its
  kept job), or an instance is not where its last completed migration put it;
- paused without a record: a job the simulated hypervisor has paused whose record
  does not say so.

Figures, not a timed test; see docs/crash.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmwatch.drivers.simphysics import Side
from lmwatch.model import Phase
from lmwatch.store import Store

FINISHED = ("completed", "cancelled", "failed")

PROFILES = """
profiles:
  - name: handover
    match: {labels: {kind: handover}}
    max_blackout: 300ms
    handover: allowed
    max_degraded: 60s
    deadline: 10m
    on_deadline: complete
  - name: pause
    match: {labels: {kind: pause}}
    max_blackout: 300ms
    may_pause: true
    max_pause: 20s
    deadline: 10m
    on_deadline: complete
  - name: plain
    max_blackout: 300ms
    deadline: 1m
    on_deadline: cancel
"""


def inventory(instances: int) -> str:
    """Two hosts; a third of the instances idle, a third busy with handover allowed,
    a third busy with pausing allowed (so that kills land in every phase)."""
    lines = [
        "hosts:",
        "  - {name: a, memory: 4096GiB}",
        "  - {name: b, memory: 4096GiB}",
        "links:",
        "  - {between: [a, b], bandwidth: 20Gbit/s}",
        "default_bandwidth: 20Gbit/s",
        "instances:",
    ]
    for i in range(instances):
        host = "a" if i % 2 == 0 else "b"
        kind = ("idle", "handover", "pause")[i % 3]
        rate = "10MiB/s" if kind == "idle" else "3GiB/s"
        lines.append(
            f"  - {{name: vm-{i}, host: {host}, memory: {2 + i % 4}GiB, "
            f"working_set: 1GiB, change_rate: {rate}, labels: {{kind: {kind}}}}}"
        )
    return "\n".join(lines) + "\n"


@dataclass
class Trials:
    root: Path
    rng: random.Random
    instances: int
    log: Callable[[str], None]
    accepted: dict[str, str] = field(default_factory=dict)  # id -> instance
    states_at_kill: Counter[str] = field(default_factory=Counter)
    kills: int = 0
    restarts_seconds: list[float] = field(default_factory=list)
    _daemon: subprocess.Popen[bytes] | None = None
    _base: str = ""
    _token: str = ""
    _runs: int = 0

    # -- the daemon ---------------------------------------------------------------

    def start(self) -> None:
        self._runs += 1
        log_path = self.root / f"daemon-{self._runs}.log"
        started = time.monotonic()
        with log_path.open("w") as output:
            self._daemon = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "lmwatch.cli",
                    "serve",
                    "--port",
                    "0",
                    "--store",
                    str(self.root / "lmwatch.db"),
                    "--profiles",
                    str(self.root / "profiles.yaml"),
                    "--inventory",
                    str(self.root / "inventory.yaml"),
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, "LMWATCH_POLL_INTERVAL": "0.5"},
            )
        give_up = time.monotonic() + 60
        while time.monotonic() < give_up:
            found = re.search(r"listening addresses=([\d.]+):(\d+)", log_path.read_text())
            if found:
                self._base = f"http://{found.group(1)}:{found.group(2)}"
                break
            if self._daemon.poll() is not None:
                raise RuntimeError(f"the daemon exited: see {log_path}")
            time.sleep(0.05)
        else:
            raise RuntimeError(f"the daemon did not listen within 60s: see {log_path}")
        self.restarts_seconds.append(time.monotonic() - started)
        self._token = (self.root / "lmwatch.token").read_text().strip()

    def kill(self) -> None:
        assert self._daemon is not None
        try:
            for item in self._get("/v1/migrations")["migrations"]:
                if item["id"] in self.accepted and item["state"] not in FINISHED:
                    self.states_at_kill[item["state"]] += 1
        except (OSError, ValueError, KeyError):
            pass  # the listing is for the figures only
        self._daemon.send_signal(signal.SIGKILL)
        self._daemon.wait(timeout=30)
        self.kills += 1

    def stop(self) -> None:
        assert self._daemon is not None
        self._daemon.send_signal(signal.SIGTERM)
        self._daemon.wait(timeout=60)

    # -- the API --------------------------------------------------------------------

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self._base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        request.add_header("Authorization", f"Bearer {self._token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def _get(self, path: str) -> Any:
        return self._call("GET", path)

    def submit_some(self, count: int, pending: list[tuple[str, str, str]]) -> None:
        for _ in range(min(count, len(pending))):
            instance, source, destination = pending.pop()
            body = {"instance": instance, "source": source, "destination": destination}
            try:
                answer = self._call("POST", "/v1/migrations", body)
            except urllib.error.HTTPError as error:
                self.log(f"refused {instance}: {error.code} {error.read()[:200]!r}")
                continue
            self.accepted[answer["id"]] = instance

    def all_ended(self) -> bool:
        items = {m["id"]: m["state"] for m in self._get("/v1/migrations")["migrations"]}
        return all(items.get(mid) in FINISHED for mid in self.accepted)


@dataclass(frozen=True, slots=True)
class Verdict:
    accepted: int
    lost: list[str]
    duplicated: list[str]
    wrong_end: list[str]
    misplaced: list[str]
    paused_unrecorded: list[str]

    @property
    def ok(self) -> bool:
        return (
            not (self.lost or self.duplicated or self.wrong_end or self.misplaced)
            and not self.paused_unrecorded
        )


def check(root: Path, accepted: dict[str, str], homes: dict[str, str]) -> Verdict:
    """Compare the store with the kept world (the daemon is stopped)."""
    store = Store.open(root / "lmwatch.db")
    db = sqlite3.connect(root / "lmwatch.db")
    try:
        (world_blob,) = db.execute("SELECT state FROM sim_world WHERE id = 1").fetchone()
        world = pickle.loads(world_blob)
        jobs = {
            job_id: pickle.loads(blob)
            for job_id, blob in db.execute("SELECT id, state FROM sim_jobs")
        }
        lost, duplicated, wrong, paused = [], [], [], []
        last_move: dict[str, tuple[float, str]] = {}
        for mid, instance in accepted.items():
            record = store.get(mid)
            if record is None or not record.state.finished:
                lost.append(mid)
                continue
            events = store.events(mid)
            ends = [e for e in events if e.kind == "state" and e.state in FINISHED]
            pauses = [e for e in events if e.kind == "decision" and e.action == "pause"]
            handovers = [e for e in events if e.kind == "decision" and e.action == "handover"]
            if len(ends) != 1 or len(pauses) > 1 or len(handovers) > 1:
                duplicated.append(mid)
            job = jobs.get(mid)
            if job is not None:
                truth = {
                    Phase.COMPLETED: "completed",
                    Phase.CANCELLED: "cancelled",
                    Phase.FAILED: "failed",
                }.get(job.model.phase, "running")
                if truth != record.state.value:
                    wrong.append(f"{mid}: store {record.state.value}, hypervisor {truth}")
                if job.model.paused and not record.paused:
                    paused.append(mid)
                if truth == "completed" and job.model.running_on is Side.DESTINATION:
                    moved_at = record.finished_at or 0.0
                    if moved_at >= last_move.get(instance, (-1.0, ""))[0]:
                        last_move[instance] = (moved_at, record.destination)
            elif record.started_at is not None:  # only one never started has no job
                wrong.append(f"{mid}: {record.state.value}, unknown to the hypervisor")
        misplaced = []
        for instance, home in homes.items():
            expected = last_move.get(instance, (0.0, home))[1]
            actual = world["where"].get(instance)
            if actual != expected:
                misplaced.append(f"{instance}: on {actual}, expected {expected}")
        return Verdict(len(accepted), lost, duplicated, wrong, misplaced, paused)
    finally:
        db.close()
        store.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmwatch.bench.crash", description=__doc__)
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--instances", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="lmwatch-crash-"))
    (root / "profiles.yaml").write_text(PROFILES)
    (root / "inventory.yaml").write_text(inventory(args.instances))
    homes = {f"vm-{i}": ("a" if i % 2 == 0 else "b") for i in range(args.instances)}
    pending = [(name, home, "b" if home == "a" else "a") for name, home in homes.items()]
    rng.shuffle(pending)
    per_restart = max(1, -(-len(pending) // max(1, args.kills)))

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    trials = Trials(root, rng, args.instances, say)
    began = time.monotonic()
    for n in range(args.kills):
        trials.start()
        trials.submit_some(per_restart + (1 if rng.random() < 0.5 else 0), pending)
        time.sleep(rng.uniform(0.2, 2.5))
        trials.kill()
        if (n + 1) % 20 == 0:
            say(f"{n + 1} kills, {len(trials.accepted)} migrations accepted")
    trials.start()
    trials.submit_some(len(pending), pending)
    give_up = time.monotonic() + 900
    while time.monotonic() < give_up and not trials.all_ended():
        time.sleep(1.0)
    trials.stop()
    verdict = check(root, trials.accepted, homes)
    elapsed = time.monotonic() - began
    restarts = sorted(trials.restarts_seconds)
    print(f"crash trials: {trials.kills} SIGKILLs, seed {args.seed}, {elapsed:.0f}s")
    print(
        "unfinished migrations at the kills, by state: "
        + ", ".join(f"{state} {count}" for state, count in trials.states_at_kill.most_common())
    )
    n = verdict.accepted
    print(f"accepted migrations            {n}")
    print(f"supervised to their true end   {n - len(verdict.lost) - len(verdict.wrong_end)}/{n}")
    print(f"lost                           {len(verdict.lost)}")
    print(f"duplicated                     {len(verdict.duplicated)}")
    print(f"wrong end                      {len(verdict.wrong_end)}")
    print(f"instances misplaced            {len(verdict.misplaced)}/{len(homes)}")
    print(f"paused without a record        {len(verdict.paused_unrecorded)}")
    print(
        f"daemon start to listening      median {restarts[len(restarts) // 2]:.2f}s, "
        f"max {restarts[-1]:.2f}s"
    )
    for problem in [*verdict.lost, *verdict.duplicated, *verdict.wrong_end, *verdict.misplaced]:
        print(f"  {problem}")
    if args.keep:
        print(f"kept {root}")
    else:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
