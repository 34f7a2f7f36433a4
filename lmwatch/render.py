"""Showing migrations to people: tables, progress, timelines, outcomes.

Everything takes the API's JSON shape (plain dicts). On a terminal the output is
drawn with rich; otherwise it is plain lines, so logs and tests read well.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import IO, Any, Self

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from lmwatch.units import format_duration, format_size

Json = Mapping[str, Any]


class Output:
    """Where the CLI writes: a rich console when it is a terminal, plain lines otherwise."""

    def __init__(
        self,
        file: IO[str] | None = None,
        *,
        err: IO[str] | None = None,
        terminal: bool | None = None,
    ) -> None:
        self.console = Console(file=file, force_terminal=terminal, highlight=False, soft_wrap=True)
        self._err = err
        if file is not None and terminal is None:
            # An explicit file that is not a terminal (tests, pipes) gets plain lines.
            self.rich = bool(getattr(file, "isatty", lambda: False)())
        else:
            self.rich = self.console.is_terminal
        self._file = file

    def line(self, text: str = "") -> None:
        if self.rich:
            self.console.print(text, markup=False)
        else:
            stream = self._file or self.console.file
            stream.write(text + "\n")
            stream.flush()

    def lines(self, texts: Iterable[str]) -> None:
        for text in texts:
            self.line(text)

    def error(self, text: str) -> None:
        """An error message on stderr (looked up at call time, so captures see it)."""
        stream = self._err or sys.stderr
        stream.write(f"error: {text}\n")
        stream.flush()

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        if self.rich:
            table = Table(*headers, show_edge=False, header_style="bold")
            for row in rows:
                table.add_row(*row)
            self.console.print(table)
        else:
            self.lines(plain_table(headers, rows))


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns aligned with spaces; the last column is not padded."""
    widths = [len(h) for h in headers]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    out = []
    for row in (headers, *rows):
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        out.append("  ".join(cells).rstrip())
    return out


# -- values ---------------------------------------------------------------------------


