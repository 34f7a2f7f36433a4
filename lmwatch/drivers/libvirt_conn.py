"""One connection per libvirt host: opened lazily, kept alive, reopened with backoff.

Every blocking libvirt call runs in a daemon thread of its own (libvirt-python
releases the GIL and a connection may be used from several threads at once); a
call stuck on a dead connection therefore never holds up the process's exit, as
a thread-pool worker would. libvirt errors become `DriverError`s whose message is
neutral (a classified cause plus the text through `neutral_text`; the raw text is
only logged); an error that
means the daemon went away also drops the connection, and the next call reopens
it once the backoff delay has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from lmwatch.clock import Clock
from lmwatch.drivers.base import DriverError
from lmwatch.drivers.libvirt_events import ensure_event_loop
from lmwatch.drivers.libvirt_mapping import ErrorCause, error_cause, neutral_text
from lmwatch.logs import get_logger

T = TypeVar("T")
log = get_logger("lmwatch.drivers.libvirt")

KEEPALIVE_INTERVAL = 5  # seconds between keepalive messages
KEEPALIVE_COUNT = 3  # unanswered messages before the connection counts as dead
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
CALL_TIMEOUT = 60.0


class HypervisorError(DriverError):
    """A libvirt call failed; `code` is libvirt's error code."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class HostLost(HypervisorError):
    """The connection to the host's hypervisor daemon is gone."""


def in_daemon_thread(
    fn: Callable[..., T], *args: Any, name: str = "lmw-libvirt"
) -> asyncio.Future[T]:
    """Run `fn(*args)` in a new daemon thread; the future gets its result or exception.

    Unlike `asyncio.to_thread`, a call that never returns (a libvirt call on a
    connection whose daemon went away) does not keep the process from exiting.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if future.done():  # cancelled by a timeout meanwhile
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def body() -> None:
        value: Any
        try:
            ok, value = True, fn(*args)
        except BaseException as error:  # handed to the awaiting side
            ok, value = False, error
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(deliver, ok, value)

    threading.Thread(target=body, name=name, daemon=True).start()
    return future


def backoff_delay(failures: int) -> float:
    """0.5, 1, 2, 4, ... seconds, at most 30."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, failures - 1))


EventSetup = Callable[[str, Any], list[int]]


