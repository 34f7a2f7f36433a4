"""`python -m lmwatch.bench.scale`: the daemon under many concurrent migrations.

For each count N it writes a simulator inventory with N instances (`PER_LINK`
migrations per source/destination pair, links fast enough that each migration
copies for a few minutes), starts the real daemon (`lmwatch serve`, simulator in
wall-clock time, default poll interval) as a subprocess on a fresh store,
submits N migrations through the HTTP API and then, while they run, measures:

- poll lag p50/p99 of the supervisor (from the daemon's own
  `lmwatch_supervisor_poll_lag_seconds` histogram, difference between the start
  and end of the window; quantiles are the upper bound of the bucket they fall
  in, so "<= 0.1" means below 100 ms);
- samples per migration per second (decisions counted over the window / running);
- the daemon's CPU share (its CPU time / wall time over the window) and RSS;
- latency p50/p99 of `GET /v1/migrations/{id}` and of a page of the list
  (`GET /v1/migrations?limit=100`);
- POST throughput during submission;
- with `--restart`, after the window: the daemon is killed (SIGKILL) and started
  again on the same store, and the time from that start to every migration that was
  unfinished being back under supervision (each has been sampled by the new daemon:
  its `lmwatch_migration_remaining_bytes` series is back, or it has finished), with
  the time to the first answer of `/healthz` beside it.

The figures are measured on the machine it runs on and printed as a table;
nothing is asserted. See docs/scale.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

PER_LINK = 10  # default migrations sharing one source/destination pair (--per-link)
INSTANCE_MEMORY_GIB = 8
PER_JOB_MIB_S = 48  # bandwidth each migration gets: a full pass of 8 GiB in ~170 s
TOKEN = "scale-bench-token"
PAGE = 100
_CLK = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    count: int
    submitted: int
    post_per_s: float
    running: int
    lag_p50: float | None
    lag_p99: float | None
    samples_per_s: float | None
    cpu: float
    rss_mib: float
    get_p50: float | None
    get_p99: float | None
    list_p50: float | None
    list_p99: float | None
    note: str = ""
    restart_unfinished: int | None = None  # unfinished when killed
    restart_up_s: float | None = None  # start to the first answer of /healthz
    restart_s: float | None = None  # start to all of them supervised again (None: not in time)


# `--busy`: instances whose passes end every few seconds well above what fits a final
# stop (a random writer of 120 MiB/s over 256 MiB, a first pass of ~20 s), with a real
# host's noise (`jitter`): every sample after the first pass asks for the dirtying
# model,
BUSY_INSTANCE = (
    "memory: 1GiB, working_set: 256MiB, change_rate: 120MiB/s, writer: random, jitter: 0.05"
)


# ... under a profile that only waits (no slow-down, pause or handover; an hour's
# deadline), so that they stay under supervision through the window.
BUSY_PROFILES = """\
version: 1
profiles:
  - name: waiting
    description: Waits for copying to finish; never slowed, paused or handed over.
    match: {}
    max_blackout: 300ms
    may_slow_down: false
    handover: forbidden
    may_pause: false
    deadline: 1h
    on_deadline: cancel
