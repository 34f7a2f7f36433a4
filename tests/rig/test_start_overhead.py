"""What supervising costs: round trips through lmwatch against the same done with libvirt.

An idle guest goes a -> b -> a eight times through lmwatch (POST /v1/migrations, wait
until the API says completed, then back) and eight times directly with libvirt, the
two kinds alternating (and which goes first alternating too). The direct migrations
use what the daemon's libvirt driver uses: the flags the daemon logged when it started
its first migration (`migration-started ... flags=`), the parameters
`libvirt_mapping.migrate_call` builds from the same plan, and the blackout budget of
its start decision set with migrateSetMaxDowntime. The profile is whatever the
daemon's default selection gives (the shipped profiles; the guest has no labels).

The daemon runs without a bandwidth cap here (the other rig tests cap the link at
16 MiB/s): the guest's memory then moves in well under a second, so the figure shows
what lmwatch adds, and the test stays short.

This is a benchmark printout, not a timed assertion: it asserts only that every
migration completed and the guest is intact, and prints

    start overhead: lmwatch X.XXs vs direct Y.YYs per round trip, ratio Z.ZZ; per migration W.WW

(the last: the ratio of the medians of the sixteen one-way migrations of each kind).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmwatch.drivers.libvirt_mapping import migrate_call
from lmwatch.model import StartPlan
from lmwatch.profiles import default_profiles_text
from lmwatch.units import parse_duration

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "rig"))
import rigctl

pytestmark = pytest.mark.rig

Daemon = Any  # tests/rig/conftest.py: Daemon (the real daemon, over HTTP)
JsonDict = dict[str, Any]
FINISHED = ("completed", "cancelled", "failed")

GUEST = "so-idle"
PAIRS = 8  # the stop -> done part comes in 200 ms steps, in streaks: more pairs steady it
POLL = 0.05  # seconds between GETs while waiting for lmwatch to say completed
MIGRATION_ADDRESS = "tcp://127.0.0.1"


@pytest.fixture(scope="module")
def daemon(daemon_factory: Any) -> Daemon:
    """The daemon with the shipped profiles, restarted without the link cap."""
    d: Daemon = daemon_factory(default_profiles_text())
    d.stop()
    config = json.loads(d.config_path.read_text())
    for host in config["hosts"].values():
        host.pop("bandwidth", None)
    d.config_path.write_text(json.dumps(config, indent=2))
    d.start()
    return d


@pytest.fixture(scope="module", autouse=True)
def guest() -> Iterator[None]:
    rigctl.define_guest("a", GUEST)
    yield
    rigctl.destroy_everywhere(GUEST)


def _at(entry: JsonDict) -> float:
    return dt.datetime.fromisoformat(entry["at"].replace("Z", "+00:00")).timestamp()


def through_lmwatch(d: Daemon, src: str, dst: str) -> tuple[float, JsonDict]:
    """POST the migration and wait (polling every 50 ms) until it is completed."""
    t0 = time.monotonic()
    mid = d.submit(GUEST, src, dst)["id"]
    while True:
        m: JsonDict = d.get(mid)
        if m["state"] in FINISHED:
            break
        if time.monotonic() - t0 > 120:
            raise AssertionError(f"lmwatch migration {src}->{dst} still {m['state']} after 120s")
        time.sleep(POLL)
    took = time.monotonic() - t0
    assert m["state"] == "completed", m
    return took, m


def start_plan_of(d: Daemon, m: JsonDict) -> tuple[int, StartPlan]:
    """The flags the daemon's driver used and the plan of its start decision."""
    found = re.search(rf"migration-started migration={m['id']} .*?flags=(\d+)", d.log())
    assert found, f"no migration-started line for {m['id']} in the daemon log"
    flags = int(found.group(1))
    start = next(e for e in m["timeline"] if e["kind"] == "decision" and e["action"] == "start")
    budget = re.search(
        r"starts with a (\S+) blackout budget"
        r"(?: during the first pass and a (\S+) blackout budget after it)?",
        start["reason"],
    )
    assert budget, start["reason"]
    first, after = budget.groups()
    slow = re.search(r"slow-down armed at (\d+)%", start["reason"])
    lv = rigctl.libvirt
    plan = StartPlan(
        arm_handover=bool(flags & lv.VIR_MIGRATE_POSTCOPY),
        arm_slow_down=bool(flags & lv.VIR_MIGRATE_AUTO_CONVERGE),
        blackout_budget=parse_duration(after or first),
        first_pass_budget=None if after is None else parse_duration(first),
    )
    if slow:
        plan = dataclasses.replace(plan, slow_down_initial=int(slow.group(1)) / 100)
    return flags, plan


