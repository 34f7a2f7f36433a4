"""Which migrations this daemon supervises when several share one database.

Every poll interval (and soon after an acceptance) a round of the membership
(lmwatch/cluster/membership.py) runs in a worker thread; then, on the loop:

- a migration supervised here that the round does not show as owned (its source
  host went to another member, its claim went stale), or every one of them when the
  daemon may no longer act (its lease is running out), stops being supervised at
  once: its task is cancelled, nothing is acted on and no outcome is written;
- a migration owned and not supervised is taken back through the restart path
  (re-attached, the evidence rebuilt before any forcing decision), or queued;
- claims given up (host moved) are released once their supervision has stopped;
- the drains of the hosts it holds are run here, and only those (`Drains.follow`).

A migration whose changes the store dropped for a stale claim (the store's listener)
is stopped the same way, at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from lmwatch.clock import outside
from lmwatch.engine.records import log

if TYPE_CHECKING:
    from lmwatch.cluster.membership import Membership, Round
    from lmwatch.engine.core import Engine


class Ownership:
    def __init__(self, engine: Engine, membership: Membership) -> None:
        self.engine = engine
        self.membership = membership
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stale: set[str] = set()  # dropped by the store: stop these at once
        self.rounds = 0

    def may_act(self, migration_id: str) -> bool:
        return self.membership.may_act() and self.membership.fencing.holds(migration_id)

    def start(self) -> None:
        loop = asyncio.get_running_loop()

        def stale(migration_id: str, _why: str) -> None:  # the writer's thread
            loop.call_soon_threadsafe(self._stale_now, migration_id)

        self.membership.fencing.on_stale(stale)
        self._task = asyncio.create_task(self._run())

    def _stale_now(self, migration_id: str) -> None:
        self._stale.add(migration_id)
        self._wake.set()

    def wake(self) -> None:
        """Run a round soon (a migration was accepted)."""
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # (gather: a cancel of the caller itself still reaches the caller)
            (ended,) = await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            if isinstance(ended, Exception):  # the rounds failed: raised, as before
                raise ended

    async def _run(self) -> None:
        """Every poll: stop everything at once when the lease is running out (even
        while a round hangs on an unreachable database), and start a round unless one
        is still under way."""
        engine = self.engine
        interval = engine.settings.poll_interval
        round_task: asyncio.Task[None] | None = None
        try:
            while True:
                if not self.membership.may_act():
                    await self.stop_all("this daemon's lease is running out")
                if round_task is None or round_task.done():
                    if round_task is not None and not round_task.cancelled():
                        error = round_task.exception()
                        if error is not None:  # never stop taking rounds
                            log.error("ownership-round-failed", error=repr(error))
                    round_task = asyncio.create_task(self.round_once())
                self._wake.clear()
                # Not asyncio.wait_for: in Python 3.11 it returns a wake-up that comes
                # with the task's cancel, so `stop` would wait another poll or more.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(interval):
                        await self._wake.wait()
        finally:
            if round_task is not None:
                round_task.cancel()
                await asyncio.gather(round_task, return_exceptions=True)

    async def stop_all(self, why: str) -> None:
        for migration_id in sorted(self.engine.supervised()):
            await self.engine.stop_supervising(migration_id, why)
        await self.engine.drains.follow(())

    async def round_once(self) -> None:
        engine = self.engine
        for migration_id in sorted(self._stale):
            self._stale.discard(migration_id)
            await engine.stop_supervising(migration_id, "its changes were refused: stale claim")
        try:
            hosts = await engine._effects.hosts()
        except Exception as error:  # the hypervisor: keep what we have this round
            log.warning("ownership-hosts-unknown", error=str(error))
            hosts = list(self.membership.last.hosts) if self.membership.last else []
        found: Round | None = await outside(
            engine.clock, asyncio.to_thread(self.membership.round, hosts)
        )
        self.rounds += 1
        if not self.membership.may_act():
            await self.stop_all("this daemon's lease is running out")
            return
        if found is None:
            return  # the database did not answer: keep supervising while the lease runs
        fencing = self.membership.fencing
        for migration_id in list(engine.supervised()):
            claim = found.owned.get(migration_id)
            if claim is None or fencing.claim_of(migration_id) != claim:
                await engine.stop_supervising(migration_id, "owned by another member now")
        if found.give_up:
            released = [c for c in found.give_up if c.key not in engine.supervised()]
            await outside(engine.clock, asyncio.to_thread(self.membership.release, released))
        for migration_id, claim in sorted(found.owned.items()):
            if migration_id not in engine.supervised():
                fencing.hold(migration_id, claim)
                if not engine.take_over(migration_id):
                    fencing.drop(migration_id)
        engine.schedule_all()
        await engine.drains.follow(found.hosts)  # the drains of the hosts held here