class HostLink:
    """The connection to one host's libvirt daemon."""

    def __init__(
        self,
        name: str,
        uri: str,
        lv: Any,
        libvirtaio: Any | None,
        clock: Clock,
        setup_events: EventSetup | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.name = name
        self.uri = uri
        self._lv = lv
        self._aio = libvirtaio
        self._clock = clock
        self._setup_events = setup_events
        self._loop = loop
        self._conn: Any | None = None
        self._callback_ids: list[int] = []
        self._failures = 0
        self._retry_at = 0.0
        self._last_error = ""
        self._opening: asyncio.Lock | None = None

    # -- connection ---------------------------------------------------------------

    async def connection(self) -> Any:
        """The open connection, opening it when needed (respecting the backoff)."""
        if self._conn is not None:
            return self._conn
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._conn is not None:
                return self._conn
            now = self._clock.now()
            if now < self._retry_at:
                raise HostLost(
                    f"host {self.name} is unreachable ({self._last_error}); "
                    f"next attempt in {self._retry_at - now:.1f} s"
                )
            loop = self._loop or asyncio.get_running_loop()
            if self._aio is not None:
                ensure_event_loop(self._aio, loop)
            try:
                conn, ids = await in_daemon_thread(self._open)
            except self._lv.libvirtError as error:
                self._failures += 1
                raw = _message(error)
                self._last_error = neutral_text(raw)
                self._retry_at = self._clock.now() + backoff_delay(self._failures)
                log.warning("host-unreachable", host=self.name, code=_code(error), error=raw)
                raise HostLost(
                    f"host {self.name} is unreachable: {self._last_error}", _code(error)
                ) from error
            self._conn, self._callback_ids = conn, ids
            self._failures = 0
            self._retry_at = 0.0
            log.info("host-connected", host=self.name)
            return conn

    def _open(self) -> tuple[Any, list[int]]:
        conn = self._lv.open(self.uri)
        if self._aio is not None:
            try:
                conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
            except self._lv.libvirtError as error:  # no event loop: keepalive unavailable
                log.warning("keepalive-unavailable", host=self.name, error=_message(error))
        with contextlib.suppress(self._lv.libvirtError, AttributeError):
            conn.registerCloseCallback(self._closed, None)
        ids = self._setup_events(self.name, conn) if self._setup_events else []
        return conn, ids

    @property
    def current(self) -> Any | None:
        """The open connection, or None while there is none (lost or not yet opened)."""
        return self._conn

    def _closed(self, conn: Any, reason: int, opaque: Any) -> None:
        if conn is self._conn:
            log.warning("host-connection-closed", host=self.name, reason=reason)
            self._forget("the connection was closed")

    def _forget(self, why: str) -> None:
        conn, ids = self._conn, self._callback_ids
        self._conn, self._callback_ids = None, []
        self._last_error = neutral_text(why)
        if conn is not None:
            threading_close(conn, ids, self._lv)

    def drop(self, why: str) -> None:
        """Give up the connection (it failed); the next call reopens it."""
        self._forget(why)

    async def close(self) -> None:
        conn, ids = self._conn, self._callback_ids
        self._conn, self._callback_ids = None, []
        if conn is not None:
            await in_daemon_thread(_close, conn, ids, self._lv)

    # -- calls --------------------------------------------------------------------

    async def call(
        self,
        fn: Callable[[Any], T],
        *,
        what: str,
        timeout: float | None = CALL_TIMEOUT,
        migration: str | None = None,
    ) -> T:
        """Run `fn(connection)` in a worker thread; libvirt errors become DriverErrors.

        `what` names the operation in lmwatch's words; `migration` (an id) goes into
        the log line that keeps libvirt's raw message.
        """
        conn = await self.connection()
        try:
            job = in_daemon_thread(fn, conn)
            return await (asyncio.wait_for(job, timeout) if timeout else job)
        except TimeoutError as error:
            self.drop(f"{what} did not answer within {timeout:.0f} s")
            raise HostLost(f"host {self.name}: {what} did not answer in time") from error
        except self._lv.libvirtError as error:
            raise self.translate(error, what, conn, migration=migration) from error

    def translate(
        self, error: Any, what: str, conn: Any | None = None, *, migration: str | None = None
    ) -> HypervisorError:
        """A libvirt error as a DriverError with a neutral message; drops the connection
        when it is gone. The raw message is logged (with the migration id, if any)."""
        lv = self._lv
        code = _code(error)
        raw = _message(error)
        message = neutral_text(raw)
        alive = True
        if conn is not None:
            try:
                alive = bool(conn.isAlive())
            except Exception:
                alive = False
        lost = (
            code in (lv.VIR_ERR_SYSTEM_ERROR, lv.VIR_ERR_RPC)
            or _domain(error) == lv.VIR_FROM_RPC
            or not alive
        )
        cause = ErrorCause.CONNECTION_LOST if lost else error_cause(lv, code, _domain(error))
        quiet = cause is ErrorCause.NO_INSTANCE  # lookups miss routinely
        (log.info if quiet else log.warning)(
            "hypervisor-error",
            host=self.name,
            operation=what,
            migration=migration,
            code=code,
            domain=_domain(error),
            cause=cause.name.lower(),
            error=raw,
        )
        if lost:
            self.drop(message)
            return HostLost(
                f"host {self.name}: lost the connection to the hypervisor during {what}: {message}",
                code,
            )
        return HypervisorError(f"host {self.name}: {what} failed ({cause}): {message}", code)


def _code(error: Any) -> int | None:
    try:
        return int(error.get_error_code())
    except Exception:
        return None


def _domain(error: Any) -> int | None:
    try:
        return int(error.get_error_domain())
    except Exception:
        return None


def _message(error: Any) -> str:
    try:
        text = error.get_error_message()
    except Exception:
        text = None
    return str(text or error)


def _close(conn: Any, ids: list[int], lv: Any) -> None:
    for callback_id in ids:
        with contextlib.suppress(Exception):
            conn.domainEventDeregisterAny(callback_id)
    with contextlib.suppress(Exception):
        conn.unregisterCloseCallback()
    with contextlib.suppress(Exception):
        conn.close()


def threading_close(conn: Any, ids: list[int], lv: Any) -> None:
    """Close a failed connection in the background (it may block on a dead socket)."""
    threading.Thread(target=_close, args=(conn, ids, lv), name="lmw-close", daemon=True).start()
