"""`lmwatch profiles check`: a summary for a good file, located problems for a bad one."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from lmwatch import cli
from lmwatch.profiles.loader import default_profiles_text


async def _check(path: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await cli.run(["profiles", "check", str(path)], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


async def test_the_shipped_profiles_pass_with_a_one_line_summary(tmp_path: Path) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(default_profiles_text())
    code, out, err = await _check(path)
    assert (code, err) == (0, "")
    assert out == "3 profiles OK: latency-critical, batch, default\n"


async def test_a_single_profile_is_counted_in_the_singular(tmp_path: Path) -> None:
    path = tmp_path / "one.yaml"
    path.write_text("profiles:\n  - name: only\n    max_blackout: 200ms\n")
    code, out, _ = await _check(path)
    assert (code, out) == (0, "1 profile OK: only\n")


@pytest.mark.parametrize(
    ("text", "line", "column", "words"),
    [
        # a YAML syntax error: the unclosed list is reported where parsing stopped
        ("profiles:\n  - name: a\n    max_blackout: [300ms\n", 4, 1, "expected ','"),
        # a wrong type
        ("profiles:\n  - name: a\n    may_pause: sometimes\n", 3, 16, "expected true or false"),
        # an unknown field, with a suggestion
        ("profiles:\n  - name: a\n    max_blackot: 300ms\n", 3, 5, "did you mean 'max_blackout'"),
        # a duration without its unit
        ("profiles:\n  - name: a\n    max_blackout: 300\n", 3, 19, "has no unit"),
    ],
    ids=["syntax", "wrong-type", "unknown-field", "no-unit"],
)
async def test_problems_are_located_and_exit_non_zero(
    tmp_path: Path, text: str, line: int, column: int, words: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    code, out, err = await _check(path)
    assert code == 1
    problems = out.splitlines()
    assert problems, err
    assert problems[0].startswith(f"{path}:{line}:{column}: "), problems[0]
    assert words in problems[0]
    assert "1 problem" in err


async def test_every_problem_gets_its_own_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "profiles:\n"
        "  - name: a\n"
        "    may_pause: sometimes\n"
        "  - name: b\n"
        "    handover: maybe\n"
        "    colour: blue\n"
    )
    code, out, err = await _check(path)
    assert code == 1
    lines = out.splitlines()
    assert [line.split(": ")[0] for line in lines] == [
        f"{path}:3:16",
        f"{path}:5:15",
        f"{path}:6:5",
    ]
    assert "3 problems" in err


async def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    code, out, _ = await _check(tmp_path / "nowhere.yaml")
    assert code == 1
    assert "cannot read" in out
