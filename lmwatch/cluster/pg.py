"""Connections to PostgreSQL.

The driver is psycopg 3, used synchronously, one connection per thread. lmwatch's
store writes through one writer thread that makes plain blocking calls (the SQLite
store's shape, which the PostgreSQL store keeps), and the lease keeper is a thread
of its own: both want a blocking driver whose connection belongs to one thread.
asyncpg is asyncio-only, so it would need a second event loop in each such thread
or a move of the store's writes onto the daemon's loop; psycopg 3 fits the threads
as they are, still offers an async API if that changes, and its binary wheel brings
its own libpq (the `postgres` extra), so a deployment needs nothing else installed.
"""

from __future__ import annotations

from typing import Any

import psycopg

from lmwatch.model import State

Connection = psycopg.Connection[Any]
# The errors that mean "the database cannot be reached now" (server gone, restarted,
# connection cut): retry on a new connection.
Unreachable = (psycopg.OperationalError, psycopg.InterfaceError)
# The `migrations.state` values of a migration that ended: no member supervises it.
ENDED = tuple(sorted(state.value for state in State if state.finished))


LOCK_WAIT = 5.0
"""Seconds a statement waits for a row or lock another session holds before it fails
(as SQLite's busy timeout): a write held up by a stuck session, an operator's open
transaction say, is then kept and retried like one the database did not take, instead
of stopping the writer and everything that waits for it."""
IDLE_IN_TRANSACTION = 10.0
"""Seconds the server lets one of lmwatch's sessions sit idle inside a transaction
before it ends the session: lmwatch's transactions take milliseconds, so one that
sits is a daemon frozen in the middle of it, whose locks would hold up every other
member's writes."""


def connect(
    url: str,
    *,
    timeout: float = 5.0,
    lock_wait: float = LOCK_WAIT,
    idle_in_transaction: float = IDLE_IN_TRANSACTION,
) -> Connection:
    """An autocommit connection (transactions are explicit: `with conn.transaction()`),
    with TCP keepalives so that a dead peer is noticed while idle, a limit on how long
    sent data may go unacknowledged (a partition) before the connection fails, and
    bounded waits for what other sessions hold (`LOCK_WAIT`, `IDLE_IN_TRANSACTION`)."""
    conn = psycopg.connect(
        url,
        autocommit=True,
        connect_timeout=max(1, round(timeout)),
        keepalives=1,
        keepalives_idle=max(1, round(timeout)),
        keepalives_interval=1,
        keepalives_count=3,
        tcp_user_timeout=max(1000, round(timeout * 1000)),
        application_name="lmwatch",
    )
    try:
        conn.execute(
            "SELECT set_config('lock_timeout', %s, false),"
            " set_config('idle_in_transaction_session_timeout', %s, false)",
            (f"{round(lock_wait * 1000)}ms", f"{round(idle_in_transaction * 1000)}ms"),
        )
    except BaseException:
        conn.close()
        raise
    return conn
