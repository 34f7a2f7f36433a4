"""A throwaway PostgreSQL server (Debian's package: scripts/postgres.sh), for the
tests (tests/pgtools.py) and the benchmarks that run several daemons on one
database (lmwatch/bench/cluster.py).

`PgCluster` runs `initdb` into a fresh temporary directory and `pg_ctl start` on a
free port, with its Unix socket in that directory, as an unprivileged user
(PostgreSQL refuses to run as root: as root the commands run as `postgres` through
`runuser`). `database()` makes an empty database and gives its URL; `stop()`
removes everything.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

SUPERUSER = "lmwatch"


def find_bindir() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin with initdb, pg_ctl and postgres, else the
    directory of an `initdb` on PATH."""
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda d: [int(p) if p.isdigit() else 0 for p in Path(d).parent.name.split(".")],
        reverse=True,
    )
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for directory in candidates:
        if all(os.access(Path(directory) / tool, os.X_OK) for tool in ("initdb", "pg_ctl")):
            return Path(directory)
    return None


def availability() -> tuple[bool, str]:
    """(True, where) when a cluster can be started here, else (False, why not)."""
    try:
        import psycopg  # noqa: F401
    except ImportError as error:
        return False, f"psycopg not importable ({error}); install the `postgres` extra"
    bindir = find_bindir()
    if bindir is None:
        return False, "no PostgreSQL server binaries (initdb, pg_ctl): run scripts/postgres.sh"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return False, "running as root and there is no `postgres` user to run the server"
        if shutil.which("runuser") is None:
            return False, "running as root and there is no runuser to drop to `postgres`"
    return True, str(bindir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """One PostgreSQL server in a temporary directory; `stop()` removes it all."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self._as_root = os.geteuid() == 0
        # As root the server runs as `postgres`, which must reach the directory: not
        # under a $TMPDIR that only root may enter.
        self.root = Path(
            tempfile.mkdtemp(prefix="lmwatch-pg-", dir="/tmp" if self._as_root else None)
        )
        self.data = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.log_path = self.root / "server.log"
        self.port = free_port()
        self._names = itertools.count(1)
        self.socket_dir.mkdir()
        if self._as_root:
            owner = pwd.getpwnam("postgres")
            for path in (self.root, self.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bindir / tool), *args]
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"{tool} failed ({done.returncode}): {done.stderr or done.stdout}\n"
                f"server log:\n{self.server_log()}"
            )

    def server_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "<no server log>"

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 "
            # A throwaway cluster: what is committed survives a restart of the server
            # (the tests restart it), not a crash of this machine.
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data),
            "-l", str(self.log_path), "-o", options,
        )  # fmt: skip

    def restart(self) -> None:
        """Stop (fast: clients are disconnected) and start again on the same port."""
        self._run("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data))
        self.start()

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError):
            self._run("pg_ctl", "stop", "-w", "-m", "immediate", "-D", str(self.data))
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres", port: int | None = None) -> str:
        return (
            f"postgresql://{SUPERUSER}@127.0.0.1:{port or self.port}/{database}?connect_timeout=5"
        )

    def database(self) -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextlib.contextmanager
def running_cluster() -> Iterator[PgCluster]:
    ok, where = availability()
    if not ok:
        raise RuntimeError(where)
    cluster = PgCluster(Path(where))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
