"""One connection per libvirt host: opened lazily, kept alive, reopened with backoff.

Blocking libvirt calls run on a bounded set of daemon threads per host
(`HostExecutor`; libvirt-python releases the GIL and a connection may be used
from several threads at once): at most `call_threads` calls run at once, each on
a thread of its own, the rest wait in a bounded queue, so the number of threads
does not grow with the number of migrations. The threads are daemon threads: a
call stuck on a dead connection (a libvirtd restart can leave one hanging for
good) never holds up the process's exit, as a `concurrent.futures` worker would.
A host whose calls stop answering is refused at once (`HostBusy`) once its queue
is full or all its threads have hung for longer than the call timeout, so it
cannot pile up threads or starve the other hosts.

libvirt errors become `DriverError`s whose message is neutral (a classified cause
plus the text through `neutral_text`; the raw text is only logged); an error that
means the daemon went away also drops the connection, and the next call reopens
it once the backoff delay has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
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
OPEN_TIMEOUT = 30.0  # seconds an open may take (a daemon may take the socket, then hang)
CLOSE_TIMEOUT = 5.0  # seconds `close` waits for a connection to close at shutdown
# libvirtd serves at most `max_client_requests` (default 5) calls of one connection
# at once; more threads than that would only wait in its socket.
CALL_THREADS = 4
CALL_QUEUE = 64  # calls that may wait for a worker of one host


class HypervisorError(DriverError):
    """A libvirt call failed; `code` is libvirt's error code."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class HostLost(HypervisorError):
    """The connection to the host's hypervisor daemon is gone."""


class HostBusy(HostLost):
    """The host does not answer its calls: too many wait, or all its workers hung.

    Raised at once, without queueing the call; the connection is kept.
    """


