"""The HTTP API's bodies (pydantic), their conversion from engine records, and the
OpenAPI document built from them.

Request models refuse unknown fields; response models declare exactly the fields
they carry (`additionalProperties: false`), so the OpenAPI document is a contract
the tests hold every real answer to. Times are RFC 3339 strings in UTC, sizes
bytes, durations seconds, rates bytes/second.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    WithJsonSchema,
    model_validator,
)
from pydantic.json_schema import models_json_schema

from lmwatch import records
from lmwatch.model import Action, Method, Prediction, State
from lmwatch.policies.placement import Placement
from lmwatch.profiles.schema import Profile
from lmwatch.store import Event, MigrationRecord

PROBLEM_JSON = "application/problem+json"
MAX_BODY = 1024**2  # bytes; a larger request body is answered 413
# Printable ASCII, no leading or trailing space (HTTP would drop it).
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]([ -~]*[!-~])?$"
# `k=v,k2=v2`: parts separated by commas, each blank or key=value with a key that is not
# blank; spaces and tabs around keys and values are dropped.
_LABEL_PART = r"([ \t]*|[ \t]*[^,= \t][^,=]*=[^,]*)"
LABELS_PATTERN = rf"^{_LABEL_PART}(,{_LABEL_PART})*$"


def _rfc3339(value: datetime) -> str:
    """UTC with milliseconds always present, so that the strings sort like the times."""
    text = value.astimezone(UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


Timestamp = Annotated[
    datetime,
    PlainSerializer(_rfc3339, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


class _Request(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# --- requests -----------------------------------------------------------------------


class MigrationCreate(_Request):
    """Ask lmwatch to migrate an instance. `source` and `destination` must differ
    (JSON Schema cannot say so; a body with the same host twice is answered 422).
    Without `destination` lmwatch chooses one; `force` needs a destination (else 422)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-distinct": [["source", "destination"]],
            # force needs a named destination
            "if": {"properties": {"force": {"const": True}}, "required": ["force"]},
            "then": {
                "required": ["destination"],
                "properties": {"destination": {"type": "string"}},
            },
            "examples": [
                {"instance": "web-1", "source": "host-a", "destination": "host-b"},
                {"instance": "web-1", "source": "host-a"},
            ],
        }
    )

    instance: str = Field(min_length=1, max_length=255, description="Instance name or uuid.")
    source: str = Field(min_length=1, max_length=255, description="Host it runs on now.")
    destination: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="Host to move it to; not the source (else 422). Left out: lmwatch "
        "chooses among every configured host (see GET /v1/instances/{instance}/placement).",
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Labels added to the instance's own for profile selection.",
    )
    profile: str | None = Field(
        default=None,
        min_length=1,
        description="Name of a loaded profile (else 422); overrides selection.",
    )

    force: StrictBool = Field(
        default=False,
        description="With a destination: skip the capacity checks (free memory and what "
        "queued and running migrations reserve there), never the checks protecting the "
        "instance (CPU, pinning, devices, name taken) nor the group rule. Recorded in the "
        "timeline and the metrics.",
    )

    @model_validator(mode="after")
    def _two_hosts(self) -> MigrationCreate:
        if self.source == self.destination:
            raise ValueError("source and destination are the same host")
        if self.force and self.destination is None:
            raise ValueError("force needs a named destination")
        return self


class ForceCompleteRequest(_Request):
    """Finish now, in the least disruptive way the profile allows."""

    accept_pause: StrictBool = Field(
        default=False,
        description="Accept a pause beyond the profile when it allows no other way.",
    )


