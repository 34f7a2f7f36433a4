"""What earlier migrations taught: switchover costs, link rates and how long a stopped
job takes to end, per host pair; recent change rates.

In memory only, no I/O: the switchover costs are learned again from the store's
completed migrations at start, and the stop times from the timelines of its cancelled
and restarted ones (`recovery.stop_times`); the other figures since the daemon started.
"""

from __future__ import annotations

import statistics
from collections import deque

from lmwatch import policies
from lmwatch.model import ChangeRate, Method, State
from lmwatch.records import Progress
from lmwatch.store import MigrationRecord


class Learned:
    def __init__(self, *, switchover_memory: int, default_switchover: float, burst: float) -> None:
        self._memory = switchover_memory
        self._default_switchover = default_switchover
        self._burst = burst  # seconds the hypervisor sends between two counts
        # Switchover costs measured on completed migrations, per (source, destination).
        self._switchovers: dict[tuple[str, str], deque[float]] = {}
        # Transfer rates completed migrations moved at, per (source, destination).
        self._rates: dict[tuple[str, str], deque[float]] = {}
        # Seconds from a stop lmwatch or an operator asked to the job's end, per
        # (source, destination): the instance runs on the source again only then.
        self._stops: dict[tuple[str, str], deque[float]] = {}
        # Change rates measured before start, per instance: (clock time, bytes/s).
        self._change_rates: dict[str, tuple[float, ChangeRate]] = {}

    def switchover(self, source: str, destination: str) -> float:
        """Seconds of switchover to plan with between two hosts (learned, or the default)."""
        measured = self._switchovers.get((source, destination), ())
        return policies.learned_switchover(measured, self._default_switchover)

    def switchover_least(self, source: str, destination: str) -> float | None:
        """The shortest switchover measured between two hosts (None: none measured)."""
        measured = self._switchovers.get((source, destination))
        return min(measured) if measured else None

    def cancel_resume(self, source: str, destination: str) -> float | None:
        """The longest a stopped job took to end between two hosts, of the last few
        (None: none measured)."""
        measured = self._stops.get((source, destination))
        return max(measured) if measured else None

    def remember_stop(self, source: str, destination: str, seconds: float) -> None:
        """A job stopped between two hosts ended `seconds` after the stop was asked."""
        if seconds >= 0:
            self._stops.setdefault((source, destination), deque(maxlen=self._memory)).append(
                seconds
            )

    def link_rate(self, source: str, destination: str) -> float | None:
        """Bytes/s the link between two hosts carried for the migrations completed over
        it (the median of the last few; None: none completed). Stands in where the
        hosts' configuration does not give the link's bandwidth."""
        rates = self._rates.get((source, destination))
        return statistics.median(rates) if rates else None

    def learn(self, record: MigrationRecord) -> None:
        """Learn from a completed migration how long its switchover took and how fast
        its link carried it."""
        if record.state is not State.COMPLETED:
            return
        rate = (record.progress or Progress()).transfer_rate
        if rate > 0:
            key = (record.source, record.destination)
            self._rates.setdefault(key, deque(maxlen=self._memory)).append(rate)
        self._learn_switchover(record)

    def _learn_switchover(self, record: MigrationRecord) -> None:
        outcome = record.outcome
        if outcome is None:
            return
        blackout = outcome.blackout_seconds
        if blackout is None:
            return
        if record.paused or outcome.method is Method.PAUSED:
            return  # a pause's length depends on what was left, not on the hosts
        progress = record.progress or Progress()
        measured = policies.measured_switchover(
            blackout,
            handed_over=record.handed_over,
            budget=float(record.blackout_budget or 0.0),
            remaining=float(progress.memory_remaining_seen),
            rate=progress.transfer_rate,
            burst=self._burst,
        )
        key = (record.source, record.destination)
        kept = self._switchovers.setdefault(key, deque(maxlen=self._memory))
        kept.append(measured)

    def recent_change_rate(self, instance: str, now: float, max_age: float) -> ChangeRate | None:
        """The instance's change rate measured no more than `max_age` seconds ago."""
        recent = self._change_rates.get(instance)
        if recent is not None and now - recent[0] <= max_age:
            return recent[1]
        return None

    def remember_change_rate(self, instance: str, now: float, rate: ChangeRate) -> None:
        self._change_rates[instance] = (now, rate)
