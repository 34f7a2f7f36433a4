"""Members and leases with fencing, in two tables.

A *member* is one daemon's incarnation: a row of `cluster_members` with a name (the
daemon's identity) and a lease, `expires_at`, set from the database's clock at each
renewal. Registering again under the same name replaces the earlier incarnation
(a restarted daemon, or a stale process of the same name), whose renewals then fail.

A unit of work (a source host, a migration) is a row of `cluster_leases`, named by
`(kind, key)`. It belongs to the member in `owner` while that member's lease runs;
once the lease has expired (or the member is gone) any live member may claim it.
Each claim adds one to the row's `token`: the fencing token. A write made on behalf
of a claim runs in `fenced(...)`, which first checks, in the write's transaction,
that the row is still owned by that member with that token and that the member's
lease still runs (by the database's clock), and holds the row against claims until
the transaction ends. A stale claim writes nothing: `StaleClaim` says why.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from lmwatch.cluster.pg import Connection


class LeaseExpired(Exception):
    """The member's lease ran out (or a later incarnation replaced it): it must stop
    acting and register again."""


class StaleClaim(Exception):
    """A write on behalf of a claim that is no longer the current one: nothing was
    written."""

    def __init__(self, claim: Claim, why: str) -> None:
        super().__init__(
            f"{claim.kind} {claim.key}: claim of member {claim.member} with token "
            f"{claim.token} is stale ({why}); nothing written"
        )
        self.claim = claim
        self.why = why


@dataclass(frozen=True, slots=True)
class Member:
    id: int
    name: str
    expires_at: datetime  # the database's clock


@dataclass(frozen=True, slots=True)
class Claim:
    """A member's hold on one unit of work; `token` fences its writes."""

    kind: str
    key: str
    member: int
    token: int


_LIVE = "SELECT 1 FROM cluster_members m WHERE m.id = {owner} AND m.expires_at > clock_timestamp()"


def register(conn: Connection, name: str, lease: float) -> Member:
    """A new incarnation of `name`, with a lease of `lease` seconds from now (the
    database's clock). Earlier incarnations of the name are dropped, and so are
    members whose lease ended over an hour ago."""
    with conn.transaction():
        conn.execute(
            "DELETE FROM cluster_members WHERE name = %s"
            " OR expires_at < clock_timestamp() - interval '1 hour'",
            (name,),
        )
        row = conn.execute(
            "INSERT INTO cluster_members (name, expires_at)"
            " VALUES (%s, clock_timestamp() + make_interval(secs => %s))"
            " RETURNING id, expires_at",
            (name, lease),
        ).fetchone()
    assert row is not None
    return Member(id=int(row[0]), name=name, expires_at=row[1])


def renew(conn: Connection, member: Member, lease: float) -> Member:
    """Extend a running lease to `lease` seconds from now; `LeaseExpired` if it has
    already run out or the member was replaced (then nothing is extended)."""
    row = conn.execute(
        "UPDATE cluster_members SET expires_at = clock_timestamp() + make_interval(secs => %s)"
        " WHERE id = %s AND expires_at > clock_timestamp() RETURNING expires_at",
        (lease, member.id),
    ).fetchone()
    if row is None:
        raise LeaseExpired(f"member {member.name} (#{member.id}): lease expired or replaced")
    return Member(id=member.id, name=member.name, expires_at=row[0])


def resign(conn: Connection, member: Member) -> bool:
    """End a running lease now (a clean stop, once everything was written): every
    unit the member holds may be claimed at once, as after its lease had run out.
    Whether it was still running."""
    row = conn.execute(
        "UPDATE cluster_members SET expires_at = clock_timestamp()"
        " WHERE id = %s AND expires_at > clock_timestamp() RETURNING id",
        (member.id,),
    ).fetchone()
    return row is not None


def live_members(conn: Connection) -> list[Member]:
    rows = conn.execute(
        "SELECT id, name, expires_at FROM cluster_members"
        " WHERE expires_at > clock_timestamp() ORDER BY id"
    ).fetchall()
    return [Member(id=int(r[0]), name=str(r[1]), expires_at=r[2]) for r in rows]


def offer(conn: Connection, kind: str, keys: Iterable[str]) -> int:
    """Make units of work claimable (those already known are left as they are); how
    many were new."""
    cursor = conn.execute(
        "INSERT INTO cluster_leases (kind, key) SELECT %s, unnest(%s::text[])"
        " ON CONFLICT DO NOTHING",
        (kind, list(keys)),
    )
    return cursor.rowcount


