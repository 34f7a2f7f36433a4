"""What the unfinished migrations hold on each host, kept as they are accepted, start
and end, so that a submission costs what its own hosts hold, not a walk over every
migration (issue 8: admission summed reservations over every unfinished migration and
the scheduler looked at every supervision on every submission).

Per host: the memory reserved by migrations arriving, how many arrive and leave,
their group labels, how many of them are under way (the scheduler's limits count
those), and the queued migrations that touch it (the only ones a slot freed there can
let start). The engine calls `add` when it tracks a migration, `start` when its
supervision starts, and `remove` when it stops tracking it; the book never reads the
store or the records again.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from lmwatch.engine.placing import HostLoad
from lmwatch.engine.scheduler import Slot
from lmwatch.policies.placement import GROUP_LABEL
from lmwatch.store import MigrationRecord


@dataclass(frozen=True, slots=True)
class _Entry:
    slot: Slot
    memory: int
    group: str | None


@dataclass(slots=True)
class _Host:
    reserved: int = 0
    arriving: int = 0  # unfinished migrations arriving (queued or under way)
    leaving: int = 0  # unfinished migrations leaving
    groups: Counter[str] = field(default_factory=Counter)  # group labels arriving
    queued: dict[str, Slot] = field(default_factory=dict)  # queued ones touching it


class Book:
    def __init__(self) -> None:
        self._hosts: dict[str, _Host] = {}
        self._entries: dict[str, _Entry] = {}
        self._running: set[str] = set()
        # Migrations under way per host, leaving / arriving: the scheduler's counts.
        self.leaving: Counter[str] = Counter()
        self.arriving: Counter[str] = Counter()

    def _host(self, name: str) -> _Host:
        host = self._hosts.get(name)
        if host is None:
            host = self._hosts[name] = _Host()
        return host

    def add(self, record: MigrationRecord, *, queue: bool = True) -> None:
        """A migration is tracked (queued until `start`). With `queue` False it only
        reserves (its acceptance is not on disk yet): a later `add` queues it."""
        known = self._entries.get(record.id)
        if known is not None:
            if queue and record.id not in self._running:
                self._host(record.source).queued[record.id] = known.slot
                self._host(record.destination).queued[record.id] = known.slot
            return
        slot = Slot(record.id, record.source, record.destination, record.created_at)
        entry = _Entry(slot, record.memory_bytes, record.labels.get(GROUP_LABEL) or None)
        self._entries[record.id] = entry
        destination = self._host(record.destination)
        destination.reserved += entry.memory
        destination.arriving += 1
        if entry.group:
            destination.groups[entry.group] += 1
        source = self._host(record.source)
        source.leaving += 1
        if queue:
            source.queued[record.id] = slot
            destination.queued[record.id] = slot

    def start(self, migration_id: str) -> None:
        """Its supervision started: it takes a slot on both hosts."""
        entry = self._entries.get(migration_id)
        if entry is None or migration_id in self._running:
            return
        slot = entry.slot
        self._running.add(migration_id)
        self._host(slot.source).queued.pop(migration_id, None)
        self._host(slot.destination).queued.pop(migration_id, None)
        self.leaving[slot.source] += 1
        self.arriving[slot.destination] += 1

    def unstart(self, migration_id: str) -> None:
        """Its start did not happen after all (no room on the destination across the
        daemons): queued again, its slots free."""
        entry = self._entries.get(migration_id)
        if entry is None or migration_id not in self._running:
            return
        slot = entry.slot
        self._running.discard(migration_id)
        self._host(slot.source).queued[migration_id] = slot
        self._host(slot.destination).queued[migration_id] = slot
        for counter, host in ((self.leaving, slot.source), (self.arriving, slot.destination)):
            counter[host] -= 1
            if counter[host] <= 0:
                del counter[host]

    def remove(self, migration_id: str) -> Slot | None:
        """It is no longer tracked (it ended): what it held is free. Its slot, if known."""
        entry = self._entries.pop(migration_id, None)
        if entry is None:
            return None
        slot = entry.slot
        source, destination = self._host(slot.source), self._host(slot.destination)
        destination.reserved -= entry.memory
        destination.arriving -= 1
        if entry.group:
            destination.groups[entry.group] -= 1
            if destination.groups[entry.group] <= 0:
                del destination.groups[entry.group]
        source.leaving -= 1
        source.queued.pop(migration_id, None)
        destination.queued.pop(migration_id, None)
        if migration_id in self._running:
            self._running.discard(migration_id)
            self.leaving[slot.source] -= 1
            self.arriving[slot.destination] -= 1
            for counter, host in ((self.leaving, slot.source), (self.arriving, slot.destination)):
                if counter[host] <= 0:
                    del counter[host]
        for name in (slot.source, slot.destination):
            held = self._hosts.get(name)
            if held is not None and not (held.arriving or held.leaving or held.queued):
                del self._hosts[name]
        return slot

    def load(self, host: str) -> HostLoad:
        """What the unfinished migrations hold on `host` (placement's reservations)."""
        held = self._hosts.get(host)
        if held is None:
            return HostLoad()
        return HostLoad(
            reserved=held.reserved,
            reservations=held.arriving,
            leaving=held.leaving,
            groups=set(held.groups),
        )

    def queued_on(self, *hosts: str) -> list[Slot]:
        """The queued migrations leaving or arriving at any of `hosts`."""
        found: dict[str, Slot] = {}
        for name in hosts:
            held = self._hosts.get(name)
            if held is not None:
                found.update(held.queued)
        return list(found.values())

    def queued_all(self) -> list[Slot]:
        return [e.slot for key, e in self._entries.items() if key not in self._running]

    @property
    def active(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._entries) - len(self._running)
