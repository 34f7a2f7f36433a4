"""The contract between the benchmark runner and whatever decides during a migration.

A controller is built once per run (`ControllerFactory(setting)`), plans the start,
then sees one `Sample` every `poll_interval` seconds of virtual time and answers
with commands, which the runner applies to the simulated migration in order.
Controllers never see the workload's hidden parameters (working set, writer kind,
rate pattern, link events): only what a real system sees.

Optional, looked up by the runner: `wake_on_pass` (sample each pass at its start, as
the engine is woken by the driver's event), `applied(command, accepted)` (told after
each command whether the migration took it, as the engine learns from the driver's
answer) and `restarted(at)` (when a new job began).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from lmwatch.model import JobResult, Sample, StartPlan
from lmwatch.profiles.schema import Profile


@dataclass(frozen=True, slots=True)
class Setting:
    """What a controller knows before the migration starts."""

    workload: str  # the workload's name (for logs only; never to look anything up)
    memory: int  # bytes of guest memory
    bandwidth: float  # bytes/s the link between the hosts is known to carry
    change_rate: float | None  # bytes/s measured before start (as the driver would), or None
    profile: Profile  # the availability profile the run is judged against
    switchover: float  # seconds of switchover cost learned so far for this host pair
    change_rate_window: float | None = None  # seconds the change-rate measurement covered
    switchover_measured: bool = True  # measured on the pair; False: a value assumed for it


@dataclass(frozen=True, slots=True)
class SetBudget:
    """Allow a final pause of this many seconds (the hypervisor's own completion test)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class SetCap:
    """Cap the transfer at this many bytes/s (None removes the cap)."""

    bytes_per_second: float | None


@dataclass(frozen=True, slots=True)
class Pause:
    """Stop the guest until the rest is copied."""


@dataclass(frozen=True, slots=True)
class Handover:
    """Resume on the destination now; the rest is fetched on demand (needs arming at start)."""


@dataclass(frozen=True, slots=True)
class Cancel:
    """Stop migrating; the guest keeps running on the source."""


@dataclass(frozen=True, slots=True)
class Restart:
    """Stop this job and start copying again with `plan` once it has ended; the time
    spent so far counts, what was copied is lost."""

    plan: StartPlan


Command = SetBudget | SetCap | Pause | Handover | Cancel | Restart


class Controller(Protocol):
    name: str
    poll_interval: float  # seconds of virtual time between samples

    def start(self) -> StartPlan:
        """How the migration starts (what is armed, the first blackout budget)."""
        ...

    def step(self, sample: Sample, now: float) -> Sequence[Command]:
        """Commands to apply now; `now` is seconds since the migration started."""
        ...

    def finished(self, result: JobResult) -> None:
        """The migration ended (controllers that learn across runs may keep something)."""
        ...


ControllerFactory = Callable[[Setting], Controller]
