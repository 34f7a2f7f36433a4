"""The HTTP API (DESIGN §5): aiohttp routes, bearer auth, problem+json errors.

Handlers validate everything they are given before they call the engine, and the
engine refuses before it records anything, so a bad request changes nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from lmwatch import schemas
from lmwatch.drivers.base import DriverError
from lmwatch.engine import Engine
from lmwatch.engine.drains import eta as item_eta
from lmwatch.engine.drains import fraction
from lmwatch.errors import ProblemError
from lmwatch.events import RESYNC, EventHub, HubEvent
from lmwatch.logs import get_logger
from lmwatch.metrics import CONTENT_TYPE_LATEST, Metrics
from lmwatch.model import MigrationRequest, State
from lmwatch.profiles import ProfileError, ProfileRegistry, SelectionError
from lmwatch.store import DrainRecord, ItemState, MigrationRecord, StoreError, StoreUnwritable

if TYPE_CHECKING:
    from lmwatch.cluster.commands import Kind  # psycopg: there with a PostgreSQL store

log = get_logger("lmwatch.api")

ENGINE: web.AppKey[Engine] = web.AppKey("engine", Engine)
REGISTRY: web.AppKey[ProfileRegistry] = web.AppKey("registry", ProfileRegistry)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
TOKEN: web.AppKey[str] = web.AppKey("token", str)
READ_TOKEN: web.AppKey[str] = web.AppKey("read_token", str)  # "": reads are open
OPENAPI: web.AppKey[dict[str, Any]] = web.AppKey("openapi", dict)
HUB: web.AppKey[EventHub] = web.AppKey("hub", EventHub)
BODY_TIMEOUT: web.AppKey[float] = web.AppKey("body_timeout", float)

MAX_IDEMPOTENCY_KEY = 255
MAX_BODY = schemas.MAX_BODY
IDEMPOTENCY_KEY = re.compile(schemas.IDEMPOTENCY_KEY_PATTERN)
LABELS = re.compile(schemas.LABELS_PATTERN)
_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Payload Too Large",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An answer other than success; rendered as application/problem+json."""

    def __init__(
        self,
        status: int,
        kind: str,
        detail: str,
        *,
        errors: list[schemas.FieldError] | None = None,
        problems: list[schemas.ProblemLocation] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail
        self.errors = errors
        self.problems = problems
        self.headers = headers or {}


def problem_response(error: ApiError) -> web.Response:
    body = schemas.Problem(
        type=f"urn:lmwatch:problem:{error.kind}",
        title=_TITLES.get(error.status, "Error"),
        status=error.status,
        detail=error.detail,
        errors=error.errors,
        problems=error.problems,
    )
    return web.Response(
        status=error.status,
        text=json.dumps(body.model_dump(mode="json", exclude_none=True)),
        content_type=schemas.PROBLEM_JSON,
        headers=error.headers,
    )


def _json(
    model: BaseModel, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(schemas.dump(model), status=status, headers=headers)


# --- middlewares ----------------------------------------------------------------------


@web.middleware
async def _problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into problem+json; nothing else leaves as an error page."""
    try:
        return await handler(request)
    except ApiError as error:
        return problem_response(error)
    except ProblemError as error:
        return problem_response(ApiError(error.status, error.kind, error.message))
    except DriverError as error:
        return problem_response(
            ApiError(503, "hypervisor-error", f"the hypervisor failed: {error}")
        )
    except StoreError as error:
        log.error("store-error", path=request.path, error=str(error))
        detail = str(error) if isinstance(error, StoreUnwritable) else "the store cannot be written"
        return problem_response(ApiError(503, "store-error", f"{detail}; retry later"))
    except web.HTTPException as error:
        if error.status < 400:
            raise
        headers = {k: v for k, v in error.headers.items() if k.lower() == "allow"}
        detail = error.text if error.text and error.status != 404 else error.reason
        if error.status == 404:
            detail = f"no such resource: {request.path}"
        return problem_response(
            ApiError(error.status, error.reason.lower().replace(" ", "-"), detail, headers=headers)
        )
    except Exception as error:  # a bug: say so without leaking internals
        log.exception("api-error", path=request.path, error=repr(error))
        return problem_response(ApiError(500, "internal", "internal error; see the daemon log"))


def _decodable(text: str) -> bool:
    """False for text with bytes that were not UTF-8 (aiohttp keeps them as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@web.middleware
async def _well_formed(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse (400) a path, query or header that is not UTF-8, naming only where it is
    (a header's value may be a credential), and read a body within the body timeout
    (408) and size limit (413) before anything looks at it."""
    where = None
    if not _decodable(request.path) or not _decodable(request.query_string):
        where = "the request target"
    else:
        for name, value in request.headers.items():
            if not _decodable(name):
                where = "a header name"
                break
            if not _decodable(value):
                where = f"the {name} header" if _decodable(name) else "a header"
                break
    if where is not None:
        raise ApiError(400, "malformed", f"{where} is not valid UTF-8")
    if request.body_exists and request.method not in READS:
        try:
            async with asyncio.timeout(request.app.get(BODY_TIMEOUT, 30.0)):
                await request.read()
        except TimeoutError:
            error = ApiError(408, "body-timeout", "the request body did not arrive in time")
            error.headers["Connection"] = "close"
            response = problem_response(error)
            response.force_close()
            return response
    return await handler(request)


READS = ("GET", "HEAD", "OPTIONS")


def _same(given: str, expected: str) -> bool:
    if not given or not expected or not _decodable(given):
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every mutating call needs `Authorization: Bearer <token>`. With a read token
    configured, reads need either token too, except health, readiness and this API's
    description (schemas.OPEN_READS)."""
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    given = given.strip() if scheme.lower() == "bearer" else ""
    token, read_token = request.app[TOKEN], request.app[READ_TOKEN]
    is_token, is_read_token = _same(given, token), _same(given, read_token)
    if request.method in READS:
        if not read_token or request.path in schemas.OPEN_READS or is_token or is_read_token:
            return await handler(request)
    elif is_token:
        return await handler(request)
    elif is_read_token:
        raise ApiError(403, "forbidden", "the read token does not allow changes")
    detail = "a bearer token is required" if not header else "wrong bearer token"
    raise ApiError(
        401, "unauthorized", detail, headers={"WWW-Authenticate": 'Bearer realm="lmwatch"'}
    )


# --- input ------------------------------------------------------------------------------


def _field_errors(error: ValidationError, where: str) -> list[schemas.FieldError]:
    return [
        schemas.FieldError(
            loc=[where, *detail["loc"]],
            message=detail["msg"].removeprefix("Value error, "),
            type=detail["type"],
        )
        for detail in error.errors()
    ]


def _invalid(detail: str, errors: list[schemas.FieldError]) -> ApiError:
    return ApiError(422, "invalid", detail, errors=errors)


async def _body(request: web.Request, model: type[M], *, optional: bool) -> M:
    """Parse and validate a JSON body: 400 when it is not JSON, 422 when it is wrong."""
    raw = await request.read()
    if not raw.strip():
        if optional:
            return model()
        raise ApiError(400, "malformed", "a JSON body is required")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(400, "malformed", f"the body is not valid JSON: {error}") from None
    except RecursionError:
        raise ApiError(400, "malformed", "the body is nested too deeply") from None
    except ValueError:  # an integer beyond Python's digit limit
        raise ApiError(400, "malformed", "the body has a number too long to read") from None
    try:
        return model.model_validate(data)
    except ValidationError as error:
        errors = _field_errors(error, "body")
        summary = "; ".join(
            f"{'.'.join(map(str, e.loc[1:])) or 'body'}: {e.message}" for e in errors
        )
        raise _invalid(f"invalid request body: {summary}", errors) from None


def _query_error(name: str, message: str) -> ApiError:
    return _invalid(
        f"query parameter {name!r}: {message}",
        [schemas.FieldError(loc=["query", name], message=message, type="value_error")],
    )


def _parse_labels(text: str) -> dict[str, str]:
    """`k=v,k2=v2` (schemas.LABELS_PATTERN); spaces and tabs around keys and values
    are dropped, empty parts skipped."""
    if not LABELS.fullmatch(text):
        raise _query_error("labels", f"{text!r} is not k=v,k2=v2 (keys not blank)")
    labels: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip(" \t"):
            continue
        key, _, value = part.partition("=")
        labels[key.strip(" \t")] = value.strip(" \t")
    return labels


# --- handlers ---------------------------------------------------------------------------


async def create_migration(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (
        0 < len(key) <= MAX_IDEMPOTENCY_KEY and IDEMPOTENCY_KEY.fullmatch(key)
    ):
        message = f"must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"
        raise _invalid(
            f"Idempotency-Key {message}",
            [
                schemas.FieldError(
                    loc=["header", "Idempotency-Key"], message=message, type="value_error"
                )
            ],
        )
    body = await _body(request, schemas.MigrationCreate, optional=False)
    record, replayed = await engine.submit(
        MigrationRequest(
            instance=body.instance,
            source=body.source,
            destination=body.destination,
            labels=dict(body.labels),
            profile=body.profile,
            force=body.force,
        ),
        key,
    )
    headers = {"Location": f"/v1/migrations/{record.id}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    answer = schemas.migration(record, engine.events(record.id))
    return _json(answer, 202, headers)


async def list_migrations(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    wanted = request.query.get("state")
    state: State | None = None
    if wanted is not None:
        try:
            state = State(wanted)
        except ValueError:
            known = ", ".join(s.value for s in State)
            raise _query_error("state", f"{wanted!r} is not a state (one of {known})") from None
    limit: int | None = None
    text = request.query.get("limit")
    if text is not None:
        if not (
            text.isascii()
            and text.isdigit()
            and len(text) < 8
            and 1 <= int(text) <= schemas.MAX_PAGE
        ):
            message = f"{text!r} is not a whole number from 1 to {schemas.MAX_PAGE}"
            raise _query_error("limit", message)
        limit = int(text)
    after = request.query.get("after")
    if after is not None and limit is None:
        limit = schemas.MAX_PAGE
    if limit is None:
        # The whole table: read and rendered in worker threads, not on the event loop
        # (the live records of supervised migrations are laid over it).
        everything = await engine.list_everything(state)
        rendered = await asyncio.to_thread(_whole_list, everything)
        return web.Response(body=rendered, content_type="application/json")
    # Running migrations come with the fresher progress they hold in memory.
    records = engine.list(state, limit=limit, after=after)
    cursor = records[-1].id if len(records) == limit else None
    page = schemas.MigrationList(
        migrations=[schemas.migration_summary(r) for r in records], next=cursor
    )
    return _json(page)


def _whole_list(records: list[MigrationRecord]) -> bytes:
    """The unpaged answer (what it always was: no `next`), as JSON."""
    body = schemas.dump(
        schemas.MigrationList(migrations=[schemas.migration_summary(r) for r in records])
    )
    del body["next"]
    return json.dumps(body).encode()


async def get_migration(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    migration_id = request.match_info["id"]
    record = engine.get(migration_id)
    return _json(schemas.migration(record, engine.events(migration_id)))


async def force_complete(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    migration_id = request.match_info["id"]
    engine.get(migration_id)  # 404 before looking at the body
    body = await _body(request, schemas.ForceCompleteRequest, optional=True)
    if engine.elsewhere(migration_id):
        return await _relayed(engine, migration_id, "force-complete", body.accept_pause)
    decision = await engine.force_complete(migration_id, accept_pause=body.accept_pause)
    record = engine.get(migration_id)
    blackout = None if decision.prediction is None else decision.prediction.blackout_seconds
    answer = schemas.ForceCompleteResponse(
        migration=schemas.migration(record, engine.events(migration_id)),
        decision=schemas.DecisionOut(
            action=decision.action, reason=decision.reason, predicted_blackout_seconds=blackout
        ),
    )
    return _json(answer, 202)


async def cancel_migration(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    migration_id = request.match_info["id"]
    if engine.elsewhere(migration_id):
        return await _relayed(engine, migration_id, "cancel")
    record = await engine.cancel(migration_id)
    return _json(schemas.migration(record, engine.events(migration_id)), 202)


async def _relayed(
    engine: Engine, migration_id: str, kind: Kind, accept_pause: bool = False
) -> web.Response:
    """An operator's command on a migration another daemon supervises: passed on through
    the database; the owner's answer, as its own API gives it (the record as the store
    holds it once the owner wrote it), or `CommandPending` when none came in time."""
    assert engine.relay is not None
    params = {"accept_pause": accept_pause} if kind == "force-complete" else {}
    command, outcome = await engine.relay.ask(migration_id, kind, params)
    migration = schemas.migration(engine.get(migration_id), engine.events(migration_id))
    if outcome is None:
        pending = schemas.CommandPending(
            pending=schemas.PendingCommand(
                id=command.id,
                kind=kind,
                accept_pause=accept_pause,
                posted_at=command.posted_at,
                posted_through=command.posted_by,
            ),
            detail=f"migration {migration_id} is supervised by another daemon, which did not "
            f"answer within {engine.relay.wait:g} s; the {kind} is recorded (command "
            f"{command.id}) and is carried out when a daemon supervising the migration takes "
            "it; its outcome shows on the migration's timeline",
            migration=migration,
        )
        return _json(pending, 202, {"Location": f"/v1/migrations/{migration_id}"})
    if outcome.outcome == "refused":
        raise ApiError(outcome.status, outcome.problem or "conflict", outcome.detail or "")
    if kind == "cancel":
        return _json(migration, 202)
    assert outcome.result is not None
    decision = schemas.DecisionOut(**outcome.result)
    return _json(schemas.ForceCompleteResponse(migration=migration, decision=decision), 202)


def drain_out(engine: Engine, drain: DrainRecord) -> schemas.Drain:
    """A drain as the API shows it: each instance with its migration's live progress."""
    drains = engine.drains
    entries = []
    for item in drain.items:
        record = drains.migration(item)
        entries.append(
            schemas.DrainEntry(
                instance=item.instance,
                state=item.state.value,
                migration_id=item.migration_id,
                destination=item.destination,
                migration_state=None if record is None else record.state,
                progress=fraction(item, record),
                eta_seconds=item_eta(item, record, engine.clock.now()),
                expected_seconds=item.expected_seconds,
                memory_bytes=item.memory_bytes,
                attempts=[schemas.DrainAttempt(destination=d, reason=r) for d, r in item.attempts],
                reason=item.reason,
                warning=item.warning,
                moves=item.moves,
            )
        )
    moved = sum(1 for i in drain.items if i.state is ItemState.MOVED)
    return schemas.Drain(
        id=drain.id,
        host=drain.host,
        state=drain.state.value,
        destinations=None if drain.destinations is None else list(drain.destinations),
        profile=drain.profile,
        created_at=schemas.timestamp(drain.created_at),
        finished_at=schemas.timestamp(drain.finished_at),
        reason=drain.reason,
        instances_total=len(drain.items),
        instances_moved=moved,
        instances_remaining=len(drain.items) - moved,
        blocked=[i.instance for i in drain.items if i.state is ItemState.BLOCKED],
        at_risk=[i.instance for i in drain.items if i.warning and i.state is ItemState.PENDING],
        eta_seconds=drains.eta(drain),
        instances=entries,
    )


async def create_drain(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    body = await _body(request, schemas.DrainCreate, optional=False)
    drain = await engine.drains.submit(body.host, body.destinations, body.profile)
    headers = {"Location": f"/v1/drains/{drain.id}"}
    return _json(drain_out(engine, drain), 202, headers)


async def list_drains(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    answer = schemas.DrainList(drains=[drain_out(engine, d) for d in engine.drains.list()])
    return _json(answer)


async def get_drain(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    return _json(drain_out(engine, engine.drains.get(request.match_info["id"])))


async def cancel_drain(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    drain = await engine.drains.cancel(request.match_info["id"])
    return _json(drain_out(engine, drain), 202)


async def list_profiles(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    answer = schemas.ProfilesOut(
        source=registry.source,
        generation=registry.generation,
        loaded_at=schemas.timestamp(registry.loaded_at),
        profiles=list(registry.current.profiles),
    )
    return _json(answer)


async def explain_profile(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    registry = request.app[REGISTRY]
    instance = request.match_info["instance"]
    extra = _parse_labels(request.query.get("labels", ""))
    requested = request.query.get("profile") or None
    info = await engine.driver.describe(instance)
    uuid = request.query.get("uuid") or info.uuid
    labels = {**info.labels, **extra}
    try:
        selection = registry.explain(instance, uuid, labels, requested)
    except SelectionError as error:
        raise ApiError(422, "no-profile", error.message) from None
    answer = schemas.ProfileSelectionOut(
        instance=instance,
        uuid=uuid,
        labels=labels,
        requested=requested,
        profile=selection.profile,
        reason=selection.reason,
        candidates=[schemas.candidate(c) for c in selection.candidates],
    )
    return _json(answer)


async def explain_placement(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    instance = request.match_info["instance"]
    text = request.query.get("destinations")
    destinations = None
    if text is not None:
        destinations = [part.strip(" \t") for part in text.split(",") if part.strip(" \t")]
        if not destinations:
            raise _query_error("destinations", f"{text!r} names no host (a,b)")
    requested = request.query.get("profile") or None
    placement = await engine.place(instance, destinations=destinations, profile=requested)
    return _json(schemas.placement_out(placement))


async def reload_profiles(request: web.Request) -> web.Response:
    registry = request.app[REGISTRY]
    try:
        result = registry.reload()
    except ProfileError as error:
        count = len(error.problems)
        raise ApiError(
            422,
            "invalid-profiles",
            f"{registry.source} has {count} problem{'s' if count != 1 else ''}; "
            f"the profiles of generation {registry.generation} stay in force",
            problems=schemas.problems_out(error.problems),
        ) from None
    answer = schemas.ReloadOut(
        source=registry.source,
        generation=result.generation,
        loaded_at=schemas.timestamp(registry.loaded_at),
        profiles=[p.name for p in registry.current.profiles],
    )
    return _json(answer)


async def metrics(request: web.Request) -> web.Response:
    # Five series per running migration: thousands of lines at scale. Rendered in a
    # thread, so that a scrape does not hold up every supervisor for its duration.
    response = web.Response(body=await asyncio.to_thread(request.app[METRICS].render))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


async def healthz(request: web.Request) -> web.Response:
    return _json(schemas.Health(status="ok"))


async def readyz(request: web.Request) -> web.Response:
    """Ready while the store answers and takes writes, its file is the one open, and
    every host answers; otherwise 503 saying what is wrong (the store first)."""
    engine = request.app[ENGINE]
    answers = engine.store.healthy()  # first: a database that does not answer says why
    store_problem = engine.store.check_file()
    store_ok = answers and store_problem is None
    detail: str | None = None
    try:
        hosts = dict(await engine.driver.reachable())
    except Exception as error:
        hosts = {}
        detail = f"cannot ask the hosts: {error}"
    down = sorted(name for name, up in hosts.items() if not up)
    if store_problem is not None:
        detail = store_problem
    elif not store_ok:
        detail = "the store does not answer"
    elif down and detail is None:
        detail = "unreachable: " + ", ".join(down)
    role: schemas.Role | None = None
    membership = engine.membership
    if membership is not None:
        acting = membership.may_act()
        role = schemas.Role(
            member=membership.name,
            may_act=acting,
            leases=membership.held_by_kind(),
            migrations_owned=len(engine.supervised()),
            database_reachable=membership.reachable,
        )
        if not acting and detail is None:
            detail = f"member {membership.name} holds no running lease on the store database"
    ready = store_ok and detail is None
    answer = schemas.Readiness(ready=ready, store=store_ok, hosts=hosts, detail=detail, role=role)
    return _json(answer, 200 if ready else 503)


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


# --- events and the status page -----------------------------------------------------------


def _last_event_id(request: web.Request) -> int | None:
    text = request.headers.get("Last-Event-ID", "").strip()
    return int(text) if text.isdigit() else None


def _encoded(event: HubEvent) -> bytes:
    """The event's bytes; an event that cannot be built is left out (and logged)."""
    try:
        return event.encode()
    except Exception as error:  # a bug: the stream goes on without this event
        log.exception("event-not-sent", id=event.id, type=event.type, error=repr(error))
        return b""


async def events(request: web.Request) -> web.StreamResponse:
    """GET /v1/events: the hub's events as text/event-stream, until the client goes."""
    hub = request.app[HUB]
    subscription = hub.subscribe(_last_event_id(request))
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    try:
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        while True:
            if subscription.lost:
                subscription.lost = False
                reason = "events were lost; reload GET /v1/migrations"
                data = json.dumps(schemas.dump(schemas.ResyncEventData(reason=reason)))
                await response.write(f"event: {RESYNC}\ndata: {data}\n\n".encode())
            taken = await subscription.take(hub.keepalive)
            if taken is None:
                break  # the daemon is stopping
            if not taken:
                await response.write(b": keep-alive\n\n")
                continue
            await response.write(b"".join(_encoded(event) for event in taken))
    except ConnectionResetError:
        pass  # the client went away
    finally:
        hub.unsubscribe(subscription)
    return response


_STATUS_PAGE: bytes | None = None


async def status_page(request: web.Request) -> web.Response:
    global _STATUS_PAGE
    if _STATUS_PAGE is None:
        _STATUS_PAGE = resources.files("lmwatch").joinpath("data/status.html").read_bytes()
    return web.Response(
        body=_STATUS_PAGE,
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


def _publish_reloads(registry: ProfileRegistry, hub: EventHub, engine: Engine) -> None:
    """Profile reloads, however triggered, go out as `profiles` events."""

    def names() -> list[str]:
        return [p.name for p in registry.current.profiles]

    def loaded(_new: object) -> None:
        hub.profiles(
            engine.clock.now(),
            loaded=True,
            source=registry.source,
            generation=registry.generation,
            profiles=names(),
        )

    def rejected(error: ProfileError) -> None:
        count = len(error.problems)
        hub.profiles(
            engine.clock.now(),
            loaded=False,
            source=registry.source,
            generation=registry.generation,
            profiles=names(),
            detail=f"{count} problem{'s' if count != 1 else ''}; the profiles in force stay",
        )

    registry.subscribe(loaded)
    registry.on_failure(rejected)


def create_app(
    engine: Engine,
    registry: ProfileRegistry,
    metrics_: Metrics,
    token: str,
    *,
    read_token: str | None = None,
    body_timeout: float = 30.0,
) -> web.Application:
    """The API application; `token` guards every POST, and with `read_token` every
    read but health, readiness and /openapi.json needs one of the two.

    Rejected profile reloads are counted in `metrics_` from here on, whatever
    triggers them (this endpoint, a file change, SIGHUP).
    """
    if not token:
        raise ValueError("an API token is required")
    metrics_.count_reload_failures(registry)
    metrics_.count_violations_from_zero(registry)
    metrics_.publish_profile_limits(registry)
    app = web.Application(middlewares=[_problems, _well_formed, _auth], client_max_size=MAX_BODY)
    app[ENGINE] = engine
    app[REGISTRY] = registry
    app[METRICS] = metrics_
    app[TOKEN] = token
    app[READ_TOKEN] = read_token or ""
    app[OPENAPI] = schemas.openapi_document()
    app[HUB] = engine.hub
    app[BODY_TIMEOUT] = body_timeout
    _publish_reloads(registry, engine.hub, engine)

    async def _close_streams(_app: web.Application) -> None:
        engine.hub.close()  # open event streams end, so that shutdown does not wait

    app.on_shutdown.append(_close_streams)
    app.router.add_post("/v1/migrations", create_migration)
    app.router.add_get("/v1/migrations", list_migrations)
    app.router.add_get("/v1/migrations/{id}", get_migration)
    app.router.add_post("/v1/migrations/{id}/force-complete", force_complete)
    app.router.add_post("/v1/migrations/{id}/cancel", cancel_migration)
    app.router.add_post("/v1/drains", create_drain)
    app.router.add_get("/v1/drains", list_drains)
    app.router.add_get("/v1/drains/{id}", get_drain)
    app.router.add_post("/v1/drains/{id}/cancel", cancel_drain)
    app.router.add_get("/v1/profiles", list_profiles)
    app.router.add_post("/v1/profiles/reload", reload_profiles)
    app.router.add_get("/v1/instances/{instance}/profile", explain_profile)
    app.router.add_get("/v1/instances/{instance}/placement", explain_placement)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/v1/events", events)
    app.router.add_get("/", status_page)
    return app