class DrainCreate(_Request):
    """Move every instance off a host. `destinations` must not name the host itself
    (JSON Schema cannot say so; such a body is answered 422)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-not-containing": [["destinations", "host"]],
            "examples": [{"host": "host-a"}, {"host": "host-a", "destinations": ["host-b"]}],
        }
    )

    host: str = Field(min_length=1, max_length=255, description="Host to empty.")
    destinations: list[Annotated[str, Field(min_length=1, max_length=255)]] | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Only these hosts may receive its instances (each known, else 404; "
        "not the drained host, else 422). Left out: lmwatch chooses among all hosts.",
    )
    profile: str | None = Field(
        default=None,
        min_length=1,
        description="Name of a loaded profile (else 422) for every migration of the drain; "
        "left out: each instance's own profile is selected.",
    )

    @model_validator(mode="after")
    def _not_itself(self) -> DrainCreate:
        if self.destinations is not None and self.host in self.destinations:
            raise ValueError(f"destinations include the drained host {self.host} itself")
        return self


# --- responses ----------------------------------------------------------------------


class ProfileApplied(_Response):
    name: str
    reason: str = Field(description="Why this profile applies.")
    requested: str | None = Field(description="Profile named in the request, if any.")


class DiskProgress(_Response):
    """The copy of the instance's local disks: copied first, while it runs; once in
    sync they stay mirrored and memory is copied."""

    total_bytes: int
    remaining_bytes: int = Field(description="Still to copy before the disks are in sync.")
    percent_copied: float = Field(ge=0, le=100)
    rate_bytes_per_second: float = Field(description="How fast the disk copy moves.")
    in_sync: bool = Field(
        description="The disks are whole on the destination; memory is copied only then, "
        "and nothing stops or moves the instance before."
    )


class Progress(_Response):
    memory_total_bytes: int
    memory_remaining_bytes: int
    memory_transferred_bytes: int
    percent_copied: float = Field(ge=0, le=100)
    passes: int
    transfer_rate_bytes_per_second: float
    change_rate_bytes_per_second: float
    blackout_budget_seconds: float
    slowdown: float = Field(description="Fraction of guest CPU taken away (0..1).")
    disk: DiskProgress | None = Field(
        default=None,
        description="The instance's local disks that move with it; null when it has none "
        "(its storage is shared).",
    )


class PredictionOut(_Response):
    eta_seconds: float | None = Field(description="Null when it will not finish on its own.")
    blackout_seconds: float | None = Field(description="Predicted final pause if completed now.")
    converges: bool | None = Field(description="Null before there is evidence.")
    confidence: float = Field(ge=0, le=1)
    floor_bytes: int | None = Field(description="Remainder copying settles at.")


class TimelineEntry(_Response):
    at: Timestamp
    kind: str = Field(
        description="state, decision, note, error, or violation (the profile was exceeded)."
    )
    action: str | None
    state: State | None
    reason: str


class Outcome(_Response):
    method: Method
    total_seconds: float
    blackout_seconds: float | None = Field(
        description="How long the instance was stopped at the end: the measured final "
        "pause of a completed migration; for one that did not complete, until the "
        "instance ran again on the source. Null when it was not stopped or is not known."
    )
    passes: int
    transferred_bytes: int
    error: str | None


class PlacementApplied(_Response):
    """How the destination was placed: chosen by lmwatch, named (and checked), or forced."""

    how: Literal["chosen", "named", "forced"]
    reason: str


class MigrationSummary(_Response):
    """A migration without its decision timeline (as listed)."""

    id: str
    instance: str
    source: str
    destination: str
    labels: dict[str, str]
    state: State
    profile: ProfileApplied
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    deadline_at: Timestamp | None
    progress: Progress | None
    prediction: PredictionOut | None
    outcome: Outcome | None
    placement: PlacementApplied | None = Field(
        description="How the destination was placed; null for migrations accepted before "
        "lmwatch recorded it."
    )
    restarts: int = Field(
        default=0,
        description="Times lmwatch started copying again from the beginning: with a "
        "higher slow-down start level, because the guest's writing outgrew the start plan, "
        "after a pause the link stretched beyond its bound, or after a job that failed with "
        "the instance still on the source (the timeline says why).",
    )
    starting_again_by: Timestamp | None = Field(
        default=None,
        description="While copying waits to start again (the job ended: it failed with the "
        "instance still on the source, or lmwatch stopped it to start again, after a pause "
        "the link slowed or stalled under or at a higher slow-down level, and the hosts "
        "have not taken a new job yet; the state is `starting` once they refused one): "
        "the last time a new job is tried, every few seconds until then; the migration "
        "ends failed, the instance on the source, if none starts. Null otherwise.",
    )


class Migration(MigrationSummary):
    """A migration with its decision timeline."""

    timeline: list[TimelineEntry]


MAX_PAGE = 1000  # most migrations one page of the list holds (`?limit=`)


class MigrationList(_Response):
    migrations: list[MigrationSummary]
    next: str | None = Field(
        default=None,
        description="With `?limit=`: the cursor of the next page (pass it as `?after=`); "
        "null on the last page and without `limit`.",
    )


class DecisionOut(_Response):
    action: Action
    reason: str
    predicted_blackout_seconds: float | None


class ForceCompleteResponse(_Response):
    migration: Migration
    decision: DecisionOut


class PendingCommand(_Response):
    """An operator's command recorded in the database the daemons share, for the
    daemon supervising the migration, and not carried out yet."""

    id: int = Field(
        description="The command's number; its outcome shows on the migration's timeline with it."
    )
    kind: Literal["cancel", "force-complete"]
    accept_pause: bool = Field(
        description="force-complete: whether a pause beyond the profile was accepted."
    )
    posted_at: Timestamp
    posted_through: str = Field(description="The daemon that recorded it.")


class CommandPending(_Response):
    """The answer (202) when another daemon supervises the migration and did not answer
    in time: the command is recorded and is carried out when a daemon supervising the
    migration takes it (it is not lost if that daemon stops); its outcome then shows on
    the migration's timeline. Sending it again is not needed."""

    pending: PendingCommand
    detail: str
    migration: Migration


class ProfilesOut(_Response):
    source: str = Field(description="File the profiles were loaded from.")
    generation: int = Field(description="Increases with every successful load.")
    loaded_at: Timestamp | None
    profiles: list[Profile]


class Candidate(_Response):
    name: str
    reason: str


class ProfileSelectionOut(_Response):
    instance: str
    uuid: str | None
    labels: dict[str, str]
    requested: str | None
    profile: Profile
    reason: str
    candidates: list[Candidate] = Field(description="Profiles considered, best first.")


