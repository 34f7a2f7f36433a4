"""Draining a host: in which order to move its instances, and how long it will take.

Pure functions over plain values (no I/O, no clock).

**Order: longest expected move first (LPT).** A drain runs at most `slots`
migrations off the host at once (the engine's per-source limit), so emptying the
host is a scheduling problem on parallel machines where the goal is the makespan
(the time the last instance leaves). Longest-processing-time-first is the classic
greedy for it: it is within 4/3 of the optimum, and the failure of the naive
(inventory) order is exactly what it avoids — a long move started last, when the
other slots have nothing left to do, so it runs alone at the end. Starting the long
ones first leaves the short ones to fill the gaps as slots free up. The bound holds
for moves that do not slow each other; moves sharing one link do, and a guest that
only converges with a whole link to itself can then end later (docs/drain.md
measures both).

**Expected duration of one move** (`expected_seconds`): memory over the bandwidth of
the fastest link to a host that can take it (where `quickest` will send it),
stretched by how much the guest rewrites while it is copied (the change rate measured
before the drain starts): copying `M` bytes at `B` while the guest dirties `D`
bytes/s re-sends a geometric series,
`M/B · 1/(1 − D/B)` in total. A guest that writes as fast as the link copies never
converges on its own; its profile finishes or cancels it, which takes longer than
any converging move of its size, so the ratio is capped (`MAX_DIRTY_RATIO`) and such
moves sort first. Without a known change rate the plain `M/B` is used; without a
known bandwidth, memory alone orders (the ratio is the same for every instance).
Local disks are copied before memory, at the same bandwidth: they add `disk/B`.

**Destination** (`quickest`): among the hosts placement accepts (room after
reservations, compatibility, anti-affinity, handover), the one where the move should
end soonest: a free arrival slot, then the most link bandwidth per arriving move.

Moving the longest first also packs destinations well: the long moves are mostly
the big ones, so the largest instances are placed while the most room is free.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from lmwatch.units import format_size

MAX_DIRTY_RATIO = 0.9  # beyond this the guest is treated as never converging on its own
UNKNOWN_BANDWIDTH = 1.25e9  # bytes/s used when nothing says how fast a link is (10 Gbit/s)


def expected_seconds(
    memory_bytes: int,
    bandwidth: float | None,
    change_rate: float | None = None,
    disk_bytes: int = 0,
) -> float:
    """Seconds a move of this instance is expected to take (see the module docstring)."""
    rate = bandwidth if bandwidth is not None and bandwidth > 0 else UNKNOWN_BANDWIDTH
    ratio = 0.0
    if change_rate is not None and change_rate > 0:
        ratio = min(change_rate / rate, MAX_DIRTY_RATIO)
    return disk_bytes / rate + memory_bytes / rate / (1.0 - ratio)


@dataclass(frozen=True, slots=True)
class Candidate:
    """An instance to move off the drained host, as the ordering sees it."""

    instance: str
    expected_seconds: float
    memory_bytes: int = 0


def lpt_order(candidates: Iterable[Candidate]) -> list[str]:
    """Instance names, longest expected move first; ties: larger memory, then name."""
    ranked = sorted(candidates, key=lambda c: (-c.expected_seconds, -c.memory_bytes, c.instance))
    return [c.instance for c in ranked]


@dataclass(frozen=True, slots=True)
class Option:
    """A destination placement accepts for an instance, as the drain weighs it."""

    host: str
    bandwidth: float | None  # bytes/s from the drained host, when known
    arriving: int = 0  # migrations queued or running to it now


def quickest(
    options: Sequence[Option], per_destination: int, preferred: str | None = None
) -> str | None:
    """Where this instance's move should end soonest, among hosts placement accepts:
    a host with a free arrival slot (it starts now), then the most bandwidth per move
    (a link is shared by the moves arriving over it), then placement's own choice,
    then the name. Placement ranks by free memory, which spreads load but may send
    a large instance over a slow link; a drain is judged by when the host is empty."""

    def key(option: Option) -> tuple[bool, float, bool, str]:
        share = 0.0
        if option.bandwidth is not None and option.bandwidth > 0:
            share = option.bandwidth / (option.arriving + 1)
        return (option.arriving >= per_destination, -share, option.host != preferred, option.host)

    return min(options, key=key).host if options else None


def shortfall(
    needs: Sequence[tuple[str, int]], room: Mapping[str, Mapping[str, int | None]]
) -> dict[str, str]:
    """Instances that will likely find no room once those before them are placed:
    each instance (in drain order, with its memory) takes the accepting host with the
    most room left (`room[instance][host]`: bytes free after reservations, None when
    the host does not say, counted as enough). Instance -> why, for those that do not
    fit. An estimate at submission, not a verdict: each is still tried at its turn."""
    used: dict[str, int] = {}
    short: dict[str, str] = {}
    for instance, memory in needs:
        hosts = room.get(instance, {})
        best: str | None = None
        best_left = -1.0
        for host, available in sorted(hosts.items()):
            left = float("inf") if available is None else available - used.get(host, 0)
            if left >= memory and left > best_left:
                best, best_left = host, left
        if best is None:
            if hosts:
                figures = ", ".join(
                    f"{host} {format_size(max(0, (free or 0) - used.get(host, 0)))}"
                    for host, free in sorted(hosts.items())
                )
                short[instance] = (
                    f"likely no room once the instances before it are placed "
                    f"(left: {figures}; it needs {format_size(memory)})"
                )
            continue
        used[best] = used.get(best, 0) + memory
    return short


def inventory_order(candidates: Iterable[Candidate]) -> list[str]:
    """The naive order: as the host lists its instances (the benchmark's baseline)."""
    return [c.instance for c in candidates]


def makespan(running_remaining: Sequence[float], queued: Sequence[float], slots: int) -> float:
    """Seconds until the last of these moves ends: the running ones end after their
    remaining seconds, each queued one (in the order given) takes the first slot that
    frees. The drain's ETA, and the measure the benchmark compares orders by."""
    slots = max(1, slots)
    ends = [max(0.0, r) for r in running_remaining]
    heapq.heapify(ends)
    free = [0.0] * max(0, slots - len(ends))
    for value in free:
        heapq.heappush(ends, value)
    finish = max(ends, default=0.0)
    for duration in queued:
        start = heapq.heappop(ends) if ends else 0.0
        end = start + max(0.0, duration)
        finish = max(finish, end)
        heapq.heappush(ends, end)
    return finish


def to_submit(pending: Sequence[str], in_flight: int, slots: int) -> list[str]:
    """Which pending instances (already in drain order) to hand to the engine now:
    as many as leave the host at once (`slots`), counting those already in flight.
    Submitting no more than that keeps queued migrations from holding destination
    memory that instances placed after them would need."""
    free = max(0, slots - in_flight)
    return list(pending[:free])


def retry_destination(
    attempts: Sequence[str], failed_on_destination: bool, cancelled: bool, max_attempts: int
) -> bool:
    """Whether an instance whose move did not happen is tried on another destination:
    when the destination refused it or it failed there, up to `max_attempts` hosts;
    never when it was cancelled (its profile's answer: it could not finish in bounds)."""
    if cancelled:
        return False
    return failed_on_destination and len(attempts) < max_attempts


RETRY_ELSEWHERE = "retry-elsewhere"  # this destination cannot take it; try another
LEFT_HOST = "left-host"  # it no longer runs on the drained host: nothing to do
ADOPT = "adopt"  # it is already migrating: follow that migration
GIVE_UP = "give-up"  # it cannot be moved at all (the reason says why)
WAIT = "wait"  # lmwatch cannot take it now (its store): ask again at the next round

# Problem kinds (lmwatch.errors, drivers.base) a refused submission may carry.
_DESTINATION_KINDS = frozenset(
    {
        "insufficient-resources",
        "incompatible",
        "name-taken",
        "already-on-destination",
        "host-unreachable",
        "refused",
        "hypervisor-error",
        "anti-affinity",
        "no-destination",
        "destination-draining",
    }
)


def on_refusal(kind: str, message: str) -> str:
    """What a drain does when the engine refuses to migrate one of its instances
    to the destination placement chose, by the refusal's problem kind."""
    if kind == "not-on-source":
        return LEFT_HOST
    if kind in ("store-unavailable", "store-error"):
        return WAIT
    if kind == "conflict" and "already migrating" in message:
        return ADOPT
    if kind in _DESTINATION_KINDS or kind == "conflict":
        return RETRY_ELSEWHERE  # e.g. admission found the destination overcommitted
    return GIVE_UP  # unknown instance, invalid profile, ...
