"""The engine's knobs: polling, per-host limits, outage tolerance, store retries."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmwatch import policies


@dataclass(frozen=True, slots=True)
class EngineSettings:
    poll_interval: float = 1.0  # seconds between samples of one migration
    max_per_source: int = 2  # migrations leaving one host at once
    max_per_destination: int = 2  # migrations arriving at one host at once
    error_tolerance: float = 90.0  # seconds of failing driver calls before a migration fails
    error_backoff: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0)
    continue_log_interval: float = 30.0  # how often an unchanged "continue" is logged
    measure_change_rate: bool = True
    change_rate_max_age: float = 600.0  # seconds a pre-start measurement is reused for
    switchover_memory: int = 20  # measured switchover costs and link rates kept per host pair
    store_check_interval: float = 5.0  # seconds between checks that the store file is there
    store_retry: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0)  # back-off of failed writes
    # Operator commands between daemons on one PostgreSQL store (engine/commands.py):
    # how long an API waits for the owner's outcome, how often an owner looks for
    # commands besides being notified, and after how long a command taken by a daemon
    # that recorded no outcome may be taken by another.
    command_wait: float = 5.0
    command_poll: float = 1.0
    command_retake_after: float = 30.0
    policy: policies.PolicySettings = field(default_factory=policies.PolicySettings)
