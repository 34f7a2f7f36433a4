"""The migration endpoints, driven through the real aiohttp client against the simulator
in virtual time. Every answer is also checked against the OpenAPI document (conftest)."""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
from typing import Any

import pytest
from apitools import Api

from lmwatch.clock import VirtualClock
from lmwatch.drivers.base import DriverError
from lmwatch.drivers.sim import SimDriver
from lmwatch.engine import Engine
from lmwatch.model import State
from lmwatch.store import Store

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
MIGRATION_FIELDS = {
    "id",
    "placement",
    "instance",
    "source",
    "destination",
    "labels",
    "state",
    "profile",
    "created_at",
    "started_at",
    "finished_at",
    "deadline_at",
    "progress",
    "prediction",
    "timeline",
    "outcome",
    "restarts",
    "starting_again_by",
}


def body(instance: str = "quiet", **extra: Any) -> dict[str, Any]:
    return {"instance": instance, "source": "a", "destination": "b", **extra}


async def start(api: Api, instance: str = "quiet", **extra: Any) -> dict[str, Any]:
    answer = await api.post("/v1/migrations", body(instance, **extra))
    assert answer.status == 202, answer.text
    return answer.body


async def until(clock: VirtualClock, engine: Engine, migration_id: str, *states: State) -> None:
    held = await clock.run_until(lambda: engine.get(migration_id).state in states, limit=3600)
    assert held, engine.get(migration_id).state


async def snapshot(store: Store, engine: Engine, driver: SimDriver) -> Any:
    """Everything a request could change: records, events, supervision, instances.

    Taken once every supervision waits for virtual time (none waits for the store's
    writer thread) and what they recorded is in the file (final event numbers)."""
    assert isinstance(engine.clock, VirtualClock)
    await engine.clock.advance(0)
    assert store.settle(5)
    records = store.list()
    return (
        records,
        [store.events(r.id) for r in records],
        engine.active_count(),
        {i.name: driver.where(i.name) for i in driver.inventory.instances},
    )


# --- create -------------------------------------------------------------------------


async def test_create_answers_202_with_location_and_the_migration(api: Api) -> None:
    answer = await api.post("/v1/migrations", body(labels={"team": "x"}))
    assert answer.status == 202
    migration = answer.body
    assert set(migration) == MIGRATION_FIELDS
    assert answer.headers["Location"] == f"/v1/migrations/{migration['id']}"
    assert "Idempotent-Replayed" not in answer.headers
    assert migration["instance"] == "quiet"
    assert migration["labels"] == {"tier": "web", "team": "x"}
    assert migration["profile"]["name"] == "default"
    assert migration["profile"]["requested"] is None
    assert migration["profile"]["reason"]
    assert migration["placement"]["how"] == "named"
    assert migration["placement"]["reason"].startswith(f"{migration['destination']}: named")
    assert RFC3339_UTC.fullmatch(migration["created_at"]), migration["created_at"]
    assert all(RFC3339_UTC.fullmatch(e["at"]) for e in migration["timeline"])
    assert migration["timeline"][0]["state"] == "queued"


async def test_create_with_a_named_profile_uses_it(api: Api) -> None:
    migration = await start(api, profile="strict")
    assert migration["profile"] == {
        "name": "strict",
        "reason": migration["profile"]["reason"],
        "requested": "strict",
    }
    assert "requested" in migration["profile"]["reason"]


async def test_labels_in_the_request_select_the_profile(api: Api) -> None:
    migration = await start(api, labels={"tier": "database"})
    assert migration["profile"]["name"] == "latency-critical"


async def test_idempotency_key_replays_the_same_migration(api: Api, store: Store) -> None:
    headers = {"Idempotency-Key": "k-1"}
    first = await api.post("/v1/migrations", body(), headers=headers)
    again = await api.post("/v1/migrations", body(), headers=headers)
    assert first.status == again.status == 202
    assert again.body["id"] == first.body["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Location"] == first.headers["Location"]
    assert len(store.list()) == 1


