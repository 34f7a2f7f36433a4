"""Selecting a profile: uuid > labels > name patterns > fallback; ties by file order."""

from __future__ import annotations

import fnmatch
import random
from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmwatch.profiles import (
    Match,
    NoProfile,
    Profile,
    ProfileSet,
    UnknownProfile,
    select_profile,
)
from lmwatch.profiles.selection import literal_characters

UUID = "6f2c1c1e-5d7b-4b0e-9a43-0d8f1b7a2c11"


def profile(name: str, **match: object) -> Profile:
    return Profile(name=name, match=Match.model_validate(match))


SET = ProfileSet(
    profiles=(
        profile("by-uuid", uuids=[UUID.upper()]),
        profile("db", labels={"tier": "database"}),
        profile("db-eu", labels={"tier": "database", "zone": "eu"}),
        profile("db-too", labels={"tier": "database"}),
        profile("web-glob", names=["web-*"]),
        profile("web-prod-glob", names=["web-prod-*"]),
        profile("web-any", names=["w??-*"]),
        profile("batch-named", names=["job-*"], labels={"tier": "batch"}),
        profile("fallback"),
        profile("fallback-too"),
    )
)


def choose(
    instance: str = "vm",
    uuid: str | None = None,
    labels: Mapping[str, str] | None = None,
    requested: str | None = None,
    profiles: ProfileSet = SET,
) -> str:
    return select_profile(
        profiles, instance=instance, uuid=uuid, labels=labels or {}, requested=requested
    ).profile.name


@pytest.mark.parametrize(
    ("instance", "uuid", "labels", "requested", "expected"),
    [
        # uuid outranks everything that matches, compared without case
        ("web-prod-1", UUID, {"tier": "database", "zone": "eu"}, None, "by-uuid"),
        # labels outrank name patterns
        ("web-prod-1", None, {"tier": "database"}, None, "db"),
        # more matching labels outrank fewer
        ("vm", None, {"tier": "database", "zone": "eu"}, None, "db-eu"),
        # equal label counts: first in file ("db" before "db-too")
        ("vm", None, {"tier": "database", "zone": "us"}, None, "db"),
        # the more literal pattern wins: web-prod-* (9) over web-* (4) and w??-* (2)
        ("web-prod-1", None, {}, None, "web-prod-glob"),
        ("web-test-1", None, {}, None, "web-glob"),
        ("wxx-1", None, {}, None, "web-any"),
        # a match with names and labels needs both
        ("job-7", None, {"tier": "batch"}, None, "batch-named"),
        ("job-7", None, {}, None, "fallback"),
        ("vm", None, {"tier": "batch"}, None, "fallback"),
        # unrelated labels and an unknown uuid fall through to the fallback (first one)
        ("vm", "0000", {"colour": "blue"}, None, "fallback"),
        # names are case-sensitive
        ("WEB-prod-1", None, {}, None, "fallback"),
        # an explicit request outranks every match
        ("web-prod-1", UUID, {"tier": "database"}, "fallback-too", "fallback-too"),
    ],
)
def test_selection_order(
    instance: str,
    uuid: str | None,
    labels: dict[str, str],
    requested: str | None,
    expected: str,
) -> None:
    assert choose(instance, uuid, labels, requested) == expected


def test_reason_names_the_rule_that_decided() -> None:
    profiles = ProfileSet(
        profiles=(
            profile("web-glob", names=["web-*"]),
            profile("db", labels={"tier": "database"}),
            profile("fallback"),
        )
    )
    selection = select_profile(profiles, instance="web-1", uuid=None, labels={"tier": "database"})
    assert selection.reason == (
        "profile 'db' matches label tier=database "
        "(labels outrank name patterns and the fallback; next was 'web-glob')"
    )


