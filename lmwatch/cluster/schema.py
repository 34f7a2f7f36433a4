"""The cluster's tables (members, leases, operator commands), created once by
whichever member comes first."""

from __future__ import annotations

from lmwatch.cluster.pg import Connection

# Taken while creating the tables, so that members starting at once do not race.
_SCHEMA_LOCK = 0x6C6D_7761_7463_6801

_SCHEMA = """
CREATE TABLE IF NOT EXISTS cluster_members (
    id bigserial PRIMARY KEY,
    name text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS cluster_leases (
    kind text NOT NULL,
    key text NOT NULL,
    owner bigint,
    token bigint NOT NULL DEFAULT 0,
    claimed_at timestamptz,
    PRIMARY KEY (kind, key)
);
CREATE INDEX IF NOT EXISTS cluster_leases_owner ON cluster_leases (owner);
CREATE TABLE IF NOT EXISTS cluster_commands (
    id bigserial PRIMARY KEY,
    migration_id text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('cancel', 'force-complete')),
    params jsonb NOT NULL DEFAULT '{}',
    posted_by text NOT NULL,
    posted_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    taken_by text,
    taken_at timestamptz,
    takes integer NOT NULL DEFAULT 0,
    outcome text CHECK (outcome IN ('accepted', 'refused')),
    status integer,
    problem text,
    detail text,
    result jsonb,
    applied_by text,
    decided_at timestamptz
);
CREATE INDEX IF NOT EXISTS cluster_commands_pending ON cluster_commands (migration_id)
    WHERE outcome IS NULL;
CREATE TABLE IF NOT EXISTS cluster_slots (
    migration_id text PRIMARY KEY,
    destination text NOT NULL
);
CREATE INDEX IF NOT EXISTS cluster_slots_destination ON cluster_slots (destination);
"""


def ensure_schema(conn: Connection) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        for statement in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
            conn.execute(statement)