class PlacementCandidate(_Response):
    """One host considered as a destination, as seen when asked."""

    host: str
    accepted: bool = Field(description="Whether it could take the instance.")
    reason: str | None = Field(description="Why not, when rejected.")
    free_memory: int | None = Field(description="Bytes the host reports free; null: unknown.")
    reserved: int = Field(description="Bytes queued and running migrations to it reserve.")
    reservations: int = Field(description="Migrations holding those reservations.")
    available: int | None = Field(description="free_memory less reserved; null: unknown.")
    handover: bool = Field(description="Whether the pair can hand over early.")
    bandwidth: float | None = Field(description="Bytes/s from the source, when known.")
    arriving: int = Field(description="Migrations queued or running to it.")
    leaving: int = Field(description="Migrations queued or running from it.")
    groups: list[str] = Field(description="`group` labels of instances there or arriving.")
    drain: str | None = Field(
        description="The drain emptying the host, when one is: such a host is never chosen."
    )


class PlacementOut(_Response):
    """Where lmwatch would move an instance now, and why; nothing is moved."""

    instance: str
    source: str
    destination: str | None = Field(description="The chosen host; null when none fits.")
    reason: str
    rejected: dict[str, str] = Field(description="Host -> why it was rejected.")
    candidates: list[PlacementCandidate] = Field(description="Every host considered, by name.")


class ReloadOut(_Response):
    source: str
    generation: int
    loaded_at: Timestamp | None
    profiles: list[str] = Field(description="Names of the loaded profiles, in file order.")


class Health(_Response):
    status: Literal["ok"]


class Role(_Response):
    """This daemon's part among the daemons sharing one database (docs/cluster.md)."""

    member: str = Field(description="This daemon's name among them.")
    may_act: bool = Field(description="Its lease runs: it may act on the migrations it owns.")
    leases: dict[str, int] = Field(
        description="Leases held by kind: host (source hosts), migration."
    )
    migrations_owned: int = Field(description="Migrations it supervises now.")
    database_reachable: bool = Field(description="The database answered its last lease round.")


class Readiness(_Response):
    ready: bool
    store: bool = Field(
        description="The store answers, takes writes and its file is the one lmwatch opened."
    )
    hosts: dict[str, bool] = Field(description="Host name -> whether it answers.")
    detail: str | None = None
    role: Role | None = Field(
        default=None, description="With a store database shared by several daemons: this one's."
    )


class MigrationEventData(_Response):
    """The data of a `state`, `decision`, `note`, `error` or `violation` event: one
    entry of a migration's timeline, as it is recorded."""

    migration: str = Field(description="Migration id.")
    instance: str
    at: Timestamp
    kind: str = Field(description="The event type again: state, decision, note, error, violation.")
    state: State = Field(description="The migration's state after this entry.")
    action: str | None = Field(description="Decisions: the action taken (start, continue, ...).")
    reason: str
    origin: str | None = Field(description="Decisions: `policy` or `operator`.")
    prediction: PredictionOut | None = Field(description="Decisions: the prediction behind it.")


class ProgressEventData(_Response):
    """The data of a `progress` event: one sample of a running migration."""

    migration: str = Field(description="Migration id.")
    instance: str
    at: Timestamp
    state: State
    progress: Progress
    prediction: PredictionOut | None = Field(description="ETA and predicted final pause.")


class ProfilesEventData(_Response):
    """The data of a `profiles` event: the profiles file was (or failed to be) reloaded."""

    at: Timestamp
    loaded: bool = Field(description="False: the file was rejected; the old set stays.")
    source: str
    generation: int = Field(description="Generation in force after this reload.")
    profiles: list[str] = Field(description="Names of the profiles in force.")
    detail: str | None = Field(description="Why the file was rejected.")


class ResyncEventData(_Response):
    """The data of a `resync` event: events were lost; reload GET /v1/migrations."""

    reason: str


class DrainAttempt(_Response):
    destination: str
    reason: str = Field(description="Why the instance did not move there.")


class DrainEntry(_Response):
    """One instance of a drain: where its move stands."""

    instance: str
    state: Literal[
        "pending", "submitting", "migrating", "moved", "blocked", "failed", "cancelled"
    ] = Field(
        description="pending: waiting for a slot; submitting/migrating: its migration is "
        "being handed over / under way; moved: off the host; blocked: no host can take it "
        "(`reason` says why); failed: its migration ended without moving it and is not "
        "retried (e.g. its profile cancelled it); cancelled: the drain was cancelled first."
    )
    migration_id: str | None = Field(description="Its current migration (GET /v1/migrations/{id}).")
    destination: str | None
    migration_state: State | None = Field(description="State of that migration.")
    progress: float = Field(ge=0, le=1, description="Fraction of its memory copied (1: moved).")
    eta_seconds: float | None = Field(
        description="Seconds until its move ends: the migration's prediction while it runs "
        "(in its first pass, what the disk copy and that pass still take; its deadline when "
        "it will not finish on its own), the expected duration before; null when nothing "
        "says."
    )
    expected_seconds: float = Field(description="Expected duration of its move (the ordering).")
    memory_bytes: int
    attempts: list[DrainAttempt] = Field(description="Destinations tried before, and why not.")
    reason: str = Field(description="What happened to it last, in words.")
    warning: str = Field(
        description="Said at submission: why it may find no room at its turn (the hosts' "
        "room once the instances before it are placed); empty when none. It is still tried."
    )
    moves: int = Field(
        ge=0,
        description="Times this drain moved it off the host before, each time something "
        "else put it back (its current migration is a move of its own).",
    )


