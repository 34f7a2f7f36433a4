"""A real, throwaway PostgreSQL for the tests (Debian's package: scripts/postgres.sh).

`PgCluster` (lmwatch/bench/pgserver.py, shared with the cluster benchmark) starts a
server in a temporary directory on a free port. Every test gets a database of its
own (`database()`); the cluster lives for the test session and is stopped and
removed at its end. `TcpProxy` stands between a client and the cluster, so that a
test can cut a daemon off from the database and let it back.

Without PostgreSQL (or psycopg) the tests that need it skip with the reason; under
CI=true they fail instead (the same rule as the rig's, tests/rig/conftest.py).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from lmwatch.bench.pgserver import (
    SUPERUSER,
    PgCluster,
    availability,
    find_bindir,
    free_port,
    running_cluster,
)

__all__ = [
    "SUPERUSER",
    "PgCluster",
    "TcpProxy",
    "availability",
    "find_bindir",
    "free_port",
    "running_cluster",
    "wait_for",
]


class TcpProxy:
    """Forwards 127.0.0.1:<port> to the cluster, until `cut()` closes every
    connection through it and refuses new ones, or `hold()` silently drops whatever
    is sent either way (a partition: the connections stay open, nothing arrives).
    `restore()` forwards again (after a hold the connections' streams are broken:
    cut them first)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._open = True
        self._held = False
        self._stopping = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                if not self._open:
                    client.close()
                    continue
                if self._held:  # accepted, and never answered
                    self._sockets.append(client)
                    threading.Thread(target=self._pipe, args=(client, None), daemon=True).start()
                    continue
                try:
                    server = socket.create_connection(("127.0.0.1", self.target_port), 5)
                except OSError:
                    client.close()
                    continue
                self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket | None) -> None:
        try:
            while data := source.recv(65536):
                if sink is not None and not self._held:
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                if s is not None:
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)

    def hold(self) -> None:
        with self._lock:
            self._held = True

    def cut(self) -> None:
        with self._lock:
            self._open = False
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._sockets.clear()

    def restore(self) -> None:
        with self._lock:
            self._open = True
            self._held = False

    def close(self) -> None:
        self._stopping = True
        self.cut()
        self._listener.close()
        self._thread.join(2)


def wait_for(predicate: object, timeout: float, step: float = 0.02) -> float:
    """Poll `predicate()` until true; the monotonic time it was first seen true."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"not true within {timeout}s")
        time.sleep(step)
