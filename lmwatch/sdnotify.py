"""systemd's notify protocol, without a dependency: readiness, watchdog, stopping.

Under `Type=notify` systemd names a unix datagram socket in `$NOTIFY_SOCKET` (a path,
or an abstract name written with a leading '@'). The daemon sends `READY=1` once the
API listens and the engine runs, `WATCHDOG=1` every `$WATCHDOG_USEC`/2 while the
supervisor is alive, and `STOPPING=1` when it shuts down. Outside systemd (no
`$NOTIFY_SOCKET`) every call does nothing.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping

from lmwatch.logs import get_logger

log = get_logger("lmwatch.sdnotify")

__all__ = ["Notifier", "watchdog_interval"]


def _address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace
    if value.startswith("/"):
        return value
    return None  # e.g. vsock:...; not used for services on the host itself


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of `$WATCHDOG_USEC`), or None when systemd
    does not watch this process (unset, invalid, or `$WATCHDOG_PID` names another)."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


class Notifier:
    """Sends notify messages to `$NOTIFY_SOCKET` (a no-op when there is none)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = _address(raw) if raw else None
        if raw and self.address is None:
            log.warning("sd-notify-unsupported", socket=raw, note="not a path or @name; ignored")
        self.watchdog = watchdog_interval(env) if self.address else None
        self._stalled = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send `KEY=value` lines in one datagram; False (and a log line) if it fails."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                sock.sendall(message)
        except OSError as error:
            log.warning("sd-notify-failed", message=fields[0], error=error.strerror or error)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping")

    def beat(self, problem: str | None) -> bool:
        """One watchdog round: ping when `problem` is None, otherwise say what is wrong
        (in the unit's status) and let systemd's watchdog run out."""
        if problem is None:
            if self._stalled:
                self._stalled = False
                log.info("watchdog-recovered")
                self.send("STATUS=supervising")
            return self.send("WATCHDOG=1")
        if not self._stalled:
            self._stalled = True
            log.warning("watchdog-withheld", problem=problem)
        self.send(f"STATUS=not alive: {problem}")
        return False

    async def feed(self, alive: Callable[[], str | None]) -> None:
        """Every watchdog interval, ping if `alive()` finds nothing wrong (runs forever;
        returns at once when systemd does not watch this process)."""
        if self.watchdog is None:
            return
        while True:
            self.beat(alive())
            await asyncio.sleep(self.watchdog)