class Drain(_Response):
    """A drain: every instance off one host, in the order they are started."""

    id: str
    host: str
    state: Literal["running", "cancelling", "completed", "failed", "cancelled"] = Field(
        description="completed: the host is empty (or was); failed: it ended with "
        "instances still on the host (their entries say why); cancelling: nothing more is "
        "started, migrations under way go on."
    )
    destinations: list[str] | None
    profile: str | None
    created_at: Timestamp
    finished_at: Timestamp | None
    reason: str
    instances_total: int
    instances_moved: int
    instances_remaining: int = Field(description="Instances still on the host.")
    blocked: list[str] = Field(
        description="Instances that cannot leave (no host can take them, or they cannot "
        "move); known at submission for those no host can take now."
    )
    at_risk: list[str] = Field(
        description="Instances not started yet that will likely find no room once those "
        "before them are placed (each entry's `warning` says why); still tried."
    )
    eta_seconds: float | None = Field(
        description="Seconds until the host is empty (parallel moves taken into account); "
        "null when a running migration will not finish on its own and has no deadline."
    )
    instances: list[DrainEntry]


class DrainList(_Response):
    drains: list[Drain]


class FieldError(_Response):
    loc: list[str | int] = Field(description="Where: body/query/header, then field path.")
    message: str
    type: str


class ProblemLocation(_Response):
    file: str
    line: int | None = Field(default=None, description="Absent when not known.")
    column: int | None = Field(default=None, description="Absent when not known.")
    path: str
    message: str


class Problem(_Response):
    """RFC 9457 problem details."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = None
    problems: list[ProblemLocation] | None = None


# --- conversions --------------------------------------------------------------------


def timestamp(value: float | datetime | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    return datetime.fromtimestamp(value, UTC)


def progress_out(progress: records.Progress | None) -> Progress | None:
    if progress is None:
        return None
    total = progress.memory_total
    remaining = progress.memory_remaining
    percent = 0.0 if total <= 0 else min(100.0, max(0.0, 100.0 * (total - remaining) / total))
    return Progress(
        memory_total_bytes=total,
        memory_remaining_bytes=remaining,
        memory_transferred_bytes=progress.memory_transferred,
        percent_copied=percent,
        passes=progress.passes,
        transfer_rate_bytes_per_second=progress.transfer_rate,
        change_rate_bytes_per_second=progress.change_rate,
        blackout_budget_seconds=progress.blackout_budget,
        slowdown=progress.slowdown,
        disk=_disk_progress(progress),
    )


def _disk_progress(progress: records.Progress) -> DiskProgress | None:
    total = progress.disk_total
    if total <= 0:
        return None
    remaining = progress.disk_remaining
    return DiskProgress(
        total_bytes=total,
        remaining_bytes=remaining,
        percent_copied=min(100.0, max(0.0, 100.0 * (total - remaining) / total)),
        rate_bytes_per_second=progress.disk_rate,
        in_sync=remaining <= 0,
    )


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if number == number and number not in (float("inf"), float("-inf")) else None


def prediction_out(prediction: Prediction | None) -> PredictionOut | None:
    if prediction is None:
        return None
    return PredictionOut(
        eta_seconds=_finite(prediction.eta_seconds),
        blackout_seconds=_finite(prediction.blackout_seconds),
        converges=prediction.converges,
        confidence=min(1.0, max(0.0, prediction.confidence)),
        floor_bytes=prediction.floor_bytes,
    )


def _outcome(outcome: records.Outcome | None) -> Outcome | None:
    if outcome is None:
        return None
    return Outcome(
        method=outcome.method,
        total_seconds=outcome.total_seconds,
        blackout_seconds=_finite(outcome.blackout_seconds),
        passes=outcome.passes,
        transferred_bytes=outcome.transferred_bytes,
        error=outcome.error,
    )


def timeline_entry(event: Event) -> TimelineEntry:
    return TimelineEntry(
        at=datetime.fromtimestamp(event.at, UTC),
        kind=event.kind,
        action=event.action,
        state=None if event.state is None else State(event.state),
        reason=event.reason,
    )


def _summary_fields(record: MigrationRecord) -> dict[str, Any]:
    progress = record.progress
    return {
        "id": record.id,
        "instance": record.instance,
        "source": record.source,
        "destination": record.destination,
        "labels": dict(record.labels),
        "state": record.state,
        "profile": ProfileApplied(
            name=record.profile_name,
            reason=record.profile_reason,
            requested=record.requested_profile,
        ),
        "created_at": timestamp(record.created_at),
        "started_at": timestamp(record.started_at),
        "finished_at": timestamp(record.finished_at),
        "deadline_at": timestamp(record.deadline_at),
        "progress": progress_out(progress),
        "prediction": None if progress is None else prediction_out(progress.prediction),
        "outcome": _outcome(record.outcome),
        "placement": _placement(record.placement),
        "restarts": 0 if record.restart is None else record.restart.count,
        "starting_again_by": timestamp(_starting_again_by(record.restart)),
    }


def _starting_again_by(restart: records.Restarts | None) -> float | None:
    """The last time a new job is tried, while one is awaited (the intent pending)."""
    if restart is None or not restart.pending:
        return None
    return restart.start_by


def _placement(placed: records.Placed | None) -> PlacementApplied | None:
    if placed is None:
        return None
    return PlacementApplied(how=placed.how.value, reason=placed.reason)


def migration_summary(record: MigrationRecord) -> MigrationSummary:
    return MigrationSummary(**_summary_fields(record))


def migration(record: MigrationRecord, events: Iterable[Event]) -> Migration:
    return Migration(
        **_summary_fields(record), timeline=[timeline_entry(event) for event in events]
    )


def placement_out(placement: Placement) -> PlacementOut:
    """The answer of the explain call."""
    return PlacementOut(
        instance=placement.instance,
        source=placement.source,
        destination=placement.host,
        reason=placement.reason,
        rejected=dict(placement.rejected),
        candidates=[
            PlacementCandidate(
                host=c.host,
                accepted=c.host not in placement.rejected,
                reason=placement.rejected.get(c.host),
                free_memory=c.free_memory,
                reserved=c.reserved,
                reservations=c.reservations,
                available=c.available,
                handover=c.handover,
                bandwidth=c.bandwidth,
                arriving=c.arriving,
                leaving=c.leaving,
                groups=sorted(c.groups),
                drain=c.drain,
            )
            for c in sorted(placement.candidates, key=lambda c: c.host)
        ],
    )


def candidate(value: tuple[str, str]) -> Candidate:
    """One entry of a selection's candidate list: (profile name, why it matched or not)."""
    name, reason = value
    return Candidate(name=name, reason=reason)


