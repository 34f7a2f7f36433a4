"""Rendering helpers: plain tables, folded timelines, the live display."""

from __future__ import annotations

import io
import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from lmwatch.render import (
    LiveProgress,
    Output,
    copied_text,
    disk_line,
    live_view,
    migration_detail,
    outcome_line,
    plain_table,
    progress_line,
    seconds_of,
    timeline_entry,
    timeline_lines,
)

MIGRATION: dict[str, Any] = {
    "id": "0123456789abcdef",
    "instance": "vm",
    "source": "a",
    "destination": "b",
    "state": "copying",
    "progress": {
        "percent_copied": 42.0,
        "passes": 2,
        "transfer_rate_bytes_per_second": 1024**3,
        "change_rate_bytes_per_second": 1024**2,
    },
    "prediction": {"eta_seconds": 12.0, "blackout_seconds": 0.2, "converges": True},
}


def test_plain_table_aligns_columns() -> None:
    lines = plain_table(("A", "LONGER"), [("xyz", "1"), ("q", "22")])
    assert lines == ["A    LONGER", "xyz  1", "q    22"]


def test_progress_line_shows_every_number() -> None:
    line = progress_line(MIGRATION)
    assert line == (
        "copying  42.0% copied  pass 2  transfer 1.0GiB/s  change 1.0MiB/s  ETA 12.0s  "
        "predicted blackout 200ms"
    )


def test_eta_says_never_when_it_cannot_converge() -> None:
    stuck = {**MIGRATION, "prediction": {"eta_seconds": None, "converges": False}}
    assert "ETA never on its own" in progress_line(stuck)


def test_outcome_line() -> None:
    migration = {
        "state": "completed",
        "outcome": {
            "method": "handover",
            "total_seconds": 80.0,
            "blackout_seconds": 0.03,
            "passes": 3,
            "transferred_bytes": 80 * 1024**3,
            "error": None,
        },
    }
    assert outcome_line(migration) == (
        "completed (handover)  total 80.0s  blackout 30ms  passes 3  transferred 80.0GiB"
    )


def test_timeline_entry_offsets_rfc3339_times() -> None:
    origin = seconds_of("2027-01-15T08:00:00Z")
    entry = {
        "at": "2027-01-15T08:00:12.300000+00:00",
        "kind": "decision",
        "action": "pause",
        "reason": "x",
    }
    assert timeline_entry(entry, origin) == "+12.3s decision pause: x"


_entry = st.builds(
    lambda action, at: {"at": at, "kind": "decision", "action": action, "reason": action},
    st.sampled_from(["continue", "continue", "pause", "raise-blackout"]),
    st.floats(min_value=0, max_value=1e5),
)


@given(st.lists(_entry, max_size=40))
def test_folding_keeps_every_other_decision_and_counts_the_rest(
    entries: list[dict[str, Any]],
) -> None:
    folded = timeline_lines(entries, 0.0, collapse=True)
    shown = [line for line in folded if not line.lstrip().startswith("...")]
    hidden = sum(int(re.findall(r"\d+", line)[0]) for line in folded if "more like it" in line)
    assert len(shown) + hidden == len(entries)
    kept = [line for line in shown if " continue:" not in line]
    assert kept == [timeline_entry(e, 0.0) for e in entries if e["action"] != "continue"]


def test_plain_live_progress_prints_only_when_state_or_pass_changes() -> None:
    buffer = io.StringIO()
    with LiveProgress(Output(buffer)) as live:
        live.update(MIGRATION)
        live.update(MIGRATION)
        live.update({**MIGRATION, "progress": {**MIGRATION["progress"], "passes": 3}})
    assert len(buffer.getvalue().splitlines()) == 2


def test_terminal_live_progress_draws_a_bar() -> None:
    buffer = io.StringIO()
    with LiveProgress(Output(buffer, terminal=True)) as live:
        live.say("+1.0s decision continue: fine")
        live.update(MIGRATION)
    text = buffer.getvalue()
    assert "━" in text and "42.0%" in text
    assert "+1.0s decision continue: fine" in text


DISK_PHASE: dict[str, Any] = {
    **MIGRATION,
    "progress": {
        **MIGRATION["progress"],
        "percent_copied": 0.0,
        "passes": 1,
        "disk": {
            "total_bytes": 20 * 1024**3,
            "remaining_bytes": 12 * 1024**3,
            "percent_copied": 40.0,
            "rate_bytes_per_second": 1024**3,
            "in_sync": False,
        },
    },
}


def test_during_the_disk_copy_the_line_the_table_and_the_detail_show_the_disks() -> None:
    assert progress_line(DISK_PHASE) == (
        "copying  disks 40.0% copied  12.0GiB left at 1.0GiB/s  ETA 12.0s  predicted blackout 200ms"
    )
    assert copied_text(DISK_PHASE) == "disks 40.0%"
    assert "12.0GiB still to copy" in "\n".join(migration_detail(DISK_PHASE))
    view = io.StringIO()
    Console(file=view, width=120).print(live_view(DISK_PHASE))
    assert "copying (disks)" in view.getvalue() and "40.0%" in view.getvalue()
    synced = {**DISK_PHASE["progress"]["disk"], "remaining_bytes": 0, "in_sync": True}
    assert disk_line(synced) == "20.0GiB local, in sync (mirrored; memory is copied)"
    after = {**DISK_PHASE, "progress": {**DISK_PHASE["progress"], "disk": synced}}
    assert progress_line(after).startswith("copying  0.0% copied  pass 1")
