"""A daemon as a member of the cluster: its lease, its share of the source hosts and
the migrations it owns, one round at a time.

Blocking (psycopg, one connection of its own): the engine runs each call in a worker
thread (lmwatch/engine/ownership.py). The lease is kept by a `LeaseKeeper` thread;
the store's writer writes under the claims kept in `fencing`.

A round: balance the source hosts (`hosts.balance_hosts`), claim the free `migration`
units of the migrations leaving the hosts this member holds, and report every
migration claim it holds, split into those it owns (source host held) and those to
give up (the host went to another member: released once their supervision stopped).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import psycopg

from lmwatch.cluster import leases
from lmwatch.cluster.fencing import MIGRATION, Fencing
from lmwatch.cluster.hosts import HOST, balance_hosts
from lmwatch.cluster.keeper import LeaseKeeper
from lmwatch.cluster.pg import ENDED, Connection, connect
from lmwatch.cluster.schema import ensure_schema
from lmwatch.logs import get_logger
from lmwatch.policies.leases import LeaseTerms

log = get_logger("lmwatch.cluster")

# Destination slots are counted under this transaction lock, one per destination.
_SLOT_LOCK = "lmwatch-destination:"


@dataclass(frozen=True, slots=True)
class Round:
    """What one round found (all from the database, as the round left it)."""

    member: leases.Member
    hosts: tuple[str, ...]  # the source hosts this member holds
    owned: Mapping[str, leases.Claim] = field(default_factory=dict)  # by migration id
    give_up: tuple[leases.Claim, ...] = ()  # held, but their source host is not ours


class Membership:
    def __init__(
        self, url: str, name: str, terms: LeaseTerms, *, keeper: LeaseKeeper | None = None
    ) -> None:
        self.url = url
        self.name = name
        self.terms = terms
        self.keeper = keeper if keeper is not None else LeaseKeeper(url, name, terms)
        # A transaction of this member's left hanging (cut off mid-way) is ended by the
        # server this long after its last statement: the rows and destination locks
        # it holds are free before its lease can have run out.
        # (Below two thirds of a lease: the least time from a cut to the lease's end.)
        self.idle_limit = min(max(terms.margin, 1.0), terms.lease / 2)
        self.fencing = Fencing(self.idle_limit)
        self._conn: Connection | None = None
        self._lock = threading.Lock()  # one worker thread uses the connection at a time
        self._offered = False
        self.last: Round | None = None  # the last round that reached the database
        self._reached = False  # whether the last round reached the database

    def start(self) -> None:
        self.keeper.start()

    def stop(self, *, resign: bool = False) -> None:
        """Stop renewing. With `resign` (a clean stop, after the store has written
        everything) the lease ends now and another member takes the work over at its
        next round; without it (or when the database cannot be reached) the lease
        runs out first."""
        if resign:
            self.keeper.resign()
        else:
            self.keeper.stop()
        with self._lock:
            self._drop()

    def may_act(self) -> bool:
        return self.keeper.may_act()

    @property
    def reachable(self) -> bool:
        """Whether the database answered this member's last renewal and last round."""
        return self.keeper.member is not None and self.keeper.failures == 0 and self._reached

    def _connection(self) -> Connection:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.url)
            self._conn.execute(
                "SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
                (f"{round(self.idle_limit * 1000)}ms",),
            )
            ensure_schema(self._conn)
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    # -- a round ------------------------------------------------------------------------

    def round(self, hosts: Iterable[str]) -> Round | None:
        """One round (blocking); None when the member is not registered or may not act,
        or the database cannot be reached (then nothing changed)."""
        member = self.keeper.member
        if member is None or not self.keeper.may_act():
            return None
        with self._lock:
            try:
                found = self._round(self._connection(), member, hosts)
            except psycopg.Error as error:
                self._reached = False
                log.warning("round-failed", member=self.name, error=" ".join(str(error).split()))
                self._drop()
                return None
        self._reached = True
        self.last = found
        return found

    def _round(self, conn: Connection, member: leases.Member, hosts: Iterable[str]) -> Round:
        if not self._offered:
            # Migrations accepted before the store had members (one daemon) have no
            # unit yet: offer every unfinished one, once.
            conn.execute(
                "INSERT INTO cluster_leases (kind, key) SELECT 'migration', id FROM migrations"
                " WHERE state <> ALL(%s) ON CONFLICT DO NOTHING",
                (list(ENDED),),
            )
            self._offered = True
        mine = [c.key for c in balance_hosts(conn, member, hosts).held]
        free = [
            str(row[0])
            for row in conn.execute(
                "SELECT l.key FROM cluster_leases l JOIN migrations m ON m.id = l.key"
                " WHERE l.kind = 'migration' AND m.source = ANY(%s)"
                " AND l.owner IS DISTINCT FROM %s",
                (mine, member.id),
            )
        ]
        if free:
            leases.claim(conn, member, MIGRATION, keys=free, limit=len(free))
        held = leases.held(conn, member, MIGRATION)
        sources = {
            str(row[0]): str(row[1])
            for row in conn.execute(
                "SELECT id, source FROM migrations WHERE id = ANY(%s)", ([c.key for c in held],)
            )
        }
        owned = {c.key: c for c in held if sources.get(c.key) in mine}
        give_up = tuple(c for c in held if c.key not in owned)
        return Round(member=member, hosts=tuple(mine), owned=owned, give_up=give_up)

    def release(self, claims: Iterable[leases.Claim]) -> None:
        """Give migrations up (blocking): another member may claim them at once."""
        with self._lock:
            try:
                conn = self._connection()
                for claim in claims:
                    try:
                        leases.release(conn, claim)
                    except leases.StaleClaim as error:
                        log.info("release-stale", migration=claim.key, why=error.why)
            except psycopg.Error as error:
                log.warning("release-failed", member=self.name, error=str(error))
                self._drop()

    def take_slot(self, claim: leases.Claim, destination: str, limit: int) -> bool:
        """A slot on `destination` for the migration of `claim` (blocking): whether it
        may start now. Counted across every member from the database, under a lock per
        destination, and written under the migration's claim."""
        with self._lock:
            try:
                conn = self._connection()
                with leases.fenced(conn, claim):
                    conn.execute(
                        "SELECT pg_advisory_xact_lock(hashtext(%s))", (_SLOT_LOCK + destination,)
                    )
                    if conn.execute(
                        "SELECT 1 FROM cluster_slots WHERE migration_id = %s", (claim.key,)
                    ).fetchone():
                        return True
                    row = conn.execute(
                        "SELECT count(*) FROM cluster_slots s JOIN migrations m"
                        " ON m.id = s.migration_id"
                        " WHERE s.destination = %s AND m.state <> ALL(%s)",
                        (destination, list(ENDED)),
                    ).fetchone()
                    if row is not None and int(row[0]) >= limit:
                        return False
                    conn.execute(
                        "INSERT INTO cluster_slots (migration_id, destination) VALUES (%s, %s)",
                        (claim.key, destination),
                    )
                    return True
            except leases.StaleClaim as error:
                log.warning("slot-refused", migration=claim.key, why=error.why)
                return False
            except psycopg.Error as error:
                log.warning("slot-failed", migration=claim.key, error=str(error))
                self._drop()
                return False

    def held_by_kind(self) -> dict[str, int]:
        """Leases held after the last round, by kind (metrics)."""
        found = self.last
        if found is None or not self.keeper.may_act():
            return {HOST: 0, MIGRATION: 0}
        return {HOST: len(found.hosts), MIGRATION: len(found.owned)}
