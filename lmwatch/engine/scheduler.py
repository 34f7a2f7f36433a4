"""Which queued migrations may start now: a pure function over plain values.

Oldest first (by acceptance time, then id), as long as neither the source nor the
destination host already has its limit of migrations under way. A migration that
cannot start yet does not hold back younger ones between other hosts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Slot:
    """A migration as the scheduler sees it: which hosts it occupies, and since when."""

    id: str
    source: str
    destination: str
    created_at: float


@dataclass(frozen=True, slots=True)
class HostLimits:
    per_source: int  # migrations leaving one host at once
    per_destination: int  # migrations arriving at one host at once


def startable(queued: Iterable[Slot], running: Iterable[Slot], limits: HostLimits) -> list[str]:
    """The ids of the queued migrations to start now, in the order to start them."""
    leaving: Counter[str] = Counter()
    arriving: Counter[str] = Counter()
    for slot in running:
        leaving[slot.source] += 1
        arriving[slot.destination] += 1
    start: list[str] = []
    for slot in sorted(queued, key=lambda s: (s.created_at, s.id)):
        if leaving[slot.source] >= limits.per_source:
            continue
        if arriving[slot.destination] >= limits.per_destination:
            continue
        leaving[slot.source] += 1
        arriving[slot.destination] += 1
        start.append(slot.id)
    return start