def direct(src: str, dst: str, plan: StartPlan, flags: int) -> tuple[float, float]:
    """One migration with libvirt as the driver would start it: (call seconds, job seconds)."""
    call = migrate_call(
        rigctl.libvirt,
        plan,
        instance=GUEST,
        migration_address=MIGRATION_ADDRESS,
        link_bandwidth=None,
    )
    assert call.flags == flags, f"driver flags {flags} != rebuilt {call.flags}"
    m = rigctl.DirectMigration(
        GUEST, src, dst, flags=call.flags, params=call.params, max_downtime_ms=call.max_downtime_ms
    )
    try:
        took = m.run(120)
    finally:
        m.close()
    assert m.error is None, f"direct migration {src}->{dst} failed: {m.error}"
    assert rigctl.where_running(GUEST) == [dst], rigctl.domain_states(GUEST)
    job = float(m.completed.get("time_elapsed", 0)) / 1000
    return took, job


STOPPED = re.compile(r"^(\S+ \S+?)\+0000: shutting down, reason=migrated")


def source_stops(host: str) -> list[float]:
    """When the source's instance stopped at each migration away from `host` (libvirt
    writes it to the instance's log), as Unix times."""
    times = []
    for line in Path(rigctl.qemu_log(GUEST, host)).read_text(errors="replace").splitlines():
        found = STOPPED.match(line)
        if found:
            stamp = dt.datetime.fromisoformat(found.group(1)).replace(tzinfo=dt.UTC)
            times.append(stamp.timestamp())
    return times


def source_stop_lines(spans: list[tuple[str, str, float, float]]) -> list[str]:
    """Where each migration's time went around the source's stop (from the instance's
    log): start -> stop, and stop -> seen done (lmwatch: completed in the API; direct:
    the migrate call returned)."""
    stops = {host: source_stops(host) for host in {src for _, src, _, _ in spans}}
    split: dict[str, tuple[list[str], list[str]]] = {"lmwatch": ([], []), "direct": ([], [])}
    for kind, src, began, ended in spans:
        stop = next((t for t in stops[src] if began <= t <= ended), None)
        before, after = split[kind]
        before.append("-" if stop is None else f"{stop - began:.2f}")
        after.append("-" if stop is None else f"{ended - stop:.2f}")
    return [
        f"  {kind}: start -> source stopped {' '.join(before)}; stopped -> done {' '.join(after)}"
        for kind, (before, after) in split.items()
    ]