"""


def inventory_yaml(count: int, per_link: int = PER_LINK, busy: bool = False) -> str:
    """Hosts in pairs, `per_link` instances per pair, one link per pair."""
    pairs = max(1, -(-count // per_link))
    lines = ["hosts:"]
    for p in range(pairs):
        for side in ("s", "d"):
            lines.append(f"  - {{name: {side}{p}, memory: 4TiB}}")
    lines.append("links:")
    for p in range(pairs):
        lines.append(f"  - {{between: [s{p}, d{p}], bandwidth: {per_link * PER_JOB_MIB_S}MiB/s}}")
    lines.append("default_bandwidth: 100MiB/s")
    lines.append("instances:")
    quiet = f"memory: {INSTANCE_MEMORY_GIB}GiB, working_set: 256MiB, change_rate: 4MiB/s"
    for i in range(count):
        p = i // per_link
        lines.append(f"  - {{name: vm{i}, host: s{p}, {BUSY_INSTANCE if busy else quiet}}}")
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


_BUCKET = re.compile(r'^lmwatch_supervisor_poll_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$', re.M)
_DECISIONS = re.compile(r"^lmwatch_decisions_total\{[^}]*\} (\S+)$", re.M)


def _histogram(text: str) -> list[tuple[float, float]]:
    return [(float(le), float(n)) for le, n in _BUCKET.findall(text)]


def _bucket_quantile(
    before: list[tuple[float, float]], after: list[tuple[float, float]], q: float
) -> float | None:
    counts = [(le, n - dict(before).get(le, 0.0)) for le, n in after]
    total = counts[-1][1] if counts else 0.0
    if total <= 0:
        return None
    for le, n in counts:
        if n >= q * total:
            return le
    return counts[-1][0]


async def _timed(session: aiohttp.ClientSession, url: str) -> float:
    began = time.perf_counter()
    async with session.get(url) as response:
        await response.read()
        response.raise_for_status()
    return time.perf_counter() - began


def _unfinished(store: Path) -> set[str]:
    """The migrations the store holds as unfinished (read as the daemon would)."""
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as connection:
        rows = connection.execute(
            "SELECT id FROM migrations WHERE state NOT IN ('completed', 'failed', 'cancelled')"
        )
        return {row[0] for row in rows}


_REMAINING = re.compile(r'^lmwatch_migration_remaining_bytes\{[^}]*migration="([^"]+)"', re.M)


async def _restart(
    env: dict[str, str], store: Path, workdir: Path, count: int, limit: float
) -> tuple[subprocess.Popen[bytes], int, float | None, float | None]:
    """Start the daemon on the killed one's store; the time to /healthz and to every
    unfinished migration being supervised again (sampled, or finished)."""
    unfinished = _unfinished(store)
    port = _free_port()
    env = {**env, "LMWATCH_PORT": str(port)}
    log = (workdir / f"daemon-{count}-restart.log").open("w")
    began = time.perf_counter()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "lmwatch.cli", "serve"], env=env, stdout=log, stderr=log
    )
    log.close()
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    up: float | None = None
    back: float | None = None
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        while time.perf_counter() - began < limit and back is None:
            try:
                if up is None:
                    async with session.get(f"{base}/healthz") as response:
                        if response.status == 200:
                            up = time.perf_counter() - began
                else:
                    async with session.get(f"{base}/metrics") as response:
                        text = await response.text()
                    missing = unfinished - set(_REMAINING.findall(text))
                    if missing and len(missing) < 50:
                        missing &= _unfinished(store)  # those that finished meanwhile count
                    if not missing:
                        back = time.perf_counter() - began
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    return daemon, len(unfinished), up, back


async def _measure(
    count: int,
    duration: float,
    workdir: Path,
    submit_timeout: float,
    per_link: int,
    restart: bool = False,
    busy: bool = False,
) -> Result:
    inventory = workdir / f"inventory-{count}.yaml"
    inventory.write_text(inventory_yaml(count, per_link, busy))
    profiles = workdir / "profiles-busy.yaml"
    if busy:
        profiles.write_text(BUSY_PROFILES)
    store = workdir / f"store-{count}.db"
    port = _free_port()
    env = {
        **os.environ,
        "LMWATCH_TOKEN": TOKEN,
        "LMWATCH_STORE_PATH": str(store),
        "LMWATCH_INVENTORY_PATH": str(inventory),
        "LMWATCH_PORT": str(port),
        "LMWATCH_MAX_PER_SOURCE": str(per_link),
        "LMWATCH_MAX_PER_DESTINATION": str(per_link),
        "LMWATCH_LOG_LEVEL": "WARNING",
        "LMWATCH_HTTP_MAX_CONNECTIONS": "1000",
    }
    if busy:
        env["LMWATCH_PROFILES_PATH"] = str(profiles)
    log = (workdir / f"daemon-{count}.log").open("w")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "lmwatch.cli", "serve"], env=env, stdout=log, stderr=log
    )
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    timeout = aiohttp.ClientTimeout(total=120)
    try:
        async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
            for _ in range(200):
                try:
                    async with session.get(f"{base}/healthz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("the daemon did not come up")
            ids: list[str] = []
            began = time.perf_counter()
            queue = list(range(count))

            async def submitter() -> None:
                while queue and time.perf_counter() - began < submit_timeout:
                    i = queue.pop(0)
                    body = {"instance": f"vm{i}", "source": f"s{i // per_link}"}
                    body["destination"] = f"d{i // per_link}"
                    async with session.post(f"{base}/v1/migrations", json=body) as response:
                        answer = await response.json()
                        if response.status != 202:
                            raise RuntimeError(f"POST refused: {response.status} {answer}")
                        ids.append(answer["id"])

            await asyncio.gather(*(submitter() for _ in range(8)))
            submit_time = time.perf_counter() - began
            note = ""
            if len(ids) < count:
                note = f"only {len(ids)} submitted in {submit_timeout:.0f}s"
            await asyncio.sleep(5)  # let the queue start and the first polls settle
            async with session.get(f"{base}/metrics") as response:
                first = await response.text()
            cpu0, wall0 = _cpu_seconds(daemon.pid), time.perf_counter()
            gets: list[float] = []
            pages: list[float] = []
            rng = random.Random(count)
            while time.perf_counter() - wall0 < duration:
                gets.append(await _timed(session, f"{base}/v1/migrations/{rng.choice(ids)}"))
                pages.append(await _timed(session, f"{base}/v1/migrations?limit={PAGE}"))
                await asyncio.sleep(0.2)
            wall = time.perf_counter() - wall0
            cpu = (_cpu_seconds(daemon.pid) - cpu0) / wall
            rss = _rss_mib(daemon.pid)
            async with session.get(f"{base}/metrics") as response:
                last = await response.text()
            running_match = re.search(r"^lmwatch_migrations_active (\S+)$", last, re.M)
            running = int(float(running_match.group(1))) if running_match else 0
            decisions = sum(float(v) for v in _DECISIONS.findall(last)) - sum(
                float(v) for v in _DECISIONS.findall(first)
            )
            h0, h1 = _histogram(first), _histogram(last)
            result = Result(
                count=count,
                submitted=len(ids),
                post_per_s=len(ids) / submit_time if submit_time > 0 else float("nan"),
                running=running,
                lag_p50=_bucket_quantile(h0, h1, 0.5),
                lag_p99=_bucket_quantile(h0, h1, 0.99),
                samples_per_s=decisions / wall / running if running else None,
                cpu=cpu,
                rss_mib=rss,
                get_p50=_quantile(gets, 0.5),
                get_p99=_quantile(gets, 0.99),
                list_p50=_quantile(pages, 0.5),
                list_p99=_quantile(pages, 0.99),
                note=note + ("" if len(gets) >= 20 else f" only {len(gets)} GETs"),
            )
        if restart:
            daemon.send_signal(signal.SIGKILL)
            daemon.wait()
            daemon, unfinished, up, back = await _restart(env, store, workdir, count, 120.0)
            result.restart_unfinished = unfinished
            result.restart_up_s = up
            result.restart_s = back
        return result
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _lag(value: float | None) -> str:
    if value is None:
        return "-"
    return "> 5000" if value == float("inf") else f"<= {value * 1000:.0f}"


def restart_table(results: list[Result]) -> str:
    rows = [
        "| migrations | unfinished when killed | start to /healthz s | start to all supervised s |",
        "|---|---|---|---|",
    ]
    for r in results:
        up = "-" if r.restart_up_s is None else f"{r.restart_up_s:.1f}"
        back = "not within 120 s" if r.restart_s is None else f"{r.restart_s:.1f}"
        rows.append(f"| {r.count} | {r.restart_unfinished} | {up} | {back} |")
    return "\n".join(rows)


def table(results: list[Result]) -> str:
    head = (
        "| migrations | POST/s | running | poll lag p50 ms | poll lag p99 ms | samples/s each "
        "| CPU (cores) | RSS MiB | GET one p50/p99 ms | GET page p50/p99 ms | note |"
    )
    rows = [head, "|" + "---|" * 11]
    for r in results:
        rows.append(
            f"| {r.count} | {r.post_per_s:.0f} | {r.running} | {_lag(r.lag_p50)} | "
            f"{_lag(r.lag_p99)} | "
            f"{'-' if r.samples_per_s is None else f'{r.samples_per_s:.2f}'} | "
            f"{r.cpu:.2f} | {r.rss_mib:.0f} | {_ms(r.get_p50)} / {_ms(r.get_p99)} | "
            f"{_ms(r.list_p50)} / {_ms(r.list_p99)} | {r.note.strip()} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmwatch.bench.scale", description=__doc__)
    parser.add_argument("--counts", default="100,500,1000,2000", help="comma-separated N")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds measured per N")
    parser.add_argument(
        "--submit-timeout", type=float, default=300.0, help="give up submitting after this"
    )
    parser.add_argument(
        "--per-link",
        type=int,
        default=PER_LINK,
        help="migrations per source/destination pair (and the per-host limits)",
    )
    parser.add_argument(
        "--busy",
        action="store_true",
        help="instances whose passes never converge on their own, with a real host's noise "
        "in their working sets and transfer-rate readings (every decision fits a model)",
    )
    parser.add_argument("--workdir", default=None, help="keep stores and logs here")
    parser.add_argument(
        "--restart",
        action="store_true",
        help="after the window, SIGKILL the daemon and time its restart on the same store",
    )
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="lmwatch-scale-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for count in counts:
            result = asyncio.run(
                _measure(
                    count,
                    args.duration,
                    workdir,
                    args.submit_timeout,
                    args.per_link,
                    restart=args.restart,
                    busy=args.busy,
                )
            )
            results.append(result)
            print(table([result]).splitlines()[-1], flush=True)
    print()
    print(table(results))
    if args.restart:
        print()
        print(restart_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
