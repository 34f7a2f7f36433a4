"""What the estimators keep of a migration's samples, folded in one sample at a time.

The estimators read a migration's samples through a `Track` rather than the whole
list: each sample is folded in once, at a cost that does not grow with the
migration's age, and what is kept is bounded:

- the last `RECENT` samples (rates, the interval between polls);
- the first and the last sample with the disks in sync (the fallback transfer rate);
- where memory's first pass began: the last sample with the disks behind, and the next;
- the first sample of a later pass of memory (since when passes show the guest's rate);
- for each of the last `kept_passes + 1` passes seen since then, and for memory's
  first two passes (the long first pass and its pair, which show how far the guest's
  writes spread when given time, however long the migration runs), its first and
  last sample and the largest remainder it showed (pass records are built from these);
- the last `kept_passes` pairs read from samples several passes apart;
- the samples of the disk copy, and of a pause, back to the newest one at least a
  window older than the latest (and at least `RECENT` of the disk copy's);
- counts and extremes (samples, pause samples, the first pause's time, disk size).

Samples arrive in order: their time and their pass count never go back (a sample
whose pass count went back to a pass no longer kept is not counted for passes).
`Track.of(history)` is the pure fold of a list; feeding the same samples one by one
with `add` gives the same track.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from lmwatch.model import Phase, Sample

RECENT = 30  # samples the rates and their variation are read from
PAUSE_WINDOW = 1.0  # seconds: the shortest span a paused transfer rate is measured over
KEPT_PASSES = 100  # passes (and pairs from several passes per poll) remembered
OPENING_PASSES = 2  # memory's first passes, remembered besides the last `KEPT_PASSES`
DISK_WINDOW = 10.0  # seconds: span the disk copy's outlook is read over


@dataclass(frozen=True, slots=True)
class Pair:
    """A pass and what the next one had to send beyond the rest it carried over.

    The hypervisor counts a page once: pages rewritten while still in the unsent rest
    add nothing, so `rewritten` is what the guest dirtied outside `rest`.
    """

    duration: float  # seconds the pass lasted
    slowdown: float  # guest slow-down while it ran
    rewritten: float  # bytes the next pass had to send less the rest carried over
    rest: float = 0.0  # bytes the pass left unsent, carried into the next
    spread: float = 0.0  # of `rest`, bytes lying all over memory (the first pass's rest)


@dataclass(slots=True)
class PassSeen:
    """The samples of one pass, as far as the records need them."""

    number: int
    head: Sample  # its first sample
    last: Sample  # its latest sample
    peak: int  # the largest remainder it showed


class Track:
    """A migration's samples, summarised for the estimators (see the module)."""

    __slots__ = (
        "_after_behind",
        "_behind",
        "_copying",
        "_highest",
        "_passes",
        "_stopped",
        "count",
        "derived",
        "disk_window",
        "evidence",
        "first",
        "first_stopped",
        "first_synced",
        "jumps",
        "kept_passes",
        "last_synced",
        "max_disk_total",
        "recent",
        "repeating",
        "stopped_count",
        "synced",
    )

    def __init__(self, kept_passes: int = KEPT_PASSES, disk_window: float = DISK_WINDOW) -> None:
        self.kept_passes = kept_passes
        self.disk_window = disk_window
        self.count = 0
        self.first: Sample | None = None
        self.recent: deque[Sample] = deque(maxlen=RECENT)
        self.synced = 0  # samples with the disks in sync
        self.first_synced: Sample | None = None
        self.last_synced: Sample | None = None
        self._behind: Sample | None = None
        self._after_behind: Sample | None = None
        self._passes: dict[int, PassSeen] = {}  # in the order first seen
        self.repeating: Sample | None = None  # the first sample of a pass after the first
        self._highest = 0  # highest pass number counted since the disks were behind
        self.jumps: deque[tuple[float, Pair]] = deque(maxlen=kept_passes)  # (time, pair)
        self._copying: deque[Sample] = deque()
        self._stopped: deque[Sample] = deque()
        self.stopped_count = 0
        self.first_stopped: Sample | None = None
        self.max_disk_total = 0
        # Counts changes to what pass records are built from (the passes kept, their
        # first sample and largest remainder, the last sample of a pass once the next
        # has begun, the pairs from jumps, where memory's first pass began): the
        # estimators keep what they derive from those, under this count, in `derived`.
        self.evidence = 0
        self.derived: dict[str, tuple[Any, Any]] = {}

    @classmethod
    def of(
        cls,
        history: Iterable[Sample],
        kept_passes: int = KEPT_PASSES,
        disk_window: float = DISK_WINDOW,
    ) -> Track:
        """The fold of `history` (a new track)."""
        track = cls(kept_passes, disk_window)
        for sample in history:
            track.add(sample)
        return track

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0

    @property
    def latest(self) -> Sample | None:
        return self.recent[-1] if self.recent else None

    @property
    def previous(self) -> Sample | None:
        return self.recent[-2] if len(self.recent) >= 2 else None

    def passes(self) -> Iterator[PassSeen]:
        """The passes kept, oldest first."""
        return iter(self._passes.values())

    @property
    def copying(self) -> deque[Sample]:
        """Samples taken while the disks were behind (the latest ones; see the module)."""
        return self._copying

    @property
    def stopped(self) -> deque[Sample]:
        """Samples taken while the guest was stopped (the latest ones; see the module)."""
        return self._stopped

    def memory_start(self, started_at: float | None) -> float | None:
        """When memory's first pass began: when the disks got in sync (estimated from
        the rate they moved at, between the last sample that saw them behind and the
        next), the migration's start without disks, None when they synced unseen."""
        tail = self._behind
        if tail is not None:
            moving = tail.disk_remaining / tail.disk_rate if tail.disk_rate > 0 else 0.0
            at = tail.time + moving
            nxt = self._after_behind
            return at if nxt is None else min(max(at, tail.time), nxt.time)
        if self.first is not None and self.first.disk_total > 0:
            return None  # the disks synced before these samples: pass 1's start unseen
        return started_at

    def add(self, sample: Sample) -> None:
        """Fold one more sample in."""
        before = self.recent[-1] if self.recent else None
        self.count += 1
        if self.first is None:
            self.first = sample
            self.evidence += 1
        self.recent.append(sample)
        self.max_disk_total = max(self.max_disk_total, sample.disk_total)
        if sample.disks_in_sync:
            self.synced += 1
            if self.first_synced is None:
                self.first_synced = sample
            self.last_synced = sample
        if before is not None:
            self._jump(before, sample)
        if sample.disk_total > 0 and not sample.disks_in_sync:
            self._keep(self._copying, sample, self.disk_window, RECENT)
            # memory's passes begin once the disks are in sync: what came before is not
            # a pass of memory
            self._behind, self._after_behind = sample, None
            self.evidence += 1
            self._passes.clear()
            self._highest = 0
            self.repeating = None
        else:
            if self._behind is not None and self._after_behind is None:
                self._after_behind = sample
                self.evidence += 1
            self._count_pass(sample)
        if sample.phase is Phase.COMPLETING:
            self.stopped_count += 1
            if self.first_stopped is None:
                self.first_stopped = sample
            self._keep(self._stopped, sample, PAUSE_WINDOW, 2)

    def _count_pass(self, sample: Sample) -> None:
        n = sample.passes
        if n < 1:
            return
        if n >= 2 and self.repeating is None:
            self.repeating = sample
        seen = self._passes.get(n)
        if seen is not None:
            if sample.memory_remaining > seen.peak:
                seen.peak = sample.memory_remaining
                self.evidence += 1
            seen.last = sample  # read for records only once the next pass has begun
            if n != self._highest:
                self.evidence += 1  # (samples do not go back; should one, it counts)
            return
        if n <= self._highest:
            return  # went back to a pass no longer kept
        self._highest = n
        self.evidence += 1
        self._passes[n] = PassSeen(n, sample, sample, sample.memory_remaining)
        opening = sum(1 for k in range(1, OPENING_PASSES + 1) if k in self._passes)
        if len(self._passes) - opening > self.kept_passes + 1:
            del self._passes[next(k for k in self._passes if k > OPENING_PASSES)]

    def _jump(self, a: Sample, b: Sample) -> None:
        """Passes shorter than the time between samples: k passes in `dt` seconds that
        sent `moved` bytes each lasted about `dt / k` and left about `moved / k`."""
        pair = jump_pair(a, b)
        if pair is not None:
            self.jumps.append((b.time, pair))
            self.evidence += 1

    @staticmethod
    def _keep(kept: deque[Sample], sample: Sample, window: float, least: int) -> None:
        """Append, dropping the oldest samples no longer needed: kept are at least
        `least`, and the newest one at least `window` older than `sample`."""
        kept.append(sample)
        horizon = sample.time - window
        while len(kept) > least and kept[1].time <= horizon:
            kept.popleft()


def jump_pair(a: Sample, b: Sample) -> Pair | None:
    """The average pass between two samples several passes apart (None otherwise).

    k passes in `dt` seconds that sent `moved` bytes lasted `dt / k` each and sent
    `moved / k`; a pass sends from its count down to the rest it carries over, and a
    sample falls anywhere within it, so a sample's remainder is on average that rest
    plus half of what the pass sent.
    """
    jump = b.passes - a.passes
    if jump < 2 or a.passes < 2 or b.phase is not Phase.COPYING:
        return None
    moved = b.memory_transferred - a.memory_transferred
    elapsed = b.time - a.time
    if moved < 0 or elapsed <= 0:
        return None
    sent = moved / jump
    rest = max(0.0, (a.memory_remaining + b.memory_remaining) / 2 - sent / 2)
    return Pair(elapsed / jump, b.slowdown, sent, rest)