def claim(
    conn: Connection,
    member: Member,
    kind: str,
    *,
    keys: Iterable[str] | None = None,
    limit: int = 100,
) -> list[Claim]:
    """Claim up to `limit` free units of `kind` (among `keys`, if given): those with no
    owner, or whose owner's lease has run out. Rows another member is claiming or
    writing under its claim at this moment are skipped, not waited for. Nothing is
    claimed unless `member`'s own lease runs."""
    rows = conn.execute(
        "WITH free AS ("
        "  SELECT l.kind, l.key FROM cluster_leases l"
        "  WHERE l.kind = %(kind)s"
        "    AND (%(keys)s::text[] IS NULL OR l.key = ANY(%(keys)s::text[]))"
        "    AND (l.owner IS NULL OR NOT EXISTS (" + _LIVE.format(owner="l.owner") + "))"
        "    AND EXISTS (" + _LIVE.format(owner="%(me)s") + ")"
        "  ORDER BY l.key LIMIT %(limit)s"
        "  FOR UPDATE OF l SKIP LOCKED"
        ") "
        "UPDATE cluster_leases l SET owner = %(me)s, token = l.token + 1,"
        " claimed_at = clock_timestamp()"
        " FROM free WHERE l.kind = free.kind AND l.key = free.key"
        " RETURNING l.key, l.token",
        {
            "kind": kind,
            "keys": None if keys is None else list(keys),
            "me": member.id,
            "limit": limit,
        },
    ).fetchall()
    return sorted(
        (Claim(kind=kind, key=str(r[0]), member=member.id, token=int(r[1])) for r in rows),
        key=lambda c: c.key,
    )


def held(conn: Connection, member: Member, kind: str) -> list[Claim]:
    """The units of `kind` that `member` holds now, with their tokens."""
    rows = conn.execute(
        "SELECT key, token FROM cluster_leases WHERE kind = %s AND owner = %s ORDER BY key",
        (kind, member.id),
    ).fetchall()
    return [Claim(kind=kind, key=str(r[0]), member=member.id, token=int(r[1])) for r in rows]


def _why_stale(conn: Connection, held_claim: Claim) -> str:
    row = conn.execute(
        "SELECT l.owner, l.token, m.name, m.expires_at > clock_timestamp()"
        " FROM cluster_leases l LEFT JOIN cluster_members m ON m.id = l.owner"
        " WHERE l.kind = %s AND l.key = %s",
        (held_claim.kind, held_claim.key),
    ).fetchone()
    if row is None:
        return "no such unit: retired"
    return describe_stale(held_claim, row[0], row[1], row[2], row[3])


def describe_stale(
    held_claim: Claim, owner: int | None, token: int, name: str | None, live: bool | None
) -> str:
    """Why `held_claim` is stale, given its unit's row as it is now."""
    if owner == held_claim.member and token == held_claim.token:
        return "the member's lease has run out"
    if owner is None:
        return f"released; token now {token}"
    state = "live" if live else "lease run out"
    return f"now claimed by member {name or '?'} (#{owner}, {state}) with token {token}"


@contextmanager
def fenced(conn: Connection, held_claim: Claim) -> Iterator[Connection]:
    """A transaction in which to write on behalf of `held_claim`: entered only while
    the claim is current (same owner, same token, the owner's lease running by the
    database's clock), else `StaleClaim` and nothing written. The row is locked for
    the transaction, so no other member claims it before the writes commit."""
    with conn.transaction():
        row = conn.execute(
            "SELECT 1 FROM cluster_leases l"
            " WHERE l.kind = %s AND l.key = %s AND l.owner = %s AND l.token = %s"
            " AND EXISTS (" + _LIVE.format(owner="l.owner") + ")"
            " FOR SHARE OF l",
            (held_claim.kind, held_claim.key, held_claim.member, held_claim.token),
        ).fetchone()
        if row is None:
            raise StaleClaim(held_claim, _why_stale(conn, held_claim))
        yield conn


def release(conn: Connection, held_claim: Claim) -> None:
    """Give the unit up (another member may claim it at once); `StaleClaim` if it was
    no longer ours."""
    with fenced(conn, held_claim):
        conn.execute(
            "UPDATE cluster_leases SET owner = NULL WHERE kind = %s AND key = %s",
            (held_claim.kind, held_claim.key),
        )


def retire(conn: Connection, held_claim: Claim) -> None:
    """Forget a finished unit, inside a `fenced` transaction of its claim (so that
    the work's last write and the retirement commit together)."""
    conn.execute(
        "DELETE FROM cluster_leases WHERE kind = %s AND key = %s AND owner = %s AND token = %s",
        (held_claim.kind, held_claim.key, held_claim.member, held_claim.token),
    )
