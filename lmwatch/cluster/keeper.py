"""The thread that keeps one member's lease, and says whether the member may act.

It registers the member, renews its lease every `renew_every`, reconnects when the
database cannot be reached (a restart, a cut connection) and, when a renewal finds
the lease already run out, registers a new incarnation (whose claims start afresh).
`may_act()` is answered from the monotonic clock alone, so that it turns false in
time even while a renewal hangs: `margin` before the lease can have run out, counted
from when the last successful renewal was sent (`lmwatch.policies.leases`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from lmwatch.cluster import leases
from lmwatch.cluster.pg import Connection, connect
from lmwatch.cluster.schema import ensure_schema
from lmwatch.logs import get_logger
from lmwatch.policies.leases import LeaseTerms, acting_until, may_act, next_renewal

log = get_logger("lmwatch.cluster")


@dataclass(frozen=True, slots=True)
class Tenure:
    """What the keeper knows now: the member (None before it first registered) and
    until when it may act (monotonic; None: not at all)."""

    member: leases.Member | None
    acting_until: float | None


class LeaseKeeper:
    def __init__(
        self,
        url: str,
        name: str,
        terms: LeaseTerms,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        connector: Callable[[str], Connection] = connect,
    ) -> None:
        self.url = url
        self.name = name
        self.terms = terms
        self._monotonic = monotonic
        self._connector = connector
        self._conn: Connection | None = None
        self._member: leases.Member | None = None
        self._sent_at: float | None = None  # when the last successful renewal was sent
        self._failures = 0
        self._last_attempt = monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.incarnations = 0  # how many times it registered

    # -- what the member may do ------------------------------------------------------

    def tenure(self) -> Tenure:
        with self._lock:
            until = None if self._sent_at is None else acting_until(self._sent_at, self.terms)
            return Tenure(self._member, until)

    def may_act(self) -> bool:
        with self._lock:
            return may_act(self._monotonic(), self._sent_at, self.terms)

    @property
    def failures(self) -> int:
        """Consecutive renewals that failed (one that hangs has not failed yet)."""
        return self._failures

    @property
    def member(self) -> leases.Member | None:
        with self._lock:
            return self._member

    # -- one renewal -----------------------------------------------------------------

    def renew_once(self) -> bool:
        """One attempt to register or renew; whether it succeeded."""
        sent_at = self._monotonic()
        self._last_attempt = sent_at
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self._connector(self.url)
                ensure_schema(self._conn)
            member = self.member
            if member is None:
                renewed = leases.register(self._conn, self.name, self.terms.lease)
                self.incarnations += 1
                log.info("member-registered", member=self.name, id=renewed.id)
            else:
                try:
                    renewed = leases.renew(self._conn, member, self.terms.lease)
                except leases.LeaseExpired:
                    log.warning("lease-lost", member=self.name, id=member.id)
                    with self._lock:
                        self._member = None
                        self._sent_at = None
                    sent_at = self._monotonic()
                    renewed = leases.register(self._conn, self.name, self.terms.lease)
                    self.incarnations += 1
                    log.info("member-registered", member=self.name, id=renewed.id)
        except psycopg.Error as error:  # unreachable, or refused: either way not renewed
            self._failures += 1
            log.warning(
                "lease-not-renewed", member=self.name, failures=self._failures, error=str(error)
            )
            self._drop_connection()
            return False
        with self._lock:
            self._member = renewed
            self._sent_at = sent_at
        self._failures = 0
        return True

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    # -- the thread ------------------------------------------------------------------

    def start(self) -> None:
        assert self._thread is None
        self._thread = threading.Thread(target=self._run, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                sent_at = self._sent_at
            due = next_renewal(sent_at, self._failures, self._last_attempt, self.terms)
            wait = due - self._monotonic()
            if wait > 0 and self._stop.wait(wait):
                break
            self.renew_once()
        self._drop_connection()

    def stop(self) -> None:
        """Stop renewing (the lease then runs out; nothing is released)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def resign(self) -> bool:
        """Stop renewing and end the lease now, so that other members take the work
        over at their next round instead of once the lease has run out; whether it
        was ended (False: not registered, already run out, or the database could not
        be reached: then it runs out as after `stop`)."""
        self.stop()
        with self._lock:
            member = self._member
            self._member = None
            self._sent_at = None
        if member is None:
            return False
        try:
            with self._connector(self.url) as conn:
                ended = leases.resign(conn, member)
        except psycopg.Error as error:
            log.warning("lease-not-ended", member=self.name, id=member.id, error=str(error))
            return False
        log.info("member-resigned", member=self.name, id=member.id, ended=ended)
        return ended
