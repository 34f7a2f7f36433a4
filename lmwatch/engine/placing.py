"""Placement as the engine sees it: reservations, candidates, and the named-host check.

Reservations: every unfinished migration (queued or running) reserves its
instance's memory on its destination until it finishes. This module is the one
place that subtracts them: a driver reports the memory its hypervisor has free
(`Driver.host_info`; the simulator's running jobs take their memory only when they
land, so nothing is counted twice) and its pre-flight checks only that raw figure.
The unfinished migrations are the engine's supervisions, which a restart rebuilds
from the store, so reservations survive a restart.

The ranking itself is pure and lives in `lmwatch.policies.placement`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lmwatch.drivers.base import (
    DriverError,
    InsufficientResources,
    Refused,
)
from lmwatch.engine.records import log
from lmwatch.model import Capabilities, HostInfo, InstanceInfo, MigrationRequest
from lmwatch.policies.placement import (
    GROUP_LABEL,
    Candidate,
    Need,
    Placement,
    rejection,
    reserved_text,
)
from lmwatch.store import MigrationRecord
from lmwatch.units import format_size


class GroupConflict(Refused):
    """The destination already runs (or receives) an instance of the same group."""

    status = 409
    kind = "anti-affinity"


class DestinationDraining(Refused):
    """The destination is being drained: nothing is moved onto a host being emptied."""

    status = 409
    kind = "destination-draining"


class NoDestination(Refused):
    """No host can take the instance; the message gives every host's reason."""

    status = 409
    kind = "no-destination"


@dataclass(slots=True)
class HostLoad:
    """What unfinished migrations hold on one host."""

    reserved: int = 0  # bytes reserved by migrations arriving
    reservations: int = 0  # how many arrive
    leaving: int = 0  # how many leave
    groups: set[str] = field(default_factory=set)  # group labels arriving


def loads(records: Iterable[MigrationRecord]) -> dict[str, HostLoad]:
    """Host -> what the unfinished migrations among `records` hold there."""
    result: dict[str, HostLoad] = {}
    for record in records:
        if record.state.finished:
            continue
        arriving = result.setdefault(record.destination, HostLoad())
        arriving.reserved += record.memory_bytes
        arriving.reservations += 1
        group = record.labels.get(GROUP_LABEL)
        if group:
            arriving.groups.add(group)
        result.setdefault(record.source, HostLoad()).leaving += 1
    return result


def candidate(
    host: str,
    info: HostInfo | None,
    load: HostLoad,
    *,
    refused: str | None = None,
    handover: bool = True,
    bandwidth: float | None = None,
    instance: str | None = None,
    drain: str | None = None,
) -> Candidate:
    """A candidate from what the driver said about `host` and what migrations hold there.
    `instance` (the one being placed) does not count towards the host's groups; `drain`
    is the drain emptying the host, if any."""
    groups = set(load.groups)
    if info is not None:
        for other in info.instances:
            group = other.labels.get(GROUP_LABEL)
            if group and other.name != instance:
                groups.add(group)
    return Candidate(
        host=host,
        free_memory=None if info is None else info.free_memory,
        reserved=load.reserved,
        reservations=load.reservations,
        refused=refused,
        handover=handover,
        bandwidth=bandwidth,
        arriving=load.reservations,
        leaving=load.leaving,
        groups=frozenset(groups),
        drain=drain,
    )


def _why(error: Exception) -> str:
    return error.message if isinstance(error, Refused) else str(error)


class Asker(Protocol):
    """What `survey` needs of the effect runner."""

    async def preflight(self, request: MigrationRequest) -> InstanceInfo: ...

    async def host_info(self, host: str) -> HostInfo: ...

    async def capabilities_between(self, source: str, destination: str) -> Capabilities: ...


async def survey(
    *,
    effects: Asker,
    request: MigrationRequest,
    hosts: Sequence[str],
    load: Mapping[str, HostLoad],
    drains: Mapping[str, str],
) -> list[Candidate]:
    """Ask the driver about each of `hosts` as a destination for `request`, at once:
    its pre-flight (a refusal becomes the host's rejection), free memory, instances
    and the pair's capabilities. A host being drained (`drains`: host -> drain id)
    is not asked: nothing goes there."""

    async def one(host: str) -> Candidate:
        if host in drains:
            return candidate(host, None, load.get(host, HostLoad()), drain=drains[host])
        refused: str | None = None
        info: HostInfo | None = None
        handover, bandwidth = True, None
        try:
            # Capacity is checked against reservations here, not by the driver.
            probe = MigrationRequest(
                instance=request.instance,
                source=request.source,
                destination=host,
                labels=request.labels,
                profile=request.profile,
                force=True,
            )
            await effects.preflight(probe)
            info = await effects.host_info(host)
            caps = await effects.capabilities_between(request.source, host)
            handover, bandwidth = caps.handover, caps.bandwidth
        except (Refused, DriverError) as error:
            refused = _why(error)
            log.info("placement-candidate-refused", instance=request.instance, host=host)
        return candidate(
            host,
            info,
            load.get(host, HostLoad()),
            refused=refused,
            handover=handover,
            bandwidth=bandwidth,
            instance=request.instance,
        )

    return list(await asyncio.gather(*(one(h) for h in hosts)))


def check_named(need: Need, found: Candidate, *, forced: bool) -> str:
    """Why a named destination may take the instance (the placement reason), or
    raise: DestinationDraining when a drain is emptying it, GroupConflict for the group
    rule (both forced too), InsufficientResources when free memory less reservations
    is short (not when forced)."""
    if found.drain is not None:
        raise DestinationDraining(
            f"{found.host} is being drained (drain {found.drain}): nothing is moved onto "
            "a host being emptied; choose another or cancel that drain"
        )
    # The handover preference only steers choosing; a named host keeps today's
    # behaviour (the start plan says when handover cannot be armed).
    why = rejection(need, dataclasses.replace(found, handover=True), forced=forced)
    if why is not None:
        if need.group and need.group in found.groups:
            raise GroupConflict(f"{found.host}: {why}")
        raise InsufficientResources(why)
    if forced:
        return f"{found.host}: forced by the request; free memory and reservations not checked"
    available = found.available
    if available is None:
        return f"{found.host}: named by the request; the host does not report free memory"
    return (
        f"{found.host}: named by the request; {format_size(available)} free after "
        f"{reserved_text(found)}, {need.instance} needs {format_size(need.memory)}"
    )


__all__ = [
    "DestinationDraining",
    "GroupConflict",
    "HostLoad",
    "NoDestination",
    "Placement",
    "candidate",
    "check_named",
    "loads",
    "survey",
]
