"""The drain routes: every answer checked against the OpenAPI document (apitools)."""

from __future__ import annotations

from typing import Any

import pytest
from apitools import Api

from lmwatch.clock import VirtualClock
from lmwatch.engine import Engine


async def test_a_drain_is_accepted_followed_and_listed(
    api: Api, engine: Engine, clock: VirtualClock
) -> None:
    answer = await api.post("/v1/drains", {"host": "a"})
    assert answer.status == 202, answer.text
    drain = answer.body
    assert answer.headers["Location"] == f"/v1/drains/{drain['id']}"
    assert drain["host"] == "a" and drain["state"] == "running"
    names = [entry["instance"] for entry in drain["instances"]]
    assert sorted(names) == ["big", "db", "quiet", "quiet2", "quiet3", "strict"]
    assert drain["instances_total"] == 6 and drain["instances_remaining"] == 6
    assert drain["eta_seconds"] is not None and drain["eta_seconds"] > 0
    assert all(entry["state"] == "pending" for entry in drain["instances"])

    def migrating() -> bool:
        current = engine.drains.get(drain["id"])
        return any(i.migration_id is not None for i in current.items)

    assert await clock.run_until(migrating, limit=60)
    await clock.advance(1.5)
    seen = (await api.get(f"/v1/drains/{drain['id']}")).body
    moving = [e for e in seen["instances"] if e["migration_id"] is not None]
    assert moving
    for entry in moving:
        assert entry["destination"] == "b"  # c is too small for any of them
        assert entry["migration_state"] is not None
        assert 0.0 <= entry["progress"] <= 1.0
        migration = await api.get(f"/v1/migrations/{entry['migration_id']}")
        assert migration.status == 200 and migration.body["instance"] == entry["instance"]
    listed = (await api.get("/v1/drains")).body["drains"]
    assert [d["id"] for d in listed] == [drain["id"]]


async def test_a_host_with_nothing_on_it_completes_at_once_and_says_so(api: Api) -> None:
    answer = await api.post("/v1/drains", {"host": "c"})
    assert answer.status == 202
    assert answer.body["state"] == "completed"
    assert answer.body["instances"] == [] and answer.body["eta_seconds"] == 0.0
    assert "already empty" in answer.body["reason"]


async def test_instances_no_host_can_take_are_blocked_in_the_answer(api: Api) -> None:
    answer = await api.post("/v1/drains", {"host": "a", "destinations": ["c"]})
    assert answer.status == 202
    body = answer.body
    assert sorted(body["blocked"]) == ["big", "db", "quiet", "quiet2", "quiet3", "strict"]
    assert all(e["state"] == "blocked" and e["reason"] for e in body["instances"])
    assert body["state"] == "failed"
    assert "could not leave a" in body["reason"]


async def test_unknown_host_is_404(api: Api) -> None:
    answer = await api.post("/v1/drains", {"host": "nowhere"})
    assert answer.status == 404 and "nowhere" in answer.body["detail"]
    answer = await api.post("/v1/drains", {"host": "a", "destinations": ["nowhere"]})
    assert answer.status == 404
    assert (await api.get("/v1/drains")).body["drains"] == []


async def test_two_drains_of_one_host_are_409(api: Api) -> None:
    first = await api.post("/v1/drains", {"host": "a"})
    assert first.status == 202
    second = await api.post("/v1/drains", {"host": "a"})
    assert second.status == 409 and first.body["id"] in second.body["detail"]


async def test_destinations_including_the_host_itself_are_422(api: Api) -> None:
    answer = await api.post("/v1/drains", {"host": "a", "destinations": ["b", "a"]})
    assert answer.status == 422 and "itself" in answer.body["detail"]
    assert (await api.get("/v1/drains")).body["drains"] == []


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"host": 5},
        {"host": ""},
        {"host": "a", "destinations": []},
        {"host": "a", "destinations": "b"},
        {"host": "a", "speed": "fast"},
        {"host": "a", "profile": "no-such-profile"},
    ],
)
async def test_a_body_that_does_not_validate_is_422(api: Api, payload: dict[str, Any]) -> None:
    answer = await api.post("/v1/drains", payload)
    assert answer.status == 422, answer.text
    assert (await api.get("/v1/drains")).body["drains"] == []


async def test_a_body_that_is_not_json_is_400(api: Api) -> None:
    answer = await api.call(
        "POST", "/v1/drains", data="{host", headers={"Content-Type": "application/json"}
    )
    assert answer.status == 400


@pytest.mark.parametrize("authorization", [False, "Bearer wrong"])
async def test_no_token_is_401(api: Api, authorization: bool | str) -> None:
    answer = await api.post("/v1/drains", {"host": "a"}, auth=authorization)
    assert answer.status == 401
    drain = (await api.post("/v1/drains", {"host": "a"})).body
    answer = await api.post(f"/v1/drains/{drain['id']}/cancel", auth=authorization)
    assert answer.status == 401
    assert (await api.get(f"/v1/drains/{drain['id']}")).body["state"] == "running"


async def test_cancel_stops_queued_work(api: Api, engine: Engine, clock: VirtualClock) -> None:
    drain = (await api.post("/v1/drains", {"host": "a"})).body
    assert await clock.run_until(
        lambda: any(i.migration_id for i in engine.drains.get(drain["id"]).items), limit=60
    )
    answer = await api.post(f"/v1/drains/{drain['id']}/cancel")
    assert answer.status == 202
    states = {e["state"] for e in answer.body["instances"]}
    assert answer.body["state"] == "cancelling"
    assert "cancelled" in states and "pending" not in states
    assert await clock.run_until(lambda: engine.drains.get(drain["id"]).state.finished, limit=7200)
    ended = (await api.get(f"/v1/drains/{drain['id']}")).body
    assert ended["state"] == "cancelled" and ended["finished_at"] is not None
    again = await api.post(f"/v1/drains/{drain['id']}/cancel")
    assert again.status == 409


async def test_unknown_drain_is_404(api: Api) -> None:
    assert (await api.get("/v1/drains/nope")).status == 404
    assert (await api.post("/v1/drains/nope/cancel")).status == 404
