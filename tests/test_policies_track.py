"""The estimators read a folded `Track`, not the whole history (issue 8).

The reference, `ScanTrack`, answers every question the estimators ask a track by
scanning the full list of samples, as `analyse`, `disk_outlook` and
`pause_outlasting` did before the fold (list comprehensions over the history).
Deciding from the fold of a long history must give the very same decision and
analysis as deciding from the scan; and what a track keeps must stay bounded.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmwatch.model import Action, MigrationContext, Phase, Sample, StartPlan
from lmwatch.policies import completion
from lmwatch.policies.estimators import PolicySettings, analyse, disk_outlook
from lmwatch.policies.forcing import pause_outlasting
from lmwatch.policies.track import OPENING_PASSES, RECENT, Pair, PassSeen, Track
from lmwatch.profiles.schema import Profile

GIB = 1 << 30
MIB = 1 << 20


class ScanTrack(Track):
    """A track whose every view is computed by scanning the whole history."""

    def __init__(self, history: Sequence[Sample], kept_passes: int, disk_window: float) -> None:
        # not Track.__init__: every view it would set is a property here
        self.kept_passes = kept_passes
        self.disk_window = disk_window
        self.history = list(history)

    def __len__(self) -> int:
        return len(self.history)

    def __bool__(self) -> bool:
        return bool(self.history)

    @property  # type: ignore[override]
    def evidence(self) -> int:
        return len(self.history)

    @property  # type: ignore[override]
    def derived(self) -> dict[str, Any]:
        return {}  # nothing kept: every view computed from the whole history each time

    @property  # type: ignore[override]
    def recent(self) -> list[Sample]:
        return self.history[-30:]

    @property
    def latest(self) -> Sample | None:
        return self.history[-1] if self.history else None

    @property
    def previous(self) -> Sample | None:
        return self.history[-2] if len(self.history) >= 2 else None

    @property  # type: ignore[override]
    def synced(self) -> int:
        return len([s for s in self.history if s.disks_in_sync])

    @property  # type: ignore[override]
    def first_synced(self) -> Sample | None:
        return next((s for s in self.history if s.disks_in_sync), None)

    @property  # type: ignore[override]
    def last_synced(self) -> Sample | None:
        return next((s for s in reversed(self.history) if s.disks_in_sync), None)

    def _cut(self) -> tuple[list[Sample], float | str | None]:
        history = self.history
        behind = [i for i, s in enumerate(history) if s.disk_total > 0 and not s.disks_in_sync]
        if behind:
            tail = history[behind[-1]]
            nxt = history[behind[-1] + 1] if behind[-1] + 1 < len(history) else None
            at = tail.time + (tail.disk_remaining / tail.disk_rate if tail.disk_rate > 0 else 0.0)
            start = at if nxt is None else min(max(at, tail.time), nxt.time)
            return history[behind[-1] + 1 :], start
        if history and history[0].disk_total > 0:
            return history, None
        return history, "started"

    def memory_start(self, started_at: float | None) -> float | None:
        _, start = self._cut()
        return started_at if start == "started" else start  # type: ignore[return-value]

    @property
    def repeating(self) -> Sample | None:
        history, _ = self._cut()
        return next((s for s in history if s.passes >= 2), None)

    def passes(self) -> Iterator[PassSeen]:
        history, _ = self._cut()
        seen: dict[int, PassSeen] = {}
        for sample in history:
            n = sample.passes
            if n < 1:
                continue
            if n not in seen:
                seen[n] = PassSeen(n, sample, sample, sample.memory_remaining)
            else:
                seen[n].peak = max(seen[n].peak, sample.memory_remaining)
                seen[n].last = sample
        passes = list(seen.values())
        last = passes[-(self.kept_passes + 1) :]
        opening = [p for p in passes[: len(passes) - len(last)] if p.number <= OPENING_PASSES]
        return iter(opening + last)

    @property  # type: ignore[override]
    def jumps(self) -> list[tuple[float, Pair]]:
        timed = []
        for a, b in itertools.pairwise(self.history):
            jump = b.passes - a.passes
            if jump < 2 or a.passes < 2 or b.phase is not Phase.COPYING:
                continue
            moved = b.memory_transferred - a.memory_transferred
            elapsed = b.time - a.time
            if moved >= 0 and elapsed > 0:
                sent = moved / jump
                rest = max(0.0, (a.memory_remaining + b.memory_remaining - sent) / 2)
                timed.append((b.time, Pair(elapsed / jump, b.slowdown, sent, rest)))
        return timed[-self.kept_passes :]

    @property
    def copying(self) -> list[Sample]:  # type: ignore[override]
        return [s for s in self.history if s.disk_total > 0 and not s.disks_in_sync]

    @property
    def stopped(self) -> list[Sample]:  # type: ignore[override]
        return [s for s in self.history if s.phase is Phase.COMPLETING]

    @property  # type: ignore[override]
    def stopped_count(self) -> int:
        return len(self.stopped)

    @property  # type: ignore[override]
    def first_stopped(self) -> Sample | None:
        return self.stopped[0] if self.stopped else None

    @property  # type: ignore[override]
    def max_disk_total(self) -> int:
        return max((s.disk_total for s in self.history), default=0)


@st.composite
def histories(draw: st.DrawFn) -> list[Sample]:
    """A migration's samples: times and pass counts never go back; a disk copy at the
    start (sometimes); passes of any length, several per poll at times; a pause
    (completing) at the end (sometimes)."""
    n = draw(st.integers(1, 160))
    memory = draw(st.sampled_from([2 * GIB, 8 * GIB]))
    disk_total = draw(st.sampled_from([0, 0, 20 * GIB]))
    disk_from = draw(st.sampled_from([0, 0, 3]))  # the disk copy reported from this sample
    disk_steps = draw(st.sampled_from([[0, 3 * GIB, 8 * GIB, 20 * GIB], [0, GIB // 4, GIB]]))
    disk_left = disk_total
    t = draw(st.floats(0.0, 5.0))
    passes = draw(st.sampled_from([0, 1, 1, 3]))
    transferred = 0
    stop_at = draw(st.integers(n // 2, n + 5))
    out = []
    for i in range(n):
        t += draw(st.sampled_from([0.2, 0.5, 1.0, 1.0, 1.0, 1.3, 3.0, 12.0]))
        if disk_left > 0 and i >= disk_from:
            disk_left = max(0, disk_left - draw(st.sampled_from(disk_steps)))
            step = 0
        else:
            step = draw(st.sampled_from([0, 0, 0, 1, 1, 2, 3, 7]))
            passes = max(passes, 1) + step
        moved = draw(st.integers(0, 400 * MIB))
        transferred += moved
        phase = Phase.COMPLETING if i >= stop_at else Phase.COPYING
        out.append(
            Sample(
                time=t,
                memory_total=draw(st.sampled_from([0, memory])),
                memory_remaining=draw(st.integers(0, memory)),
                memory_transferred=transferred,
                transfer_rate=draw(st.sampled_from([0.0, 100.0 * MIB, 120.0 * MIB, 90.5 * MIB])),
                change_rate=draw(st.sampled_from([0.0, 10.0 * MIB, 50.0 * MIB, 200.0 * MIB])),
                passes=passes,
                phase=phase,
                blackout_budget=draw(st.sampled_from([0.0, 0.3, 0.5])),
                slowdown=draw(st.sampled_from([0.0, 0.0, 0.2, 0.5])),
                disk_total=disk_total,
                disk_remaining=disk_left if i >= disk_from else 0,
                disk_rate=draw(st.sampled_from([0.0, 200.0 * MIB])) if disk_total else 0.0,
            )
        )
    return out


@st.composite
def contexts(draw: st.DrawFn) -> MigrationContext:
    plan = StartPlan(
        arm_handover=draw(st.booleans()),
        arm_slow_down=draw(st.booleans()),
        blackout_budget=0.3,
    )
    return MigrationContext(
        started_at=0.0,
        memory_bytes=8 * GIB,
        plan=plan,
        blackout_budget=draw(st.sampled_from([0.3, 0.5, 2.0])),
        deadline_at=draw(st.sampled_from([None, 60.0, 600.0])),
        switchover=0.05,
        change_rate_before_start=draw(st.sampled_from([None, 20.0 * MIB, 300.0 * MIB])),
        change_rate_window=draw(st.sampled_from([None, 1.0])),
        paused=draw(st.booleans()),
        paused_at=draw(st.sampled_from([None, 30.0])),
        force=draw(st.booleans()),
    )


PROFILES = [
    Profile(name="plain"),
    Profile(name="pause", max_blackout=0.5, may_pause=True, max_pause=3.0),
    Profile(name="handover", handover="allowed", max_degraded=15, on_deadline="complete"),
    Profile(name="slow", may_slow_down=True, deadline="10m", on_deadline="complete"),
]
PROFILE = PROFILES[1]


def _folded(history: Sequence[Sample], policy: PolicySettings) -> Track:
    track = Track(policy.kept_passes, policy.disk_window)
    for sample in history:  # one at a time, as the engine folds them in
        track.add(sample)
    return track


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    history=histories(),
    ctx=contexts(),
    kept=st.sampled_from([2, 5, 100]),
    window=st.sampled_from([3.0, 10.0]),
    now=st.sampled_from([50.0, 400.0]),
    profile=st.sampled_from(PROFILES),
)
def test_deciding_from_the_fold_equals_deciding_from_the_whole_history(
    history: list[Sample],
    ctx: MigrationContext,
    kept: int,
    window: float,
    now: float,
    profile: Profile,
) -> None:
    policy = PolicySettings(kept_passes=kept, disk_window=window)
    scan = ScanTrack(history, kept, window)
    track = _folded(history, policy)
    assert analyse(track, ctx, policy) == analyse(scan, ctx, policy)
    assert disk_outlook(track, policy) == disk_outlook(scan, policy)
    assert pause_outlasting(profile, track, ctx) == pause_outlasting(profile, scan, ctx)
    assert track.max_disk_total == scan.max_disk_total
    assert completion.decide(profile, track, ctx, now, policy) == completion.decide(
        profile, scan, ctx, now, policy
    )
    # a list is folded the same way
    assert completion.decide(profile, history, ctx, now, policy) == completion.decide(
        profile, track, ctx, now, policy
    )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    history=histories(),
    ctx=contexts(),
    kept=st.sampled_from([2, 5, 100]),
    now=st.sampled_from([50.0, 400.0]),
    profile=st.sampled_from(PROFILES),
)
def test_a_track_decided_at_every_sample_decides_as_a_fresh_fold(
    history: list[Sample], ctx: MigrationContext, kept: int, now: float, profile: Profile
) -> None:
    """What the estimators keep on a track between samples (`Track.derived`) is never
    stale: deciding at every sample, as the engine does, gives at each one what a
    track folded afresh from the samples so far gives."""
    policy = PolicySettings(kept_passes=kept)
    track = Track(policy.kept_passes, policy.disk_window)
    for i, sample in enumerate(history):
        track.add(sample)
        fresh = Track.of(history[: i + 1], policy.kept_passes, policy.disk_window)
        assert analyse(track, ctx, policy) == analyse(fresh, ctx, policy)
        assert completion.decide(profile, track, ctx, now, policy) == completion.decide(
            profile, fresh, ctx, now, policy
        )


def _long_migration(samples: int) -> Iterator[Sample]:
    """A migration that never converges: a pass every few seconds, for hours."""
    transferred = 0
    for i in range(samples):
        transferred += 100 * MIB
        yield Sample(
            time=float(i),
            memory_total=8 * GIB,
            memory_remaining=(i % 4 + 1) * 300 * MIB,
            memory_transferred=transferred,
            transfer_rate=100.0 * MIB,
            change_rate=80.0 * MIB,
            passes=1 + i // 3 + (i // 50) % 2 * 3,  # every 50 samples, a few passes per poll
            phase=Phase.COPYING if i < samples - 20 else Phase.COMPLETING,
            disk_total=20 * GIB,
            disk_remaining=max(0, 20 * GIB - i * GIB),
            disk_rate=GIB,
        )


def _samples_kept(track: Track) -> int:
    kept = set(map(id, track.recent))
    kept |= set(map(id, track.copying)) | set(map(id, track.stopped))
    for seen in track.passes():
        kept |= {id(seen.head), id(seen.last)}
    return len(kept)


def test_what_a_track_keeps_does_not_grow_with_the_migration_s_age() -> None:
    policy = PolicySettings()
    short, long = Track.of(_long_migration(1_000)), Track.of(_long_migration(20_000))
    assert len(long) == 20_000
    assert len(list(long.passes())) == policy.kept_passes + 1
    assert len(long.jumps) == policy.kept_passes
    assert _samples_kept(long) <= _samples_kept(short)
    assert _samples_kept(long) <= RECENT + 2 * (policy.kept_passes + 1) + RECENT + 2
    # and the decision is the one the whole history gives
    ctx = MigrationContext(
        started_at=0.0,
        memory_bytes=8 * GIB,
        plan=StartPlan(arm_handover=False, arm_slow_down=False, blackout_budget=0.3),
        blackout_budget=0.3,
        deadline_at=None,
        paused=True,
    )
    scan = ScanTrack(list(_long_migration(20_000)), policy.kept_passes, policy.disk_window)
    decision = completion.decide(PROFILE, long, ctx, 20_000.0, policy)
    assert decision == completion.decide(PROFILE, scan, ctx, 20_000.0, policy)
    # the pause outlasts its bound at this rate; no deadline: the job starts again
    assert decision.action is Action.RESTART


def test_memory_s_first_passes_are_kept_however_long_the_migration_runs() -> None:
    """The long first pass and its pair tell the working set from the rate; the
    passes kept besides them are the last `kept_passes + 1`."""
    samples = [
        dataclasses.replace(s, disk_total=0, disk_remaining=0, disk_rate=0.0)
        for s in _long_migration(1_000)
    ]
    track = Track.of(samples, kept_passes=10)
    numbers = [p.number for p in track.passes()]
    seen = sorted({s.passes for s in samples})
    assert seen[-1] > 300
    assert numbers == [1, 2, *seen[-11:]]


def test_the_engine_keeps_a_track_not_the_samples() -> None:
    """The supervision holds the fold; nothing keeps a list of samples per migration."""
    from lmwatch.engine.records import Supervision

    fields = {f.name: f.type for f in dataclasses.fields(Supervision)}
    assert "history" not in fields
    assert fields["track"] in ("Track", Track)


def test_passes_seen_before_the_disks_fell_behind_do_not_count() -> None:
    """Memory's passes begin once the disks are in sync: passes reported before a
    disk copy (reported late) are forgotten by the fold as by the scan."""
    history = [
        Sample(
            time=float(i + 1),
            memory_total=8 * GIB,
            memory_remaining=4 * GIB - i,
            memory_transferred=i * 100 * MIB,
            transfer_rate=100.0 * MIB,
            change_rate=0.0,
            passes=passes,
            phase=Phase.COPYING,
            disk_total=20 * GIB,
            disk_remaining=left,
            disk_rate=200.0 * MIB,
        )
        for i, (left, passes) in enumerate(
            [(0, 1), (0, 1), (0, 2), (5 * GIB, 2), (0, 2), (0, 3), (0, 4)]
        )
    ]
    ctx = MigrationContext(
        started_at=0.0,
        memory_bytes=8 * GIB,
        plan=StartPlan(arm_handover=False, arm_slow_down=False, blackout_budget=0.3),
        blackout_budget=0.3,
        deadline_at=None,
    )
    policy = PolicySettings()
    folded = analyse(Track.of(history), ctx, policy)
    assert [r.number for r in folded.records] == [3, 4]
    assert folded == analyse(ScanTrack(history, policy.kept_passes, policy.disk_window), ctx)
