"""What the benchmark found: per profile and controller, a table, a JSON file and a figure.

Per (profile, controller): how many runs were clean (completed within every promise
of the profile), how many broke a promise, were cancelled or failed; total time as a
ratio to the hindsight bound's, over the workloads both finished cleanly; the
measured blackout; the degraded running a handover cost the instance; and, for
controllers that predict, how the time to completion
they predicted once the first pass had ended compares with what it took.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmwatch.bench.corpus import Workload
from lmwatch.bench.judge import Verdict, judge
from lmwatch.bench.runner import Run
from lmwatch.profiles.schema import Profile

BOUND = "hindsight bound"
LMWATCH = "lmwatch"
ETA_TOLERANCE = 0.5  # an ETA the actual time came within this share of, either way
HEADERS = (
    "profile",
    "controller",
    "runs",
    "clean",
    "violations",
    "cancelled",
    "failed",
    "time/bound p50",
    "p90",
    "blackout p50",
    "p90",
    "degraded p50",
    "p90",
    "ETA actual/predicted p10",
    "p50",
    "p90",
    "within ±50%",
)
OUTCOME_COLOURS = {
    "clean": "#3a923a",
    "violation": "#d62728",
    "cancelled": "#ff9f1c",
    "failed": "#7f7f7f",
}


def quantile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def violation_kind(text: str) -> str:
    """A violation without its numbers: "blackout 0.31s over 300ms" -> "blackout over limit"."""
    if re.search(r"\d", text):
        return f"{text.split()[0]} over limit"
    return text


@dataclass(frozen=True, slots=True)
class Row:
    profile: str
    controller: str
    runs: int
    clean: float  # percent of runs
    violations: int  # runs that broke at least one promise
    cancelled: float  # percent
    failed: float  # percent
    unfinished: int  # runs stopped at the time limit (also counted in violations)
    cancelled_quietly: int = 0  # cancelled runs without a violation
    failed_quietly: int = 0  # failed runs without a violation
    time_ratios: tuple[float, ...] = field(default=(), repr=False)  # total / bound's
    blackouts: tuple[float, ...] = field(default=(), repr=False)  # completed runs
    # completed runs: seconds the instance ran degraded after a handover (0 without one)
    degraded: tuple[float, ...] = field(default=(), repr=False)
    handed_over: int = 0  # completed runs that were handed over
    eta_ratios: tuple[float, ...] = field(default=(), repr=False)  # actual / predicted
    violation_kinds: Mapping[str, int] = field(default_factory=dict)

    @property
    def eta_within(self) -> float | None:
        """Percent of the ETAs the actual time came within ±`ETA_TOLERANCE` of: "within
        ±50 % at p90" read both ways (the ratio's p90 alone hides ETAs far too long)."""
        if not self.eta_ratios:
            return None
        near = sum(abs(ratio - 1.0) <= ETA_TOLERANCE + 1e-12 for ratio in self.eta_ratios)
        return 100.0 * near / len(self.eta_ratios)

    @property
    def outcome_shares(self) -> dict[str, float]:
        """Exclusive shares in percent: clean, violation, cancelled, failed."""
        return {
            "clean": self.clean,
            "violation": 100.0 * self.violations / self.runs if self.runs else 0.0,
            "cancelled": 100.0 * self.cancelled_quietly / self.runs if self.runs else 0.0,
            "failed": 100.0 * self.failed_quietly / self.runs if self.runs else 0.0,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "controller": self.controller,
            "runs": self.runs,
            "clean_percent": round(self.clean, 2),
            "violations": self.violations,
            "cancelled_percent": round(self.cancelled, 2),
            "failed_percent": round(self.failed, 2),
            "unfinished": self.unfinished,
            "time_to_bound_median": quantile(self.time_ratios, 0.5),
            "time_to_bound_p90": quantile(self.time_ratios, 0.9),
            "time_to_bound_count": len(self.time_ratios),
            "blackout_median_seconds": quantile(self.blackouts, 0.5),
            "blackout_p90_seconds": quantile(self.blackouts, 0.9),
            "degraded_median_seconds": quantile(self.degraded, 0.5),
            "degraded_p90_seconds": quantile(self.degraded, 0.9),
            "handed_over_count": self.handed_over,
            "eta_ratio_p10": quantile(self.eta_ratios, 0.1),
            "eta_ratio_median": quantile(self.eta_ratios, 0.5),
            "eta_ratio_p90": quantile(self.eta_ratios, 0.9),
            "eta_count": len(self.eta_ratios),
            "eta_within_percent": self.eta_within,
            "violation_kinds": dict(self.violation_kinds),
        }


