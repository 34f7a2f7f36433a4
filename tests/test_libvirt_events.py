"""libvirt's event callbacks on the asyncio loop (`lmwatch.drivers.libvirt_events`),
with the real `libvirtaio` module (libvirt-python, installed by the rig step)."""

from __future__ import annotations

import asyncio
import gc
import os
from typing import Any

import pytest

from lmwatch.drivers import libvirt_events

libvirtaio = pytest.importorskip(
    "libvirtaio", reason="libvirt-python is not installed (the rig step installs it)"
)

WRITABLE = 2  # libvirt.VIR_EVENT_HANDLE_WRITABLE


def test_libvirt_callbacks_run_with_the_cyclic_collector_paused() -> None:
    """libvirt dispatches handle and timeout events holding locks of its own; a
    collection inside may run a libvirt object's `__del__` (`virDomainFree`) that waits
    for the same lock, and the loop's thread hangs for ever (seen in CI under
    `_eventInvokeHandleCallback`). The callbacks run with the collector paused, and it
    is back on once they return."""
    loop = asyncio.new_event_loop()
    seen: list[tuple[str, bool]] = []
    read, write = os.pipe()
    try:
        impl = libvirt_events._make_impl(libvirtaio, loop)

        def on_handle(*args: Any) -> None:
            seen.append(("handle", gc.isenabled()))

        def on_timeout(*args: Any) -> None:
            seen.append(("timeout", gc.isenabled()))

        watch = impl._add_handle(write, WRITABLE, on_handle, None)
        timer = impl._add_timeout(0, on_timeout, None)
        loop.run_until_complete(asyncio.sleep(0.05))
        impl._remove_handle(watch)
        impl._remove_timeout(timer)
        loop.run_until_complete(asyncio.sleep(0.01))
    finally:
        loop.close()
        os.close(read)
        os.close(write)
    assert {kind for kind, _ in seen} == {"handle", "timeout"}, seen
    assert not any(enabled for _, enabled in seen), seen
    assert gc.isenabled()
