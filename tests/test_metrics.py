"""Metrics that follow other components."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from lmwatch.metrics import VIOLATION_KINDS, Metrics
from lmwatch.profiles import ProfileRegistry

GOOD = "profiles:\n  - name: default\n    max_blackout: 300ms\n"


def test_every_rejected_reload_is_counted_however_it_was_triggered(tmp_path: Path) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(GOOD)
    registry = ProfileRegistry(path)
    metrics = Metrics()
    metrics.count_reload_failures(registry)
    path.write_text(GOOD.replace("300ms", "3 sec"))
    assert registry.poll() is not None  # a file change, as the watcher sees it
    registry.try_reload()  # SIGHUP and the API take this path
    value = metrics.registry.get_sample_value("lmwatch_profile_reload_failures_total")
    assert value == 2
    assert registry.current.profiles[0].max_blackout == 0.3  # the last good set stays


def test_no_created_series_are_exposed() -> None:
    metrics = Metrics()
    metrics.decisions.labels("continue").inc()
    metrics.duration.labels("converged").observe(3)
    text = metrics.render().decode()
    assert "lmwatch_decisions_total" in text
    assert "_created" not in text


def test_violation_counters_start_at_zero_for_every_profile_and_follow_reloads(
    tmp_path: Path,
) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(GOOD)
    registry = ProfileRegistry(path)
    metrics = Metrics()
    metrics.count_violations_from_zero(registry)

    def value(profile: str, kind: str) -> float | None:
        return metrics.registry.get_sample_value(
            "lmwatch_profile_violations_total", {"profile": profile, "kind": kind}
        )

    assert {kind: value("default", kind) for kind in VIOLATION_KINDS} == dict.fromkeys(
        VIOLATION_KINDS, 0.0
    )
    path.write_text(GOOD + "  - name: batch\n    max_blackout: 2s\n")
    assert registry.try_reload().ok
    assert value("batch", "deadline") == 0.0


def test_the_violation_kinds_are_those_the_policy_reports() -> None:
    module = importlib.import_module("lmwatch.policies.violations")
    source = Path(str(module.__file__)).read_text(encoding="utf-8")
    assert set(re.findall(r'Violation\(\s*"([a-z-]+)"', source)) == set(VIOLATION_KINDS)


def test_the_limits_of_the_profiles_in_force_are_exposed_and_replaced_on_reload(
    tmp_path: Path,
) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(
        "profiles:\n  - name: db\n    max_blackout: 300ms\n    handover: allowed\n"
        "    max_degraded: 60s\n  - name: default\n    max_blackout: 500ms\n"
        "    may_pause: true\n    max_pause: 3s\n"
    )
    registry = ProfileRegistry(path)
    metrics = Metrics()
    metrics.publish_profile_limits(registry)

    def limits() -> dict[tuple[str, str], float]:
        return {
            (s.labels["profile"], s.labels["limit"]): s.value
            for family in metrics.registry.collect()
            if family.name == "lmwatch_profile_limit_seconds"
            for s in family.samples
        }

    assert limits() == {
        ("db", "max_blackout"): 0.3,
        ("db", "max_degraded"): 60.0,
        ("default", "max_blackout"): 0.5,
        ("default", "max_pause"): 3.0,
    }
    path.write_text(GOOD)
    assert registry.try_reload().ok
    assert limits() == {("default", "max_blackout"): 0.3}


def test_disk_gauges_are_served_per_migration_and_forgotten_with_it() -> None:
    metrics = Metrics()
    labels = ("m1", "files", "a", "b")
    metrics.disk_remaining.labels(*labels).set(12 * 1024**3)
    metrics.disk_rate.labels(*labels).set(1.25e9)
    text = metrics.render().decode()
    assert 'lmwatch_migration_disk_remaining_bytes{destination="b",instance="files"' in text
    assert "lmwatch_migration_disk_rate_bytes_per_second{" in text
    metrics.forget(labels)
    text = metrics.render().decode()
    assert 'migration="m1"' not in text


def test_placements_are_exported_from_zero_for_each_way() -> None:
    text = Metrics().render().decode()
    for how in ("chosen", "named", "forced"):
        assert f'lmwatch_placements_total{{how="{how}"}} 0.0' in text
