"""deploy/grafana: the dashboard is well formed, its PromQL parses, and every metric it
(and the Prometheus rules) use is one the daemon really serves at /metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from apitools import Api
from prometheus_client.parser import text_string_to_metric_families

from lmwatch.clock import VirtualClock
from lmwatch.drivers.sim import SimDriver
from lmwatch.engine import Engine
from lmwatch.model import State

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "lmwatch-dashboard.json"
RULES = DEPLOY / "prometheus" / "lmwatch-rules.yml"
METRIC = re.compile(r"\blmwatch(?:_[a-z0-9_]+|:[a-z0-9_:]+)")
# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "6h", "$job": ".*"}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def panels(within: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in within:
        yield panel
        yield from panels(panel.get("panels", []))


def dashboard_queries() -> list[str]:
    board = dashboard()
    found = [t["expr"] for p in panels(board["panels"]) for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            found.append(variable["definition"])
    return found


def rule_queries() -> list[str]:
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def recorded_names() -> set[str]:
    rules = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return {
        rule["record"] for group in rules["groups"] for rule in group["rules"] if "record" in rule
    }


def substituted(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def balanced(expr: str) -> bool:
    """Brackets pair up outside string literals."""
    closing = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    quote: str | None = None
    escaped = False
    for char in expr:
        if quote is not None:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
        elif char in "\"'`":
            quote = char
        elif char in "([{":
            stack.append(char)
        elif char in closing and (not stack or stack.pop() != closing[char]):
            return False
    return not stack and quote is None


def test_the_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "lmwatch" and board["title"]
    every = list(panels(board["panels"]))
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids))
    for panel in every:
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    titles = " ".join(p["title"] for p in every).lower()
    for subject in ("state", "duration", "blackout", "remaining", "eta", "decisions"):
        assert subject in titles
    assert "hypervisor errors" in titles and "violations" in titles


def test_every_query_is_balanced_and_uses_only_known_grafana_variables() -> None:
    for expr in dashboard_queries():
        assert expr.strip()
        assert balanced(expr), expr
        leftover = re.findall(r"\$\{?\w+", substituted(expr))
        assert not leftover, f"{expr}: unknown variables {leftover}"
    assert balanced('sum(rate(x{a="(("}[5m]))') and not balanced("sum(rate(x[5m])")


def test_every_dashboard_query_parses_as_promql(tmp_path: Path) -> None:
    """promtool parses PromQL offline as rule expressions."""
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not found (Debian package prometheus; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    queries = [q for q in dashboard_queries() if not q.startswith("label_values(")]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": substituted(q)}
                    for i, q in enumerate(queries)
                ],
            }
        ]
    }
    file = tmp_path / "dashboard-queries.yml"
    file.write_text(yaml.safe_dump(rules))
    done = subprocess.run(
        [path, "check", "rules", str(file)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
async def served_names(
    api: Api, clock: VirtualClock, engine: Engine, driver: SimDriver
) -> set[str]:
    """Sample names /metrics serves while a migration runs (with a hypervisor error
    on the way), after it completed, and while a drain runs."""
    created = await api.post(
        "/v1/migrations", {"instance": "quiet", "source": "a", "destination": "b"}
    )
    assert created.status == 202
    migration_id = created.body["id"]
    driver.inject_fault("driver_error_on_sample", count=1, migration_id=migration_id)
    names: set[str] = set()
    texts = []
    for _ in range(3):
        await clock.advance(0.7)
        texts.append((await api.get("/metrics")).text)
    assert await clock.run_until(lambda: engine.get(migration_id).state is State.COMPLETED)
    texts.append((await api.get("/metrics")).text)
    # A drain under way serves its per-drain series too.
    assert (await api.post("/v1/drains", {"host": "a"})).status == 202
    texts.append((await api.get("/metrics")).text)
    for text in texts:
        assert "_created" not in text
        for family in text_string_to_metric_families(text):
            names.update(sample.name for sample in family.samples)
    return names


async def test_every_metric_the_dashboard_and_the_rules_use_is_served(
    served_names: set[str],
) -> None:
    recorded = recorded_names()
    per_migration = {n for n in served_names if n.startswith("lmwatch_migration_")}
    assert "lmwatch_migration_eta_seconds" in per_migration  # the run was caught in flight
    assert "lmwatch_hypervisor_errors_total" in served_names
    for source, queries in (("dashboard", dashboard_queries()), ("rules", rule_queries())):
        used = {name for query in queries for name in METRIC.findall(query)}
        assert used, source
        missing = {
            name
            for name in used
            if name not in served_names and not (":" in name and name in recorded)
        }
        assert not missing, f"{source} uses metrics /metrics does not serve: {sorted(missing)}"


def test_the_dashboard_covers_every_metric_the_daemon_documents() -> None:
    readme = (DEPLOY.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`(lmwatch_[a-z_]+)`", section))
    used = " ".join(dashboard_queries())
    for name in documented:
        assert name in used, f"{name} is not on the dashboard"
