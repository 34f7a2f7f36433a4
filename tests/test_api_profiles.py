"""Profile endpoints: list, explain, reload (success, invalid file, metrics)."""

from __future__ import annotations

from pathlib import Path

import pytest
from apitools import SMALL_PROFILES, Api
from prometheus_client.parser import text_string_to_metric_families

from lmwatch.drivers.sim import SimDriver
from lmwatch.profiles import ProfileRegistry


def reload_failures(text: str) -> float:
    for family in text_string_to_metric_families(text):
        if family.name == "lmwatch_profile_reload_failures":
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    raise AssertionError("no lmwatch_profile_reload_failures metric")


async def test_profiles_lists_every_field_in_base_units(api: Api, profiles_file: Path) -> None:
    answer = await api.get("/v1/profiles")
    assert answer.status == 200
    assert answer.body["source"] == str(profiles_file)
    assert answer.body["generation"] == 1
    assert answer.body["loaded_at"].endswith("Z")
    profiles = {p["name"]: p for p in answer.body["profiles"]}
    assert list(profiles) == ["latency-critical", "strict", "default"]
    critical = profiles["latency-critical"]
    assert critical["max_blackout"] == pytest.approx(0.3)
    assert critical["max_degraded"] == 60
    assert critical["handover"] == "allowed"
    assert critical["match"]["labels"] == {"tier": "database"}
    assert critical["deadline"]["fixed"] == 1200
    assert profiles["default"]["deadline"]["per_gib"] == 120
    assert profiles["default"]["deadline"]["min"] == 300
    assert profiles["default"]["max_pause"] == 3


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", "latency-critical"),  # the instance's own labels
        ("?labels=tier=strict", "strict"),  # query labels override the instance's
        ("?labels=tier=web,team=x", "default"),
        ("?profile=strict", "strict"),
    ],
)
async def test_explain_says_which_profile_applies_and_why(
    api: Api, query: str, expected: str
) -> None:
    answer = await api.get(f"/v1/instances/db/profile{query}")
    assert answer.status == 200, answer.text
    assert answer.body["profile"]["name"] == expected
    assert answer.body["reason"]
    assert answer.body["instance"] == "db"
    assert answer.body["uuid"]  # from the driver's description
    names = [c["name"] for c in answer.body["candidates"]]
    assert names == ["latency-critical", "strict", "default"]


async def test_explain_takes_uuid_from_the_query(api: Api) -> None:
    answer = await api.get("/v1/instances/db/profile?uuid=6f2c1c1e-5d7b-4b0e-9a43-0d8f1b7a2c11")
    assert answer.body["uuid"] == "6f2c1c1e-5d7b-4b0e-9a43-0d8f1b7a2c11"


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/instances/ghost/profile", 404),
        ("/v1/instances/db/profile?labels=tier", 422),
        ("/v1/instances/db/profile?profile=nope", 422),
    ],
)
async def test_explain_errors(api: Api, path: str, status: int) -> None:
    answer = await api.get(path)
    assert answer.status == status, answer.text
    assert answer.content_type == "application/problem+json"


async def test_reload_picks_up_an_edit(
    api: Api, profiles_file: Path, registry: ProfileRegistry
) -> None:
    profiles_file.write_text(SMALL_PROFILES.replace("max_pause: 3s", "max_pause: 4s"))
    answer = await api.post("/v1/profiles/reload")
    assert answer.status == 200, answer.text
    assert answer.body["generation"] == 2
    assert answer.body["profiles"] == ["latency-critical", "strict", "default"]
    assert registry.current.by_name("default").max_pause == 4  # type: ignore[union-attr]
    listed = await api.get("/v1/profiles")
    assert listed.body["generation"] == 2


async def test_invalid_reload_is_422_with_positions_and_keeps_the_old_set(
    api: Api, profiles_file: Path, registry: ProfileRegistry
) -> None:
    before = registry.current
    metrics_before = reload_failures((await api.get("/metrics")).text)
    broken = SMALL_PROFILES.replace("max_pause: 3s", "max_pause: 3").replace(
        "handover: allowed", "handover: sometimes"
    )
    profiles_file.write_text(broken)
    answer = await api.post("/v1/profiles/reload")
    assert answer.status == 422, answer.text
    assert answer.content_type == "application/problem+json"
    problems = answer.body["problems"]
    assert len(problems) == 2
    lines = broken.splitlines()
    for problem in problems:
        assert problem["file"] == str(profiles_file)
        line = lines[problem["line"] - 1]
        assert problem["column"] >= 1
        assert ("max_pause" in line) or ("handover" in line), (problem, line)
    assert registry.current is before
    listed = await api.get("/v1/profiles")
    assert listed.body["generation"] == 1
    assert reload_failures((await api.get("/metrics")).text) == metrics_before + 1


async def test_explain_is_503_when_the_instance_host_does_not_answer(
    api: Api, driver: SimDriver
) -> None:
    driver.inject_fault("source_gone", host="a", duration=60)
    answer = await api.get("/v1/instances/db/profile")
    assert answer.status == 503
    assert answer.content_type == "application/problem+json"
