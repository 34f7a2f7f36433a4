"""GET /v1/events: server-sent events from the engine, driven through the real aiohttp
client while migrations run on the simulator in virtual time."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import ClientResponse
from apitools import Api
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from lmwatch.clock import VirtualClock
from lmwatch.engine import Engine
from lmwatch.events import PROGRESS, EventHub
from lmwatch.model import State


@dataclass
class Sse:
    id: int | None
    type: str
    data: Any


class Stream:
    """Reads a text/event-stream response into parsed events, in the background."""

    def __init__(self, response: ClientResponse) -> None:
        self.response = response
        self.events: list[Sse] = []
        self.comments: list[str] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        fields: dict[str, str] = {}
        while True:
            raw = await self.response.content.readline()
            if not raw:
                return
            line = raw.decode().rstrip("\n")
            if not line:
                if "data" in fields:
                    ident = fields.get("id")
                    self.events.append(
                        Sse(
                            int(ident) if ident else None,
                            fields.get("event", "message"),
                            json.loads(fields["data"]),
                        )
                    )
                fields = {}
            elif line.startswith(":"):
                self.comments.append(line)
            else:
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")

    def of(self, migration_id: str) -> list[Sse]:
        return [e for e in self.events if e.data.get("migration") == migration_id]

    async def close(self) -> None:
        self.task.cancel()
        self.response.close()
        await asyncio.gather(self.task, return_exceptions=True)


async def subscribe(api: Api, **headers: str) -> Stream:
    response = await api.client.get("/v1/events", headers=headers)
    assert response.status == 200
    assert response.content_type == "text/event-stream"
    return Stream(response)


async def start(api: Api, instance: str = "quiet") -> str:
    answer = await api.post(
        "/v1/migrations", {"instance": instance, "source": "a", "destination": "b"}
    )
    assert answer.status == 202, answer.text
    return str(answer.body["id"])


async def finish(clock: VirtualClock, engine: Engine, migration_id: str) -> None:
    held = await clock.run_until(lambda: engine.get(migration_id).state.finished, limit=3600)
    assert held, engine.get(migration_id).state


async def settle(stream: Stream, count: int) -> None:
    for _ in range(400):
        if len(stream.events) >= count:
            return
        await asyncio.sleep(0.005)


def validator(openapi: dict[str, Any], event_type: str) -> Draft202012Validator:
    media = openapi["paths"]["/v1/events"]["get"]["responses"]["200"]["content"]
    ref = media["text/event-stream"]["x-event-data"][event_type]["$ref"]
    resource = Resource.from_contents(openapi, default_specification=DRAFT202012)
    registry = Registry().with_resource("urn:doc", resource)
    return Draft202012Validator({"$ref": "urn:doc" + ref}, registry=registry)


async def test_a_migration_streams_state_decision_and_progress_in_order(
    api: Api, clock: VirtualClock, engine: Engine, openapi: dict[str, Any]
) -> None:
    stream = await subscribe(api)
    try:
        migration_id = await start(api, "db")
        await finish(clock, engine, migration_id)
        timeline = (await api.get(f"/v1/migrations/{migration_id}")).body["timeline"]
        await settle(stream, len(timeline))
        await asyncio.sleep(0.05)
    finally:
        await stream.close()
    events = stream.of(migration_id)
    ids = [e.id for e in stream.events]
    assert all(i is not None for i in ids) and ids == sorted(ids) and len(set(ids)) == len(ids)
    # Every event's data matches the schema the OpenAPI document gives its type.
    for event in stream.events:
        errors = list(validator(openapi, event.type).iter_errors(event.data))
        assert not errors, (event.type, event.data, errors[0].message)
    # The timeline entries arrive as events, in the order they were recorded.
    entries = [e for e in events if e.type != PROGRESS]
    assert [(e.type, e.data["reason"]) for e in entries] == [
        (t["kind"], t["reason"]) for t in timeline
    ]
    states = [e.data["state"] for e in entries if e.type == "state"]
    assert states[0] == "queued"
    assert states[-1] == "completed"
    assert {"starting", "copying"} <= set(states)
    first_decision = next(e for e in entries if e.type == "decision")
    assert first_decision.data["action"] == "start"
    assert any(e.data["prediction"] is not None for e in entries if e.type == "decision")
    assert any(e.data["origin"] == "policy" for e in entries if e.type == "decision")
    # Progress: between copying and completion, the remainder shrinks to the end.
    progress = [e for e in events if e.type == PROGRESS]
    assert len(progress) >= 3
    kinds = [e.type for e in events]
    assert kinds.index(PROGRESS) > kinds.index("decision")
    assert max(i for i, k in enumerate(kinds) if k == PROGRESS) < len(kinds) - 1
    first, last = progress[0].data, progress[-1].data
    assert first["progress"]["memory_total_bytes"] > 0
    assert (
        last["progress"]["memory_transferred_bytes"] > first["progress"]["memory_transferred_bytes"]
    )
    assert any(p.data["prediction"] and "eta_seconds" in p.data["prediction"] for p in progress)


async def test_a_consumer_that_never_reads_does_not_hold_up_the_engine(
    api: Api, clock: VirtualClock, engine: Engine
) -> None:
    engine.hub.queue_size = 8
    response = await api.client.get("/v1/events")  # subscribed; never read
    try:
        await asyncio.sleep(0.05)
        assert engine.hub.subscribers == 1
        ids = [await start(api, name) for name in ("quiet", "quiet2", "db")]
        for migration_id in ids:
            await finish(clock, engine, migration_id)
        assert all(engine.get(i).state is State.COMPLETED for i in ids)
    finally:
        response.close()


def test_a_full_queue_drops_old_progress_first_then_asks_for_a_resync() -> None:
    hub = EventHub(queue_size=4)
    slow = hub.subscribe()
    for n in range(3):
        hub.publish(PROGRESS, {"n": n})
    hub.publish("state", {"n": 3})
    hub.publish("decision", {"n": 4})
    assert [e.type for e in slow.queue] == [PROGRESS, PROGRESS, "state", "decision"]
    assert slow.dropped == 1 and not slow.lost
    for n in range(5, 8):
        hub.publish("note", {"n": n})
    assert len(slow.queue) == 4
    assert all(e.type != PROGRESS for e in slow.queue)
    assert slow.lost  # a timeline event had to go: the stream sends a resync


async def test_last_event_id_resumes_with_the_buffered_events(api: Api) -> None:
    hub = _hub(api)
    for n in range(5):
        hub.publish("note", {"n": n})
    stream = await subscribe(api, **{"Last-Event-ID": "2"})
    try:
        await settle(stream, 3)
    finally:
        await stream.close()
    assert [(e.id, e.data["n"]) for e in stream.events] == [(3, 2), (4, 3), (5, 4)]


async def test_a_resume_from_an_id_no_longer_buffered_gets_a_resync(api: Api) -> None:
    hub = _hub(api)
    hub._recent = type(hub._recent)(maxlen=2)
    for n in range(5):
        hub.publish("note", {"n": n})
    stream = await subscribe(api, **{"Last-Event-ID": "1"})
    try:
        await settle(stream, 3)
    finally:
        await stream.close()
    assert [e.type for e in stream.events] == ["resync", "note", "note"]
    assert "GET /v1/migrations" in stream.events[0].data["reason"]


async def test_an_idle_stream_gets_keep_alive_comments(api: Api) -> None:
    _hub(api).keepalive = 0.02
    stream = await subscribe(api)
    try:
        for _ in range(200):
            if stream.comments:
                break
            await asyncio.sleep(0.005)
    finally:
        await stream.close()
    assert stream.comments[0] == ": keep-alive"


async def test_profile_reloads_are_events(api: Api, profiles_file: Path) -> None:
    stream = await subscribe(api)
    try:
        await asyncio.sleep(0.02)
        assert (await api.post("/v1/profiles/reload")).status == 200
        profiles_file.write_text("version: 1\nprofiles: [nonsense\n")
        assert (await api.post("/v1/profiles/reload")).status == 422
        await settle(stream, 2)
    finally:
        await stream.close()
    loaded, rejected = stream.events
    assert loaded.type == rejected.type == "profiles"
    assert loaded.data["loaded"] is True and "default" in loaded.data["profiles"]
    assert rejected.data["loaded"] is False
    assert rejected.data["generation"] == loaded.data["generation"]


def _hub(api: Api) -> EventHub:
    from lmwatch.api import HUB

    return api.client.app[HUB]


def test_events_are_built_when_sent_and_are_always_valid_json() -> None:
    hub = EventHub()
    built: list[int] = []

    def build() -> dict[str, Any]:
        built.append(1)
        return {"eta": float("inf"), "rates": [1.5, float("nan")]}

    event = hub.publish(PROGRESS, build)
    assert built == []  # publishing costs the engine nothing more
    text = event.encode().decode()
    assert text.startswith(f"id: {event.id}\nevent: progress\ndata: ")
    assert json.loads(text.split("data: ", 1)[1]) == {"eta": None, "rates": [1.5, None]}
    event.encode()
    assert built == [1]


async def test_open_streams_end_when_the_daemon_stops(api: Api) -> None:
    stream = await subscribe(api)
    try:
        await asyncio.sleep(0.02)
        assert _hub(api).subscribers == 1
        await api.client.app.shutdown()  # what the daemon's runner does on SIGTERM
        await asyncio.wait_for(stream.task, 5)
    finally:
        await stream.close()
    assert _hub(api).subscribers == 0
