"""Prometheus metrics (DESIGN §6): names `lmwatch_*`, base units, neutral words only."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from lmwatch.profiles import ProfileRegistry
from lmwatch.profiles.schema import ProfileSet
from lmwatch.store import Store

if TYPE_CHECKING:
    from lmwatch.cluster.membership import Membership

__all__ = ["CONTENT_TYPE_LATEST", "VIOLATION_KINDS", "Metrics", "MigrationGauges"]

# No `*_created` series: one more series per counter and histogram child that no
# dashboard or rule uses (process-wide in prometheus-client; lmwatch is the process).
disable_created_metrics()

# The kinds `lmwatch.policies.violations` reports.
VIOLATION_KINDS = ("blackout", "pause", "handover", "slow-down", "deadline")


@dataclass(frozen=True, slots=True)
class MigrationGauges:
    """The series of one running migration (children of the labelled gauges)."""

    remaining: Gauge
    transfer_rate: Gauge
    change_rate: Gauge
    disk_remaining: Gauge
    disk_rate: Gauge
    eta: Gauge
    predicted_blackout: Gauge


_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, float("inf"))
_BLACKOUT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, float("inf"))


class Metrics:
    """One set of metrics on its own registry (so tests and several engines never clash)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.started = Counter(
            "lmwatch_migrations_started", "Migrations started, by profile.", ["profile"], registry=r
        )
        self.restarts = Counter(
            "lmwatch_restarts",
            "Migrations started again from the beginning: with a higher slow-down start "
            "level (the guest's writing outgrew the start plan), after a pause the link "
            "stretched beyond its bound, or after a job that failed with the instance still "
            "on the source, by profile.",
            ["profile"],
            registry=r,
        )
        self.finished = Counter(
            "lmwatch_migrations_finished",
            "Migrations finished, by final state and completion method.",
            ["state", "method"],
            registry=r,
        )
        self.placements = Counter(
            "lmwatch_placements",
            "Migrations accepted, by how their destination was placed (chosen, named or forced).",
            ["how"],
            registry=r,
        )
        for how in ("chosen", "named", "forced"):
            self.placements.labels(how)  # each series from zero
        self.decisions = Counter(
            "lmwatch_decisions", "Decisions taken, by action.", ["action"], registry=r
        )
        self.hypervisor_errors = Counter(
            "lmwatch_hypervisor_errors",
            "Errors from the hypervisor driver, by operation.",
            ["operation"],
            registry=r,
        )
        self.violations = Counter(
            "lmwatch_profile_violations",
            "Completed migrations that exceeded their profile, by profile and kind "
            "(blackout, pause, handover, slow-down, deadline).",
            ["profile", "kind"],
            registry=r,
        )
        self.profile_reload_failures = Counter(
            "lmwatch_profile_reload_failures", "Profile reloads rejected as invalid.", registry=r
        )
        self.duration = Histogram(
            "lmwatch_migration_duration_seconds",
            "Total time of finished migrations, by method.",
            ["method"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.blackout = Histogram(
            "lmwatch_blackout_seconds",
            "Final pause seen by instances, by method (measured; a stop that did not "
            "complete counts until the instance ran again on the source).",
            ["method"],
            buckets=_BLACKOUT_BUCKETS,
            registry=r,
        )
        self.active = Gauge("lmwatch_migrations_active", "Migrations not finished.", registry=r)
        self.queued = Gauge(
            "lmwatch_migrations_queued", "Migrations waiting for a slot.", registry=r
        )
        labels = ["migration", "instance", "source", "destination"]
        self.remaining = Gauge(
            "lmwatch_migration_remaining_bytes", "Memory still to copy.", labels, registry=r
        )
        self.transfer_rate = Gauge(
            "lmwatch_migration_transfer_rate_bytes_per_second",
            "Bytes per second moved to the destination.",
            labels,
            registry=r,
        )
        self.change_rate = Gauge(
            "lmwatch_migration_change_rate_bytes_per_second",
            "Bytes per second of memory the guest rewrites.",
            labels,
            registry=r,
        )
        self.disk_remaining = Gauge(
            "lmwatch_migration_disk_remaining_bytes",
            "Local disk still to copy before the disks are in sync (0 when in sync or "
            "when the instance has no local disks).",
            labels,
            registry=r,
        )
        self.disk_rate = Gauge(
            "lmwatch_migration_disk_rate_bytes_per_second",
            "Bytes per second the copy of local disks moves.",
            labels,
            registry=r,
        )
        self.eta = Gauge(
            "lmwatch_migration_eta_seconds",
            "Predicted time to completion (NaN when it will not finish on its own).",
            labels,
            registry=r,
        )
        self.predicted_blackout = Gauge(
            "lmwatch_migration_predicted_blackout_seconds",
            "Predicted final pause if completed now.",
            labels,
            registry=r,
        )
        self.profile_limits = Gauge(
            "lmwatch_profile_limit_seconds",
            "Limits of the profiles in force, by profile and limit (max_blackout, and "
            "max_pause / max_degraded where the profile allows a pause / a handover).",
            ["profile", "limit"],
            registry=r,
        )
        self.store_healthy = Gauge(
            "lmwatch_store_healthy",
            "1 while the store takes writes and its file is in place; 0 while changes wait "
            "in memory or the file was deleted (no new migration is accepted then).",
            registry=r,
        )
        self.store_write_failures = Counter(
            "lmwatch_store_write_failures",
            "Writes to the store that failed (each is kept and retried).",
            registry=r,
        )
        self.drains_active = Gauge(
            "lmwatch_drains_active", "Drains moving instances off a host now.", registry=r
        )
        self.drain_instances = Gauge(
            "lmwatch_drain_instances",
            "Instances of each unfinished drain, by drain id, drained host and state "
            "(pending, submitting, migrating, moved, blocked, failed, cancelled).",
            ["drain", "host", "state"],
            registry=r,
        )
        self.poll_lag = Histogram(
            "lmwatch_supervisor_poll_lag_seconds",
            "How late the supervisor polled a migration compared with its schedule.",
            buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, float("inf")),
            registry=r,
        )
        self.member_leases = Gauge(
            "lmwatch_member_leases",
            "Leases this daemon holds, by its member name and kind (host: source hosts; "
            "migration: migrations claimed); 0 for a daemon alone on its store.",
            ["member", "kind"],
            registry=r,
        )
        self.migrations_owned = Gauge(
            "lmwatch_migrations_owned",
            "Migrations this daemon supervises now (with a shared database: those it owns).",
            registry=r,
        )
        self.store_reachable = Gauge(
            "lmwatch_store_reachable",
            "1 while the store's database answers (with a shared database: this daemon's "
            "last lease renewal and round), else 0.",
            registry=r,
        )

    def watch_store(self, store: Store) -> None:
        """Expose whether `store` takes new work, and count its failed writes."""
        self.store_healthy.set_function(lambda: 1.0 if store.problem() is None else 0.0)
        store.on_write_failure(self.store_write_failures.inc)

    def watch_role(
        self, store: Store, supervised: Callable[[], int], membership: Membership | None
    ) -> None:
        """The daemon's role among those sharing its database (docs/cluster.md): its
        leases by kind (labelled with its name), the migrations it supervises, and
        whether the database answers. A daemon alone on its store holds no leases,
        supervises what it has, and its store answers while it takes writes."""
        leases, reachable = self.member_leases, self.store_reachable
        self.migrations_owned.set_function(lambda: float(supervised()))
        if membership is None:
            for kind in ("host", "migration"):
                leases.labels("", kind).set(0)
            reachable.set_function(lambda: 1.0 if store.problem() is None else 0.0)
            return

        def held(kind: str) -> Callable[[], float]:
            return lambda: float(membership.held_by_kind().get(kind, 0))

        for kind in ("host", "migration"):
            leases.labels(membership.name, kind).set_function(held(kind))
        reachable.set_function(lambda: 1.0 if membership.reachable else 0.0)

    def count_reload_failures(self, profiles: ProfileRegistry) -> None:
        """Count every rejected reload of `profiles`, however it was triggered."""
        profiles.on_failure(lambda _error: self.profile_reload_failures.inc())

    def count_violations_from_zero(self, profiles: ProfileRegistry) -> None:
        """Expose every profile's violation counters at 0 before the first violation, for
        the profiles loaded now and after each reload: a rule on their increase then sees
        the first one too (a counter that appears at 1 shows no increase). The same for
        the count of migrations started again."""

        def zero(profile_set: ProfileSet) -> None:
            for profile in profile_set.profiles:
                self.restarts.labels(profile.name)
                for kind in VIOLATION_KINDS:
                    self.violations.labels(profile.name, kind)

        zero(profiles.current)
        profiles.subscribe(zero)

    def publish_profile_limits(self, profiles: ProfileRegistry) -> None:
        """Expose the limits of the profiles in force (replaced on each reload), for
        dashboards that draw blackouts against them."""

        def publish(profile_set: ProfileSet) -> None:
            self.profile_limits.clear()
            for profile in profile_set.profiles:
                self.profile_limits.labels(profile.name, "max_blackout").set(profile.max_blackout)
                if profile.may_pause:
                    self.profile_limits.labels(profile.name, "max_pause").set(profile.max_pause)
                if profile.handover_allowed:
                    self.profile_limits.labels(profile.name, "max_degraded").set(
                        profile.max_degraded
                    )

        publish(profiles.current)
        profiles.subscribe(publish)

    def migration_gauges(self, labels: tuple[str, str, str, str]) -> MigrationGauges:
        """The per-migration series of one migration (to set without a lookup each time)."""
        return MigrationGauges(
            remaining=self.remaining.labels(*labels),
            transfer_rate=self.transfer_rate.labels(*labels),
            change_rate=self.change_rate.labels(*labels),
            disk_remaining=self.disk_remaining.labels(*labels),
            disk_rate=self.disk_rate.labels(*labels),
            eta=self.eta.labels(*labels),
            predicted_blackout=self.predicted_blackout.labels(*labels),
        )

    def forget(self, labels: tuple[str, str, str, str]) -> None:
        """Drop the per-migration series once it has finished."""
        for gauge in (
            self.remaining,
            self.transfer_rate,
            self.change_rate,
            self.disk_remaining,
            self.disk_rate,
            self.eta,
            self.predicted_blackout,
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(*labels)

    def drains(self, active: int, instances: Mapping[tuple[str, str, str], int]) -> None:
        """The unfinished drains now: how many, and their instances by (drain, host,
        state); a finished drain's series go."""
        self.drains_active.set(active)
        self.drain_instances.clear()
        for (drain, host, state), count in instances.items():
            self.drain_instances.labels(drain, host, state).set(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
