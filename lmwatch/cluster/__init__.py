"""Several daemons on one PostgreSQL database: members, leases with fencing,
operator commands.

- `pg`: connections (psycopg 3, synchronous, one connection per thread);
- `schema`: the tables (`cluster_members`, `cluster_leases`, `cluster_commands`);
- `leases`: register and renew a member, offer, claim, release and retire work,
  writes fenced by a claim's token;
- `keeper`: the thread that keeps a member's lease and says when it may act;
- `hosts`: one round of a member taking its share of the source hosts;
- `commands`: operator commands (cancel, force-complete) posted for the daemon
  supervising a migration, taken, answered and waited for through the database.

The decisions (when to renew, when to stop acting, which member gets which host)
are pure functions in `lmwatch.policies.leases`. docs/cluster.md says what exists
and what comes next.
"""
