"""`choose`: which host an instance should move to, among the candidates as seen now.

A candidate is rejected, with the first reason that applies, when:

1. it is the source, or one of the hosts the caller excluded (never listed);
2. it is being drained (by any daemon): nothing is moved onto a host being emptied,
   forced or not;
3. the pre-flight refused it (CPU model or pinning, non-movable devices, name taken,
   unreachable, ...): the refusal's own sentence;
4. two instances sharing a `group` label would run on it (an instance of that group
   runs there or is arriving);
5. the instance's profile allows handover and the pair cannot hand over (the profile
   counts on it to finish within its bounds);
6. its free memory, less what queued and running migrations to it reserve, is
   below the instance's memory (not checked when `forced`).

The others are ranked, best first, by:

1. a free arrival slot (fewer migrations queued or running to it than the engine's
   per-host limit): it starts now instead of queueing;
2. most free memory after reservations;
3. fastest link from the source (unknown counts as slowest);
4. fewest migrations queued or running to and from it;
5. name (so that the choice is deterministic).

The reason names the chosen host, the rule that decided against the runner-up, and
every rejected host with its reason. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from lmwatch.units import format_size

GROUP_LABEL = "group"  # instances sharing its value never land on the same host


class How(StrEnum):
    """How a migration's destination was placed."""

    CHOSEN = "chosen"  # lmwatch chose it: the request named none
    NAMED = "named"  # the request named it; every check applied
    FORCED = "forced"  # the request named it with force: capacity checks skipped


@dataclass(frozen=True, slots=True)
class Candidate:
    """One possible destination as seen now."""

    host: str
    free_memory: int | None  # bytes the host reports free; None when unknown
    reserved: int = 0  # bytes queued and running migrations to it reserve
    reservations: int = 0  # how many migrations hold those reservations
    refused: str | None = None  # the pre-flight's refusal; None when it accepted
    handover: bool = True  # the pair (source, host) can hand over
    bandwidth: float | None = None  # bytes/s from the source, when known
    arriving: int = 0  # migrations queued or running to it
    leaving: int = 0  # migrations queued or running from it
    groups: frozenset[str] = frozenset()  # `group` labels of instances there or arriving
    drain: str | None = None  # the id of the drain emptying it, when one is

    @property
    def available(self) -> int | None:
        """Free memory after reservations (bytes); None when the host does not say."""
        return None if self.free_memory is None else self.free_memory - self.reserved


@dataclass(frozen=True, slots=True)
class Need:
    """What the instance to place needs."""

    instance: str
    source: str
    memory: int  # bytes
    group: str | None = None  # its `group` label, if any
    handover: bool = False  # its profile allows handover (and counts on it)
    profile: str | None = None  # the profile's name, for the reasons


@dataclass(frozen=True, slots=True)
class Placement:
    """The answer: the chosen host (None when none fits), why, and why not the others."""

    host: str | None
    reason: str
    rejected: Mapping[str, str] = field(default_factory=dict)  # host -> why not
    candidates: tuple[Candidate, ...] = ()  # every host considered, as seen
    instance: str = ""  # the instance placed, by name
    source: str = ""  # where it runs now


def rejection(need: Need, candidate: Candidate, *, forced: bool = False) -> str | None:
    """Why `candidate` cannot take the instance (rules 2-6 above); None when it can."""
    if candidate.drain is not None:
        return f"{candidate.host} is being drained (drain {candidate.drain})"
    if candidate.refused is not None:
        return candidate.refused
    if need.group and need.group in candidate.groups:
        return (
            f"instance of group {need.group!r} already there or arriving "
            f"({need.instance!r} may not share a host with it)"
        )
    if need.handover and not candidate.handover:
        profile = f"profile {need.profile!r}" if need.profile else "its profile"
        return f"cannot take handover from {need.source}, which {profile} allows"
    available = candidate.available
    if not forced and available is not None and available < need.memory:
        return (
            f"{candidate.host} has {format_size(max(0, candidate.free_memory or 0))} free, "
            f"{reserved_text(candidate)}; {need.instance} needs {format_size(need.memory)}"
        )
    return None


def reserved_text(candidate: Candidate) -> str:
    """ "4.0GiB reserved by 1 migration", or "nothing reserved"."""
    if not candidate.reservations:
        return "nothing reserved"
    plural = "" if candidate.reservations == 1 else "s"
    return (
        f"{format_size(candidate.reserved)} reserved by {candidate.reservations} migration{plural}"
    )


def _rank(candidate: Candidate, slots: int) -> tuple[int, int, float, int, str]:
    available = candidate.available
    return (
        0 if candidate.arriving < slots else 1,
        -(available if available is not None else -1),
        -(candidate.bandwidth or 0.0),
        candidate.arriving + candidate.leaving,
        candidate.host,
    )


def _deciding(best: Candidate, second: Candidate, slots: int, count: int) -> str:
    """Which ranking rule put `best` ahead of `second`, as words."""
    among = f"among {count} candidates"
    if (best.arriving < slots) != (second.arriving < slots):
        return f"a free arrival slot ({best.arriving} of {slots} in use) {among}"
    if best.available != second.available:
        free = format_size(best.available or 0)
        return f"most free memory after reservations ({free}) {among}"
    if best.bandwidth != second.bandwidth:
        return f"fastest link from the source ({format_size(int(best.bandwidth or 0))}/s) {among}"
    if best.arriving + best.leaving != second.arriving + second.leaving:
        return f"fewest migrations to and from it {among}"
    return f"first by name of {count} equal candidates"


def choose(
    need: Need,
    candidates: Sequence[Candidate],
    *,
    per_destination: int,
    exclude: Collection[str] = (),
    forced: bool = False,
) -> Placement:
    """The best candidate for `need` (see the module's rules), or none with every reason.

    `per_destination` is the engine's limit of migrations arriving at one host at once;
    `exclude` lists hosts never to choose (the source is never chosen either)."""
    seen = tuple(
        sorted(
            (c for c in candidates if c.host != need.source and c.host not in exclude),
            key=lambda c: c.host,
        )
    )
    rejected: dict[str, str] = {}
    fit: list[Candidate] = []
    for candidate in seen:
        why = rejection(need, candidate, forced=forced)
        if why is None:
            fit.append(candidate)
        else:
            rejected[candidate.host] = why
    not_chosen = "; ".join(f"{host} rejected: {why}" for host, why in rejected.items())
    if not fit:
        if not seen:
            reason = f"no candidate host for {need.instance} (only its source or excluded hosts)"
        else:
            reason = f"no host can take {need.instance}: {not_chosen}"
        return Placement(None, reason, rejected, seen, need.instance, need.source)
    fit.sort(key=lambda c: _rank(c, per_destination))
    best = fit[0]
    if len(fit) == 1:
        why = f"the only one of {len(seen)} candidates that can take it"
    else:
        why = _deciding(best, fit[1], per_destination, len(fit))
    reason = f"{best.host}: {why}" + (f"; {not_chosen}" if not_chosen else "")
    return Placement(best.host, reason, rejected, seen, need.instance, need.source)
