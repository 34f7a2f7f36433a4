"""deploy/prometheus: the rules load (`promtool check rules`), behave as their unit
tests say (`promtool test rules`), and the scrape example is a valid configuration."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"


def promtool() -> str:
    """promtool's path; skip without it, except under CI=true, where it must be there."""
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not found (Debian package prometheus; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(*args: str) -> str:
    done = subprocess.run(
        [promtool(), *args],
        cwd=DEPLOY,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def test_the_rules_pass_promtool_check_rules() -> None:
    assert "SUCCESS" in run("check", "rules", "lmwatch-rules.yml")


def test_the_rules_pass_their_promtool_unit_tests() -> None:
    assert "SUCCESS" in run("test", "rules", "lmwatch-rules.test.yml")


def test_the_scrape_example_passes_promtool_check_config() -> None:
    assert "SUCCESS" in run("check", "config", "scrape.yml")


def test_every_alert_has_a_unit_test() -> None:
    import yaml

    rules = yaml.safe_load((DEPLOY / "lmwatch-rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((DEPLOY / "lmwatch-rules.test.yml").read_text())
    firing = {
        case["alertname"]
        for test in tests["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts == firing
