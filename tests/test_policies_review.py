"""review_profile_change(): edits that cannot apply to a migration already started."""

from __future__ import annotations

import pytest

from lmwatch.model import StartPlan
from lmwatch.policies import review_profile_change
from lmwatch.profiles.schema import Profile

BASE = Profile(name="p")


def edit(profile: Profile = BASE, **changes: object) -> Profile:
    """A validated copy of `profile` with some fields changed, as a reload would give."""
    return Profile.model_validate({**profile.model_dump(), **changes})


def _plan(handover: bool = False, slow_down: bool = False) -> StartPlan:
    return StartPlan(arm_handover=handover, arm_slow_down=slow_down, blackout_budget=0.3)


@pytest.mark.parametrize(
    ("old", "new", "plan", "words"),
    [
        (BASE, edit(handover="allowed"), _plan(), ["handover"]),
        (BASE, edit(may_slow_down=True), _plan(), ["slowing"]),
        (
            BASE,
            edit(handover="allowed", may_slow_down=True),
            _plan(),
            ["handover", "slowing"],
        ),
        (
            edit(may_slow_down=True),
            BASE,
            _plan(slow_down=True),
            ["cannot be withdrawn"],
        ),
        # everything below applies: no sentences
        (BASE, edit(max_blackout=2.0), _plan(), []),
        (BASE, edit(handover="allowed"), _plan(handover=True), []),
        (edit(handover="allowed"), BASE, _plan(handover=True), []),
        (BASE, BASE, _plan(), []),
    ],
)
def test_review(old: Profile, new: Profile, plan: StartPlan, words: list[str]) -> None:
    notes = review_profile_change(old, new, plan)
    assert len(notes) == len(words)
    for note, word in zip(notes, words, strict=True):
        assert word in note and note.endswith(("migration", "it"))