# --- OpenAPI ------------------------------------------------------------------------

_REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    MigrationCreate,
    ForceCompleteRequest,
    DrainCreate,
)
_RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    Migration,
    MigrationList,
    ForceCompleteResponse,
    CommandPending,
    ProfilesOut,
    ProfileSelectionOut,
    PlacementOut,
    ReloadOut,
    Health,
    Readiness,
    Problem,
    MigrationEventData,
    ProgressEventData,
    ProfilesEventData,
    ResyncEventData,
    Drain,
    DrainList,
)
_REF = "#/components/schemas/{model}"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def component_schemas() -> dict[str, Any]:
    """Every body schema, generated from the models, keyed by model name."""
    models: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
        *((model, "validation") for model in _REQUEST_MODELS),
        *((model, "serialization") for model in _RESPONSE_MODELS),
    ]
    keyed, top = models_json_schema(models, ref_template=_REF)
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    for (model, _mode), schema in keyed.items():
        if "$ref" not in schema:
            schemas[model.__name__] = schema
    missing = [m.__name__ for m, _ in models if m.__name__ not in schemas]
    assert not missing, f"schemas not named after their models: {missing}"
    return schemas


def _json(model: type[BaseModel], description: str, **extra: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": _ref(model)}},
    }
    answer.update(extra)
    return answer


def _or_pending(model: type[BaseModel], description: str) -> dict[str, Any]:
    """The answer of an operator's command: `model`, or `CommandPending` when the daemon
    supervising the migration is another one and did not answer in time."""
    return {
        "description": f"{description} Several daemons on one database: the same when "
        "another daemon supervises the migration and answers within a few seconds "
        "(its refusals are answered as they are, 409 with its text); a `CommandPending` "
        "when it does not: the command is recorded and carried out when a daemon "
        "supervising the migration takes it.",
        "content": {"application/json": {"schema": {"oneOf": [_ref(model), _ref(CommandPending)]}}},
    }


def _problem(description: str, **extra: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {PROBLEM_JSON: {"schema": _ref(Problem)}},
    }
    answer.update(extra)
    return answer


