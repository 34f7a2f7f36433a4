"""Clocks: wall-clock time for the daemon, virtual time for tests and `simulate`.

Everything that waits or reads the time takes a `Clock`, so the same engine runs
a migration in minutes against a host and in milliseconds in a test.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

T = TypeVar("T")


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on an epoch scale that never jumps (virtual clocks start at a fixed
        epoch). Differences of two readings are true durations."""
        ...

    async def sleep(self, seconds: float) -> None: ...


class WallClock:
    """Real time for the daemon: the wall clock as it read at start, moved on by the
    monotonic clock.

    Everything lmwatch times is a duration: deadlines, how long the hypervisor has
    not answered, back-off, poll lag, how old a change-rate measurement is, the
    rates between samples, the simulator's physics, a measured pause. Reading
    `time.time()` for them let a step of the system clock (a manual change, NTP
    correcting a badly set clock) fire a deadline or give up on a hypervisor at
    once. A monotonic clock never steps, but counts from boot, so it cannot be
    stored or shown; anchoring it to the wall clock once gives both: readings are
    epoch seconds (stored, shown as timestamps, read back after a restart or a
    reboot as wall-clock times) and their differences are monotonic durations. A
    step while the daemon runs is not followed: timestamps stay on the scale set at
    start until the next start re-anchors it.
    """

    def __init__(self) -> None:
        self._epoch = time.time() - time.monotonic()

    def now(self) -> float:
        return self._epoch + time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))


class VirtualClock:
    """Time moves only when `advance` or `run_until` moves it.

    Sleepers wake in deadline order; between wake-ups every ready task runs, so
    the order of events is the one wall-clock time would give. While work outside
    the event loop is awaited through `hold` (the store's writer thread), time stands
    still: it takes milliseconds of wall-clock time, not the minutes virtual time
    could jump meanwhile.
    """

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._held = 0  # awaits of work outside the loop under way

    async def hold(self, work: Awaitable[T]) -> T:
        """Await `work` (done outside the event loop) with time standing still."""
        self._held += 1
        try:
            return await work
        finally:
            self._held -= 1

    async def _wait_held(self, give_up: float, idle_wait: float = 0.0005) -> bool:
        """Wait in real time while held; False when that outlasts `give_up`."""
        while self._held:
            if time.monotonic() > give_up:
                return False
            await asyncio.sleep(idle_wait)
        return True

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), future))
        await future

    @property
    def next_wakeup(self) -> float | None:
        self._drop_cancelled()
        return self._sleepers[0][0] if self._sleepers else None

    def _drop_cancelled(self) -> None:
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)

    async def _settle(self) -> None:
        """Let every task that can run without time passing do so."""
        for _ in range(8):
            await asyncio.sleep(0)

    async def advance(self, seconds: float) -> None:
        target = self._now + seconds
        while True:
            await self._settle()
            if self._held:
                await self._wait_held(time.monotonic() + 30.0)
                continue
            wake = self.next_wakeup
            if wake is None or wake > target:
                break
            self._wake_due(wake)
        self._now = max(self._now, target)
        await self._settle()

    def _wake_due(self, at: float) -> None:
        self._now = max(self._now, at)
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)

    async def run_until(
        self,
        condition: Callable[[], bool | Awaitable[bool]],
        *,
        limit: float = 24 * 3600.0,
        idle_wait: float = 0.0005,
        real_timeout: float = 30.0,
    ) -> bool:
        """Advance time sleeper by sleeper until `condition` holds or `limit` passes.

        When nothing sleeps (a task is waiting on real I/O), wait a little real
        time instead of jumping ahead. Returns whether the condition held.
        """
        end = self._now + limit
        give_up = time.monotonic() + real_timeout
        while True:
            await self._settle()
            result = condition()
            if not isinstance(result, bool):
                result = await result
            if result:
                return True
            if self._held:
                # Each wait for work outside the loop gets `real_timeout` of its own:
                # a long run in virtual time may take longer than that in all.
                if not await self._wait_held(time.monotonic() + real_timeout, idle_wait):
                    return False
                continue
            wake = self.next_wakeup
            if wake is None:
                if time.monotonic() > give_up:
                    return False
                await asyncio.sleep(idle_wait)
                continue
            if wake > end:
                self._now = end
                return False
            self._wake_due(wake)


async def outside(clock: Clock, work: Awaitable[T]) -> T:
    """Await work done outside the event loop (a disk write by the store's writer
    thread); a virtual clock stands still meanwhile."""
    if isinstance(clock, VirtualClock):
        return await clock.hold(work)
    return await work