@pytest.mark.parametrize(
    ("instance", "uuid", "labels", "reason_part"),
    [
        ("vm", UUID, {}, "a uuid match outranks labels, name patterns and the fallback"),
        (
            "vm",
            None,
            {"tier": "database", "zone": "eu"},
            "more matching labels outrank fewer (2 vs 1)",
        ),
        ("vm", None, {"tier": "database"}, "'db-too' matches as well; first in file among equals"),
        ("web-prod-1", None, {}, "a more specific name pattern outranks a looser one (9 vs 4"),
        ("job-1", None, {"tier": "batch"}, "labels outrank name patterns and the fallback"),
        ("vm", None, {}, "'fallback-too' matches as well; first in file among equals"),
    ],
)
def test_reason_for_each_rule(
    instance: str, uuid: str | None, labels: dict[str, str], reason_part: str
) -> None:
    reason = select_profile(SET, instance=instance, uuid=uuid, labels=labels).reason
    assert reason_part in reason


def test_only_match_says_so() -> None:
    profiles = ProfileSet(
        profiles=(profile("db", labels={"tier": "db"}), profile("x", names=["x"]))
    )
    selection = select_profile(profiles, instance="y", uuid=None, labels={"tier": "db"})
    assert selection.reason == "profile 'db' matches label tier=db (no other profile matches)"


def test_candidates_explain_every_profile_in_file_order() -> None:
    selection = select_profile(
        SET, instance="job-1", uuid=None, labels={"tier": "database", "zone": "us"}
    )
    verdicts = dict(selection.candidates)
    assert [name for name, _ in selection.candidates] == [p.name for p in SET.profiles]
    assert verdicts["db"] == "selected: matches label tier=database"
    assert verdicts["db-too"] == "matches label tier=database, outranked by 'db'"
    assert verdicts["db-eu"] == "no match: label zone is 'us' (wanted 'eu')"
    assert verdicts["by-uuid"] == "no match: the instance's uuid is not known"
    assert verdicts["web-glob"] == "no match: name 'job-1' matches none of 'web-*'"
    assert verdicts["batch-named"] == "no match: label tier is 'database' (wanted 'batch')"
    assert verdicts["fallback"] == "is the fallback (empty match), outranked by 'db'"


def test_requested_profile_candidates() -> None:
    selection = select_profile(SET, instance="vm", uuid=None, labels={}, requested="db")
    assert selection.reason.startswith("profile 'db' was requested explicitly")
    assert dict(selection.candidates)["db"] == "requested"
    assert dict(selection.candidates)["fallback"] == "not considered: 'db' was requested"


def test_unknown_requested_profile() -> None:
    with pytest.raises(UnknownProfile) as caught:
        choose(requested="db-ue")
    assert caught.value.name == "db-ue"
    assert "no profile is named 'db-ue'" in str(caught.value)
    assert "did you mean 'db-eu'?" in str(caught.value)
    assert isinstance(caught.value, LookupError)


def test_no_match_and_no_fallback() -> None:
    profiles = ProfileSet(profiles=(profile("db", labels={"tier": "db"}),))
    with pytest.raises(NoProfile) as caught:
        choose("vm-1", None, {"tier": "web"}, profiles=profiles)
    message = str(caught.value)
    assert "no profile matches instance 'vm-1'" in message
    assert "labels tier=web" in message
    assert "fallback" in message
    assert caught.value.candidates == [("db", "no match: label tier is 'web' (wanted 'db')")]


@pytest.mark.parametrize(
    ("pattern", "literal"),
    [("web-*", 4), ("*", 0), ("w??-*", 2), ("db[0-9]-*", 3), ("exact", 5)],
)
def test_literal_characters(pattern: str, literal: int) -> None:
    assert literal_characters(pattern) == literal


# --- properties --------------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9-]{0,6}", fullmatch=True)
label_maps = st.dictionaries(st.sampled_from(["tier", "zone", "team"]), st.sampled_from("abc"))


@st.composite
def instances(draw: st.DrawFn) -> tuple[str, str | None, dict[str, str]]:
    return draw(names), draw(st.none() | st.sampled_from([UUID, "u-2"])), draw(label_maps)


