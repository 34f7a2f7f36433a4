"""Metrics that follow other components."""

from __future__ import annotations

from pathlib import Path

from lmwatch.metrics import Metrics
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