def in_daemon_thread(
    fn: Callable[..., T], *args: Any, name: str = "lmw-libvirt"
) -> asyncio.Future[T]:
    """Run `fn(*args)` in a new daemon thread; the future gets its result or exception.

    Unlike `asyncio.to_thread`, a call that never returns (a libvirt call on a
    connection whose daemon went away) does not keep the process from exiting.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    call = _Call(functools.partial(fn, *args), loop, future)
    threading.Thread(target=call.run, name=name, daemon=True).start()
    return future


@dataclass(eq=False)
class _Call:
    """One call for a worker thread; its result goes to `future` on `loop`."""

    fn: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]

    def run(self) -> None:  # worker thread
        self.hand_over(*self.execute())

    def execute(self) -> tuple[bool, Any]:  # worker thread
        """Run the call: (True, its value) or (False, what it raised)."""
        try:
            return True, self.fn()
        except BaseException as error:  # handed to the awaiting side
            return False, error

    def hand_over(self, ok: bool, value: Any) -> None:  # worker thread
        """Give the outcome to the loop that waits for it."""
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            self.loop.call_soon_threadsafe(self._deliver, ok, value)

    def _deliver(self, ok: bool, value: Any) -> None:  # loop thread
        if self.future.done():  # cancelled by a timeout meanwhile
            return
        if ok:
            self.future.set_result(value)
        else:
            self.future.set_exception(value)


@dataclass(eq=False)
class _Worker:
    name: str
    busy_since: float  # clock reading when its current call started
    hung: bool = False  # set aside: its call outlived the timeout; it ends when it returns


@dataclass(eq=False)
class _Queue:
    calls: deque[_Call] = field(default_factory=deque)
    warned: bool = False  # "calls are queueing" was logged since the queue last drained
    refusing: bool = False  # "refused" was logged since the last accepted call


class HostExecutor:
    """A bounded set of daemon threads for one host's blocking calls.

    At most `workers` calls run at once, each on a thread of its own; up to
    `queue_limit` more wait, in order. A thread whose call returns takes the next
    waiting call, or ends when none waits (an idle host keeps no threads). A
    thread whose call has run for `hang_after` seconds (the injected clock) is set
    aside: it no longer counts as a worker and ends when its call returns, and a
    new thread may take its place as long as at most `spare` set-aside threads
    exist. So a host has at most `workers + spare` threads however many calls it
    gets. A call is refused at once with `HostBusy` when the queue is full, or when
    all threads are set aside and no new one may start. A waiting call whose future
    is cancelled (its caller timed out) leaves the queue without running.

    The threads are daemon threads and `shutdown` does not wait for running calls:
    a call that never returns never holds up the process's exit.
    """

    def __init__(
        self,
        host: str,
        clock: Clock,
        *,
        workers: int = CALL_THREADS,
        queue_limit: int = CALL_QUEUE,
        hang_after: float = CALL_TIMEOUT,
        spare: int | None = None,
    ) -> None:
        self.host = host
        self.workers = max(1, workers)
        self.queue_limit = max(0, queue_limit)
        self.hang_after = hang_after
        self.spare = self.workers if spare is None else max(0, spare)
        self._clock = clock
        self._lock = threading.Lock()
        self._queue = _Queue()
        self._threads: list[_Worker] = []
        self._serial = itertools.count(1)
        self._closed = False

    @property
    def thread_prefix(self) -> str:
        return f"lmw-call-{self.host}/"

    @property
    def depth(self) -> int:
        """Calls waiting for a thread."""
        with self._lock:
            return len(self._queue.calls)

    @property
    def threads(self) -> int:
        """Threads of this host: running a call, or stuck on a hung one."""
        with self._lock:
            return len(self._threads)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run or queue `fn(*args)`; the future (of the running loop) gets its result
        or exception. Raises `HostBusy` instead of queueing when the host is stuck."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        call = _Call(functools.partial(fn, *args), loop, future)
        # Threads start once the lock is let go: a call that returns at once must not
        # find the lock still held by the thread that started it.
        starting: list[threading.Thread] = []
        try:
            with self._lock:
                queued = self._admit(call, starting)
        finally:
            for thread in starting:
                thread.start()
        if queued:
            future.add_done_callback(functools.partial(self._withdraw, call))
        return future

    def shutdown(self) -> None:
        """Refuse new calls, fail the waiting ones; running calls are not waited for."""
        with self._lock:
            self._closed = True
            waiting = list(self._queue.calls)
            self._queue.calls.clear()
        for call in waiting:
            if not call.future.done():
                call.future.set_exception(
                    HostBusy(f"host {self.host}: the driver is shutting down")
                )

    # -- under the lock --------------------------------------------------------------

    def _admit(self, call: _Call, starting: list[threading.Thread]) -> bool:
        """Give `call` a new thread (put in `starting`) or queue it; True when queued.
        Threads freed by set-aside calls go to the oldest waiting calls first."""
        queue = self._queue
        if self._closed:
            raise HostBusy(f"host {self.host}: the driver is shutting down")
        self._set_aside_hung()
        while queue.calls and self._room():
            starting.append(self._new_worker(queue.calls.popleft()))
        if self._room():
            queue.refusing = False
            starting.append(self._new_worker(call))
            return False
        if not self._active():
            self._refuse(
                f"{len(self._threads)} calls have not answered for over {self.hang_after:.0f} s"
            )
        if len(queue.calls) >= self.queue_limit:
            self._refuse(f"{len(queue.calls)} calls already waiting")
        queue.refusing = False
        queue.calls.append(call)
        depth = len(queue.calls)
        if not queue.warned and depth >= max(1, self.queue_limit // 2):
            queue.warned = True
            log.warning(
                "host-calls-queued",
                host=self.host,
                waiting=depth,
                limit=self.queue_limit,
                threads=len(self._threads),
            )
        return True

    def _refuse(self, why: str) -> None:
        if not self._queue.refusing:
            self._queue.refusing = True
            log.warning(
                "host-calls-refused",
                host=self.host,
                why=why,
                waiting=len(self._queue.calls),
                threads=len(self._threads),
            )
        raise HostBusy(f"host {self.host}: {why}; it is not answering")

    def _room(self) -> bool:
        """Whether one more thread may start."""
        return self._active() < self.workers and len(self._threads) < self.workers + self.spare

    def _active(self) -> int:
        """Threads serving calls (not set aside)."""
        return sum(1 for w in self._threads if not w.hung)

    def _set_aside_hung(self) -> None:
        now = self._clock.now()
        hung = [w for w in self._threads if not w.hung and now - w.busy_since >= self.hang_after]
        for worker in hung:
            worker.hung = True
        if hung:
            log.warning(
                "host-calls-hung",
                host=self.host,
                hung=sum(1 for w in self._threads if w.hung),
                after_s=self.hang_after,
                spare=self.spare,
            )

    def _new_worker(self, call: _Call) -> threading.Thread:
        """A thread for `call`, counted at once, for the caller to start."""
        worker = _Worker(f"{self.thread_prefix}{next(self._serial)}", self._clock.now())
        self._threads.append(worker)
        return threading.Thread(
            target=self._work, args=(worker, call), name=worker.name, daemon=True
        )

    # -- threads -----------------------------------------------------------------------

    def _work(self, me: _Worker, call: _Call) -> None:
        """Run calls until none waits. A caller gets its outcome only once this thread
        has taken the next call or left: a caller that submits again at once finds
        the thread's place free, not still held by the call it just got back."""
        following: _Call | None = call
        while following is not None:
            call = following
            outcome = call.execute()
            with self._lock:
                following = self._take_next(me)
            call.hand_over(*outcome)

    def _take_next(self, me: _Worker) -> _Call | None:  # under the lock
        """The next waiting call for `me`, or None when `me` ends (it leaves the list).

        A set-aside thread whose call came back after all takes waiting calls again
        when fewer than `workers` threads serve them: it may be the last thread left.
        """
        if me.hung and self._queue.calls and self._active() < self.workers:
            me.hung = False
        if me.hung or self._closed or not self._queue.calls:
            self._threads.remove(me)
            return None
        call = self._queue.calls.popleft()
        if not self._queue.calls:
            self._queue.warned = False
        me.busy_since = self._clock.now()
        return call

    def _withdraw(self, call: _Call, future: asyncio.Future[Any]) -> None:  # loop thread
        if future.cancelled():
            with self._lock, contextlib.suppress(ValueError):  # already taken by a thread
                self._queue.calls.remove(call)


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
        *,
        call_threads: int = CALL_THREADS,
        call_queue: int = CALL_QUEUE,
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
        self.executor = HostExecutor(
            name, clock, workers=call_threads, queue_limit=call_queue, hang_after=CALL_TIMEOUT
        )

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
            opening = self.executor.submit(self._open)
            try:
                async with asyncio.timeout(OPEN_TIMEOUT):  # (wait_for may eat a cancel)
                    conn, ids = await asyncio.shield(opening)
            except self._lv.libvirtError as error:
                raw = _message(error)
                self._failed(neutral_text(raw))
                log.warning("host-unreachable", host=self.name, code=_code(error), error=raw)
                raise HostLost(
                    f"host {self.name} is unreachable: {self._last_error}", _code(error)
                ) from error
            except BaseException as error:
                # A daemon that takes the socket but never answers: no one waits for this
                # open any more; the connection it may yet return is closed, not leaked.
                opening.add_done_callback(_close_unwanted)
                if not isinstance(error, TimeoutError):
                    raise
                self._failed(f"opening the connection did not answer within {OPEN_TIMEOUT:.0f} s")
                log.warning("host-unreachable", host=self.name, error=self._last_error)
                raise HostLost(f"host {self.name} is unreachable: {self._last_error}") from error
            self._conn, self._callback_ids = conn, ids
            self._failures = 0
            self._retry_at = 0.0
            log.info("host-connected", host=self.name)
            return conn

    def _failed(self, why: str) -> None:
        """An open failed: the next attempt waits for the backoff delay."""
        self._failures += 1
        self._last_error = why
        self._retry_at = self._clock.now() + backoff_delay(self._failures)

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
        """Stop the host's workers and close the connection; waits for neither longer
        than `CLOSE_TIMEOUT` (a call or a close may hang on a dead daemon for good)."""
        self.executor.shutdown()
        conn, ids = self._conn, self._callback_ids
        self._conn, self._callback_ids = None, []
        if conn is not None:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT):  # (wait_for may eat a cancel)
                    await in_daemon_thread(_close, conn, ids, self._lv, name="lmw-close")
            except TimeoutError:
                log.warning("host-close-timed-out", host=self.name, after_s=CLOSE_TIMEOUT)

    # -- calls --------------------------------------------------------------------

    async def call(
        self,
        fn: Callable[[Any], T],
        *,
        what: str,
        timeout: float | None = CALL_TIMEOUT,
        migration: str | None = None,
    ) -> T:
        """Run `fn(connection)` on one of the host's workers; libvirt errors become
        DriverErrors. The timeout counts from the call, waiting for a worker included.

        `what` names the operation in lmwatch's words; `migration` (an id) goes into
        the log line that keeps libvirt's raw message. Raises `HostBusy` at once when
        the host's calls are not being answered (see `HostExecutor`).
        """
        conn = None
        try:
            async with asyncio.timeout(timeout or None):
                conn = await self.connection()  # an open that hangs counts as the call's
                return await self.executor.submit(fn, conn)
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


def _close_unwanted(opening: asyncio.Future[tuple[Any, list[int]]]) -> None:
    """Close the connection of an open that was given up (it answered too late)."""
    if opening.cancelled() or opening.exception() is not None:
        return
    conn, ids = opening.result()
    threading_close(conn, ids, None)


def threading_close(conn: Any, ids: list[int], lv: Any) -> None:
    """Close a failed connection in the background (it may block on a dead socket)."""
    threading.Thread(target=_close, args=(conn, ids, lv), name="lmw-close", daemon=True).start()
