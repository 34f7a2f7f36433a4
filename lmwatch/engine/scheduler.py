"""Which queued migrations may start now: a pure function over plain values.

Oldest first (by acceptance time, then id), as long as neither the source nor the
destination host already has its limit of migrations under way. A migration that
cannot start yet does not hold back younger ones between other hosts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
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
    return startable_among(queued, leaving, arriving, limits)


def startable_among(
    queued: Iterable[Slot],
    leaving: Mapping[str, int],
    arriving: Mapping[str, int],
    limits: HostLimits,
) -> list[str]:
    """`startable` with the migrations under way given as counts per host (leaving
    each source, arriving at each destination), for the queued migrations given.

    The engine passes only the queued migrations a change can concern (a new one; those
    on the hosts of one that ended): after every call none of the others can start,
    and their hosts' counts did not go down, so the answer is the one over all."""
    out: Counter[str] = Counter()
    into: Counter[str] = Counter()
    start: list[str] = []
    for slot in sorted(queued, key=lambda s: (s.created_at, s.id)):
        if leaving.get(slot.source, 0) + out[slot.source] >= limits.per_source:
            continue
        if arriving.get(slot.destination, 0) + into[slot.destination] >= limits.per_destination:
            continue
        out[slot.source] += 1
        into[slot.destination] += 1
        start.append(slot.id)
    return start