@st.composite
def profile_sets(draw: st.DrawFn) -> ProfileSet:
    """Profiles whose match kinds are drawn at random (ties are possible)."""
    count = draw(st.integers(1, 8))
    out = []
    for index in range(count):
        kind = draw(st.sampled_from(["uuid", "labels", "names", "both", "empty"]))
        match: dict[str, object] = {}
        if kind == "uuid":
            match["uuids"] = [draw(st.sampled_from([UUID, "u-2"]))]
        if kind in ("labels", "both"):
            match["labels"] = draw(label_maps.filter(bool))
        if kind in ("names", "both"):
            match["names"] = [draw(st.sampled_from(["*", "a*", "ab*", "?b*", "a?c*"]))]
        out.append(profile(f"p{index}", **match))
    return ProfileSet(profiles=tuple(out))


@given(profile_sets(), instances())
def test_selection_is_deterministic(
    profiles: ProfileSet, instance: tuple[str, str | None, dict[str, str]]
) -> None:
    name, uuid, labels = instance
    try:
        first = select_profile(profiles, instance=name, uuid=uuid, labels=labels)
    except NoProfile:
        with pytest.raises(NoProfile):
            select_profile(profiles, instance=name, uuid=uuid, labels=labels)
        return
    again = select_profile(
        profiles, instance=name, uuid=uuid, labels=dict(reversed(labels.items()))
    )
    assert again == first


@given(profile_sets(), instances(), st.randoms(use_true_random=False))
def test_winner_is_unchanged_by_reordering_profiles_that_do_not_match(
    profiles: ProfileSet, instance: tuple[str, str | None, dict[str, str]], rng: random.Random
) -> None:
    """Only profiles that cannot tie with the winner (they do not match) are moved."""
    name, uuid, labels = instance
    try:
        chosen = select_profile(profiles, instance=name, uuid=uuid, labels=labels)
    except NoProfile:
        return
    verdicts = dict(chosen.candidates)
    matching = [p for p in profiles.profiles if not verdicts[p.name].startswith("no match")]
    others = [p for p in profiles.profiles if verdicts[p.name].startswith("no match")]
    rng.shuffle(others)
    # interleave: matching profiles keep their relative order, the others go anywhere
    slots = sorted(rng.sample(range(len(profiles.profiles)), len(matching)))
    merged: list[Profile] = []
    it_matching, it_others = iter(matching), iter(others)
    for position in range(len(profiles.profiles)):
        merged.append(next(it_matching) if position in slots else next(it_others))
    shuffled = ProfileSet(profiles=tuple(merged))
    again = select_profile(shuffled, instance=name, uuid=uuid, labels=labels)
    assert again.profile == chosen.profile
    assert again.reason == chosen.reason


@given(profile_sets(), instances())
def test_winner_matches_and_nothing_outranks_it(
    profiles: ProfileSet, instance: tuple[str, str | None, dict[str, str]]
) -> None:
    """Checked against a direct reading of the rules, not the implementation's ranking."""
    name, uuid, labels = instance

    def rank(p: Profile) -> tuple[int, int, int, int] | None:
        m = p.match
        uuid_ok = (
            bool(m.uuids) and uuid is not None and uuid.lower() in {u.lower() for u in m.uuids}
        )
        if m.uuids and not uuid_ok:
            return None
        if any(labels.get(k) != v for k, v in m.labels.items()):
            return None
        hits = [pat for pat in m.names if fnmatch.fnmatchcase(name, pat)]
        if m.names and not hits:
            return None
        literal = max((literal_characters(h) for h in hits), default=0)
        return (int(uuid_ok), len(m.labels), int(bool(hits)), literal)

    ranks = [rank(p) for p in profiles.profiles]
    candidates = [(r, -i) for i, r in enumerate(ranks) if r is not None]
    if not candidates:
        with pytest.raises(NoProfile):
            select_profile(profiles, instance=name, uuid=uuid, labels=labels)
        return
    _, best = max(candidates)
    chosen = select_profile(profiles, instance=name, uuid=uuid, labels=labels)
    assert chosen.profile == profiles.profiles[-best]
