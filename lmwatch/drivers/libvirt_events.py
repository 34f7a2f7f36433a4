"""libvirt's event loop on the running asyncio loop, safe to use from worker threads.

`libvirtaio` assumes that libvirt calls its add/update/remove functions from the
loop's thread. Blocking libvirt calls run in worker threads here, and libvirt's
RPC client updates its socket watch and keepalive timer from the calling thread
(while holding the connection's lock). This adapter forwards such calls to the
loop with `call_soon_threadsafe` and never waits for the loop (waiting could
deadlock against a loop callback that needs the same connection lock); ids are
allocated at once so the caller gets its answer immediately.

libvirt's callbacks run with Python's cyclic garbage collector paused
(`_outside_collection`).
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Callable
from typing import Any

_registered: dict[str, Any] = {}


def ensure_event_loop(libvirtaio: Any, loop: asyncio.AbstractEventLoop) -> Any:
    """Register (once per asyncio loop) the thread-safe implementation; return it."""
    current = _registered.get("impl")
    if current is not None and current.loop is loop and not loop.is_closed():
        return current
    impl = _make_impl(libvirtaio, loop).register()
    libvirtaio._current_impl = impl  # what libvirtaio.getCurrentImpl() reports
    _registered["impl"] = impl
    return impl


def _outside_collection(cb: Callable[..., Any]) -> Callable[..., Any]:
    """`cb` (libvirt's dispatch of a handle or timeout event), run with Python's cyclic
    garbage collector paused.

    libvirt runs its event callbacks holding locks of its own (a connection's client
    lock while it reads the socket and updates the socket's watch). A collection
    triggered by any allocation in between may finalize a libvirt object left in a
    reference cycle, whose `__del__` (`virDomainFree`) waits for the same lock: the
    loop's thread then waits on itself for ever (seen once in CI, `virDomainFree` under
    `_eventInvokeHandleCallback`). Paused, the collector runs after the callback
    returns, outside libvirt's locks."""

    def call(*args: Any) -> Any:
        if not gc.isenabled():
            return cb(*args)
        gc.disable()
        try:
            return cb(*args)
        finally:
            gc.enable()

    return call


def _make_impl(libvirtaio: Any, loop: asyncio.AbstractEventLoop) -> Any:
    base = libvirtaio.virEventAsyncIOImpl
    if not hasattr(libvirtaio, "FDCallback"):  # a fake or an unexpected version
        return base(loop=loop)

    class ThreadSafeImpl(base):  # type: ignore[misc, valid-type]
        def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
            super().__init__(loop=loop)
            self._loop_thread: int | None = None
            self._queued = 0  # operations forwarded to the loop and not yet run
            self._lock = threading.Lock()
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                self._note_thread()
            else:
                loop.call_soon_threadsafe(self._note_thread)

        def _note_thread(self) -> None:
            self._loop_thread = threading.get_ident()

        def _here(self) -> bool:
            return self._loop_thread == threading.get_ident()

        def _new_id(self) -> int:
            return next(libvirtaio.Callback._iden_counter)

        # -- handles ------------------------------------------------------------

        def _add_handle(self, fd: int, event: int, cb: Any, opaque: Any) -> int:
            iden = self._new_id()
            self._run(self._do_add_handle, iden, fd, event, cb, opaque)
            return iden

        def _do_add_handle(self, iden: int, fd: int, event: int, cb: Any, opaque: Any) -> None:
            callback = libvirtaio.FDCallback(
                self, _outside_collection(cb), opaque, descriptor=self.descriptors[fd], event=event
            )
            callback.iden = iden
            self.callbacks[iden] = callback
            self.descriptors[fd].add_handle(callback)
            self._pending_inc()

        def _update_handle(self, watch: int, event: int) -> None:
            self._run(self._do_update, watch, event)

        def _remove_handle(self, watch: int) -> int:
            self._run(super()._remove_handle, watch)
            return 0

        # -- timeouts -----------------------------------------------------------

        def _add_timeout(self, timeout: int, cb: Any, opaque: Any) -> int:
            iden = self._new_id()
            self._run(self._do_add_timeout, iden, timeout, cb, opaque)
            return iden

        def _do_add_timeout(self, iden: int, timeout: int, cb: Any, opaque: Any) -> None:
            callback = libvirtaio.TimeoutCallback(self, _outside_collection(cb), opaque)
            callback.iden = iden
            self.callbacks[iden] = callback
            callback.update(timeout=timeout)
            self._pending_inc()

        def _update_timeout(self, timer: int, timeout: int) -> None:
            self._run(self._do_update, timer, timeout)

        def _remove_timeout(self, timer: int) -> int:
            self._run(super()._remove_timeout, timer)
            return 0

        # -- plumbing -----------------------------------------------------------

        def _do_update(self, iden: int, value: int) -> None:
            callback = self.callbacks.get(iden)
            if callback is not None:
                callback.update(value)

        def _run(self, fn: Any, *args: Any) -> None:
            """Run now when on the loop's thread (and nothing is queued before it),
            else queue it, in order, on the loop."""
            if self.loop.is_closed():  # shutting down: nothing left to watch
                return
            if self._here() and self._queued == 0:
                fn(*args)
            else:
                with self._lock:
                    self._queued += 1
                self.loop.call_soon_threadsafe(self._queued_call, fn, args)

        def _queued_call(self, fn: Any, args: tuple[Any, ...]) -> None:
            with self._lock:
                self._queued -= 1
            fn(*args)

    return ThreadSafeImpl(loop)