async def test_idempotency_key_with_another_body_is_409(
    api: Api, store: Store, engine: Engine, driver: SimDriver
) -> None:
    headers = {"Idempotency-Key": "k-2"}
    await api.post("/v1/migrations", body(), headers=headers)
    before = await snapshot(store, engine, driver)
    answer = await api.post("/v1/migrations", body("quiet2"), headers=headers)
    assert answer.status == 409
    assert "Idempotency-Key" in answer.body["detail"]
    assert await snapshot(store, engine, driver) == before


async def test_second_migration_of_a_migrating_instance_is_409(api: Api) -> None:
    await start(api)
    answer = await api.post("/v1/migrations", body())
    assert answer.status == 409
    assert answer.body["status"] == 409
    assert "already migrating" in answer.body["detail"]


BAD_CREATES: list[tuple[str, Any, int, dict[str, str]]] = [
    ("malformed JSON", b'{"instance": "quiet", ', 400, {}),
    ("empty body", b"", 400, {}),
    ("not an object", [1, 2], 422, {}),
    ("missing field", {"instance": "quiet", "destination": "b"}, 422, {}),
    ("force without destination", {"instance": "quiet", "source": "a", "force": True}, 422, {}),
    ("force not a boolean", body(force="yes"), 422, {}),
    ("unknown field", body(speed="fast"), 422, {}),
    ("wrong type", body(labels={"tier": 1}), 422, {}),
    ("number as instance", {"instance": 7, "source": "a", "destination": "b"}, 422, {}),
    ("same host", {"instance": "quiet", "source": "a", "destination": "a"}, 422, {}),
    ("unknown profile", body(profile="nope"), 422, {}),
    ("unknown instance", body("ghost"), 404, {}),
    ("unknown destination", {"instance": "quiet", "source": "a", "destination": "zz"}, 404, {}),
    ("not on source", {"instance": "quiet", "source": "b", "destination": "a"}, 409, {}),
    ("no room", {"instance": "big", "source": "a", "destination": "c"}, 409, {}),
    ("key too long", body(), 422, {"Idempotency-Key": "k" * 300}),
]


@pytest.mark.parametrize(
    ("payload", "status", "headers"),
    [case[1:] for case in BAD_CREATES],
    ids=[case[0] for case in BAD_CREATES],
)
async def test_bad_create_is_refused_and_changes_nothing(
    api: Api,
    store: Store,
    engine: Engine,
    driver: SimDriver,
    payload: Any,
    status: int,
    headers: dict[str, str],
) -> None:
    await start(api, "quiet3")  # something already there, which must stay as it is
    before = await snapshot(store, engine, driver)
    if isinstance(payload, bytes):
        answer = await api.call("POST", "/v1/migrations", data=payload, headers=headers)
    else:
        answer = await api.post("/v1/migrations", payload, headers=headers)
    assert answer.status == status, answer.text
    assert answer.content_type == "application/problem+json"
    assert answer.body["status"] == status
    assert answer.body["detail"]
    if status == 422 and not isinstance(payload, bytes) and payload != body(profile="nope"):
        assert answer.body["errors"], answer.body
        assert all(e["loc"][0] in ("body", "header") for e in answer.body["errors"])
    assert await snapshot(store, engine, driver) == before


async def test_unknown_field_is_named_in_the_error(api: Api) -> None:
    answer = await api.post("/v1/migrations", body(speed="fast"))
    assert answer.status == 422
    assert ["body", "speed"] in [e["loc"] for e in answer.body["errors"]]


# --- auth ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [False, "Bearer wrong-token", "Basic dGVzdA==", "Bearer", "test-token-0123456789"],
    ids=["none", "wrong", "basic", "empty", "no-scheme"],
)
@pytest.mark.parametrize(
    "path",
    [
        "/v1/migrations",
        "/v1/migrations/{id}/force-complete",
        "/v1/migrations/{id}/cancel",
        "/v1/profiles/reload",
    ],
)
async def test_every_post_needs_the_token(
    api: Api,
    store: Store,
    engine: Engine,
    driver: SimDriver,
    authorization: bool | str,
    path: str,
) -> None:
    migration = await start(api)
    before = await snapshot(store, engine, driver)
    answer = await api.post(path.format(id=migration["id"]), body("quiet2"), auth=authorization)
    assert answer.status == 401
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert await snapshot(store, engine, driver) == before