_UNAUTHORIZED = _problem(
    "Missing or wrong bearer token.",
    headers={"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
)
_UNAUTHORIZED_READ = _problem(
    "Missing or wrong bearer token (only when the daemon has a read token).",
    headers={"WWW-Authenticate": {"schema": {"type": "string"}, "description": "Bearer"}},
)
_FORBIDDEN = _problem("The read token was given: it allows reads only.")
# Reads that never need a token, even when the daemon has a read token.
# The status page is static (its data comes from the API, with the token it is given).
OPEN_READS = frozenset({"/", "/healthz", "/readyz", "/openapi.json"})
_MALFORMED = _problem("The body is not JSON (malformed JSON is always 400, never 422).")
_INVALID = _problem(
    "The body or a parameter is invalid (unknown fields included); `errors` lists each "
    "field with its location."
)
_NO_MIGRATION = _problem("No migration with this id.")
_UNAVAILABLE = _problem("A host, the hypervisor or the store does not answer; nothing changed.")
_MIGRATION_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "Migration id.",
}
_SECURED: list[dict[str, list[str]]] = [{"bearer": []}]
_ID_FROM_BODY = {"id": "$response.body#/id"}
# From an answer that carries a migration to what can be done with it next.
_MIGRATION_LINKS: dict[str, Any] = {
    "GetMigration": {
        "operationId": "getMigration",
        "parameters": _ID_FROM_BODY,
        "description": "The migration just created.",
    },
    "CancelMigration": {
        "operationId": "cancelMigration",
        "parameters": _ID_FROM_BODY,
        "description": "Stop it.",
    },
    "ForceComplete": {
        "operationId": "forceComplete",
        "parameters": _ID_FROM_BODY,
        "description": "Finish it now.",
    },
}
_NO_DRAIN = _problem("No drain with this id.")
_DRAIN_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "Drain id.",
}
_DRAIN_LINKS: dict[str, Any] = {
    "GetDrain": {
        "operationId": "getDrain",
        "parameters": _ID_FROM_BODY,
        "description": "The drain just created.",
    },
    "CancelDrain": {
        "operationId": "cancelDrain",
        "parameters": _ID_FROM_BODY,
        "description": "Stop it.",
    },
}
# Every request: what the HTTP layer answers before an operation sees it.
_BAD_REQUEST = _problem(
    "The request is malformed: not HTTP, a line or header too long, a path, query or "
    "header that is not UTF-8, or the body is not JSON (malformed JSON is always 400, "
    "never 422)."
)
_TOO_LARGE = _problem(f"The body is larger than {MAX_BODY} bytes.")
_BODY_TIMEOUT = _problem("The body did not arrive within the body timeout; the connection closes.")


def _body(model: type[BaseModel], required: bool) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": _ref(model)}}}


