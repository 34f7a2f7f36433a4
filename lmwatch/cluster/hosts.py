"""A member's share of the source hosts: one round of claiming and releasing.

Each round offers the hosts (so that every host has a lease row), reads the live
members, computes who should hold which host (`assign_hosts`, by member name, so
that a restarted daemon gets the same hosts back), releases the hosts this member
holds that now belong to another, and claims the free ones that belong to it. A
host still held by its previous live owner is claimed in a later round, once that
owner has released it or its lease has run out: two members never hold one host.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lmwatch.cluster import leases
from lmwatch.cluster.pg import Connection
from lmwatch.logs import get_logger
from lmwatch.policies.leases import assign_hosts, host_changes

log = get_logger("lmwatch.cluster")

HOST = "host"


@dataclass(frozen=True, slots=True)
class HostRound:
    held: tuple[leases.Claim, ...]  # after the round
    claimed: tuple[str, ...]
    released: tuple[str, ...]
    waiting: tuple[str, ...]  # assigned to this member, still held by another


def balance_hosts(conn: Connection, member: leases.Member, hosts: Iterable[str]) -> HostRound:
    all_hosts = sorted(set(hosts))
    leases.offer(conn, HOST, all_hosts)
    names = {m.name for m in leases.live_members(conn)}
    assignment = assign_hosts(all_hosts, names)
    current = {c.key: c for c in leases.held(conn, member, HOST)}
    changes = host_changes(assignment, current, member.name)
    released: list[str] = []
    for host in changes.release:
        try:
            leases.release(conn, current.pop(host))
            released.append(host)
        except leases.StaleClaim as error:
            current.pop(host, None)
            log.warning("host-lease-lost", member=member.name, host=host, why=error.why)
    claimed = (
        leases.claim(conn, member, HOST, keys=changes.claim, limit=len(changes.claim))
        if changes.claim
        else []
    )
    for c in claimed:
        current[c.key] = c
    waiting = tuple(h for h in changes.claim if h not in current)
    if claimed or released:
        log.info(
            "hosts-balanced",
            member=member.name,
            claimed=",".join(c.key for c in claimed) or None,
            released=",".join(released) or None,
            waiting=len(waiting),
        )
    return HostRound(
        held=tuple(sorted(current.values(), key=lambda c: c.key)),
        claimed=tuple(c.key for c in claimed),
        released=tuple(released),
        waiting=waiting,
    )