def seconds_of(at: Any) -> float | None:
    """Clock seconds from an RFC 3339 string or a number."""
    if at is None:
        return None
    if isinstance(at, int | float):
        return float(at)
    try:
        return datetime.fromisoformat(str(at).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def rate(value: float | None) -> str:
    return "-" if value is None else f"{format_size(value)}/s"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def offset(seconds: float) -> str:
    return f"+{seconds:.1f}s"


def short_id(migration_id: str) -> str:
    return migration_id[:8]


def route(migration: Json) -> str:
    return f"{migration.get('source', '?')} -> {migration.get('destination', '?')}"


def _progress(migration: Json) -> Json:
    return migration.get("progress") or {}


def _prediction(migration: Json) -> Json:
    return migration.get("prediction") or {}


def eta_text(migration: Json) -> str:
    state = migration.get("state")
    if state in ("completed", "cancelled", "failed"):
        return "-"
    prediction = _prediction(migration)
    if not prediction:
        return "-"
    eta = prediction.get("eta_seconds")
    if eta is None:
        return "never on its own" if prediction.get("converges") is False else "-"
    return format_duration(eta)


def method_text(migration: Json) -> str:
    outcome = migration.get("outcome") or {}
    return str(outcome.get("method") or "-")


# -- lines ----------------------------------------------------------------------------


def disk_line(disk: Json) -> str:
    """The local disks that move with the instance: how much of them is still to copy."""
    total = format_size(disk.get("total_bytes"))
    if disk.get("in_sync"):
        return f"{total} local, in sync (mirrored; memory is copied)"
    return (
        f"{total} local, {format_size(disk.get('remaining_bytes'))} still to copy at "
        f"{rate(disk.get('rate_bytes_per_second'))} ({percent(disk.get('percent_copied'))} "
        "copied); memory is copied once they are in sync"
    )


def progress_line(migration: Json) -> str:
    """One line: state, % copied, pass, rates, ETA, predicted blackout."""
    progress = _progress(migration)
    prediction = _prediction(migration)
    parts = [str(migration.get("state", "?"))]
    disk = progress.get("disk") if progress else None
    if disk and not disk.get("in_sync"):
        # the disks are copied first: memory shows no progress yet
        parts += [
            f"disks {percent(disk.get('percent_copied'))} copied",
            f"{format_size(disk.get('remaining_bytes'))} left at "
            f"{rate(disk.get('rate_bytes_per_second'))}",
        ]
    elif progress:
        parts += [
            f"{percent(progress.get('percent_copied'))} copied",
            f"pass {progress.get('passes', '-')}",
            f"transfer {rate(progress.get('transfer_rate_bytes_per_second'))}",
            f"change {rate(progress.get('change_rate_bytes_per_second'))}",
        ]
    parts.append(f"ETA {eta_text(migration)}")
    if prediction:
        blackout = format_duration(prediction.get("blackout_seconds"))
        parts.append(f"predicted blackout {blackout}")
    return "  ".join(parts)


def timeline_entry(entry: Json, origin: float | None) -> str:
    """`+12.3s decision raise-blackout: reason` with the time since `origin`."""
    at = seconds_of(entry.get("at"))
    when = offset(at - origin) if at is not None and origin is not None else str(entry.get("at"))
    label = entry.get("action") or entry.get("state") or ""
    kind = entry.get("kind", "")
    head = f"{when} {kind}" + (f" {label}" if label else "")
    return f"{head}: {entry.get('reason', '')}"


def timeline_lines(
    entries: Sequence[Json], origin: float | None, *, collapse: bool = False
) -> list[str]:
    """Timeline entries as lines; with `collapse`, a run of unchanged-course
    ("continue") decisions shows only its first and last entry."""
    if not collapse:
        return [timeline_entry(entry, origin) for entry in entries]
    lines: list[str] = []
    index = 0
    while index < len(entries):
        end = index
        while (
            end + 1 < len(entries)
            and _is_continue(entries[end + 1])
            and _is_continue(entries[index])
        ):
            end += 1
        lines.append(timeline_entry(entries[index], origin))
        if end - index > 1:
            lines.append(f"  ... {end - index - 1} more like it")
        if end > index:
            lines.append(timeline_entry(entries[end], origin))
        index = end + 1
    return lines


def _is_continue(entry: Json) -> bool:
    return entry.get("kind") == "decision" and entry.get("action") == "continue"


def timeline_origin(migration: Json) -> float | None:
    return seconds_of(migration.get("created_at"))


def outcome_line(migration: Json) -> str:
    outcome = migration.get("outcome") or {}
    state = migration.get("state", "?")
    if not outcome:
        return f"{state}"
    parts = [
        f"{state} ({outcome.get('method', '-')})",
        f"total {format_duration(outcome.get('total_seconds'))}",
        f"blackout {format_duration(outcome.get('blackout_seconds'))}",
        f"passes {outcome.get('passes', '-')}",
        f"transferred {format_size(outcome.get('transferred_bytes'))}",
    ]
    if outcome.get("error"):
        parts.append(f"error: {outcome['error']}")
    return "  ".join(parts)


def _finished(migration: Json) -> bool:
    return migration.get("state") in ("completed", "cancelled", "failed")


def copied_text(migration: Json) -> str:
    """% copied while running; after the end the outcome says more than the last sample."""
    if _finished(migration):
        return "-"
    disk = _progress(migration).get("disk") or {}
    if disk and not disk.get("in_sync"):
        return f"disks {percent(disk.get('percent_copied'))}"
    return percent(_progress(migration).get("percent_copied"))


def migration_row(migration: Json) -> list[str]:
    return [
        short_id(str(migration.get("id", ""))),
        str(migration.get("instance", "")),
        route(migration),
        str(migration.get("state", "")),
        copied_text(migration),
        eta_text(migration),
        method_text(migration),
    ]


MIGRATION_HEADERS = ("ID", "INSTANCE", "ROUTE", "STATE", "COPIED", "ETA", "METHOD")


def migration_detail(migration: Json) -> list[str]:
    """Everything about one migration, line by line, timeline last."""
    profile = migration.get("profile") or {}
    lines = [
        f"migration  {migration.get('id')}",
        f"instance   {migration.get('instance')}  ({route(migration)})",
        f"state      {migration.get('state')}",
        f"profile    {profile.get('name', '-')}: {profile.get('reason', '')}",
    ]
    placement = migration.get("placement") or {}
    if placement:
        lines.append(f"placement  {placement.get('how')}: {placement.get('reason', '')}")
    labels = migration.get("labels") or {}
    if labels:
        lines.append("labels     " + ", ".join(f"{k}={v}" for k, v in sorted(labels.items())))
    for field in ("created_at", "started_at", "finished_at", "deadline_at"):
        if migration.get(field):
            lines.append(f"{field.removesuffix('_at'):<10} {migration[field]}")
    if migration.get("starting_again_by") and not _finished(migration):
        lines.append(f"waiting    to start again, trying until {migration['starting_again_by']}")
    if migration.get("progress") and not _finished(migration):
        lines.append(f"progress   {progress_line(migration)}")
    disk = _progress(migration).get("disk")
    if disk:
        lines.append(f"disks      {disk_line(disk)}")
    prediction = _prediction(migration)
    if prediction and not _finished(migration):
        converges = prediction.get("converges")
        verdict = {True: "yes", False: "no", None: "not known yet"}[converges]
        lines.append(
            f"predicted  ETA {eta_text(migration)}, blackout "
            f"{format_duration(prediction.get('blackout_seconds'))}, converges {verdict} "
            f"(confidence {float(prediction.get('confidence') or 0):.0%})"
        )
    if migration.get("outcome"):
        lines.append(f"outcome    {outcome_line(migration)}")
    timeline = migration.get("timeline") or []
    if timeline:
        lines.append("timeline")
        origin = timeline_origin(migration)
        lines += [f"  {timeline_entry(entry, origin)}" for entry in timeline]
    return lines


def decision_lines(result: Json) -> list[str]:
    """The answer to force-complete: the action taken and why."""
    decision = result.get("decision") or {}
    migration = result.get("migration") or {}
    lines = [f"{decision.get('action', '?')}: {decision.get('reason', '')}"]
    blackout = decision.get("predicted_blackout_seconds")
    if blackout is not None:
        lines.append(f"predicted blackout {format_duration(blackout)}")
    if migration:
        lines.append(f"migration {migration.get('id')} is {migration.get('state')}")
    return lines


PLACEMENT_HEADERS = ("host", "free", "reserved", "available", "link", "in/out", "verdict")


def _size(value: Any) -> str:
    return "-" if value is None else format_size(int(value))


def placement_rows(answer: Json) -> list[list[str]]:
    """One row per host considered: its figures and whether it was chosen, and why not."""
    rows = []
    chosen = answer.get("destination")
    for candidate in answer.get("candidates") or []:
        host = str(candidate.get("host", "?"))
        count = int(candidate.get("reservations") or 0)
        reserved = f"{_size(candidate.get('reserved'))} ({count})" if count else "-"
        if host == chosen:
            verdict = "chosen"
        elif candidate.get("accepted"):
            verdict = "fits"
        else:
            verdict = f"rejected: {candidate.get('reason', '')}"
        rows.append(
            [
                host,
                _size(candidate.get("free_memory")),
                reserved,
                _size(candidate.get("available")),
                rate(candidate.get("bandwidth")),
                f"{candidate.get('arriving', 0)}/{candidate.get('leaving', 0)}",
                verdict,
            ]
        )
    return rows


def placement_lines(answer: Json) -> list[str]:
    """The explain-placement answer: where to, and why, above the hosts' table."""
    where = answer.get("destination") or "no host"
    return [
        f"{answer.get('instance')} on {answer.get('source')}: {where}",
        f"  why: {answer.get('reason', '')}",
    ]


def explain_lines(answer: Json) -> list[str]:
    profile = answer.get("profile") or {}
    name = profile.get("name", "-") if isinstance(profile, Mapping) else str(profile)
    lines = [f"{answer.get('instance')}: profile {name!r}", f"  why: {answer.get('reason', '')}"]
    candidates = answer.get("candidates") or []
    if candidates:
        lines.append("  candidates:")
        for candidate in candidates:
            lines.append(f"    {_candidate(candidate)}")
    return lines


def _candidate(candidate: Any) -> str:
    if not isinstance(candidate, Mapping):
        return str(candidate)
    name = candidate.get("name") or candidate.get("profile") or "?"
    if isinstance(name, Mapping):
        name = name.get("name", "?")
    verdict = candidate.get("matches", candidate.get("matched"))
    mark = {True: "matches", False: "no match", None: ""}.get(verdict, str(verdict))
    why = candidate.get("reason") or candidate.get("why") or ""
    text = f"{name}"
    if mark:
        text += f" ({mark})"
    return f"{text}: {why}" if why else text


def profile_rows(profiles: Iterable[Json]) -> list[list[str]]:
    rows = []
    for profile in profiles:
        match = profile.get("match") or {}
        parts = []
        for key in ("labels", "names", "uuids"):
            value = match.get(key)
            if value:
                if isinstance(value, Mapping):
                    parts.append(",".join(f"{k}={v}" for k, v in value.items()))
                else:
                    parts.append(",".join(str(v) for v in value))
        rows.append(
            [
                str(profile.get("name", "")),
                " ".join(parts) or "(any)",
                _duration_field(profile.get("max_blackout")),
                str(profile.get("handover", "-")),
                _yes(profile.get("may_slow_down")),
                _yes(profile.get("may_pause")),
                str(profile.get("on_deadline", "-")),
            ]
        )
    return rows


PROFILE_HEADERS = ("NAME", "MATCH", "MAX BLACKOUT", "HANDOVER", "SLOW DOWN", "PAUSE", "DEADLINE")


def _duration_field(value: Any) -> str:
    return format_duration(value) if isinstance(value, int | float) else str(value or "-")


def _yes(value: Any) -> str:
    return {True: "yes", False: "no"}.get(value, "-") if isinstance(value, bool) else "-"


# -- live display -----------------------------------------------------------------------


class _LiveDisplay:
    """A display that redraws in place on a terminal (rich's Live) and prints plain
    lines otherwise; subclasses say what shows before the first update."""

    waiting = ""

    def __init__(self, output: Output) -> None:
        self.output = output
        self._live: Live | None = None

    def __enter__(self) -> Self:
        if self.output.rich:
            self._live = Live(
                Text(self.waiting),
                console=self.output.console,
                auto_refresh=False,
                transient=False,
            )
            self._live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()


class LiveProgress(_LiveDisplay):
    """The `migrate --follow` display: a bar on a terminal, change-only lines otherwise."""

    waiting = "waiting for the first sample"

    def __init__(self, output: Output) -> None:
        super().__init__(output)
        self._last_plain: tuple[Any, ...] | None = None

    def say(self, text: str) -> None:
        if self._live is not None:
            self._live.console.print(text, markup=False, highlight=False)
        else:
            self.output.line(text)

    def update(self, migration: Json) -> None:
        if self._live is not None:
            if _finished(migration):
                self._live.update(Text(""), refresh=True)
            else:
                self._live.update(live_view(migration), refresh=True)
            return
        if _finished(migration):
            return  # the outcome line follows
        disk = _progress(migration).get("disk") or {}
        key = (
            migration.get("state"),
            _progress(migration).get("passes"),
            None if disk.get("in_sync", True) else int(disk.get("percent_copied") or 0) // 10,
        )
        if key != self._last_plain:
            self._last_plain = key
            self.output.line(progress_line(migration))


def live_view(migration: Json) -> Group:
    """Two lines: state, bar and percent; then pass, rates, ETA and predicted blackout."""
    progress = _progress(migration)
    copied = float(progress.get("percent_copied") or 0.0)
    state = str(migration.get("state", "?"))
    disk = progress.get("disk") or {}
    if disk and not disk.get("in_sync"):  # the bar follows the disk copy until it is in sync
        copied = float(disk.get("percent_copied") or 0.0)
        state += " (disks)"
    top = Table.grid(padding=(0, 1))
    top.add_row(
        Text(state, style="bold"),
        ProgressBar(total=100.0, completed=copied, width=30),
        Text(f"{copied:5.1f}%"),
    )
    details = progress_line(migration).split("  ", 2)[-1] if progress else ""
    return Group(top, Text(details))


# -- drains ----------------------------------------------------------------------------

DRAIN_HEADERS = ("ID", "HOST", "STATE", "MOVED", "BLOCKED", "ETA", "CREATED")
_DRAIN_DONE = ("completed", "failed", "cancelled")


def _eta_seconds(value: Any) -> str:
    return "-" if value is None else format_duration(float(value))


def drain_row(drain: Json) -> list[str]:
    created = seconds_of(drain.get("created_at"))
    when = datetime.fromtimestamp(created).strftime("%Y-%m-%d %H:%M:%S") if created else "-"
    return [
        short_id(str(drain.get("id", ""))),
        str(drain.get("host", "")),
        str(drain.get("state", "")),
        f"{drain.get('instances_moved', 0)}/{drain.get('instances_total', 0)}",
        ", ".join(drain.get("blocked") or []) or "-",
        "-" if drain.get("state") in _DRAIN_DONE else _eta_seconds(drain.get("eta_seconds")),
        when,
    ]


def drain_entry_line(entry: Json) -> str:
    """One instance of a drain: `name  state  NN%  -> destination  ETA  reason`."""
    state = str(entry.get("state", "?"))
    parts = [str(entry.get("instance", "?")), state]
    if state in ("migrating", "submitting"):
        parts.append(f"{100 * float(entry.get('progress') or 0):.0f}%")
        if entry.get("migration_state"):
            parts.append(f"({entry['migration_state']})")
    if entry.get("destination"):
        parts.append(f"-> {entry['destination']}")
    if state in ("pending", "migrating", "submitting"):
        parts.append(f"ETA {_eta_seconds(entry.get('eta_seconds'))}")
    if state in ("blocked", "failed") or (state == "moved" and not entry.get("migration_id")):
        parts.append(f"- {entry.get('reason', '')}")
    elif state == "pending" and entry.get("warning"):
        parts.append(f"- at risk: {entry['warning']}")
    return "  ".join(parts)


def drain_total_line(drain: Json) -> str:
    moved, total = drain.get("instances_moved", 0), drain.get("instances_total", 0)
    text = f"drain {drain.get('host')}: {drain.get('state')}, {moved}/{total} moved"
    if drain.get("blocked"):
        text += f", blocked: {', '.join(drain['blocked'])}"
    if drain.get("at_risk"):
        text += f", at risk: {', '.join(drain['at_risk'])}"
    if drain.get("state") not in _DRAIN_DONE:
        text += f", empty in {_eta_seconds(drain.get('eta_seconds'))}"
    return text


def drain_detail(drain: Json) -> list[str]:
    lines = [
        f"drain {drain.get('id')}",
        drain_total_line(drain),
        f"reason: {drain.get('reason', '')}",
    ]
    if drain.get("destinations"):
        lines.append(f"destinations: {', '.join(drain['destinations'])}")
    if drain.get("profile"):
        lines.append(f"profile: {drain['profile']}")
    for entry in drain.get("instances") or []:
        lines.append("  " + drain_entry_line(entry))
        for attempt in entry.get("attempts") or []:
            lines.append(f"      tried {attempt.get('destination')}: {attempt.get('reason')}")
    return lines


def drain_view(drain: Json) -> Group:
    """One live line per instance (bar, state, destination, ETA) and a total bar."""
    grid = Table.grid(padding=(0, 1))
    for entry in drain.get("instances") or []:
        done = 100.0 * float(entry.get("progress") or 0.0)
        grid.add_row(
            Text(str(entry.get("instance", "?")), style="bold"),
            ProgressBar(total=100.0, completed=done, width=20),
            Text(drain_entry_line(entry).split("  ", 1)[-1]),
        )
    total = int(drain.get("instances_total") or 0)
    moved = int(drain.get("instances_moved") or 0)
    bar = Table.grid(padding=(0, 1))
    bar.add_row(
        Text("total", style="bold"),
        ProgressBar(total=float(max(total, 1)), completed=float(moved), width=40),
        Text(drain_total_line(drain)),
    )
    return Group(grid, bar)


class LiveDrain(_LiveDisplay):
    """The `drain --follow` display: live lines on a terminal, change-only lines
    otherwise (an instance's state, destination or tenth of progress; the total)."""

    waiting = "waiting for the drain"

    def __init__(self, output: Output) -> None:
        super().__init__(output)
        self._seen: dict[str, tuple[Any, ...]] = {}
        self._total: tuple[Any, ...] | None = None

    def update(self, drain: Json) -> None:
        if self._live is not None:
            self._live.update(drain_view(drain), refresh=True)
            return
        for entry in drain.get("instances") or []:
            key = (
                entry.get("state"),
                entry.get("destination"),
                entry.get("migration_state"),
                int(10 * float(entry.get("progress") or 0.0)),
            )
            name = str(entry.get("instance"))
            if self._seen.get(name) != key:
                self._seen[name] = key
                self.output.line(drain_entry_line(entry))
        total = (drain.get("state"), drain.get("instances_moved"))
        if total != self._total:
            self._total = total
            self.output.line(drain_total_line(drain))
