"""The typed parts of a stored migration, and the one place they are encoded.

A `MigrationRecord` (`lmwatch.store`) holds its start plan, last progress, outcome,
placement and restarts as the immutable values here. The store keeps each in a TEXT
column holding a JSON object; `encode` (on write) and `decode` (on read) below are
the only code that writes or reads that JSON, so the rest of the program handles
typed values only. The text written is what earlier versions wrote (the same keys,
sorted), so old and new rows read alike.

Reading is lenient about the shape an earlier version wrote: a key this version does
not know is ignored, a key missing (or null) takes the field's default, and an empty
object is no value at all (as the API always showed it). Only what a part means
nothing without is required (a plan's `arm_handover`, `arm_slow_down` and
`blackout_budget`, an outcome's `method`); a value missing one of those, or a value of
the wrong type, raises ValueError or TypeError naming the key, which the store
reports as a corrupt row (`CorruptRecord`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lmwatch.model import Method, Prediction, StartPlan
from lmwatch.policies.placement import How


@dataclass(frozen=True, slots=True)
class Progress:
    """A running migration's last sample, with the prediction made from it."""

    time: float = 0.0  # clock seconds of the sample
    memory_total: int = 0
    memory_remaining: int = 0
    memory_transferred: int = 0
    memory_remaining_seen: int = 0  # the last remainder seen while copying
    transfer_rate: float = 0.0
    change_rate: float = 0.0
    passes: int = 0
    blackout_budget: float = 0.0
    slowdown: float = 0.0
    disk_total: int = 0
    disk_remaining: int = 0
    disk_rate: float = 0.0
    prediction: Prediction | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a migration ended."""

    method: Method
    total_seconds: float = 0.0
    blackout_seconds: float | None = None
    passes: int = 0
    transferred_bytes: int = 0
    error: str | None = None
    running_on: str | None = None  # host the instance runs on afterwards, when known


@dataclass(frozen=True, slots=True)
class Placed:
    """How the destination was placed, and why there."""

    how: How
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Restarts:
    """Starting the migration again (`Action.RESTART`). `pending` holds from the intent
    (recorded, with the new `plan`, before the job is stopped) until the new job has
    started; `plan` and `planned_rate` stay as the last restart's afterwards."""

    count: int = 0
    pending: bool = False
    plan: StartPlan | None = None
    planned_rate: float | None = None  # bytes/s of writing the new plan was made for
    job_started_at: float | None = None  # clock time the current job began
    # the last clock time to try starting the new job while the hosts refuse it (None:
    # one try; intents recorded before every restart carried one)
    start_by: float | None = None


# -- to JSON ---------------------------------------------------------------------------
# Keys in sorted order: the text is the one `json.dumps(..., sort_keys=True)` wrote.


def prediction_json(prediction: Prediction | None) -> dict[str, Any] | None:
    if prediction is None:
        return None
    return {
        "blackout_seconds": prediction.blackout_seconds,
        "change_rate": prediction.change_rate,
        "confidence": prediction.confidence,
        "converges": prediction.converges,
        "eta_seconds": prediction.eta_seconds,
        "floor_bytes": prediction.floor_bytes,
        "remaining": prediction.remaining,
        "transfer_rate": prediction.transfer_rate,
    }


def plan_json(plan: StartPlan) -> dict[str, Any]:
    data: dict[str, Any] = {
        "arm_handover": plan.arm_handover,
        "arm_slow_down": plan.arm_slow_down,
        "bandwidth": plan.bandwidth,
        "blackout_budget": plan.blackout_budget,
    }
    if plan.first_pass_budget is not None:  # a plan without one reads as it was written
        data["first_pass_budget"] = plan.first_pass_budget
    data["reason"] = plan.reason
    data["slow_down_initial"] = plan.slow_down_initial
    data["slow_down_step"] = plan.slow_down_step
    return data


