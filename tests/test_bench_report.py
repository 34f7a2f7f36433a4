"""The benchmark report: aggregation, the gate, and the files it writes."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from neutral import HYPERVISOR_WORDS

from lmwatch import cli
from lmwatch.bench.controller import ControllerBase
from lmwatch.bench.corpus import GBIT, GIB, HARSH_LINKS, Workload, generate, load_corpus, with_links
from lmwatch.bench.report import (
    BOUND,
    HEADERS,
    Row,
    Summary,
    gate,
    quantile,
    summarize,
    table_rows,
    violation_kind,
    write_report,
)
from lmwatch.bench.runner import Run
from lmwatch.drivers.inventory import ConstantRate
from lmwatch.model import StartPlan
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


def test_degraded_running_is_read_over_completed_runs_with_none_where_not_handed_over() -> None:
    handed = [
        replace(BASE, workload=f"w{i}", handed_over=True, degraded_seconds=float(seconds))
        for i, seconds in enumerate((2, 4, 30))
    ]
    plain = replace(BASE, workload="w3")
    cancelled = replace(
        BASE, workload="w3", controller="y", outcome="cancelled", blackout_seconds=None
    )
    summary = summarize([*handed, plain, cancelled], WORKLOADS, [PROFILE])
    row = summary.row("p", "x")
    assert row is not None
    assert row.degraded == (2.0, 4.0, 30.0, 0.0)
    assert (quantile(row.degraded, 0.5), quantile(row.degraded, 0.9)) == (3.0, pytest.approx(22.2))
    data = row.as_dict()
    assert (data["degraded_median_seconds"], data["handed_over_count"]) == (3.0, 3)
    assert table_rows(summary)[0][11:13] == ["3.0s", "22.2s"]
    other = summary.row("p", "y")
    assert other is not None and other.degraded == ()  # a cancelled run ran nothing degraded
    assert table_rows(summary)[1][11:13] == ["-", "-"]


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
    assert lm.eta_within == 25.0  # only 1.25 lies within ±50 %
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
    assert rows[1][11:13] == ["0ms", "0ms"]  # no handover, no degraded running
    assert rows[1][-4:] == ["2.00", "5.00", "8.00", "25.0%"]
    assert rows[2][-4:] == ["-", "-", "-", "-"]  # no predictions from "other"


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


# -- the command ------------------------------------------------------------------------


class _Idle(ControllerBase):
    name = "idle"
    poll_interval = 2.0

    def __init__(self, setting: Any) -> None:
        self.setting = setting

    def start(self) -> StartPlan:
        return StartPlan(arm_handover=False, arm_slow_down=False, blackout_budget=0.3)

    def step(self, sample: Any, now: float) -> list[Any]:
        return []

    def finished(self, result: Any) -> None:
        return None


def _bound_runs(workloads: Any, profiles: Any, *, processes: int = 1) -> list[Run]:
    return [
        replace(BASE, workload=w.name, profile=p.name, controller=BOUND, total_seconds=1.0)
        for w in workloads
        for p in profiles
    ]


@pytest.fixture
def fake_controllers(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmwatch.bench import __main__ as command

    bound = SimpleNamespace(bound_runs=_bound_runs)
    monkeypatch.setattr(
        command,
        "available_controllers",
        lambda: ({"lmwatch": _Idle, "idle": _Idle}, ["a baseline"], bound),
    )


async def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = await cli.run(argv, stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


async def test_bench_command_writes_results_and_gates(
    tmp_path: Path, fake_controllers: None
) -> None:
    status, out, err = await _cli(
        "bench", "--seed", "1", "--count", "3", "--out", str(tmp_path), "--processes", "1"
    )
    assert status == 0, err
    assert "not available: a baseline" in out
    assert "latency-critical  lmwatch" in out and BOUND in out
    assert {p.name for p in tmp_path.iterdir()} == {"results.json", "report.png", "corpus.yaml"}
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["seed"] == 1 and data["meta"]["count"] == 3
    assert len(data["runs"]) == 3 * 3 * 3
    assert load_corpus(tmp_path / "corpus.yaml") == generate(1, 3)
    # The idle controller breaks promises on some of these: the gate says which.
    status, out, _ = await _cli(
        "bench",
        "--corpus",
        str(tmp_path / "corpus.yaml"),
        "--controllers",
        "lmwatch,bound",
        "--out",
        str(tmp_path / "gate"),
        "--processes",
        "1",
        "--gate",
    )
    assert status == 1
    assert "gate: FAILED" in out and "runs with violations" in out
    assert not HYPERVISOR_WORDS.search(out)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--controllers", "lmwatch,nobody"], "unknown controller nobody"),
        (["--corpus", "x.yaml", "--seed", "2"], "cannot be combined"),
        (["--corpus", "/nonexistent.yaml"], "cannot read"),
        (["--controllers", "idle", "--gate"], "--gate needs the lmwatch controller"),
        (["--count", "0"], "at least 1"),
        (["--seed", "1", "--count", "2", "--workload", "s1-0001,nobody"], "no workload nobody"),
        (["--seed", "1", "--count", "2", "--jitter", "0.9"], "--jitter must be between"),
    ],
)
async def test_bench_command_usage_errors(
    argv: list[str], message: str, fake_controllers: None, tmp_path: Path
) -> None:
    status, _, err = await _cli("bench", "--out", str(tmp_path), *argv)
    assert status == 2
    assert message in err


async def test_bench_command_runs_single_workloads_and_keeps_lmwatch_actions(
    tmp_path: Path,
) -> None:
    status, out, err = await _cli(
        "bench",
        "--seed",
        "1",
        "--count",
        "3",
        "--workload",
        "s1-0001",
        "--controllers",
        "lmwatch",
        "--out",
        str(tmp_path),
        "--processes",
        "1",
    )
    assert status == 0, err
    assert "only s1-0001" in out
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["workloads"] == ["s1-0001"]
    runs = [Run.from_dict(r) for r in data["runs"]]
    assert {r.workload for r in runs} == {"s1-0001"} and len(runs) == 3
    # lmwatch's decisions other than "continue", with when and why (it raises the
    # budget of this guest under strict, whose copying does not converge on its own)
    acted = [a for r in runs for a in r.actions]
    assert acted, "lmwatch acted on none of the runs"
    for at, action, why in acted:
        assert 0 < at <= max(r.total_seconds for r in runs)
        assert action != "continue" and why


async def test_bench_command_jitter_reaches_the_runs_and_the_written_corpus(
    tmp_path: Path,
) -> None:
    """`--jitter` moves every workload's working set from pass to pass, says so, and
    the corpus written beside the results carries it, so the run can be repeated."""
    argv = ["--seed", "1", "--count", "2", "--controllers", "lmwatch", "--processes", "1"]
    status, out, err = await _cli("bench", *argv, "--jitter", "0.05", "--out", str(tmp_path))
    assert status == 0, err
    assert "working sets moving ±5% a pass" in out
    assert "jitter: 0.05" in (tmp_path / "corpus.yaml").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["jitter"] == 0.05


async def test_bench_command_counting_reaches_the_runs_and_the_written_corpus(
    tmp_path: Path,
) -> None:
    """`--counting after-send` counts every workload's passes as hosts that clear the
    dirty log before sending do, says so, and the corpus written beside the results
    carries it; a random writer over much of its memory then leaves less at its first
    pass's end than counted the default way."""
    argv = ["--seed", "1", "--count", "40", "--controllers", "lmwatch", "--processes", "1"]
    default = tmp_path / "union"
    status, _, err = await _cli("bench", *argv, "--out", str(default))
    assert status == 0, err
    after = tmp_path / "after"
    status, out, err = await _cli("bench", *argv, "--counting", "after-send", "--out", str(after))
    assert status == 0, err
    assert "counting after-send" in out
    assert "counting: after-send" in (after / "corpus.yaml").read_text()
    assert json.loads((after / "results.json").read_text())["meta"]["counting"] == "after-send"
    runs = [json.loads((d / "results.json").read_text())["runs"] for d in (default, after)]
    assert runs[0] != runs[1]  # the counts moved what lmwatch saw and did


async def test_bench_command_links_redraws_the_link_events_and_writes_them(
    tmp_path: Path,
) -> None:
    """`--links harsh` draws every workload's link events anew, says so, and the corpus
    written beside the results carries them, so the run can be repeated."""
    argv = ["--seed", "5", "--count", "40", "--controllers", "lmwatch", "--processes", "1"]
    status, out, err = await _cli("bench", *argv, "--links", "harsh", "--out", str(tmp_path))
    assert status == 0, err
    assert "link events drawn anew (harsh)" in out
    written = load_corpus(tmp_path / "corpus.yaml")
    assert written == with_links(generate(5, 40), HARSH_LINKS)
    assert written != generate(5, 40)
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["links"] == "harsh"


def test_the_eta_share_is_printed_rounded_down_so_it_never_reaches_a_target_it_missed() -> None:
    near = (1.0,) * 278 + (2.0,) * 31  # 278 of 309 within ±50 %: 89.97 %
    row = Row("p", "lmwatch", 309, 100.0, 0, 0.0, 0.0, 0, eta_ratios=near)
    assert row.eta_within == pytest.approx(89.968, abs=1e-3)
    assert table_rows(Summary((row,), (), ()))[0][-1] == "89.9%"