async def test_gets_need_no_token(api: Api) -> None:
    migration = await start(api)
    for path in ("/v1/migrations", f"/v1/migrations/{migration['id']}", "/v1/profiles"):
        assert (await api.get(path, auth=False)).status == 200


# --- list and get --------------------------------------------------------------------


async def test_list_filters_by_state_and_leaves_out_timelines(
    api: Api, clock: VirtualClock, engine: Engine
) -> None:
    done = await start(api, "quiet")
    await until(clock, engine, done["id"], State.COMPLETED)
    running = await start(api, "db")
    everything = await api.get("/v1/migrations")
    assert [m["id"] for m in everything.body["migrations"]] == [done["id"], running["id"]]
    assert all("timeline" not in m for m in everything.body["migrations"])
    completed = await api.get("/v1/migrations?state=completed")
    assert [m["id"] for m in completed.body["migrations"]] == [done["id"]]
    assert (await api.get("/v1/migrations?state=cancelled")).body == {"migrations": []}


async def test_list_with_an_unknown_state_is_422(api: Api) -> None:
    answer = await api.get("/v1/migrations?state=sleeping")
    assert answer.status == 422
    assert answer.body["errors"][0]["loc"] == ["query", "state"]


async def test_unknown_migration_is_404_everywhere(api: Api) -> None:
    for method, path in [
        ("GET", "/v1/migrations/nope"),
        ("POST", "/v1/migrations/nope/cancel"),
        ("POST", "/v1/migrations/nope/force-complete"),
    ]:
        answer = await api.call(method, path)
        assert answer.status == 404, (method, path)
        assert "nope" in answer.body["detail"]


async def test_unknown_route_is_a_problem_too(api: Api, checker: Any) -> None:
    response = await api.client.get("/v2/nothing")
    assert response.status == 404
    assert response.content_type == "application/problem+json"
    assert (await response.json())["status"] == 404


async def test_a_migration_runs_to_completion_through_the_api(
    api: Api, clock: VirtualClock, engine: Engine
) -> None:
    migration = await start(api, "quiet")
    path = f"/v1/migrations/{migration['id']}"
    await clock.advance(1.0)
    during = (await api.get(path)).body
    assert during["state"] == "copying"
    progress = during["progress"]
    assert progress["memory_total_bytes"] == 2 * 1024**3
    assert 0 < progress["percent_copied"] < 100
    assert progress["passes"] == 1
    assert progress["transfer_rate_bytes_per_second"] > 0
    assert during["prediction"] is not None
    assert during["started_at"] is not None
    assert during["deadline_at"] is not None
    await until(clock, engine, migration["id"], State.COMPLETED)
    after = (await api.get(path)).body
    assert after["state"] == "completed"
    assert after["finished_at"] >= after["started_at"]
    outcome = after["outcome"]
    assert outcome["method"] == "converged"
    assert outcome["transferred_bytes"] >= 2 * 1024**3
    assert 0 < outcome["blackout_seconds"] < 0.5
    assert outcome["passes"] >= 1
    assert outcome["error"] is None
    states = [e["state"] for e in after["timeline"] if e["kind"] == "state"]
    assert states[0] == "queued" and states[-1] == "completed"
    assert "copying" in states
    assert [e["at"] for e in after["timeline"]] == sorted(e["at"] for e in after["timeline"])


# --- force-complete ----------------------------------------------------------------


async def test_force_complete_hands_over_when_the_profile_allows(
    api: Api, clock: VirtualClock, engine: Engine
) -> None:
    migration = await start(api, "db")
    await clock.advance(1.0)
    answer = await api.post(f"/v1/migrations/{migration['id']}/force-complete")
    assert answer.status == 202, answer.text
    decision = answer.body["decision"]
    assert decision["action"] == "handover"
    assert decision["reason"]
    assert decision["predicted_blackout_seconds"] is not None
    assert any(e["action"] == "handover" for e in answer.body["migration"]["timeline"])
    cancel = await api.post(f"/v1/migrations/{migration['id']}/cancel")
    assert cancel.status == 409
    assert "handover" in cancel.body["detail"]
    await until(clock, engine, migration["id"], State.COMPLETED)
    final = (await api.get(f"/v1/migrations/{migration['id']}")).body
    assert final["outcome"]["method"] == "handover"


