"""The OpenAPI document itself, /metrics, /healthz and /readyz."""

from __future__ import annotations

from typing import Any

from apitools import Api
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

from lmwatch.clock import VirtualClock
from lmwatch.drivers.sim import SimDriver
from lmwatch.engine import Engine
from lmwatch.model import State
from lmwatch.schemas import component_schemas


def test_the_openapi_document_is_valid(openapi: dict[str, Any]) -> None:
    validate(openapi)
    assert openapi["openapi"].startswith("3.1")


def test_every_body_schema_comes_from_a_model(openapi: dict[str, Any]) -> None:
    """Every $ref in the paths points at a generated component."""
    generated = component_schemas()
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(openapi)
    assert refs
    for ref in refs:
        name = ref.removeprefix("#/components/schemas/")
        assert name in generated, ref
    assert openapi["components"]["schemas"] == generated


async def test_every_route_is_documented_and_nothing_else(
    api: Api, openapi: dict[str, Any]
) -> None:
    routes = {
        (route.method, route.resource.canonical)
        for route in api.client.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {
        (method.upper(), path)
        for path, operations in openapi["paths"].items()
        for method in operations
    }
    assert routes == documented


async def test_served_document_is_the_generated_one(api: Api, openapi: dict[str, Any]) -> None:
    answer = await api.get("/openapi.json")
    assert answer.status == 200
    assert answer.body == openapi


async def test_posts_declare_bearer_security_and_gets_do_not(openapi: dict[str, Any]) -> None:
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            secured = operation.get("security") == [{"bearer": []}]
            assert secured == (method == "post"), (method, path)
            if method == "post":
                assert "401" in operation["responses"], path


async def test_healthz(api: Api) -> None:
    answer = await api.get("/healthz")
    assert answer.status == 200
    assert answer.body == {"status": "ok"}


async def test_readyz_reports_hosts_and_store(
    api: Api, driver: SimDriver, clock: VirtualClock
) -> None:
    ready = await api.get("/readyz")
    assert ready.status == 200, ready.text
    assert ready.body["ready"] is True
    assert ready.body["store"] is True
    assert ready.body["hosts"] == {"a": True, "b": True, "c": True}
    driver.inject_fault("source_gone", host="b", duration=60)
    down = await api.get("/readyz")
    assert down.status == 503
    assert down.body["ready"] is False
    assert down.body["hosts"]["b"] is False
    assert "b" in down.body["detail"]
    await clock.advance(61)
    assert (await api.get("/readyz")).status == 200


async def test_readyz_is_503_when_the_store_is_closed(api: Api, engine: Engine) -> None:
    engine.store.close()
    answer = await api.get("/readyz")
    assert answer.status == 503
    assert answer.body["store"] is False


def families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


async def test_metrics_count_a_finished_migration(
    api: Api, clock: VirtualClock, engine: Engine
) -> None:
    created = await api.post(
        "/v1/migrations", {"instance": "quiet", "source": "a", "destination": "b"}
    )
    migration_id = created.body["id"]
    await clock.advance(1.2)  # past the second sample; the pass takes about 1.7 s
    during = await api.get("/metrics")
    assert during.status == 200
    assert during.headers["Content-Type"].startswith("text/plain")
    gauges = families(during.text)
    remaining = [
        s
        for s in gauges["lmwatch_migration_remaining_bytes"].samples
        if s.labels["migration"] == migration_id
    ]
    assert remaining and 0 < remaining[0].value < 2 * 1024**3
    done = await clock.run_until(lambda: engine.get(migration_id).state is State.COMPLETED)
    assert done
    found = families((await api.get("/metrics")).text)
    finished = {
        (s.labels["state"], s.labels["method"]): s.value
        for s in found["lmwatch_migrations_finished"].samples
        if s.name.endswith("_total")
    }
    assert finished == {("completed", "converged"): 1.0}
    started = [s for s in found["lmwatch_migrations_started"].samples if s.name.endswith("_total")]
    assert [(s.labels["profile"], s.value) for s in started] == [("default", 1.0)]
    durations = {
        s.labels["method"]: s.value
        for s in found["lmwatch_migration_duration_seconds"].samples
        if s.name.endswith("_count")
    }
    assert durations == {"converged": 1.0}
    total = next(
        s.value
        for s in found["lmwatch_migration_duration_seconds"].samples
        if s.name.endswith("_sum")
    )
    outcome = engine.get(migration_id).outcome
    assert outcome is not None
    assert total == outcome.total_seconds > 0
    blackout = next(
        s.value for s in found["lmwatch_blackout_seconds"].samples if s.name.endswith("_sum")
    )
    assert blackout == outcome.blackout_seconds
    assert not [
        s
        for s in found["lmwatch_migration_remaining_bytes"].samples
        if s.labels["migration"] == migration_id
    ]
