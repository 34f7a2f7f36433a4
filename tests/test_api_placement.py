"""Placement through the API: chosen and forced creates, the explain call, bad input.
Every answer is also checked against the OpenAPI document (conftest)."""

from __future__ import annotations

from apitools import Api

from lmwatch.drivers.sim import SimDriver
from lmwatch.metrics import Metrics
from lmwatch.store import Store


async def test_a_create_without_destination_is_placed_and_says_why(
    api: Api, metrics: Metrics
) -> None:
    answer = await api.post("/v1/migrations", {"instance": "quiet", "source": "a"})
    assert answer.status == 202, answer.text
    migration = answer.body
    assert migration["destination"] == "b"
    assert migration["placement"]["how"] == "chosen"
    # c (1 GiB) cannot hold a 2 GiB instance: rejected with the numbers
    assert migration["placement"]["reason"] == (
        "b: the only one of 2 candidates that can take it; "
        "c rejected: c has 1.0GiB free, nothing reserved; quiet needs 2.0GiB"
    )
    assert "destination chosen: b" in migration["timeline"][0]["reason"]
    assert metrics.registry.get_sample_value("lmwatch_placements_total", {"how": "chosen"}) == 1


async def test_no_host_fits_is_409_with_every_reason(api: Api, store: Store) -> None:
    answer = await api.post(
        "/v1/migrations", {"instance": "quiet", "source": "a", "labels": {"group": "g"}}
    )
    assert answer.status == 202
    # quiet2 shares the group: b is taken by the group rule, c is too small
    answer = await api.post(
        "/v1/migrations", {"instance": "quiet2", "source": "a", "labels": {"group": "g"}}
    )
    assert answer.status == 409, answer.text
    assert answer.body["type"].endswith("no-destination")
    assert "b rejected: instance of group 'g'" in answer.body["detail"]
    assert "c rejected: c has 1.0GiB free" in answer.body["detail"]
    assert store.active_for_instance("quiet2") is None


async def test_forced_needs_a_destination_and_the_token(api: Api, driver: SimDriver) -> None:
    forced = {"instance": "quiet", "source": "a", "destination": "c", "force": True}
    assert (await api.post("/v1/migrations", forced, auth=False)).status == 401
    named = await api.post("/v1/migrations", {**forced, "force": False})
    assert named.status == 409 and named.body["type"].endswith("insufficient-resources")
    answer = await api.post("/v1/migrations", forced)
    assert answer.status == 202, answer.text
    assert answer.body["placement"]["how"] == "forced"
    assert "not checked" in answer.body["placement"]["reason"]
    unnamed = await api.post("/v1/migrations", {"instance": "quiet2", "source": "a", "force": True})
    assert unnamed.status == 422
    assert driver.where("quiet2") == "a"


async def test_explain_placement_moves_nothing(api: Api, store: Store) -> None:
    answer = await api.get("/v1/instances/db/placement")
    assert answer.status == 200, answer.text
    body = answer.body
    assert (body["instance"], body["source"], body["destination"]) == ("db", "a", "b")
    assert set(body["rejected"]) == {"c"}
    hosts = {c["host"]: c for c in body["candidates"]}
    assert set(hosts) == {"b", "c"}
    assert hosts["b"]["accepted"] and hosts["b"]["available"] == 256 << 30
    assert not hosts["c"]["accepted"] and hosts["c"]["reason"] == body["rejected"]["c"]
    assert store.list() == []
    only = await api.get("/v1/instances/db/placement?destinations=c")
    assert only.status == 200 and only.body["destination"] is None
    assert [c["host"] for c in only.body["candidates"]] == ["c"]


async def test_explain_placement_bad_input(api: Api) -> None:
    assert (await api.get("/v1/instances/nobody/placement")).status == 404
    assert (await api.get("/v1/instances/db/placement?destinations=z")).status == 404
    assert (await api.get("/v1/instances/db/placement?destinations=,")).status == 422
    assert (await api.get("/v1/instances/db/placement?profile=nonesuch")).status == 422