@dataclass(frozen=True, slots=True)
class Summary:
    rows: tuple[Row, ...]
    runs: tuple[Run, ...]
    verdicts: tuple[Verdict, ...]  # one per run, same order

    def row(self, profile: str, controller: str) -> Row | None:
        return next(
            (r for r in self.rows if r.profile == profile and r.controller == controller), None
        )

    @property
    def controllers(self) -> list[str]:
        return list(dict.fromkeys(r.controller for r in self.rows))

    @property
    def profiles(self) -> list[str]:
        return list(dict.fromkeys(r.profile for r in self.rows))


def summarize(
    runs: Iterable[Run], workloads: Sequence[Workload], profiles: Sequence[Profile]
) -> Summary:
    """Judge every run and aggregate per (profile, controller), in first-seen order."""
    runs = tuple(runs)
    by_workload = {w.name: w for w in workloads}
    by_profile = {p.name: p for p in profiles}
    verdicts = tuple(judge(r, by_profile[r.profile], by_workload[r.workload]) for r in runs)
    bound_clean: dict[tuple[str, str], float] = {
        (r.profile, r.workload): r.total_seconds
        for r, v in zip(runs, verdicts, strict=True)
        if r.controller == BOUND and v.clean and r.total_seconds > 0
    }
    groups: dict[tuple[str, str], list[tuple[Run, Verdict]]] = {}
    for r, v in zip(runs, verdicts, strict=True):
        groups.setdefault((r.profile, r.controller), []).append((r, v))
    order = {name: i for i, name in enumerate(by_profile)}
    keys = sorted(groups, key=lambda key: order.get(key[0], len(order)))  # stable otherwise
    rows = []
    for profile, controller in keys:
        pairs = groups[(profile, controller)]
        count = len(pairs)
        kinds: Counter[str] = Counter()
        ratios, blackouts, degraded, etas = [], [], [], []
        for r, v in pairs:
            kinds.update(violation_kind(text) for text in v.violations)
            bound = bound_clean.get((profile, r.workload))
            if v.clean and bound is not None:
                ratios.append(r.total_seconds / bound)
            if r.outcome == "completed" and r.blackout_seconds is not None:
                blackouts.append(r.blackout_seconds)
            if r.outcome == "completed":
                degraded.append(r.degraded_seconds or 0.0)
            if r.eta_ratio is not None:
                etas.append(r.eta_ratio)
        rows.append(
            Row(
                profile=profile,
                controller=controller,
                runs=count,
                clean=100.0 * sum(v.clean for _, v in pairs) / count,
                violations=sum(bool(v.violations) for _, v in pairs),
                cancelled=100.0 * sum(v.cancelled for _, v in pairs) / count,
                failed=100.0 * sum(v.failed for _, v in pairs) / count,
                unfinished=sum(v.unfinished for _, v in pairs),
                cancelled_quietly=sum(v.cancelled and not v.violations for _, v in pairs),
                failed_quietly=sum(v.failed and not v.violations for _, v in pairs),
                time_ratios=tuple(ratios),
                blackouts=tuple(blackouts),
                degraded=tuple(degraded),
                handed_over=sum(r.outcome == "completed" and r.handed_over for r, _ in pairs),
                eta_ratios=tuple(etas),
                violation_kinds=dict(sorted(kinds.items())),
            )
        )
    return Summary(rows=tuple(rows), runs=runs, verdicts=verdicts)


# -- the table ----------------------------------------------------------------------------


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _share(percent: float | None) -> str:
    """A share to a tenth of a point, rounded down: 89.97 % is no 90.0 % against a target."""
    return "-" if percent is None else f"{math.floor(percent * 10 + 1e-9) / 10:.1f}%"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.1f}s"


def table_rows(summary: Summary) -> list[list[str]]:
    rows = []
    for row in summary.rows:
        rows.append(
            [
                row.profile,
                row.controller,
                str(row.runs),
                f"{row.clean:.1f}%",
                str(row.violations),
                f"{row.cancelled:.1f}%",
                f"{row.failed:.1f}%",
                _ratio(quantile(row.time_ratios, 0.5)),
                _ratio(quantile(row.time_ratios, 0.9)),
                _seconds(quantile(row.blackouts, 0.5)),
                _seconds(quantile(row.blackouts, 0.9)),
                _seconds(quantile(row.degraded, 0.5)),
                _seconds(quantile(row.degraded, 0.9)),
                _ratio(quantile(row.eta_ratios, 0.1)),
                _ratio(quantile(row.eta_ratios, 0.5)),
                _ratio(quantile(row.eta_ratios, 0.9)),
                _share(row.eta_within),
            ]
        )
    return rows


