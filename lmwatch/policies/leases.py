"""Leases of several daemons on one database: pure decisions over plain values.

A daemon (a *member*) holds a lease that the database times (its `expires_at` is
the database's clock at the renewal plus the lease). The daemon cannot read that
clock, but it knows when it *sent* a renewal that then succeeded, by its own
monotonic clock: the database renewed no earlier than that, so the lease runs at
least until `sent + lease`. The daemon stops acting `margin` before that point if
no later renewal succeeded, so that it has stopped before another member can take
its work over.

Hosts are spread across the live members by rendezvous hashing with a bound on
each member's share: every member gets at most ceil(hosts / members) hosts, and a
member joining or leaving moves few hosts besides its own.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LeaseTerms:
    """How long a lease lasts, how often it is renewed, and how long before its end
    a member that could not renew stops acting (all seconds)."""

    lease: float
    renew_every: float
    margin: float
    retry_after: float  # first wait after a failed renewal; doubled up to renew_every

    def __post_init__(self) -> None:
        if min(self.lease, self.renew_every, self.margin, self.retry_after) <= 0:
            raise ValueError("lease terms must be positive")
        if self.renew_every + self.margin >= self.lease:
            raise ValueError(
                f"renew_every ({self.renew_every}s) plus margin ({self.margin}s) must be "
                f"shorter than the lease ({self.lease}s): a member would stop acting "
                "before its next renewal"
            )

    @classmethod
    def for_lease(cls, lease: float) -> LeaseTerms:
        """Renew three times a lease; stop acting a fifth of a lease before its end."""
        return cls(lease=lease, renew_every=lease / 3, margin=lease / 5, retry_after=lease / 20)


def acting_until(renewal_sent_at: float, terms: LeaseTerms) -> float:
    """The monotonic time until which a member may act, given when it sent its last
    successful renewal (or registration)."""
    return renewal_sent_at + terms.lease - terms.margin


def may_act(now: float, renewal_sent_at: float | None, terms: LeaseTerms) -> bool:
    return renewal_sent_at is not None and now < acting_until(renewal_sent_at, terms)


def next_renewal(
    renewal_sent_at: float | None, failures: int, last_attempt_at: float, terms: LeaseTerms
) -> float:
    """When to try to renew next: `renew_every` after the last successful renewal
    (at once when not registered yet); after `failures` consecutive failures,
    `retry_after` doubled per failure, at most `renew_every`, after the last attempt."""
    if failures == 0:
        if renewal_sent_at is None:
            return last_attempt_at
        return renewal_sent_at + terms.renew_every
    doublings = min(failures - 1, 32)  # past that the cap applies anyway
    return last_attempt_at + min(terms.renew_every, terms.retry_after * 2**doublings)


def _weight(host: str, member: str) -> int:
    digest = hashlib.blake2b(f"{host}\0{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign_hosts(hosts: Iterable[str], members: Iterable[str]) -> dict[str, str]:
    """Which member each host belongs to (no members: none). Each member gets at
    most ceil(hosts / members); a host goes to its highest-weighted member that
    still has room, hosts taken in order of their best weight, so the result depends
    only on the two sets."""
    names = sorted(set(members))
    if not names:
        return {}
    unique = sorted(set(hosts))
    room = dict.fromkeys(names, math.ceil(len(unique) / len(names)) if unique else 0)
    ranked = {
        host: sorted(names, key=lambda member: (-_weight(host, member), member)) for host in unique
    }
    order = sorted(unique, key=lambda host: (-_weight(host, ranked[host][0]), host))
    assignment: dict[str, str] = {}
    for host in order:
        member = next(m for m in ranked[host] if room[m] > 0)
        room[member] -= 1
        assignment[host] = member
    return assignment


@dataclass(frozen=True, slots=True)
class HostChanges:
    """What one member should do with host leases: claim these, release those."""

    claim: tuple[str, ...]
    release: tuple[str, ...]


def host_changes(assignment: Mapping[str, str], held: Iterable[str], me: str) -> HostChanges:
    """Claim the hosts assigned to `me` not yet held; release the held ones now
    assigned to another member (or to none, when the host is gone)."""
    held_set = set(held)
    mine = {host for host, member in assignment.items() if member == me}
    return HostChanges(claim=tuple(sorted(mine - held_set)), release=tuple(sorted(held_set - mine)))
