"""The neutral data types shared by every layer.

Nothing here names a hypervisor mechanism: drivers translate their own statistics
into `Sample` and carry out `Action`s; policies read samples and return decisions.
All values are immutable; sizes are bytes, durations seconds, rates bytes/second.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

GIB = 1024**3
MIB = 1024**2


class State(StrEnum):
    """Lifecycle of a migration as the API reports it."""

    QUEUED = "queued"
    STARTING = "starting"
    COPYING = "copying"
    COMPLETING = "completing"
    HANDOVER = "handover"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in _STATES_FINISHED


class Phase(StrEnum):
    """What the driver sees the hypervisor doing with a running migration."""

    COPYING = "copying"  # memory copied while the instance runs
    COMPLETING = "completing"  # instance stopped (blackout or pause), last bytes moving
    HANDOVER = "handover"  # running on the destination, remainder fetched on demand
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in _PHASES_FINISHED


_STATES_FINISHED = frozenset((State.COMPLETED, State.CANCELLED, State.FAILED))
_PHASES_FINISHED = frozenset((Phase.COMPLETED, Phase.CANCELLED, Phase.FAILED))


class Action(StrEnum):
    """What a decision asks the engine to do."""

    CONTINUE = "continue"
    RAISE_BLACKOUT = "raise-blackout"  # allow a longer final pause (up to max_blackout)
    PAUSE = "pause"  # stop the instance until the rest is copied
    HANDOVER = "handover"  # resume on the destination before all memory arrived
    CANCEL = "cancel"  # stop migrating; the instance keeps running on the source
    # Stop this job and start copying again from the beginning with a new plan (a
    # higher slow-down start level), or with the same one after a pause the link
    # stretched; the instance keeps running on the source meanwhile.
    RESTART = "restart"


class Method(StrEnum):
    """How a migration ended."""

    CONVERGED = "converged"
    BLACKOUT_RAISED = "blackout-raised"
    SLOWED = "slowed"
    PAUSED = "paused"
    HANDOVER = "handover"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class MigrationRequest:
    instance: str
    source: str
    destination: str | None  # None: lmwatch chooses (see `policies.placement.choose`)
    labels: Mapping[str, str] = field(default_factory=dict)
    profile: str | None = None  # explicit profile name; overrides selection
    # With a named destination: skip the capacity checks (free memory, reservations),
    # never those protecting the instance (CPU, pinning, devices, name taken).
    force: bool = False


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """What the driver knows about an instance before it moves."""

    name: str
    uuid: str
    host: str
    memory_bytes: int
    labels: Mapping[str, str] = field(default_factory=dict)
    # Bytes of disk local to its host that must move with it (0: storage is shared).
    local_disk_bytes: int = 0


@dataclass(frozen=True, slots=True)
class HostInfo:
    """What the driver knows about a host as a destination.

    `free_memory` is what the hypervisor reports free for incoming instances; it never
    subtracts what lmwatch's queued or running migrations reserve there (the engine's
    placement owns "free minus reserved", see `lmwatch.engine.placing`)."""

    name: str
    free_memory: int | None  # bytes; None when the host does not say
    instances: tuple[InstanceInfo, ...] = ()  # running there now


@dataclass(frozen=True, slots=True)
class ChangeRate:
    """A change-rate measurement before start: distinct bytes the guest dirtied in
    `window` seconds, over `window`. A guest that rewrites a small working set
    saturates it, so the figure depends on the window; the policy reads it as one
    point of the same curve as the passes' remainders."""

    bytes_per_second: float
    window: float  # seconds the measurement covered


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the hypervisor on a source/destination pair can do."""

    handover: bool = True
    slow_down: bool = True
    measure_change_rate: bool = True
    bandwidth: float | None = None  # bytes/s a migration between them can expect, if known


@dataclass(frozen=True, slots=True)
class StartPlan:
    """How a migration is started; chosen by `policies.plan_start`.

    Handover and slow-down can only be used later when armed here.
    """

    arm_handover: bool
    arm_slow_down: bool
    blackout_budget: float  # seconds, once the first pass is over
    slow_down_initial: float = 0.2  # fraction of guest CPU taken once slowing starts
    slow_down_step: float = 0.1
    bandwidth: float | None = None  # bytes/s cap; None = no cap
    reason: str = ""
    # Seconds of budget the job starts with, held while the first pass copies the bulk
    # of memory (`policies.start`); None: `blackout_budget` from the start.
    first_pass_budget: float | None = None

    @property
    def starting_budget(self) -> float:
        """The budget in force when the job starts."""
        if self.first_pass_budget is None:
            return self.blackout_budget
        return min(self.first_pass_budget, self.blackout_budget)


@dataclass(frozen=True, slots=True)
class Sample:
    """One observation of a running migration."""

    time: float  # clock seconds
    memory_total: int
    memory_remaining: int
    memory_transferred: int
    transfer_rate: float  # bytes/s, as last measured (0 when unknown)
    change_rate: float  # bytes/s the guest rewrites (0 when unknown, e.g. first pass)
    passes: int  # 1 during the first full pass, 2 during the second, ...
    phase: Phase
    blackout_budget: float = 0.0  # seconds currently allowed for the final pause
    slowdown: float = 0.0  # fraction of guest CPU currently taken away (0..1)
    expected_blackout: float | None = None  # hypervisor's own estimate, when it gives one
    # Local disks copied with the instance (all 0 when its storage is shared). Until
    # `disks_in_sync`, memory copying has not really begun and nothing may be forced.
    disk_total: int = 0
    disk_remaining: int = 0
    disk_rate: float = 0.0  # bytes/s the disk copy moves, as last measured

    @property
    def disks_in_sync(self) -> bool:
        return self.disk_remaining == 0


@dataclass(frozen=True, slots=True)
class Prediction:
    """Estimates behind a decision, reported on every migration."""

    transfer_rate: float
    change_rate: float
    remaining: int
    eta_seconds: float | None  # None when it will not finish on its own
    blackout_seconds: float | None  # predicted final pause if completed now
    converges: bool | None  # None before there is evidence
    floor_bytes: int | None = None  # remainder copying settles at
    confidence: float = 0.0  # 0..1, how much evidence the estimate has


class Rule(StrEnum):
    """Which rule of `decide` (or which request) a decision comes from, in the order
    `lmwatch/policies/completion.py` lists them. The reason text says the same to a
    person; code compares rules, never the text."""

    PAUSE_OUTLASTS_BOUND = "pause-outlasts-bound"
    PAST_COPYING = "past-copying"
    SWITCH_OUTLASTS_BOUND = "switch-outlasts-bound"
    DISKS_NEVER_SYNC = "disks-never-sync"
    DISKS_MISS_DEADLINE = "disks-miss-deadline"
    DISK_COPY = "disk-copy"
    LINK_STILL = "link-still"
    OPERATOR_FINISH = "operator-finish"
    OPERATOR_CANCEL = "operator-cancel"
    BUDGET_OVER_LIMIT = "budget-over-limit"
    FIRST_PASS_OVER = "first-pass-over"
    DEADLINE = "deadline"
    NO_PROGRESS_YET = "no-progress-yet"
    FIRST_PASS = "first-pass"
    WINDOWS_FILLED = "windows-filled"
    ONE_PASS_EITHER_WAY = "one-pass-either-way"
    CONVERGES = "converges"
    PAUSE_CHEAPER_THAN_SLOWING = "pause-cheaper-than-slowing"
    RAISE_BUDGET = "raise-budget"
    FINISH_WITHIN_BOUNDS = "finish-within-bounds"
    ONE_PASS_HOPEFUL = "one-pass-hopeful"
    START_AGAIN = "start-again"
    SLOWING = "slowing"
    QUIETER_PHASE_SEEN = "quieter-phase-seen"
    STILL_SHRINKING = "still-shrinking"
    RATES_VARY = "rates-vary"
    PATIENCE = "patience"
    WAITING_STOPPED_PAYING = "waiting-stopped-paying"
    JOB_FAILED = "job-failed"  # after the job ended: start again (`restart_after_failure`)


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    reason: str  # a sentence an operator understands
    prediction: Prediction | None = None
    blackout_budget: float | None = None  # for RAISE_BLACKOUT: the new budget, seconds
    slow_down_initial: float | None = None  # for RESTART: the new start's slow-down level
    planned_rate: float | None = None  # for RESTART: the write rate (bytes/s) it is planned for
    # for RESTART: the last clock time to try starting the new job while the hosts
    # refuse it (None: one try)
    start_by: float | None = None
    note: str | None = None  # e.g. a profile edit that cannot apply to this migration
    rule: Rule | None = None  # which rule decided (None: made outside `decide`)


@dataclass(frozen=True, slots=True)
class MigrationContext:
    """What the policy needs to know about a migration besides its samples."""

    started_at: float
    memory_bytes: int
    plan: StartPlan
    blackout_budget: float  # currently in force
    deadline_at: float | None  # absolute clock time, None = no deadline
    paused: bool = False
    paused_at: float | None = None  # clock time of our pause; None when unknown (restart)
    handed_over: bool = False
    force: bool = False  # an operator asked to finish now
    accept_pause: bool = False  # the operator accepts a pause beyond the profile
    # Seconds the final stop costs beyond copying the remainder (stop, device state,
    # resume), as learned for this host pair; budgets leave room for it.
    switchover: float = 0.05
    # The shortest switchover measured on this host pair (None: none measured yet).
    switchover_least: float | None = None
    # The longest a stopped job took to end on this host pair, lately (None: none
    # measured yet): the instance runs on the source again only then.
    cancel_resume: float | None = None
    change_rate_before_start: float | None = None  # bytes/s, measured before start
    change_rate_window: float | None = None  # seconds that measurement covered, when known
    restarts: int = 0  # times this migration was started again (`Action.RESTART`)
    # Clock time the current hypervisor job began: `started_at` unless the migration
    # was started again (then the deadline still counts from `started_at`).
    job_started_at: float | None = None


@dataclass(frozen=True, slots=True)
class JobResult:
    """What the driver reports once a migration has ended."""

    phase: Phase  # COMPLETED, CANCELLED or FAILED
    # How long the instance was stopped at the end: the measured final pause of a
    # completed migration, or, for one that did not complete, from the stop to running
    # again on the source (the link broke under the final copy, say). None: not stopped,
    # or not known.
    blackout_seconds: float | None = None
    transferred: int = 0
    passes: int = 0
    paused: bool = False
    handed_over: bool = False
    slowdown: float = 0.0  # highest slow-down applied
    error: str | None = None
    running_on: str | None = None  # host the instance runs on afterwards, when known
    note: str | None = None  # something the driver did or found that the log should say