def gate(summary: Summary, controller: str = "lmwatch", points: float = 3.0) -> list[str]:
    """Why `controller` fails the gate: any violation, or clean % more than `points`
    below the hindsight bound's on a profile. Empty when it passes."""
    reasons = []
    for profile in summary.profiles:
        row = summary.row(profile, controller)
        if row is None:
            reasons.append(f"{profile}: no runs of {controller}")
            continue
        if row.violations:
            kinds = ", ".join(f"{kind} ×{count}" for kind, count in row.violation_kinds.items())
            reasons.append(f"{profile}: {row.violations} runs with violations ({kinds})")
        bound = summary.row(profile, BOUND)
        if bound is not None and row.clean < bound.clean - points:
            reasons.append(
                f"{profile}: {row.clean:.1f}% clean, more than {points:g} points below "
                f"the hindsight bound's {bound.clean:.1f}%"
            )
    return reasons


# -- files ----------------------------------------------------------------------------------


def results_json(summary: Summary, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    runs = []
    for r, v in zip(summary.runs, summary.verdicts, strict=True):
        entry = r.as_dict()
        entry["eta_ratio"] = r.eta_ratio
        entry["clean"] = v.clean
        entry["violations"] = list(v.violations)
        runs.append(entry)
    return {
        "meta": dict(meta or {}),
        "summary": [row.as_dict() for row in summary.rows],
        "runs": runs,
    }


def write_json(path: str | Path, summary: Summary, meta: Mapping[str, Any] | None = None) -> None:
    Path(path).write_text(
        json.dumps(results_json(summary, meta), indent=1, allow_nan=False) + "\n", encoding="utf-8"
    )


def write_png(path: str | Path, summary: Summary, *, title: str = "") -> None:
    """Per profile: outcome shares per controller (bars) and the CDF of time / bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    profiles = summary.profiles or ["-"]
    controllers = summary.controllers
    others = [c for c in controllers if c not in (LMWATCH, BOUND)]
    palette = plt.get_cmap("tab20")
    styles: dict[str, dict[str, Any]] = {
        name: {"color": palette(index % 20), "linewidth": 1.0} for index, name in enumerate(others)
    }
    styles[LMWATCH] = {"color": "black", "linewidth": 2.2}
    columns = len(profiles)
    height = max(3.0, 0.3 * len(controllers) + 1.2)
    figure, axes = plt.subplots(
        2,
        columns,
        figsize=(5.2 * columns, height + 4.6),
        squeeze=False,
        gridspec_kw={"height_ratios": [height, 3.4]},
    )
    for column, profile in enumerate(profiles):
        bars = axes[0][column]
        names = [c for c in controllers if summary.row(profile, c) is not None]
        left = [0.0] * len(names)
        for outcome, colour in OUTCOME_COLOURS.items():
            widths = []
            for name in names:
                row = summary.row(profile, name)
                assert row is not None
                widths.append(row.outcome_shares[outcome])
            bars.barh(names, widths, left=left, color=colour)
            left = [a + b for a, b in zip(left, widths, strict=True)]
        bars.set_xlim(0, 100)
        bars.invert_yaxis()
        bars.set_title(profile)
        bars.set_xlabel("% of runs")
        bars.tick_params(axis="y", labelsize=8)
        if column:
            bars.set_yticklabels([])
        cdf = axes[1][column]
        for name in names:
            row = summary.row(profile, name)
            assert row is not None
            values = sorted(row.time_ratios)
            if not values or name == BOUND:
                continue
            ys = [(i + 1) / len(values) for i in range(len(values))]
            cdf.step(values, ys, where="post", **styles.get(name, {}))
        if not cdf.lines:
            cdf.text(
                0.5,
                0.5,
                "no clean pairs with the hindsight bound",
                ha="center",
                va="center",
                transform=cdf.transAxes,
                fontsize=8,
                color="#555555",
            )
        else:
            cdf.set_xscale("log")
        cdf.set_xlabel("total time / hindsight bound (where both were clean)")
        if column == 0:
            cdf.set_ylabel("share of those workloads")
        cdf.set_ylim(0, 1.02)
        cdf.grid(True, alpha=0.3)
    figure.legend(
        handles=[Patch(color=colour, label=outcome) for outcome, colour in OUTCOME_COLOURS.items()],
        loc="upper center",
        ncol=len(OUTCOME_COLOURS),
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.5, 0.965),
    )
    lines = [name for name in controllers if name != BOUND]
    if lines:
        figure.legend(
            handles=[
                Line2D([], [], label=name, **styles[name]) for name in lines if name in styles
            ],
            loc="lower center",
            ncol=min(len(lines), 7),
            fontsize=7,
            frameon=False,
        )
    if title:
        figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.06, 1, 0.95))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(
    directory: str | Path, summary: Summary, meta: Mapping[str, Any] | None = None
) -> tuple[Path, Path]:
    """results.json and report.png in `directory` (created when missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    results, figure = directory / "results.json", directory / "report.png"
    write_json(results, summary, meta)
    title = ""
    if meta:
        title = str(meta.get("title", ""))
    write_png(figure, summary, title=title)
    return results, figure
