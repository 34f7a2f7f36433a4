"""Admission of a migration request: validation, idempotency, profile selection.

The pre-flight itself (asking the hypervisor about the instance) is an effect and
goes through the effect runner; what to do with its answer is decided here.
"""

from __future__ import annotations

import hashlib
import json

from lmwatch.drivers.base import destination_of
from lmwatch.errors import Conflict, Invalid
from lmwatch.model import InstanceInfo, MigrationRequest, State
from lmwatch.profiles import NoProfile, ProfileRegistry, Selection, UnknownProfile
from lmwatch.store import MigrationRecord, Store


def validate(request: MigrationRequest) -> None:
    """Refuse a request that can never run, before anything is asked or recorded."""
    if request.source == request.destination:
        raise Invalid("source and destination are the same host")
    if request.force and request.destination is None:
        raise Invalid("force needs a named destination")


def fingerprint(request: MigrationRequest) -> str:
    """What an Idempotency-Key replay must repeat exactly."""
    body = json.dumps(
        {
            "instance": request.instance,
            "source": request.source,
            "destination": request.destination,
            "labels": dict(sorted(request.labels.items())),
            "profile": request.profile,
            # Only when set: earlier keys keep their fingerprints.
            **({"force": True} if request.force else {}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(body.encode()).hexdigest()


def replayed(
    store: Store, request: MigrationRequest, idempotency_key: str | None, fingerprint: str
) -> str | None:
    """The id of the earlier migration this request replays, or None; Conflict when
    the key was used for another request or the instance is already migrating."""
    if idempotency_key is not None:
        earlier = store.by_idempotency_key(idempotency_key)
        if earlier is not None:
            if earlier.request_fingerprint != fingerprint:
                raise Conflict(
                    "this Idempotency-Key was used for a different request; use a new key"
                )
            return earlier.id
    active = store.active_for_instance(request.instance)
    if active is not None:
        raise Conflict(
            f"instance {request.instance!r} is already migrating "
            f"(migration {active.id}, {active.state.value})"
        )
    return None


def select(
    profiles: ProfileRegistry, request: MigrationRequest, info: InstanceInfo
) -> tuple[dict[str, str], Selection]:
    """The labels the migration carries (the request's win over the host's) and the
    profile that applies to it; Invalid when none does."""
    labels = {**info.labels, **request.labels}
    try:
        selection = profiles.explain(request.instance, info.uuid, labels, request.profile)
    except (UnknownProfile, NoProfile) as error:
        raise Invalid(str(error)) from error
    return labels, selection


def new_record(
    request: MigrationRequest,
    info: InstanceInfo,
    labels: dict[str, str],
    selection: Selection,
    *,
    migration_id: str,
    now: float,
    idempotency_key: str | None,
    fingerprint: str,
) -> tuple[MigrationRecord, str]:
    """The queued record of an accepted migration and the reason recorded with it."""
    record = MigrationRecord(
        id=migration_id,
        instance=request.instance,
        source=request.source,
        destination=destination_of(request),
        labels=labels,
        requested_profile=request.profile,
        profile_name=selection.profile.name,
        profile_reason=selection.reason,
        profile=selection.profile.model_dump(mode="json"),
        memory_bytes=info.memory_bytes,
        uuid=info.uuid,
        state=State.QUEUED,
        created_at=now,
        idempotency_key=idempotency_key,
        request_fingerprint=fingerprint,
    )
    accepted = f"accepted; profile {selection.profile.name!r}: {selection.reason}"
    return record, accepted
