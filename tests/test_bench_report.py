"""The benchmark report: aggregation, the gate, and the files it writes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from lmwatch.bench.corpus import GBIT, GIB, Workload
from lmwatch.bench.report import (
    BOUND,
    HEADERS,
    gate,
    quantile,
    summarize,
    table_rows,
    violation_kind,
    write_report,
)
from lmwatch.bench.runner import Run
from lmwatch.drivers.inventory import ConstantRate
from lmwatch.profiles.schema import Profile

PROFILE = Profile.model_validate(
    {"name": "p", "max_blackout": "300ms", "deadline": "20m", "on_deadline": "cancel"}
)
WORKLOADS = [
    Workload(
        name=f"w{i}",
        memory=4 * GIB,
        working_set=GIB,
        writer="random",
        change_rate=ConstantRate(rate=0.0),
        bandwidth=10 * GBIT,
        switchover=0.03,
    )
    for i in range(4)
]
BASE = Run(
    workload="w0",
    profile="p",
    controller="x",
    outcome="completed",
    total_seconds=10.0,
    blackout_seconds=0.2,
    paused=False,
    pause_seconds=None,
    handed_over=False,
    degraded_seconds=None,
    max_slowdown=0.0,
)


def runs() -> list[Run]:
    out = []
    for index, workload in enumerate(WORKLOADS):
        bound = replace(BASE, workload=workload.name, controller=BOUND, total_seconds=10.0)
        out.append(bound)
        mine = replace(
            bound,
            controller="lmwatch",
            total_seconds=10.0 + 10 * index,
            eta_at=5.0,
            eta_predicted=4.0,
            eta_actual=5.0 + 10 * index,
        )
        out.append(mine)
        other = replace(bound, controller="other")
        if index == 1:
            other = replace(other, blackout_seconds=0.5)  # a violation
        elif index == 2:
            other = replace(other, outcome="cancelled", blackout_seconds=None)
        elif index == 3:
            other = replace(other, outcome="unfinished", blackout_seconds=None)
        out.append(other)
    return out


def test_quantile_interpolates() -> None:
    assert quantile([], 0.5) is None
    assert quantile([3.0], 0.9) == 3.0
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert quantile([float(i) for i in range(11)], 0.9) == pytest.approx(9.0)


def test_violation_kinds_drop_the_numbers() -> None:
    assert violation_kind("blackout 0.31s over 300ms") == "blackout over limit"
    assert violation_kind("did not finish") == "did not finish"


def test_summary_per_profile_and_controller() -> None:
    summary = summarize(runs(), WORKLOADS, [PROFILE])
    assert summary.controllers == [BOUND, "lmwatch", "other"]
    lm = summary.row("p", "lmwatch")
    other = summary.row("p", "other")
    bound = summary.row("p", BOUND)
    assert lm is not None and other is not None and bound is not None
    assert (lm.clean, lm.violations, lm.cancelled) == (100.0, 0, 0.0)
    assert lm.time_ratios == (1.0, 2.0, 3.0, 4.0)
    assert lm.eta_ratios == (1.25, 3.75, 6.25, 8.75)
    assert (other.clean, other.violations, other.cancelled, other.unfinished) == (25.0, 2, 25.0, 1)
    assert other.time_ratios == (1.0,)  # only where both were clean
    assert other.violation_kinds == {"blackout over limit": 1, "did not finish": 1}
    assert other.outcome_shares == {
        "clean": 25.0,
        "violation": 50.0,
        "cancelled": 25.0,
        "failed": 0.0,
    }
    assert bound.time_ratios == (1.0, 1.0, 1.0, 1.0)
    rows = table_rows(summary)
    assert all(len(row) == len(HEADERS) for row in rows)
    assert rows[1][:7] == ["p", "lmwatch", "4", "100.0%", "0", "0.0%", "0.0%"]
    assert rows[1][7:9] == ["2.50", "3.70"]
    assert rows[2][-2:] == ["-", "-"]  # no predictions from "other"


def test_gate() -> None:
    summary = summarize(runs(), WORKLOADS, [PROFILE])
    assert gate(summary, "lmwatch") == []
    reasons = gate(summary, "other")
    assert reasons[0].startswith("p: 2 runs with violations (blackout over limit ×1")
    assert "below the hindsight bound's 100.0%" in reasons[1]
    assert gate(summary, "nobody") == ["p: no runs of nobody"]
    # Without a bound, only violations count.
    alone = summarize([r for r in runs() if r.controller != BOUND], WORKLOADS, [PROFILE])
    assert gate(alone, "lmwatch") == []
    assert alone.row("p", "lmwatch") is not None


def test_files_are_written(tmp_path: Path) -> None:
    summary = summarize(runs(), WORKLOADS, [PROFILE])
    results, figure = write_report(tmp_path / "out", summary, {"seed": 1, "title": "t"})
    data = json.loads(results.read_text())
    assert data["meta"] == {"seed": 1, "title": "t"}
    assert len(data["runs"]) == 12
    assert data["runs"][1]["eta_ratio"] == 1.25 and data["runs"][1]["clean"] is True
    assert data["runs"][5]["violations"] == ["blackout 0.50s over 300ms"]
    lm = next(s for s in data["summary"] if s["controller"] == "lmwatch")
    assert lm["time_to_bound_median"] == 2.5 and lm["clean_percent"] == 100.0
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Without a bound the figure still draws.
    alone = summarize([r for r in runs() if r.controller != BOUND], WORKLOADS, [PROFILE])
    _, empty = write_report(tmp_path / "alone", alone)
    assert empty.stat().st_size > 1000