@pytest.mark.scenario("start overhead")
def test_start_overhead_against_direct_libvirt(daemon: Daemon, summary: Any) -> None:
    rigctl.libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    rigctl.wait_heartbeat(GUEST, 90, 2)
    assert rigctl.where_running(GUEST) == ["a"]

    lm_trips: list[float] = []
    direct_trips: list[float] = []
    lm_to_copying: list[float] = []  # POST accepted -> copying started, from the timeline
    lm_each: list[float] = []  # POST -> completed seen, per migration
    lm_copying: list[float] = []  # copying started -> completed, from the timeline
    spans: list[tuple[str, str, float, float]] = []  # (kind, source, wall start, wall end)
    lm_after_job: list[float] = []  # the outcome's total_seconds, per migration
    direct_each: list[float] = []  # the migrate call, per migration
    direct_jobs: list[float] = []  # the job's own time_elapsed, per migration
    flags_plan: tuple[int, StartPlan] | None = None
    profiles: set[str] = set()
    rows: list[str] = []

    def lmwatch_trip() -> float:
        nonlocal flags_plan
        t0 = time.monotonic()
        for src, dst in (("a", "b"), ("b", "a")):
            began = time.time()
            took, m = through_lmwatch(daemon, src, dst)
            spans.append(("lmwatch", src, began, time.time()))
            lm_each.append(took)
            profiles.add(m["profile"]["name"])
            if flags_plan is None:
                flags_plan = start_plan_of(daemon, m)
            states = {e["state"]: _at(e) for e in m["timeline"] if e["kind"] == "state"}
            lm_to_copying.append(states["copying"] - states["queued"])
            lm_copying.append(states["completed"] - states["copying"])
            lm_after_job.append(m["outcome"]["total_seconds"])
        return time.monotonic() - t0

    def direct_trip() -> float:
        assert flags_plan is not None
        t0 = time.monotonic()
        for src, dst in (("a", "b"), ("b", "a")):
            began = time.time()
            took, job = direct(src, dst, flags_plan[1], flags_plan[0])
            spans.append(("direct", src, began, time.time()))
            direct_each.append(took)
            direct_jobs.append(job)
        return time.monotonic() - t0

    for i in range(PAIRS):
        # lmwatch goes first in even pairs (and always in the first: it tells the flags)
        order = ("lmwatch", "direct") if i % 2 == 0 else ("direct", "lmwatch")
        for kind in order:
            if kind == "lmwatch":
                lm_trips.append(lmwatch_trip())
            else:
                direct_trips.append(direct_trip())
        rows.append(
            f"  pair {i + 1} ({order[0]} first): lmwatch {lm_trips[-1]:.2f}s, "
            f"direct {direct_trips[-1]:.2f}s"
        )

    hb = rigctl.wait_heartbeat(GUEST, 20, rigctl.last_heartbeat(GUEST)["n"] + 1, host="a")
    assert rigctl.where_running(GUEST) == ["a"] and hb["bad"] == 0, hb

    lm, dr = statistics.median(lm_trips), statistics.median(direct_trips)
    assert flags_plan is not None
    flags, plan = flags_plan
    budgets = f"{plan.starting_budget * 1000:.0f} ms"
    if plan.first_pass_budget is not None:  # the direct migrations keep it throughout
        budgets += f" ({plan.blackout_budget * 1000:.0f} ms after the first pass for lmwatch)"
    each = statistics.median(lm_each) / statistics.median(direct_each)
    headline = (
        f"start overhead: lmwatch {lm:.2f}s vs direct {dr:.2f}s per round trip, "
        f"ratio {lm / dr:.2f}; per migration {each:.2f}"
    )
    text = "\n".join(
        [
            f"start overhead ({PAIRS} alternating pairs of round trips a->b->a, idle 128 MiB "
            f"guest, no link cap, profile {', '.join(sorted(profiles))}, flags {flags}, "
            f"budget {budgets}, slow-down "
            f"{'armed' if plan.arm_slow_down else 'not armed'}):",
            *rows,
            f"  lmwatch per migration: POST -> completed median "
            f"{statistics.median(lm_each):.2f}s, of which POST -> copying started "
            f"{statistics.median(lm_to_copying):.2f}s (max {max(lm_to_copying):.2f}s: the "
            f"change rate measured before the first start); outcome total_seconds "
            f"{statistics.median(lm_after_job):.2f}s",
            f"  direct per migration: migrate call median {statistics.median(direct_each):.2f}s "
            f"(the job's own time_elapsed {statistics.median(direct_jobs):.2f}s; the call "
            "returns after libvirt's confirm phase)",
            "  each migration, in order: lmwatch POST -> completed "
            + " ".join(f"{t:.2f}" for t in lm_each)
            + "; of it copying -> completed "
            + " ".join(f"{t:.2f}" for t in lm_copying)
            + "; direct "
            + " ".join(f"{t:.2f}" for t in direct_each),
            *source_stop_lines(spans),
            headline,
        ]
    )
    summary.figures(text)
    summary.note("start overhead", headline)
    summary.note(
        "start overhead",
        f"POST -> copying started: median {statistics.median(lm_to_copying):.2f}s, "
        f"max {max(lm_to_copying):.2f}s",
    )
