"""Admission of a request: validation, the idempotency fingerprint, replays, the record."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from lmwatch.engine import admission
from lmwatch.errors import Conflict, Invalid
from lmwatch.model import InstanceInfo, MigrationRequest, State
from lmwatch.profiles import ProfileRegistry
from lmwatch.store import Store

PROFILES = """\
profiles:
  - name: db
    match: {labels: {role: db}}
    max_blackout: 300ms
  - name: default
    max_blackout: 1s
"""


BASE = MigrationRequest(instance="vm1", source="a", destination="b")


def request(**changes: Any) -> MigrationRequest:
    return dataclasses.replace(BASE, **changes)


INFO = InstanceInfo(name="vm1", uuid="u-1", host="a", memory_bytes=1 << 30, labels={"role": "db"})


def test_the_same_host_at_both_ends_is_invalid() -> None:
    with pytest.raises(Invalid):
        admission.validate(request(destination="a"))
    admission.validate(request())


def test_the_fingerprint_ignores_the_order_of_labels_only() -> None:
    one = admission.fingerprint(request(labels={"x": "1", "y": "2"}))
    assert one == admission.fingerprint(request(labels={"y": "2", "x": "1"}))
    assert one != admission.fingerprint(request(labels={"x": "1"}))
    assert one != admission.fingerprint(request(labels={"x": "1", "y": "2"}, profile="db"))
    assert one != admission.fingerprint(request(labels={"x": "1", "y": "2"}, destination="c"))


def test_the_requests_labels_win_over_the_hosts_and_choose_the_profile(tmp_path: Path) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(PROFILES)
    registry = ProfileRegistry(path)
    labels, selection = admission.select(registry, request(), INFO)
    assert labels == {"role": "db"} and selection.profile.name == "db"
    labels, selection = admission.select(registry, request(labels={"role": "web"}), INFO)
    assert labels == {"role": "web"} and selection.profile.name == "default"
    with pytest.raises(Invalid):
        admission.select(registry, request(profile="nonesuch"), INFO)


def test_a_replay_and_a_reused_key(tmp_path: Path) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(PROFILES)
    _, selection = admission.select(ProfileRegistry(path), request(), INFO)
    store = Store.open(tmp_path / "lmwatch.db")
    fingerprint = admission.fingerprint(request())
    assert admission.replayed(store, request(), "k1", fingerprint) is None
    record, reason = admission.new_record(
        request(),
        INFO,
        {"role": "db"},
        selection,
        migration_id="m-1",
        now=10.0,
        idempotency_key="k1",
        fingerprint=fingerprint,
    )
    assert record.state is State.QUEUED and record.profile_name == "db"
    assert record.id == "m-1"
    assert reason == f"accepted; profile 'db': {selection.reason}"
    store.insert(record, reason)
    assert admission.replayed(store, request(), "k1", fingerprint) == record.id
    with pytest.raises(Conflict, match="different request"):
        admission.replayed(store, request(labels={"x": "1"}), "k1", "other")
    with pytest.raises(Conflict, match="already migrating"):
        admission.replayed(store, request(), None, fingerprint)
    store.close()
