"""Loading profiles files: every kind of mistake is reported with its line and column."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from lmwatch.profiles import (
    ProfileError,
    ProfileProblem,
    load_profiles,
    load_profiles_bytes,
    load_profiles_text,
)
from lmwatch.profiles.schema import HandoverPolicy, OnDeadline


def problems_of(text: str, source: str = "profiles.yaml") -> list[ProfileProblem]:
    with pytest.raises(ProfileError) as caught:
        load_profiles_text(textwrap.dedent(text), source=source)
    assert caught.value.problems, "a ProfileError always says what is wrong"
    return caught.value.problems


def where(problem: ProfileProblem) -> tuple[int | None, int | None, str]:
    return problem.line, problem.column, problem.path


GOOD = """\
    version: 1
    profiles:
      - name: fast
        match: {labels: {tier: database}, names: ["db-*"]}
        max_blackout: 300ms
        handover: allowed
        max_degraded: 30s
        deadline: 20m
        on_deadline: complete
      - name: rest
        may_slow_down: true
        may_pause: true
        max_pause: 2s
        deadline: {per_gib: 90s, min: 5m, max: 1h}
"""


def test_a_good_file_loads_in_base_units() -> None:
    profiles = load_profiles_text(textwrap.dedent(GOOD))
    fast, rest = profiles.profiles
    assert fast.name == "fast"
    assert fast.max_blackout == pytest.approx(0.3)
    assert fast.handover is HandoverPolicy.ALLOWED
    assert fast.match.labels == {"tier": "database"}
    assert fast.match.names == ("db-*",)
    assert fast.deadline_seconds(8 * 1024**3) == 1200
    assert fast.on_deadline is OnDeadline.COMPLETE
    assert rest.max_pause == 2.0
    assert rest.deadline_seconds(1024**3) == 300  # 90s, raised to the 5m minimum
    assert rest.deadline_seconds(10 * 1024**3) == 900
    assert rest.deadline_seconds(100 * 1024**3) == 3600  # capped at 1h


def test_problem_text_has_file_line_column_path_and_message() -> None:
    (problem,) = problems_of(
        """\
        profiles:
          - name: a
          - name: b
            max_blackout: 3 sec
        """
    )
    assert str(problem) == (
        "profiles.yaml:4:19: profiles[1].max_blackout: '3 sec' is not a duration "
        "(write e.g. 300ms, 2s, 5m, 1h30m)"
    )
    assert problem.as_dict() == {
        "file": "profiles.yaml",
        "line": 4,
        "column": 19,
        "path": "profiles[1].max_blackout",
        "message": "'3 sec' is not a duration (write e.g. 300ms, 2s, 5m, 1h30m)",
    }


@pytest.mark.parametrize(
    ("text", "line", "column", "path", "message_part"),
    [
        pytest.param(
            "profiles:\n  - name: a\n    max_blackout: [300ms\n",
            4,
            1,
            "",
            "expected ',' or ']'",
            id="yaml-syntax-unclosed-flow",
        ),
        pytest.param(
            "profiles:\n  - name: a\n   bad: x\n",
            3,
            4,
            "",
            "expected <block end>",
            id="yaml-indent",
        ),
        pytest.param("profiles:\n\t- name: a\n", 2, 1, "", "indent with spaces", id="yaml-tab"),
        pytest.param(
            "profiles:\n  - name: a\n    may_pause: sometimes\n",
            3,
            16,
            "profiles[0].may_pause",
            "expected true or false, got 'sometimes'",
            id="wrong-type-bool",
        ),
        pytest.param(
            "profiles:\n  - name: a\n    handover: maybe\n",
            3,
            15,
            "profiles[0].handover",
            "expected 'allowed' or 'forbidden', got 'maybe'",
            id="wrong-enum",
        ),
        pytest.param(
            "profiles:\n  - name: a\n    match:\n      labels: {rack: 12}\n",
            4,
            22,
            "profiles[0].match.labels.rack",
            "expected text, got '12'; put it in quotes",
            id="label-value-not-text",
        ),
        pytest.param(
            "profiles:\n  - name: a\n    match: [x]\n",
            3,
            12,
            "profiles[0].match",
            "expected a mapping",
            id="wrong-type-mapping",
        ),
        pytest.param(
            "profiles:\n  name: a\n",
            2,
            3,
            "profiles",
            "expected a list",
            id="profiles-not-a-list",
        ),
        pytest.param(
            "profiles:\n  - name: a\n    max_blackoutt: 1s\n",
            3,
            5,
            "profiles[0].max_blackoutt",
            "unknown field 'max_blackoutt' (did you mean 'max_blackout'?)",
            id="unknown-field-with-suggestion",
        ),
        pytest.param(
            "profiles:\n  - name: a\n    deadline: {per_gib: 90s, zzz: 1s}\n",
            3,
            30,
            "profiles[0].deadline.zzz",
            "unknown field 'zzz' (known fields: fixed, per_gib, min, max)",
            id="unknown-nested-field-lists-known",
        ),
        pytest.param(
            "version: 1\n",
            1,
            1,
            "profiles",
            "required field 'profiles' is missing",
            id="missing-top-level",
        ),
        pytest.param(
            "profiles:\n  - max_blackout: 1s\n",
            2,
            5,
            "profiles[0].name",
            "required field 'name' is missing",
            id="missing-name-points-at-profile",
        ),
        pytest.param(
            "profiles:\n  - name: a\n  - name: b\n  - name: a\n",
            4,
            11,
            "profiles[2].name",
            "profile name 'a' is used twice (first by profiles[0])",
            id="duplicate-profile-name-points-at-second",
        ),
        pytest.param(
            "profiles:\n  - name: a\n  - name: b\n    max_blackout: 2s\n"
            "    may_pause: true\n    max_pause: 1s\n",
            3,
            5,
            "profiles[1]",
            "max_pause (1s) is below max_blackout (2s)",
            id="contradiction-points-at-profile",
        ),
        pytest.param(
            "profiles:\n  - name: a\n    max_pause: 3s\n",
            2,
            5,
            "profiles[0]",
            "max_pause is set but may_pause is false",
            id="pause-without-permission",
        ),
        pytest.param(
            "profiles:\n  - name: a\n    deadline: {per_gib: 90s, min: 1h, max: 5m}\n",
            3,
            15,
            "profiles[0].deadline",
            "deadline min is above its max",
            id="deadline-bounds-inverted",
        ),
        pytest.param(
            "profiles:\n  - name: a\n    deadline: {fixed: 20m, max: 1h}\n",
            3,
            15,
            "profiles[0].deadline",
            "min and max only bound a per_gib deadline",
            id="deadline-bounds-on-fixed",
        ),
        pytest.param(
            "profiles:\n  - name: a\n    max_blackout: 300\n",
            3,
            19,
            "profiles[0].max_blackout",
            "300 has no unit (write e.g. 300s or 300ms)",
            id="duration-without-unit",
        ),
        pytest.param(
            "profiles:\n  - name: a\n    deadline: {per_gib: 90}\n",
            3,
            25,
            "profiles[0].deadline.per_gib",
            "90 has no unit",
            id="per-gib-without-unit",
        ),
        pytest.param(
            "profiles:\n  - name: a\n    max_degraded: -1\n",
            3,
            19,
            "profiles[0].max_degraded",
            "has no unit",
            id="negative-number",
        ),
        pytest.param(
            "profiles:\n  - name: a b\n",
            2,
            11,
            "profiles[0].name",
            "'a b' is not a usable profile name",
            id="bad-name",
        ),
        pytest.param(
            "version: 2\nprofiles:\n  - name: a\n",
            1,
            10,
            "version",
            "expected 1, got '2'",
            id="unknown-version",
        ),
        pytest.param("profiles: []\n", 1, 11, "profiles", "no profiles", id="no-profiles"),
        pytest.param(
            "- name: a\n",
            1,
            1,
            "",
            "expected a mapping with a top-level 'profiles:'",
            id="root-list",
        ),
        pytest.param(
            "profiles:\n  - name: a\n    name: b\n",
            3,
            5,
            "profiles[0].name",
            "key 'name' appears twice in the same mapping (first at line 2)",
            id="duplicate-yaml-key",
        ),
        pytest.param(
            "profiles:\n  - name: a\n    match:\n      labels: {tier: db, tier: web}\n",
            4,
            26,
            "profiles[0].match.labels.tier",
            "appears twice",
            id="duplicate-yaml-key-in-flow-mapping",
        ),
        pytest.param(
            "profiles:\n  - name: a\nprofiles:\n  - name: b\n",
            3,
            1,
            "profiles",
            "appears twice",
            id="duplicate-top-level-key",
        ),
    ],
)
def test_each_mistake_is_located(
    text: str, line: int, column: int, path: str, message_part: str
) -> None:
    problems = problems_of(text)
    assert [where(p) for p in problems] == [(line, column, path)], problems
    assert message_part in problems[0].message


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "~\n"])
def test_empty_file(text: str) -> None:
    (problem,) = problems_of(text)
    assert where(problem) == (1, 1, "")
    assert "empty" in problem.message


def test_every_problem_is_reported_in_file_order() -> None:
    problems = problems_of(
        """\
        profiles:
          - name: a
            may_slow_down: perhaps
          - name: b
            max_blackout: 1 sec
            colour: blue
        """
    )
    assert [where(p) for p in problems] == [
        (3, 20, "profiles[0].may_slow_down"),
        (5, 19, "profiles[1].max_blackout"),
        (6, 5, "profiles[1].colour"),
    ]


def test_a_failing_item_does_not_also_report_an_empty_list() -> None:
    problems = problems_of("profiles:\n  - name: a\n    may_pause: nope\n")
    assert len(problems) == 1
    assert "at least one" not in problems[0].message


def test_all_duplicate_keys_are_reported() -> None:
    problems = problems_of("profiles:\n  - name: a\n    name: b\n    name: c\n")
    assert [(p.line, p.column) for p in problems] == [(3, 5), (4, 5)]


def test_yaml_aliases_and_merges_are_allowed() -> None:
    # an unknown top-level key is refused, so an anchor lives on a profile
    profiles = load_profiles_text(
        textwrap.dedent(
            """\
            profiles:
              - &a
                name: a
                max_blackout: 1s
                match: {labels: {tier: x}}
              - <<: *a
                name: b
            """
        )
    )
    assert [p.name for p in profiles.profiles] == ["a", "b"]
    assert profiles.profiles[1].max_blackout == 1.0


def test_multiple_documents_are_refused() -> None:
    (problem,) = problems_of("profiles:\n  - name: a\n---\nprofiles:\n  - name: b\n")
    assert (problem.line, problem.column) == (3, 1)
    assert "single document" in problem.message


def test_load_from_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("profiles:\n  - name: a\n    max_blackout: soon\n")
    with pytest.raises(ProfileError) as caught:
        load_profiles(path)
    assert str(caught.value).startswith(f"{path}:3:19: profiles[0].max_blackout: ")
    path.write_text("profiles:\n  - name: a\n")
    assert load_profiles(path).profiles[0].name == "a"


def test_misspelt_top_level_key_is_both_missing_and_unknown() -> None:
    problems = problems_of("profile:\n  - name: a\n")
    assert [where(p) for p in problems] == [(1, 1, "profiles"), (1, 1, "profile")]
    assert "did you mean 'profiles'?" in problems[1].message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError) as caught:
        load_profiles(tmp_path / "nope.yaml")
    (problem,) = caught.value.problems
    assert problem.line is None
    assert "cannot read" in problem.message
    assert str(problem).startswith(f"{tmp_path / 'nope.yaml'}: cannot read")


def test_not_utf8_is_located() -> None:
    with pytest.raises(ProfileError) as caught:
        load_profiles_bytes(b"profiles:\n  - name: \xff\n", source="p.yaml")
    (problem,) = caught.value.problems
    assert (problem.line, problem.column) == (2, 11)
    assert "UTF-8" in problem.message


def test_zero_needs_no_unit_and_units_are_required_only_in_files() -> None:
    profiles = load_profiles_text("profiles:\n  - name: a\n    max_pause: 0\n")
    assert profiles.profiles[0].max_pause == 0.0
    from lmwatch.profiles.schema import Profile

    assert Profile(name="a", max_blackout=0.25).max_blackout == 0.25  # Python callers: seconds


def test_error_str_joins_every_problem() -> None:
    with pytest.raises(ProfileError) as caught:
        load_profiles_text("profiles:\n  - name: a\n    x: 1\n    y: 2\n", source="f")
    assert str(caught.value).splitlines() == [str(p) for p in caught.value.problems]
    assert len(caught.value.problems) == 2
