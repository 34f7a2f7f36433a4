"""A member's claims on the migrations it supervises, as the store's writer uses them.

With several daemons on one database every change of a migration is written on
behalf of that migration's claim (a `migration` unit of `cluster_leases`): the
writer's transaction first locks the claims of the migrations in its batch that are
still current (owner, token, a running lease by the database's clock: what
`leases.fenced` checks) and writes only their changes. A migration whose claim is
stale, or that this member holds no claim on, has its changes dropped, never retried;
the drop is logged with the migration and why, and the listeners (the engine) are
told, so that its supervision stops. The final outcome retires the claim, and frees
the migration's destination slot, in the same transaction.

An acceptance (by any member) offers its migration's unit in the transaction that
inserts it.

The SQL runs on the store's write connection (`?` placeholders, rows by column name),
inside the writer's transaction.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping
from typing import Any

from lmwatch.cluster.leases import Claim, describe_stale
from lmwatch.logs import get_logger

log = get_logger("lmwatch.cluster")

MIGRATION = "migration"

_CURRENT = (
    "SELECT l.key AS key FROM cluster_leases l"
    " JOIN unnest(?::text[], ?::bigint[], ?::bigint[]) AS c(key, owner, token)"
    " ON l.key = c.key AND l.owner = c.owner AND l.token = c.token"
    " WHERE l.kind = 'migration' AND EXISTS (SELECT 1 FROM cluster_members m"
    " WHERE m.id = l.owner AND m.expires_at > clock_timestamp())"
    " FOR SHARE OF l"
)
_WHY = (
    "SELECT l.key AS key, l.owner AS owner, l.token AS token, m.name AS name,"
    " m.expires_at > clock_timestamp() AS live"
    " FROM cluster_leases l LEFT JOIN cluster_members m ON m.id = l.owner"
    " WHERE l.kind = 'migration' AND l.key = ANY(?::text[])"
)

StaleListener = Callable[[str, str], None]  # (migration id, why)


class Fencing:
    """The claims this member writes under, by migration id (thread-safe: the engine
    sets them on the loop, the store's writer reads them).

    `idle_limit` (seconds): the server ends a writer's transaction that waits longer
    than this for its next statement (a daemon cut off mid-transaction), so that the
    claims it locked are free before its lease can have run out."""

    def __init__(self, idle_limit: float = 2.0) -> None:
        self.idle_limit = idle_limit
        self._lock = threading.Lock()
        self._claims: dict[str, Claim] = {}
        self._listeners: list[StaleListener] = []

    # -- the engine's side -------------------------------------------------------------

    def hold(self, migration_id: str, claim: Claim) -> None:
        with self._lock:
            self._claims[migration_id] = claim

    def drop(self, migration_id: str) -> Claim | None:
        """Write nothing more for this migration (it is no longer supervised here)."""
        with self._lock:
            return self._claims.pop(migration_id, None)

    def claim_of(self, migration_id: str) -> Claim | None:
        with self._lock:
            return self._claims.get(migration_id)

    def holds(self, migration_id: str) -> bool:
        with self._lock:
            return migration_id in self._claims

    def claims(self) -> dict[str, Claim]:
        with self._lock:
            return dict(self._claims)

    def on_stale(self, listener: StaleListener) -> None:
        self._listeners.append(listener)

    # -- the writer's side (inside its transaction) --------------------------------------

    def admit(self, db: Any, migration_ids: Collection[str]) -> dict[str, str]:
        """Lock the current claims of these migrations for the transaction; the ones
        whose changes must be dropped, with why."""
        if not migration_ids:
            return {}
        db.execute(
            "SELECT set_config('idle_in_transaction_session_timeout', ?, true)",
            (f"{round(self.idle_limit * 1000)}ms",),
        )
        with self._lock:
            claims = {m: self._claims.get(m) for m in migration_ids}
        known = {m: c for m, c in claims.items() if c is not None}
        stale = {m: "this member holds no claim on it" for m, c in claims.items() if c is None}
        if known:
            keys = sorted(known)
            rows = db.execute(
                _CURRENT,
                (keys, [known[k].member for k in keys], [known[k].token for k in keys]),
            ).fetchall()
            current = {str(row["key"]) for row in rows}
            lost = [k for k in keys if k not in current]
            if lost:
                found = {str(row["key"]): row for row in db.execute(_WHY, (lost,)).fetchall()}
                for key in lost:
                    row = found.get(key)
                    stale[key] = (
                        "no such unit: retired"
                        if row is None
                        else describe_stale(
                            known[key], row["owner"], row["token"], row["name"], row["live"]
                        )
                    )
        return stale

    def offer(self, db: Any, migration_id: str) -> None:
        db.execute(
            "INSERT INTO cluster_leases (kind, key) VALUES ('migration', ?) ON CONFLICT DO NOTHING",
            (migration_id,),
        )

    def retire(self, db: Any, migration_id: str) -> None:
        """The migration's final outcome is in this transaction: its unit and its
        destination slot go with it (the claim was locked by `admit`)."""
        claim = self.claim_of(migration_id)
        if claim is not None:
            db.execute(
                "DELETE FROM cluster_leases WHERE kind = 'migration' AND key = ? AND owner = ?"
                " AND token = ?",
                (migration_id, claim.member, claim.token),
            )
        db.execute("DELETE FROM cluster_slots WHERE migration_id = ?", (migration_id,))

    def committed(self, retired: Collection[str], stale: Mapping[str, str]) -> None:
        """After the writer's transaction committed: forget retired claims, report
        the dropped changes (once per migration)."""
        with self._lock:
            for migration_id in (*retired, *stale):
                self._claims.pop(migration_id, None)
        for migration_id, why in stale.items():
            log.warning("changes-dropped", migration=migration_id, why=why)
            for listener in self._listeners:
                listener(migration_id, why)