async def test_force_complete_is_409_when_the_profile_allows_no_way(
    api: Api, clock: VirtualClock, engine: Engine, store: Store, driver: SimDriver
) -> None:
    migration = await start(api, "strict")
    await clock.advance(1.0)
    before = await snapshot(store, engine, driver)
    refused = await api.post(f"/v1/migrations/{migration['id']}/force-complete", {})
    assert refused.status == 409, refused.text
    assert await snapshot(store, engine, driver) == before
    accepted = await api.post(
        f"/v1/migrations/{migration['id']}/force-complete", {"accept_pause": True}
    )
    assert accepted.status == 202, accepted.text
    assert accepted.body["decision"]["action"] == "pause"
    await until(clock, engine, migration["id"], State.COMPLETED)
    final = (await api.get(f"/v1/migrations/{migration['id']}")).body
    assert final["outcome"]["method"] == "paused"


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"{not json", 400),
        ({"accept_pause": "yes"}, 422),
        ({"accept_pause": True, "now": True}, 422),
        ([True], 422),
    ],
    ids=["malformed", "wrong-type", "unknown-field", "not-an-object"],
)
async def test_bad_force_complete_body_changes_nothing(
    api: Api,
    clock: VirtualClock,
    engine: Engine,
    store: Store,
    driver: SimDriver,
    payload: Any,
    status: int,
) -> None:
    migration = await start(api, "strict")
    await clock.advance(1.0)
    before = await snapshot(store, engine, driver)
    path = f"/v1/migrations/{migration['id']}/force-complete"
    if isinstance(payload, bytes):
        answer = await api.call("POST", path, data=payload)
    else:
        answer = await api.post(path, payload)
    assert answer.status == status, answer.text
    assert await snapshot(store, engine, driver) == before


async def test_force_complete_before_copying_and_after_the_end_is_409(
    api: Api, clock: VirtualClock, engine: Engine
) -> None:
    first = await start(api, "quiet")
    await start(api, "quiet2")
    queued = await start(api, "quiet3")  # the third from host a waits for a slot
    assert engine.get(queued["id"]).state is State.QUEUED
    answer = await api.post(f"/v1/migrations/{queued['id']}/force-complete")
    assert answer.status == 409
    assert "not started copying" in answer.body["detail"]
    await until(clock, engine, first["id"], State.COMPLETED)
    answer = await api.post(f"/v1/migrations/{first['id']}/force-complete")
    assert answer.status == 409


# --- cancel --------------------------------------------------------------------------


async def test_cancel_stops_the_migration_and_the_instance_stays(
    api: Api, clock: VirtualClock, engine: Engine, driver: SimDriver
) -> None:
    migration = await start(api, "strict")
    await clock.advance(1.0)
    answer = await api.post(f"/v1/migrations/{migration['id']}/cancel")
    assert answer.status == 202, answer.text
    assert answer.body["id"] == migration["id"]
    assert any(e["action"] == "cancel" for e in answer.body["timeline"])
    await until(clock, engine, migration["id"], State.CANCELLED, State.FAILED)
    final = (await api.get(f"/v1/migrations/{migration['id']}")).body
    assert final["state"] == "cancelled"
    assert final["outcome"]["method"] == "cancelled"
    assert driver.where("strict") == "a"


async def test_cancel_of_a_queued_migration_is_immediate(api: Api, engine: Engine) -> None:
    await start(api, "quiet")
    await start(api, "quiet2")
    queued = await start(api, "quiet3")
    answer = await api.post(f"/v1/migrations/{queued['id']}/cancel")
    assert answer.status == 202
    assert answer.body["state"] == "cancelled"
    assert answer.body["outcome"]["method"] == "cancelled"