def _paths() -> dict[str, Any]:
    states = [state.value for state in State]
    return {
        "/v1/migrations": {
            "post": {
                "operationId": "createMigration",
                "summary": "Start supervising the migration of an instance.",
                "security": _SECURED,
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": 255,
                            "pattern": IDEMPOTENCY_KEY_PATTERN,
                        },
                        "description": "Printable ASCII. The same key with the same body "
                        "returns the same migration; with another body, 409.",
                    }
                ],
                "requestBody": _body(MigrationCreate, True),
                "responses": {
                    "202": _json(
                        Migration,
                        "Accepted (or replayed for a known Idempotency-Key).",
                        headers={
                            "Location": {
                                "schema": {"type": "string"},
                                "description": "/v1/migrations/{id}",
                            },
                            "Idempotent-Replayed": {
                                "schema": {"type": "string", "enum": ["true"]},
                                "description": "Present when this answers an earlier request.",
                            },
                        },
                        links=_MIGRATION_LINKS,
                    ),
                    "400": _MALFORMED,
                    "401": _UNAUTHORIZED,
                    "404": _problem("Unknown instance or host."),
                    "409": _problem(
                        "The instance is already migrating, the Idempotency-Key was used for "
                        "another body, or the hosts refuse the move."
                    ),
                    "422": _INVALID,
                    "503": _problem(
                        "A host or the hypervisor does not answer, or the store cannot be "
                        "written now (full disk, store file deleted: the detail says which and "
                        "what to do); nothing was accepted; retry later. Migrations already "
                        "accepted go on."
                    ),
                },
            },
            "get": {
                "operationId": "listMigrations",
                "summary": "List migrations, oldest first.",
                "parameters": [
                    {
                        "name": "state",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "enum": states},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE},
                        "description": "At most this many migrations (one page); the answer's "
                        "`next` names the next page. Without it, every migration.",
                    },
                    {
                        "name": "after",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "Cursor: the page after this migration id (the `next` "
                        "of the previous page); an id no migration has gives an empty page.",
                    },
                ],
                "responses": {
                    "200": _json(MigrationList, "Migrations (without their timelines)."),
                    "422": _INVALID,
                },
            },
        },
        "/v1/migrations/{id}": {
            "get": {
                "operationId": "getMigration",
                "summary": "State, progress, prediction, profile, timeline and outcome.",
                "parameters": [_MIGRATION_ID],
                "responses": {
                    "200": _json(
                        Migration,
                        "The migration.",
                        links={k: v for k, v in _MIGRATION_LINKS.items() if k != "GetMigration"},
                    ),
                    "404": _NO_MIGRATION,
                },
            }
        },
        "/v1/migrations/{id}/force-complete": {
            "post": {
                "operationId": "forceComplete",
                "summary": "Finish now in the least disruptive way the profile allows.",
                "security": _SECURED,
                "parameters": [_MIGRATION_ID],
                "requestBody": _body(ForceCompleteRequest, False),
                "responses": {
                    "202": _or_pending(ForceCompleteResponse, "The decision taken."),
                    "400": _MALFORMED,
                    "401": _UNAUTHORIZED,
                    "404": _NO_MIGRATION,
                    "409": _problem(
                        "The profile allows no way to finish now (see accept_pause), or the "
                        "migration is not copying (finished, not started, already completing)."
                    ),
                    "422": _INVALID,
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/v1/migrations/{id}/cancel": {
            "post": {
                "operationId": "cancelMigration",
                "summary": "Stop migrating; the instance keeps running on the source.",
                "security": _SECURED,
                "parameters": [_MIGRATION_ID],
                "responses": {
                    "202": _or_pending(Migration, "Cancelling."),
                    "401": _UNAUTHORIZED,
                    "404": _NO_MIGRATION,
                    "409": _problem("Finished, or past the point of no return (handover)."),
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/v1/drains": {
            "post": {
                "operationId": "createDrain",
                "summary": "Move every instance off a host, choosing where each goes.",
                "description": "The instances are ordered longest expected move first and "
                "handed over as the per-host limits allow; each destination is chosen when "
                "its turn comes. Instances no host can take now are `blocked` in this answer "
                "already. A host with nothing on it gives a drain completed at once.",
                "requestBody": _body(DrainCreate, True),
                "responses": {
                    "202": _json(
                        Drain,
                        "Accepted.",
                        headers={
                            "Location": {
                                "schema": {"type": "string"},
                                "description": "/v1/drains/{id}",
                            }
                        },
                        links=_DRAIN_LINKS,
                    ),
                    "400": _MALFORMED,
                    "401": _UNAUTHORIZED,
                    "404": _problem("Unknown host (the drained one or a destination)."),
                    "409": _problem("The host is already draining."),
                    "422": _problem(
                        "The body does not validate, names the drained host among the "
                        "destinations, or names a profile that is not loaded."
                    ),
                    "503": _problem(
                        "A host or the hypervisor does not answer, or the store cannot be "
                        "written now; nothing was accepted; retry later."
                    ),
                },
            },
            "get": {
                "operationId": "listDrains",
                "summary": "Every drain, oldest first.",
                "responses": {"200": _json(DrainList, "Drains.")},
            },
        },
        "/v1/drains/{id}": {
            "get": {
                "operationId": "getDrain",
                "summary": "A drain: each instance's move (progress, ETA) and the drain's ETA.",
                "parameters": [_DRAIN_ID],
                "responses": {
                    "200": _json(Drain, "The drain."),
                    "404": _NO_DRAIN,
                },
            }
        },
        "/v1/drains/{id}/cancel": {
            "post": {
                "operationId": "cancelDrain",
                "summary": "Start nothing more; migrations under way finish or end per "
                "their profiles.",
                "parameters": [_DRAIN_ID],
                "responses": {
                    "202": _json(Drain, "Cancelling (or cancelled when nothing was under way)."),
                    "401": _UNAUTHORIZED,
                    "404": _NO_DRAIN,
                    "409": _problem("The drain has already ended."),
                },
            }
        },
        "/v1/profiles": {
            "get": {
                "operationId": "listProfiles",
                "summary": "The loaded availability profiles (seconds and bytes).",
                "responses": {"200": _json(ProfilesOut, "The profiles in force.")},
            }
        },
        "/v1/profiles/reload": {
            "post": {
                "operationId": "reloadProfiles",
                "summary": "Read the profiles file again.",
                "security": _SECURED,
                "responses": {
                    "200": _json(ReloadOut, "Loaded."),
                    "401": _UNAUTHORIZED,
                    "422": _problem(
                        "The file is invalid; `problems` lists each with file, line and "
                        "column. The profiles loaded before stay in force."
                    ),
                },
            }
        },
        "/v1/instances/{instance}/profile": {
            "get": {
                "operationId": "explainProfile",
                "summary": "Which profile applies to an instance, and why.",
                "parameters": [
                    {
                        "name": "instance",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "labels",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "pattern": LABELS_PATTERN},
                        "description": "Extra labels, `k=v,k2=v2` (keys not blank; spaces "
                        "and tabs around keys and values are dropped).",
                    },
                    {
                        "name": "uuid",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "profile",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "A profile name a request would name: one of the "
                        "loaded profiles (else 422).",
                    },
                ],
                "responses": {
                    "200": _json(ProfileSelectionOut, "The selection."),
                    "404": _problem("Unknown instance."),
                    "422": _INVALID,
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/v1/instances/{instance}/placement": {
            "get": {
                "operationId": "explainPlacement",
                "summary": "Where lmwatch would move an instance now, and why (moves nothing).",
                "parameters": [
                    {
                        "name": "instance",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "destinations",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string", "pattern": "[^, \\t]"},
                        "description": "Only these hosts, `a,b` (each a known host, else "
                        "404; spaces and tabs around names dropped); by default every "
                        "configured host but the source.",
                    },
                    {
                        "name": "profile",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "A profile name a request would name: one of the "
                        "loaded profiles (else 422).",
                    },
                ],
                "responses": {
                    "200": _json(PlacementOut, "The placement, with every host's figures."),
                    "404": _problem("Unknown instance or host."),
                    "422": _INVALID,
                    "503": _UNAVAILABLE,
                },
            }
        },
        "/v1/events": {
            "get": {
                "operationId": "events",
                "summary": "Server-sent events: migrations' timelines and progress, reloads.",
                "description": _EVENTS_DESCRIPTION,
                "parameters": [
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "Resume after this event id (events still buffered "
                        "are sent first; a `resync` event says when some are not).",
                    }
                ],
                "responses": {
                    "200": {
                        "description": "An endless text/event-stream.",
                        "content": {
                            "text/event-stream": {
                                # One server-sent event (as clients parse the stream);
                                # its JSON `data` per type is under x-event-data.
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "id": {"type": "string", "pattern": "^[0-9]+$"},
                                        "event": {
                                            "type": "string",
                                            "enum": [
                                                "state",
                                                "decision",
                                                "note",
                                                "error",
                                                "violation",
                                                "progress",
                                                "profiles",
                                                "resync",
                                            ],
                                        },
                                        "data": {"type": "string"},
                                        "retry": {"type": "integer", "minimum": 0},
                                    },
                                },
                                "x-event-data": {
                                    "state": _ref(MigrationEventData),
                                    "decision": _ref(MigrationEventData),
                                    "note": _ref(MigrationEventData),
                                    "error": _ref(MigrationEventData),
                                    "violation": _ref(MigrationEventData),
                                    "progress": _ref(ProgressEventData),
                                    "profiles": _ref(ProfilesEventData),
                                    "resync": _ref(ResyncEventData),
                                },
                            }
                        },
                    }
                },
            }
        },
        "/": {
            "get": {
                "operationId": "statusPage",
                "summary": "Read-only status page (HTML; live from /v1/events).",
                "description": "Needs no token itself. When the daemon has a read token, "
                "open it as `/?token=<token>`; the page then sends it with its requests.",
                "responses": {
                    "200": {
                        "description": "The page.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus text format.",
                "responses": {
                    "200": {
                        "description": "Metrics.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "health",
                "summary": "Liveness.",
                "responses": {"200": _json(Health, "Alive.")},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "readiness",
                "summary": "Readiness: the store answers, takes writes and its file is in "
                "place, and every host is reachable.",
                "responses": {
                    "200": _json(Readiness, "Ready."),
                    "503": _json(Readiness, "Not ready; the body says what is missing."),
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1 document.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }


_EVENTS_DESCRIPTION = """\
A `text/event-stream` (server-sent events) that never ends. Each event has an `id:`
(increasing; send it back as `Last-Event-ID` to resume), an `event:` type and one
line of JSON `data:`; the schema of each type's data is under `x-event-data`. An idle
stream gets a `: keep-alive` comment every 15 seconds.

- `state`: a migration changed state (queued, starting, copying, completing,
  handover, completed, cancelled, failed), with the reason.
- `decision`: lmwatch (origin `policy`) or an operator (`operator`) decided: the
  `action` (start, continue, raise-blackout, pause, handover, cancel), with
  the `reason` and the `prediction` behind it. An unchanged `continue` is sent when
  its gist changes or every 30 seconds.
- `note`, `error`, `violation`: other timeline entries (a violation: the completed
  migration exceeded its profile).
- `progress`: one sample of a running migration, every poll: remaining and copied
  bytes, rates, passes, and the prediction (ETA, predicted final pause).
- `profiles`: the profiles file was reloaded (`loaded` true) or rejected (false).
- `resync`: events were lost (the client was too slow, or resumed from an id no
  longer buffered): reload `GET /v1/migrations`. A slow client loses old `progress`
  events first; they are superseded by the next ones anyway.
"""


def _with_auth(paths: dict[str, Any]) -> dict[str, Any]:
    """Each operation with the tokens it needs: changes the token; reads (but
    OPEN_READS) either token when the daemon has a read token. Also the answers of
    the HTTP layer every operation may get: 400, and for POSTs 408 and 413."""
    for path, operations in paths.items():
        for method, operation in operations.items():
            operation["responses"].setdefault("400", _BAD_REQUEST)
            if method == "post":
                operation["responses"].setdefault("408", _BODY_TIMEOUT)
                operation["responses"].setdefault("413", _TOO_LARGE)
            if method == "get":
                if path in OPEN_READS:
                    continue
                operation["security"] = [{}, {"bearer": []}]
                operation["responses"].setdefault("401", _UNAUTHORIZED_READ)
            else:
                operation["security"] = [{"bearer": []}]
                operation["responses"].setdefault("403", _FORBIDDEN)
    return paths


def openapi_document(version: str = "0.1.0") -> dict[str, Any]:
    """The OpenAPI 3.1 description of the whole API."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "lmwatch",
            "version": version,
            "description": (
                "Supervises live migrations of virtual machines and finishes them within "
                "each instance's availability profile. Errors are application/problem+json. "
                "Every POST needs `Authorization: Bearer <token>`. When the daemon has a "
                "read token, every GET but /healthz, /readyz and /openapi.json needs "
                "either token; the read token is refused (403) for changes."
            ),
        },
        "paths": _with_auth(_paths()),
        "components": {
            "schemas": component_schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def dump(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")


def problems_out(problems: Sequence[Any]) -> list[ProblemLocation]:
    return [
        ProblemLocation(
            file=str(p.file),
            line=p.line,
            column=p.column,
            path=str(p.path),
            message=str(p.message),
        )
        for p in problems
    ]
