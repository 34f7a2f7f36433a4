"""The one small interface every hypervisor driver implements.

A driver speaks its hypervisor's language inside and the neutral vocabulary of
`lmwatch.model` outside. Migrations are addressed by lmwatch's migration id; the
driver keeps whatever handle it needs. Every method may raise `DriverError` (the
hypervisor failed or went away) or, before start, a `Refused` subclass (the
request cannot be carried out; the API turns these into 4xx answers).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from lmwatch.errors import ProblemError
from lmwatch.model import (
    Capabilities,
    ChangeRate,
    HostInfo,
    InstanceInfo,
    JobResult,
    MigrationRequest,
    Sample,
    StartPlan,
)

CHANGE_RATE_WINDOW = 1
"""Seconds a change-rate measurement before start covers, on every driver and in the
benchmark's model of the engine: the policy reads the figure with its window (a guest
that rewrites a small working set saturates it, so a longer window reads lower), and
what the benchmark shows of lmwatch's decisions holds only for the window the daemon
measures. The start waits for it, so it is the shortest the hypervisor offers (whole
seconds). A longer window scatters less (the hypervisor samples as many pages and
finds more of them changed) and shows more of a small working set's saturation, but
each of its seconds is a second of every measured migration; the benchmark measured
both (docs/benchmark.md, "The measurement's window")."""


class DriverError(Exception):
    """The hypervisor failed, refused an action mid-way, or could not be reached."""


class Refused(ProblemError):
    """A request that cannot be carried out; nothing was changed."""

    status = 409
    kind = "refused"


class UnknownHost(Refused):
    status = 404
    kind = "unknown-host"


class UnknownInstance(Refused):
    status = 404
    kind = "unknown-instance"


class NotOnSource(Refused):
    status = 409
    kind = "not-on-source"


class AlreadyOnDestination(Refused):
    status = 409
    kind = "already-on-destination"


class InsufficientResources(Refused):
    status = 409
    kind = "insufficient-resources"


class Incompatible(Refused):
    status = 409
    kind = "incompatible"


class NameTaken(Refused):
    """The destination already defines another instance under this name (or this
    instance's identity under another name)."""

    status = 409
    kind = "name-taken"


class HostUnreachable(Refused):
    status = 503
    kind = "host-unreachable"


def destination_of(request: MigrationRequest) -> str:
    """The destination a request names; drivers only see requests that name one (the
    engine chooses before asking them)."""
    if request.destination is None:
        raise Refused(f"no destination named for instance {request.instance!r}")
    return request.destination


class ActionRefused(DriverError):
    """The hypervisor cannot do this now (e.g. cancel after handover)."""


def handover_broke_text(source: str, destination: str) -> str:
    """Why a migration failed whose link broke after the handover: the instance runs
    on the destination, waiting for the part of its memory the source still holds
    (the hypervisor keeps both until the move is resumed). One text for every driver."""
    return (
        f"the link broke during the handover: the instance runs on {destination} but part "
        f"of its memory is still on {source}, and it waits for it until the move is "
        f"resumed; keep {source} running (stopping it loses the instance)"
    )


@runtime_checkable
class Driver(Protocol):
    name: str

    async def hosts(self) -> Sequence[str]:
        """Names of the hosts this driver manages."""
        ...

    async def reachable(self) -> dict[str, bool]:
        """Host name -> whether it answers right now (for readiness)."""
        ...

    async def describe(self, instance: str, host: str | None = None) -> InstanceInfo:
        """Where an instance runs and what it is; raises UnknownInstance/UnknownHost."""
        ...

    async def instances_on(self, host: str) -> Sequence[InstanceInfo]:
        """The instances running on `host` now (what a drain must move off it), in
        the host's own order; UnknownHost for a host it does not manage."""
        ...

    async def preflight(self, request: MigrationRequest) -> InstanceInfo:
        """Every check that can refuse the request before anything starts. With
        `request.force` the host's free memory is not checked (the rest always is)."""
        ...

    async def host_info(self, host: str) -> HostInfo:
        """The host's free memory and the instances running there (for choosing a
        destination). Free memory is the hypervisor's figure: it never subtracts what
        lmwatch's queued or running migrations reserve (the engine does that)."""
        ...

    async def capabilities(self, source: str, destination: str) -> Capabilities: ...

    async def measure_change_rate(self, instance: str, host: str) -> ChangeRate | None:
        """What the guest rewrites, measured before start over `CHANGE_RATE_WINDOW`
        seconds; None when unsupported."""
        ...

    async def start(self, migration_id: str, request: MigrationRequest, plan: StartPlan) -> None:
        """Begin migrating; returns once the hypervisor has accepted the job."""
        ...

    async def sample(self, migration_id: str) -> Sample:
        """Current progress; phase is terminal once the job has ended."""
        ...

    async def result(self, migration_id: str) -> JobResult:
        """How an ended job finished. Only valid once `sample` shows a terminal phase."""
        ...

    async def set_blackout_budget(self, migration_id: str, seconds: float) -> None: ...

    async def set_bandwidth(self, migration_id: str, bytes_per_second: float | None) -> None: ...

    async def pause(self, migration_id: str) -> None: ...

    async def handover(self, migration_id: str) -> None: ...

    async def cancel(self, migration_id: str) -> None:
        """Stop migrating; raises ActionRefused once handed over."""
        ...

    async def reattach(
        self,
        migration_id: str,
        request: MigrationRequest,
        plan: StartPlan,
        *,
        paused: bool = False,
    ) -> JobResult | None:
        """After a daemon restart: find the job again.

        Returns None when it is still running (and now supervised again), or the
        truthful result when it ended while nobody watched. `paused`: lmwatch paused
        the instance (its record says so); a job that ended without completing then
        leaves it resumed on the source, as `cancel` and a failure do.
        """
        ...

    async def wait_event(self, migration_id: str, timeout: float) -> None:
        """Sleep up to `timeout`, returning early when the job changes phase or pass."""
        ...

    async def close(self) -> None: ...