def progress_json(progress: Progress) -> dict[str, Any]:
    return {
        "blackout_budget": progress.blackout_budget,
        "change_rate": progress.change_rate,
        "disk_rate": progress.disk_rate,
        "disk_remaining": progress.disk_remaining,
        "disk_total": progress.disk_total,
        "memory_remaining": progress.memory_remaining,
        "memory_remaining_seen": progress.memory_remaining_seen,
        "memory_total": progress.memory_total,
        "memory_transferred": progress.memory_transferred,
        "passes": progress.passes,
        "prediction": prediction_json(progress.prediction),
        "slowdown": progress.slowdown,
        "time": progress.time,
        "transfer_rate": progress.transfer_rate,
    }


def outcome_json(outcome: Outcome) -> dict[str, Any]:
    return {
        "blackout_seconds": outcome.blackout_seconds,
        "error": outcome.error,
        "method": outcome.method.value,
        "passes": outcome.passes,
        "running_on": outcome.running_on,
        "total_seconds": outcome.total_seconds,
        "transferred_bytes": outcome.transferred_bytes,
    }


def placed_json(placed: Placed) -> dict[str, Any]:
    return {"how": placed.how.value, "reason": placed.reason}


def restarts_json(restarts: Restarts) -> dict[str, Any]:
    data: dict[str, Any] = {
        "count": restarts.count,
        "job_started_at": restarts.job_started_at,
        "pending": restarts.pending,
        "plan": None if restarts.plan is None else plan_json(restarts.plan),
        "planned_rate": restarts.planned_rate,
    }
    if restarts.start_by is not None:  # only when set: older rows read the same
        data["start_by"] = restarts.start_by
    return data


# -- from JSON -------------------------------------------------------------------------


# Reads are on the API's path (a page decodes its rows): the common case comes first.


def _number(data: Mapping[str, Any], key: str, default: float = 0.0) -> float:
    value = data.get(key)
    if type(value) is float:
        return value
    if value is None:
        return default
    if type(value) is int:  # not bool: type(True) is bool
        return float(value)
    raise ValueError(f"{key}: not a number: {value!r}")


def _maybe_number(data: Mapping[str, Any], key: str) -> float | None:
    return None if data.get(key) is None else _number(data, key)


def _count(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key)
    if type(value) is int:
        return value
    return int(_number(data, key))


def _maybe_count(data: Mapping[str, Any], key: str) -> int | None:
    return None if data.get(key) is None else _count(data, key)


def _flag(data: Mapping[str, Any], key: str, default: bool = False) -> bool:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"{key}: not true or false: {value!r}")
    return value


def _maybe_flag(data: Mapping[str, Any], key: str) -> bool | None:
    return None if data.get(key) is None else _flag(data, key)


def _maybe_text(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"{key}: not a string: {value!r}")


def _object(value: Any, key: str | None = None) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        where = "" if key is None else f"{key}: "
        raise ValueError(f"{where}a JSON {type(value).__name__}, not an object")
    return value


def prediction_from(data: Mapping[str, Any] | None) -> Prediction | None:
    if not data:
        return None
    return Prediction(
        transfer_rate=_number(data, "transfer_rate"),
        change_rate=_number(data, "change_rate"),
        remaining=_count(data, "remaining"),
        eta_seconds=_maybe_number(data, "eta_seconds"),
        blackout_seconds=_maybe_number(data, "blackout_seconds"),
        converges=_maybe_flag(data, "converges"),
        floor_bytes=_maybe_count(data, "floor_bytes"),
        confidence=_number(data, "confidence"),
    )


_PLAN_KEYS: dict[str, Callable[[Mapping[str, Any], str], Any]] = {
    "arm_handover": _flag,
    "arm_slow_down": _flag,
    "blackout_budget": _number,
    "slow_down_initial": _number,
    "slow_down_step": _number,
    "bandwidth": _maybe_number,
    "reason": _maybe_text,
    "first_pass_budget": _maybe_number,
}