async def test_cancel_after_completion_is_409_and_changes_nothing(
    api: Api, clock: VirtualClock, engine: Engine, store: Store, driver: SimDriver
) -> None:
    migration = await start(api, "quiet")
    await until(clock, engine, migration["id"], State.COMPLETED)
    before = await snapshot(store, engine, driver)
    answer = await api.post(f"/v1/migrations/{migration['id']}/cancel")
    assert answer.status == 409
    assert "completed" in answer.body["detail"]
    assert await snapshot(store, engine, driver) == before


async def test_a_hypervisor_failure_during_force_complete_is_503(
    api: Api, clock: VirtualClock, driver: SimDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    migration = await start(api, "db")
    await clock.advance(1.0)

    async def failing(migration_id: str) -> None:
        raise DriverError("connection reset")

    monkeypatch.setattr(driver, "handover", failing)
    answer = await api.post(f"/v1/migrations/{migration['id']}/force-complete")
    assert answer.status == 503, answer.text
    assert "connection reset" in answer.body["detail"]
    again = (await api.get(f"/v1/migrations/{migration['id']}")).body
    assert again["state"] == "copying"


# --- a finished migration's body ----------------------------------------------------

# A finished migration's row as lmwatch wrote it when these parts were JSON dicts
# (`json.dumps(..., sort_keys=True)`), restarted once, its prediction still there.
_OLD_PLAN = {
    "arm_handover": False,
    "arm_slow_down": True,
    "bandwidth": None,
    "blackout_budget": 0.3,
    "reason": "slow-down armed",
    "slow_down_initial": 0.2,
    "slow_down_step": 0.1,
}
_OLD_ROW = {
    "id": "m-old",
    "instance": "quiet",
    "source": "a",
    "destination": "b",
    "labels": '{"team": "x"}',
    "requested_profile": None,
    "profile_name": "default",
    "profile_reason": "fallback",
    "profile": '{"name": "default"}',
    "memory_bytes": 8 << 30,
    "uuid": None,
    "state": "completed",
    "created_at": 1_800_000_000.0,
    "started_at": 1_800_000_001.0,
    "finished_at": 1_800_000_031.5,
    "deadline_at": 1_800_000_601.0,
    "plan": json.dumps({**_OLD_PLAN, "slow_down_initial": 0.4}, sort_keys=True),
    "blackout_budget": 0.3,
    "paused": 0,
    "handed_over": 0,
    "progress": json.dumps(
        {
            "time": 1_800_000_031.0,
            "memory_remaining_seen": 1 << 20,
            "memory_total": 8 << 30,
            "memory_remaining": 0,
            "memory_transferred": 9 << 30,
            "transfer_rate": 1.25e9,
            "change_rate": 2.5e8,
            "passes": 4,
            "blackout_budget": 0.3,
            "slowdown": 0.2,
            "disk_total": 4 << 30,
            "disk_remaining": 0,
            "disk_rate": 5e8,
            "prediction": {
                "transfer_rate": 1.25e9,
                "change_rate": 2.5e8,
                "remaining": 1 << 20,
                "eta_seconds": 0.5,
                "blackout_seconds": 0.0125,
                "converges": True,
                "floor_bytes": None,
                "confidence": 0.75,
            },
        },
        sort_keys=True,
    ),
    "outcome": json.dumps(
        {
            "method": "slowed",
            "total_seconds": 30.5,
            "blackout_seconds": 0.02,
            "passes": 4,
            "transferred_bytes": 9 << 30,
            "error": None,
            "running_on": "b",
        },
        sort_keys=True,
    ),
    "idempotency_key": None,
    "request_fingerprint": None,
    "placement": '{"how": "named", "reason": "b: named by the request"}',
    "restart": json.dumps(
        {
            "count": 1,
            "pending": False,
            "plan": {**_OLD_PLAN, "slow_down_initial": 0.4},
            "planned_rate": 3e8,
            "job_started_at": 1_800_000_011.0,
        },
        sort_keys=True,
    ),
}
_FINISHED_BODY = {
    "id": "m-old",
    "instance": "quiet",
    "source": "a",
    "destination": "b",
    "labels": {"team": "x"},
    "state": "completed",
    "profile": {"name": "default", "reason": "fallback", "requested": None},
    "created_at": "2027-01-15T08:00:00.000Z",
    "started_at": "2027-01-15T08:00:01.000Z",
    "finished_at": "2027-01-15T08:00:31.500Z",
    "deadline_at": "2027-01-15T08:10:01.000Z",
    "progress": {
        "memory_total_bytes": 8 << 30,
        "memory_remaining_bytes": 0,
        "memory_transferred_bytes": 9 << 30,
        "percent_copied": 100.0,
        "passes": 4,
        "transfer_rate_bytes_per_second": 1.25e9,
        "change_rate_bytes_per_second": 2.5e8,
        "blackout_budget_seconds": 0.3,
        "slowdown": 0.2,
        "disk": {
            "total_bytes": 4 << 30,
            "remaining_bytes": 0,
            "percent_copied": 100.0,
            "rate_bytes_per_second": 5e8,
            "in_sync": True,
        },
    },
    "prediction": {
        "eta_seconds": 0.5,
        "blackout_seconds": 0.0125,
        "converges": True,
        "confidence": 0.75,
        "floor_bytes": None,
    },
    "outcome": {
        "method": "slowed",
        "total_seconds": 30.5,
        "blackout_seconds": 0.02,
        "passes": 4,
        "transferred_bytes": 9 << 30,
        "error": None,
    },
    "placement": {"how": "named", "reason": "b: named by the request"},
    "restarts": 1,
    "starting_again_by": None,  # added since: null for every migration not waiting to start
    "timeline": [
        {
            "at": "2027-01-15T08:00:31.500Z",
            "kind": "state",
            "action": None,
            "state": "completed",
            "reason": "completed (slowed)",
        }
    ],
}


def _write_old_row(path: str) -> None:
    """The row and its last event, written straight into the store file."""
    with sqlite3.connect(path) as db:
        columns = ", ".join(_OLD_ROW)
        marks = ", ".join("?" for _ in _OLD_ROW)
        db.execute(f"INSERT INTO migrations({columns}) VALUES({marks})", tuple(_OLD_ROW.values()))
        db.execute(
            "INSERT INTO events(migration_id, at, kind, action, state, reason, data) "
            "VALUES('m-old', 1800000031.5, 'state', NULL, 'completed', 'completed (slowed)', "
            "?)",
            (_OLD_ROW["outcome"],),
        )


async def test_a_finished_migration_s_body_is_what_it_always_was(api: Api, store: Store) -> None:
    _write_old_row(store.path)
    answer = await api.get("/v1/migrations/m-old")
    assert answer.status == 200, answer.text
    assert answer.body == _FINISHED_BODY
    listed = await api.get("/v1/migrations?state=completed")
    assert listed.body["migrations"] == [
        {key: value for key, value in _FINISHED_BODY.items() if key != "timeline"}
    ]


async def test_a_finished_migration_written_again_has_the_same_text_and_body(
    api: Api, store: Store
) -> None:
    """Read from the old row and written by this version, the parts are the same text
    in the file, and the API shows the same body."""
    _write_old_row(store.path)
    record = store.get("m-old")
    assert record is not None
    store.insert(dataclasses.replace(record, id="m-new", instance="other"), "accepted")
    assert store.flush()
    parts = ("plan", "progress", "outcome", "placement", "restart")
    with sqlite3.connect(store.path) as db:
        written = db.execute(
            f"SELECT {', '.join(parts)} FROM migrations WHERE id='m-new'"
        ).fetchone()
    assert dict(zip(parts, written, strict=True)) == {part: _OLD_ROW[part] for part in parts}
    answer = await api.get("/v1/migrations/m-new")
    assert answer.status == 200, answer.text
    expected = {**_FINISHED_BODY, "id": "m-new", "instance": "other"}
    assert {k: v for k, v in answer.body.items() if k != "timeline"} == {
        k: v for k, v in expected.items() if k != "timeline"
    }
