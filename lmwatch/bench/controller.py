"""The contract between the benchmark runner and whatever decides during a migration.

A controller is built once per run (`ControllerFactory(setting)`), plans the start,
then sees one `Sample` every `poll_interval` seconds of virtual time and answers
with commands, which the runner applies to the simulated migration in order.
Controllers never see the workload's hidden parameters (working set, writer kind,
rate pattern, link events): only what a real system sees.

Besides `start`, `step` and `finished`, the runner reads what `ControllerBase` gives
every controller a default for: `started_at` (when the job begins, after a measurement
before it), `wake_on_pass` (sample each pass at its start, as the engine is woken by the
driver's event), `applied(command, accepted)` (told after each command whether the
migration took it, as the engine learns from the driver's answer), `after_failure` and
`retry_interval` (a new job after a failed one), `restarted(at)` (when a new job began),
and `predictions` and `reasons` (the ETAs made and the actions taken, for the report).
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
    started_at: float  # seconds: the job begins then (a measurement before it counts)
    wake_on_pass: bool  # sampled at each pass's start too, at most every `MIN_WAKE` s
    retry_interval: float  # seconds between new jobs tried after a failed one

    @property
    def predictions(self) -> Sequence[tuple[float, float | None]]:
        """(time, ETA seconds) of each prediction made."""
        ...

    @property
    def reasons(self) -> Sequence[tuple[float, str, str]]:
        """(time, action, why) of each action taken."""
        ...

    def start(self) -> StartPlan:
        """How the migration starts (what is armed, the first blackout budget)."""
        ...

    def next_poll(self, now: float) -> float:
        """Seconds from the sample taken at `now` to the next one (`poll_interval`, or
        sooner where the controller needs a look earlier)."""
        ...

    def step(self, sample: Sample, now: float) -> Sequence[Command]:
        """Commands to apply now; `now` is seconds since the migration started."""
        ...

    def applied(self, command: Command, accepted: bool) -> None:
        """Whether the migration took `command` (a handover while the link is down is
        refused)."""
        ...

    def after_failure(self, result: JobResult, now: float) -> Command | None:
        """The job failed with the guest on the source: a new job to try now, or None."""
        ...

    def restarted(self, at: float) -> None:
        """A new job began at `at`."""
        ...

    def finished(self, result: JobResult) -> None:
        """The migration ended (controllers that learn across runs may keep something)."""
        ...


class ControllerBase:
    """Defaults for what a controller need not do: begin at once, sample every
    `poll_interval` only, never start again after a failed job, predict nothing, keep
    nothing across runs."""

    started_at: float = 0.0
    wake_on_pass: bool = False
    retry_interval: float = 5.0
    predictions: Sequence[tuple[float, float | None]] = ()
    reasons: Sequence[tuple[float, str, str]] = ()

    poll_interval: float

    def next_poll(self, now: float) -> float:
        return self.poll_interval

    def applied(self, command: Command, accepted: bool) -> None:
        return None

    def after_failure(self, result: JobResult, now: float) -> Command | None:
        return None

    def restarted(self, at: float) -> None:
        return None

    def finished(self, result: JobResult) -> None:
        return None


ControllerFactory = Callable[[Setting], Controller]
