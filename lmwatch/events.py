"""In-process publish/subscribe of what happens to migrations, for `GET /v1/events`.

The engine publishes each timeline entry (state changes, decisions with their reason
and prediction, notes, errors, profile violations) and every progress sample; the
API publishes profile reloads. Publishing never blocks and never fails: each
subscriber has a bounded queue, and when a slow subscriber's queue is full its
oldest *progress* event is dropped (the next one supersedes it anyway). Only when a
queue holds nothing but timeline events is the oldest of those dropped, and the
subscriber is then sent a `resync` event telling it to reload its view.

Every event has an increasing id; the last `buffer` events are kept so that a
client reconnecting with `Last-Event-ID` gets what it missed while it is still
buffered (and a `resync` when it is not).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from lmwatch import schemas
from lmwatch.records import prediction_from
from lmwatch.store import MigrationRecord

PROGRESS = "progress"
RESYNC = "resync"
# Event types (the `event:` field); documented in the OpenAPI document.
TIMELINE_KINDS = ("state", "decision", "note", "error", "violation")
TYPES = (*TIMELINE_KINDS, PROGRESS, "profiles", RESYNC)


def _finite(value: Any) -> Any:
    """JSON without NaN or infinities (which JSON.parse refuses): null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


@dataclass(eq=False, slots=True)
class HubEvent:
    """One event. Its data is built when first sent, not when published: the engine
    only hands over what it already has, and pays nothing while nobody listens."""

    id: int
    type: str
    build: Callable[[], Mapping[str, Any]]
    _data: Mapping[str, Any] | None = None

    @property
    def data(self) -> Mapping[str, Any]:
        if self._data is None:
            self._data = self.build()
        return self._data

    def encode(self) -> bytes:
        """The event in text/event-stream framing (the JSON is one line)."""
        text = json.dumps(_finite(self.data), separators=(",", ":"), allow_nan=False)
        return f"id: {self.id}\nevent: {self.type}\ndata: {text}\n\n".encode()


@dataclass(eq=False)
class Subscription:
    """One subscriber's bounded queue of events to deliver."""

    size: int
    queue: deque[HubEvent] = field(default_factory=deque)
    dropped: int = 0  # progress events dropped because the subscriber was slow
    lost: bool = False  # a timeline event was dropped: a resync is due
    closed: bool = False
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, event: HubEvent) -> None:
        if len(self.queue) >= self.size:
            victim = next((e for e in self.queue if e.type == PROGRESS), None)
            if victim is not None:
                self.queue.remove(victim)
                self.dropped += 1
            else:
                self.queue.popleft()
                self.lost = True
        self.queue.append(event)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def take(self, timeout: float) -> list[HubEvent] | None:
        """Everything queued, waiting up to `timeout` seconds for something; [] on
        timeout, None once the hub is closed."""
        if not self.queue and not self.closed:
            try:
                async with asyncio.timeout(timeout):  # (asyncio.wait_for may eat a cancel)
                    await self._ready.wait()
            except TimeoutError:
                return []
        self._ready.clear()
        if self.closed:
            return None
        taken = list(self.queue)
        self.queue.clear()
        return taken


class EventHub:
    """Bounded fan-out of events to subscribers, with a replay buffer."""

    def __init__(
        self, *, buffer: int = 1000, queue_size: int = 256, keepalive: float = 15.0
    ) -> None:
        self.queue_size = queue_size
        self.keepalive = keepalive  # seconds between keep-alive comments of an idle stream
        self._last_id = 0
        self._recent: deque[HubEvent] = deque(maxlen=buffer)
        self._subscribers: list[Subscription] = []

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(
        self, type_: str, data: Mapping[str, Any] | Callable[[], Mapping[str, Any]]
    ) -> HubEvent:
        """Queue an event for every subscriber; `data` may be a function building it."""
        self._last_id += 1
        build = data if callable(data) else (lambda: data)
        event = HubEvent(self._last_id, type_, build)
        self._recent.append(event)
        for subscription in self._subscribers:
            subscription.offer(event)
        return event

    def subscribe(self, last_event_id: int | None = None) -> Subscription:
        """A new subscription; with `last_event_id`, the buffered events after it are
        queued first, and a resync is due when some of them are no longer buffered
        (or the id is not one of this daemon's: it restarted)."""
        subscription = Subscription(self.queue_size)
        if last_event_id is not None:
            oldest = self._recent[0].id if self._recent else self._last_id + 1
            if last_event_id > self._last_id or last_event_id + 1 < oldest:
                subscription.lost = True
            for event in self._recent:
                if event.id > last_event_id:
                    subscription.offer(event)
        self._subscribers.append(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscribers:
            self._subscribers.remove(subscription)

    def close(self) -> None:
        """End every subscription (the daemon is stopping)."""
        for subscription in self._subscribers:
            subscription.close()
        self._subscribers.clear()

    # -- what the engine and the API publish ------------------------------------------

    def timeline(
        self,
        record: MigrationRecord,
        at: float,
        kind: str,
        reason: str,
        action: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        """A timeline entry of `record` (as it is after the entry), recorded at `at`."""

        def build() -> dict[str, Any]:
            details = data or {}
            origin = details.get("origin")
            body = schemas.MigrationEventData(
                migration=record.id,
                instance=record.instance,
                at=datetime.fromtimestamp(at, UTC),
                kind=kind,
                state=record.state,
                action=action,
                reason=reason,
                origin=origin if isinstance(origin, str) else None,
                prediction=schemas.prediction_out(prediction_from(details.get("prediction"))),
            )
            return schemas.dump(body)

        self.publish(kind, build)

    def progress(self, record: MigrationRecord, at: float) -> None:
        """The progress `record` holds (immutable: built later, it is still this one's).

        Only while someone listens: progress is a snapshot the next one replaces, so
        none is kept for replay when there is nobody to send it to."""
        progress = record.progress
        if progress is None or not self._subscribers:
            return

        def build() -> dict[str, Any]:
            body = schemas.ProgressEventData(
                migration=record.id,
                instance=record.instance,
                at=datetime.fromtimestamp(at, UTC),
                state=record.state,
                progress=schemas.progress_out(progress),
                prediction=schemas.prediction_out(progress.prediction),
            )
            return schemas.dump(body)

        self.publish(PROGRESS, build)

    def profiles(
        self,
        at: float,
        *,
        loaded: bool,
        source: str,
        generation: int,
        profiles: list[str],
        detail: str | None = None,
    ) -> None:
        body = schemas.ProfilesEventData(
            at=datetime.fromtimestamp(at, UTC),
            loaded=loaded,
            source=source,
            generation=generation,
            profiles=profiles,
            detail=detail,
        )
        self.publish("profiles", schemas.dump(body))
