"""The shipped profiles file loads, reads as intended, and stays neutral."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lmwatch.profiles import (
    HandoverPolicy,
    Match,
    OnDeadline,
    Profile,
    default_profiles_text,
    load_default_profiles,
    load_profiles,
    select_profile,
)

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3


def test_repo_root_file_is_the_shipped_one() -> None:
    link = ROOT / "profiles.yaml"
    assert link.is_symlink()
    assert link.resolve() == (ROOT / "lmwatch" / "data" / "profiles.yaml").resolve()
    assert load_profiles(link) == load_default_profiles()


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ({"tier": "database"}, "latency-critical"),
        ({"tier": "batch"}, "batch"),
        ({"tier": "web"}, "default"),
        ({}, "default"),
    ],
)
def test_each_example_is_selected_by_its_labels(labels: dict[str, str], expected: str) -> None:
    selection = select_profile(load_default_profiles(), instance="vm-1", uuid=None, labels=labels)
    assert selection.profile.name == expected


def test_example_values() -> None:
    profiles = load_default_profiles()
    critical = profiles.by_name("latency-critical")
    batch = profiles.by_name("batch")
    default = profiles.by_name("default")
    assert critical is not None and batch is not None and default is not None

    assert critical.max_blackout == pytest.approx(0.3)
    assert not critical.may_slow_down
    assert critical.handover is HandoverPolicy.ALLOWED
    assert critical.max_degraded == 30
    assert not critical.may_pause
    assert critical.deadline_seconds(4 * GIB) == 20 * 60
    assert critical.on_deadline is OnDeadline.COMPLETE

    assert batch.max_blackout == 1
    assert batch.may_slow_down
    assert batch.handover is HandoverPolicy.FORBIDDEN
    assert batch.may_pause and batch.max_pause == 8
    assert batch.deadline_seconds(1 * GIB) == 5 * 60
    assert batch.deadline_seconds(10 * GIB) == 600
    assert batch.deadline_seconds(100 * GIB) == 3600
    assert batch.on_deadline is OnDeadline.COMPLETE

    assert default.match.names == () and default.match.labels == {} and default.match.uuids == ()
    assert default.max_blackout == pytest.approx(0.5)
    assert default.may_slow_down
    assert default.handover is HandoverPolicy.FORBIDDEN
    assert default.may_pause and default.max_pause == 3
    assert default.deadline_seconds(1 * GIB) == 5 * 60
    assert default.deadline_seconds(10 * GIB) == 1200
    assert default.on_deadline is OnDeadline.CANCEL


def test_every_field_is_explained_in_a_comment() -> None:
    """The first example sets every field, each introduced by a comment naming it."""
    text = default_profiles_text()
    first = text[text.index("  - name: latency-critical") : text.index("  - name: batch")]
    lines = first.splitlines()
    for field in Profile.model_fields:
        (index,) = [i for i, line in enumerate(lines) if re.match(rf"\s+(- )?{field}:", line)]
        if "#" in lines[index]:
            continue  # explained inline
        comments = []  # the comment block above this field (or above its group)
        for line in reversed(lines[:index]):
            if line.lstrip().startswith("#"):
                comments.append(line)
            elif comments:
                break
        assert any(field in comment for comment in comments), field
    for kind in Match.model_fields:
        assert f"#   {kind}" in first or f"# {kind}:" in first, kind
    assert "per_gib" in first


def test_shipped_file_is_neutral() -> None:
    forbidden = r"post-?copy|suspend|downtime|auto-?converge|xbzrle|libvirt|qemu|hypervisor"
    assert not re.search(forbidden, default_profiles_text(), re.IGNORECASE)