def plan_from(data: Mapping[str, Any]) -> StartPlan:
    """A key without a default that is missing (or null) is a TypeError of StartPlan."""
    present = {key: read(data, key) for key, read in _PLAN_KEYS.items() if key in data}
    present = {key: value for key, value in present.items() if value is not None}
    return StartPlan(**present)


def progress_from(data: Mapping[str, Any]) -> Progress | None:
    if not data:
        return None
    prediction = data.get("prediction")
    return Progress(
        time=_number(data, "time"),
        memory_total=_count(data, "memory_total"),
        memory_remaining=_count(data, "memory_remaining"),
        memory_transferred=_count(data, "memory_transferred"),
        memory_remaining_seen=_count(data, "memory_remaining_seen"),
        transfer_rate=_number(data, "transfer_rate"),
        change_rate=_number(data, "change_rate"),
        passes=_count(data, "passes"),
        blackout_budget=_number(data, "blackout_budget"),
        slowdown=_number(data, "slowdown"),
        disk_total=_count(data, "disk_total"),
        disk_remaining=_count(data, "disk_remaining"),
        disk_rate=_number(data, "disk_rate"),
        prediction=None
        if prediction is None
        else prediction_from(_object(prediction, "prediction")),
    )


def outcome_from(data: Mapping[str, Any]) -> Outcome | None:
    if not data:
        return None
    if data.get("method") is None:
        raise ValueError("method missing")
    return Outcome(
        method=Method(data["method"]),
        total_seconds=_number(data, "total_seconds"),
        blackout_seconds=_maybe_number(data, "blackout_seconds"),
        passes=_count(data, "passes"),
        transferred_bytes=_count(data, "transferred_bytes"),
        error=_maybe_text(data, "error"),
        running_on=_maybe_text(data, "running_on"),
    )


def placed_from(data: Mapping[str, Any]) -> Placed | None:
    """None when it does not say how (the API showed no placement for it)."""
    how = data.get("how")
    if how not in tuple(How):
        return None
    return Placed(How(how), str(data.get("reason") or ""))


def restarts_from(data: Mapping[str, Any]) -> Restarts:
    plan = data.get("plan")
    restarts = Restarts(
        count=_count(data, "count"),
        pending=_flag(data, "pending"),
        plan=None if plan is None else plan_from(_object(plan, "plan")),
        planned_rate=_maybe_number(data, "planned_rate"),
        job_started_at=_maybe_number(data, "job_started_at"),
        start_by=_maybe_number(data, "start_by"),
    )
    if restarts.pending and restarts.plan is None:
        raise ValueError("pending without the plan to start again with")
    return restarts


# -- the columns ------------------------------------------------------------------------


def _mapping_json(value: Mapping[str, Any]) -> dict[str, Any]:
    return dict(value)


def _mapping_from(data: Mapping[str, Any]) -> Mapping[str, Any]:
    return data


# Each JSON column of the migrations table: how its value becomes a JSON object, and
# back. `labels` and `profile` stay plain mappings (the profile is its JSON form).
_CODECS: dict[str, tuple[Callable[[Any], dict[str, Any]], Callable[[Mapping[str, Any]], Any]]] = {
    "labels": (_mapping_json, _mapping_from),
    "profile": (_mapping_json, _mapping_from),
    "plan": (plan_json, plan_from),
    "progress": (progress_json, progress_from),
    "outcome": (outcome_json, outcome_from),
    "placement": (placed_json, placed_from),
    "restart": (restarts_json, restarts_from),
}
JSON_COLUMNS = tuple(_CODECS)
_SORTED = frozenset(("labels", "profile"))  # the others' dicts are built in key order


def encode(column: str, value: Any) -> str | None:
    """A JSON column's text for `value` (None: SQL NULL)."""
    if value is None:
        return None
    as_json = _CODECS[column][0](value)
    return json.dumps(as_json, sort_keys=column in _SORTED)


def decode(column: str, text: str | None) -> Any:
    """The value a JSON column's text holds; ValueError or TypeError when it cannot."""
    if text is None:
        return None
    return _CODECS[column][1](_object(json.loads(text)))
