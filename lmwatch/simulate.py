"""What-if runs: one migration through the real engine, in virtual time.

Nothing here models a migration on its own: the engine, the policies, the
profiles and the simulator driver are the ones the daemon uses, with an
in-memory store and a `VirtualClock`, so a run of an hour takes milliseconds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmwatch.clock import VirtualClock
from lmwatch.drivers.inventory import Inventory, InventoryError
from lmwatch.engine import Engine, EngineSettings
from lmwatch.model import MigrationRequest
from lmwatch.profiles.registry import ProfileRegistry
from lmwatch.records import Outcome, outcome_json
from lmwatch.store import Event, Store

SOURCE_HOST = "host-a"
DESTINATION_HOST = "host-b"
DEFAULT_INSTANCE = "instance-1"
DEFAULT_LIMIT = 7 * 24 * 3600.0  # virtual seconds; a run that long has gone wrong


@dataclass(frozen=True, slots=True)
class SimulationReport:
    """How the simulated migration ended, and every decision on the way."""

    instance: str
    source: str
    destination: str
    profile: str
    profile_reason: str
    state: str  # final state (or the state at `limit` when it did not finish)
    finished: bool
    outcome: Outcome | None
    timeline: tuple[Mapping[str, Any], ...]  # `at` in virtual seconds since submission
    duration: float  # virtual seconds from submission to the end (or to `limit`)
    memory_bytes: int = 0
    notes: tuple[str, ...] = field(default=())

    def as_json(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "source": self.source,
            "destination": self.destination,
            "memory_bytes": self.memory_bytes,
            "profile": {"name": self.profile, "reason": self.profile_reason},
            "state": self.state,
            "finished": self.finished,
            "duration_seconds": self.duration,
            "outcome": None if self.outcome is None else outcome_json(self.outcome),
            "timeline": [dict(entry) for entry in self.timeline],
        }


def scenario(
    *,
    memory: int,
    change_rate: float | Mapping[str, Any],
    bandwidth: float,
    working_set: int | None = None,
    labels: Mapping[str, str] | None = None,
    name: str = DEFAULT_INSTANCE,
    disk: int = 0,
    disk_writes: float = 0.0,
) -> Inventory:
    """A two-host inventory holding one instance, from what-if parameters.

    `change_rate` is bytes/s, or a pattern mapping as in an inventory file
    (e.g. `{"pattern": "bursty", "base": ..., "peak": ..., "period": ...}`).
    `disk` bytes of local disk (written at `disk_writes` bytes/s) move with it.
    """
    room = max(4 * memory, 1024**3)
    data: dict[str, Any] = {
        "hosts": [
            {"name": SOURCE_HOST, "memory": room},
            {"name": DESTINATION_HOST, "memory": room},
        ],
        "links": [{"between": [SOURCE_HOST, DESTINATION_HOST], "bandwidth": bandwidth}],
        "default_bandwidth": bandwidth,
        "instances": [
            {
                "name": name,
                "host": SOURCE_HOST,
                "memory": memory,
                "working_set": working_set,
                "change_rate": dict(change_rate)
                if isinstance(change_rate, Mapping)
                else change_rate,
                "labels": dict(labels or {}),
                "disk": disk,
                "disk_writes": disk_writes,
            }
        ],
    }
    try:
        return Inventory.model_validate(data)
    except ValueError as error:
        raise InventoryError(_first_error(error)) from error


def _events(engine: Engine, migration_id: str) -> Sequence[Event]:
    events: Sequence[Event] = engine.store.events(migration_id)
    return events


def _first_error(error: ValueError) -> str:
    errors = getattr(error, "errors", None)
    if callable(errors):
        messages = [str(e.get("msg", "")).removeprefix("Value error, ") for e in errors()]
        return "; ".join(m for m in messages if m) or str(error)
    return str(error)


def choose_route(
    inventory: Inventory, instance: str, destination: str | None = None
) -> tuple[str, str]:
    """Source (where the instance runs) and a destination: the given one or the fastest link."""
    entry = inventory.instance(instance)
    if entry is None:
        known = ", ".join(i.name for i in inventory.instances) or "none"
        raise InventoryError(f"the inventory has no instance {instance!r} (known: {known})")
    source = entry.host
    if destination is not None:
        if inventory.host(destination) is None:
            raise InventoryError(f"the inventory has no host {destination!r}")
        if destination == source:
            raise InventoryError(f"{instance!r} already runs on {destination!r}")
        return source, destination
    others = [h.name for h in inventory.hosts if h.name != source]
    if not others:
        raise InventoryError("the inventory needs a second host to migrate to")
    best = max(others, key=lambda host: inventory.bandwidth(source, host))
    return source, best


async def simulate(
    inventory: Inventory,
    instance: str,
    *,
    destination: str | None = None,
    labels: Mapping[str, str] | None = None,
    profile: str | None = None,
    profiles_path: str | Path | None = None,
    profiles_text: str | None = None,
    poll_interval: float = 1.0,
    limit: float = DEFAULT_LIMIT,
) -> SimulationReport:
    """Migrate `instance` once through the real engine in virtual time and report.

    Raises `InventoryError` for an unusable scenario, `ProfileError` for an
    unusable profiles file, and the engine's `Invalid`/`Refused` errors when the
    request would be refused by the daemon too.
    """
    from lmwatch.drivers.sim import SimDriver  # the simulator, with its physics

    source, target = choose_route(inventory, instance, destination)
    clock = VirtualClock()
    profiles = ProfileRegistry(profiles_path, default_text=profiles_text, clock=clock)
    store = Store.open(":memory:")
    driver = SimDriver(inventory, clock)
    engine = Engine(
        driver=driver,
        store=store,
        profiles=profiles,
        clock=clock,
        settings=EngineSettings(poll_interval=poll_interval),
    )
    try:
        await engine.start()
        request = MigrationRequest(
            instance=instance,
            source=source,
            destination=target,
            labels=dict(labels or {}),
            profile=profile,
        )
        record, _ = await engine.submit(request)
        begin = record.created_at
        finished = await clock.run_until(lambda: engine.get(record.id).state.finished, limit=limit)
        final = engine.get(record.id)
        timeline = tuple(
            {
                "at": round(event.at - begin, 6),
                "kind": event.kind,
                "action": event.action,
                "state": event.state,
                "reason": event.reason,
            }
            for event in _events(engine, record.id)
        )
        end = final.finished_at if final.finished_at is not None else clock.now()
        return SimulationReport(
            instance=instance,
            source=source,
            destination=target,
            profile=final.profile_name,
            profile_reason=final.profile_reason,
            state=final.state.value,
            finished=finished,
            outcome=final.outcome,
            timeline=timeline,
            duration=end - begin,
            memory_bytes=final.memory_bytes,
        )
    finally:
        await engine.stop()
        await driver.close()
        store.close()
