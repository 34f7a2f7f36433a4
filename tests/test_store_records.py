"""The typed parts of a stored migration (`lmwatch.records`): what the store writes,
what it reads back, rows written by earlier versions, and corrupt ones."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from typing import Any

import pytest

from lmwatch import records
from lmwatch.model import Method, Prediction, StartPlan, State
from lmwatch.policies.placement import How
from lmwatch.records import Outcome, Placed, Progress, Restarts
from lmwatch.store import CorruptRecord, MigrationRecord, Store

PREDICTION = Prediction(1.25e9, 2.5e8, 1 << 20, 0.5, 0.0125, True, 4096, 0.75)
PLAN = StartPlan(
    arm_handover=True,
    arm_slow_down=False,
    blackout_budget=0.3,
    slow_down_initial=0.4,
    slow_down_step=0.2,
    bandwidth=1e9,
    reason="armed",
)
PROGRESS = Progress(
    time=1.5,
    memory_total=8 << 30,
    memory_remaining=1 << 30,
    memory_transferred=9 << 30,
    memory_remaining_seen=2 << 30,
    transfer_rate=1.25e9,
    change_rate=2.5e8,
    passes=4,
    blackout_budget=0.3,
    slowdown=0.2,
    disk_total=4 << 30,
    disk_remaining=1 << 30,
    disk_rate=5e8,
    prediction=PREDICTION,
)
OUTCOME = Outcome(Method.SLOWED, 30.5, 0.02, 4, 9 << 30, None, "b")
PLACED = Placed(How.NAMED, "b: named by the request")
RESTARTS = Restarts(count=2, pending=True, plan=PLAN, planned_rate=3e8, job_started_at=11.0)

# A plan that holds a lower budget during the first pass (`first_pass_budget`, written
# only when there is one: a plan without it reads and writes as plans did before).
HELD_PLAN = dataclasses.replace(PLAN, first_pass_budget=0.05)
OMITTED_WHEN_NONE = {StartPlan: {"first_pass_budget"}, Restarts: {"start_by"}}

PARTS: list[tuple[str, Any]] = [
    ("plan", PLAN),
    ("plan", HELD_PLAN),
    ("progress", PROGRESS),
    ("progress", Progress()),
    ("outcome", OUTCOME),
    ("outcome", Outcome(Method.FAILED, error="no answer")),
    ("placement", PLACED),
    ("restart", RESTARTS),
    ("restart", Restarts(count=1)),
    # after a failed job: the last moment to start the new job (written only then)
    ("restart", dataclasses.replace(RESTARTS, start_by=1800.0)),
]


@pytest.mark.parametrize(("column", "value"), PARTS)
def test_each_part_reads_back_as_it_was_written(column: str, value: Any) -> None:
    text = records.encode(column, value)
    assert text is not None
    assert records.decode(column, text) == value
    assert records.encode(column, None) is None and records.decode(column, None) is None


@pytest.mark.parametrize(
    ("part", "as_json"),
    [
        (PLAN, records.plan_json),
        (HELD_PLAN, records.plan_json),
        (PROGRESS, records.progress_json),
        (OUTCOME, records.outcome_json),
        (PLACED, records.placed_json),
        (RESTARTS, records.restarts_json),
        (PREDICTION, records.prediction_json),
    ],
)
def test_every_field_is_encoded(part: Any, as_json: Any) -> None:
    """A field added to a part without its key would be lost on every write (one
    written only when set reads back as its default, None, when absent)."""
    omitted = {
        name for name in OMITTED_WHEN_NONE.get(type(part), set()) if getattr(part, name) is None
    }
    assert set(as_json(part)) == {f.name for f in dataclasses.fields(part)} - omitted


def test_the_text_written_is_what_the_dict_form_wrote() -> None:
    """Rows written now and rows written before read alike (and diff alike)."""
    old_progress = {
        **{f.name: getattr(PROGRESS, f.name) for f in dataclasses.fields(Progress)},
        "prediction": dataclasses.asdict(PREDICTION),
    }
    old_outcome = {**dataclasses.asdict(OUTCOME), "method": "slowed"}
    assert records.encode("progress", PROGRESS) == json.dumps(old_progress, sort_keys=True)
    assert records.encode("outcome", OUTCOME) == json.dumps(old_outcome, sort_keys=True)
    old_plan = {k: v for k, v in dataclasses.asdict(PLAN).items() if k != "first_pass_budget"}
    assert records.encode("plan", PLAN) == json.dumps(old_plan, sort_keys=True)
    assert records.encode("plan", HELD_PLAN) == json.dumps(
        dataclasses.asdict(HELD_PLAN), sort_keys=True
    )
    assert records.encode("placement", PLACED) == json.dumps(
        {"how": "named", "reason": PLACED.reason}, sort_keys=True
    )


def _row(path: str, **columns: Any) -> None:
    """A migration row written straight into the file, as an earlier version did."""
    values = {
        "id": "m-1",
        "instance": "vm",
        "source": "a",
        "destination": "b",
        "labels": "{}",
        "profile_name": "default",
        "profile_reason": "fallback",
        "profile": '{"name": "default"}',
        "memory_bytes": 1 << 30,
        "state": "copying",
        "created_at": 100.0,
        **columns,
    }
    with sqlite3.connect(path) as db:
        names = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        db.execute(f"INSERT INTO migrations({names}) VALUES({marks})", tuple(values.values()))


def test_a_row_of_the_dict_form_with_fewer_keys_loads_with_defaults(store: Store) -> None:
    """Keys an earlier version did not write take their defaults; keys this version
    does not know are ignored; an empty object is no value (as the API showed it)."""
    _row(
        store.path,
        plan=json.dumps({"arm_handover": True, "arm_slow_down": False, "blackout_budget": 0.5}),
        progress=json.dumps(
            {
                "memory_total": 100,
                "memory_remaining": 40,
                "passes": 2,
                "transfer_rate": 10,
                "retired_key": "ignored",
                "prediction": {"transfer_rate": 10.0, "remaining": 40, "eta_seconds": 4.0},
            }
        ),
        outcome="{}",
        placement=json.dumps({"how": "chosen"}),
        restart=json.dumps({"count": 1, "pending": False, "planned_rate": None}),
    )
    record = store.get("m-1")
    assert record is not None
    assert record.plan == StartPlan(arm_handover=True, arm_slow_down=False, blackout_budget=0.5)
    assert record.progress == Progress(
        memory_total=100,
        memory_remaining=40,
        passes=2,
        transfer_rate=10.0,
        prediction=Prediction(10.0, 0.0, 40, 4.0, None, None, None, 0.0),
    )
    assert record.outcome is None
    assert record.placement == Placed(How.CHOSEN, "")
    assert record.restart == Restarts(count=1)


@pytest.mark.parametrize(
    ("column", "text", "reason"),
    [
        ("progress", '{"passes": "three"}', "column progress: passes: not a number: 'three'"),
        ("progress", '{"prediction": [1]}', "column progress: prediction: a JSON list, not"),
        ("outcome", '{"method": "teleported"}', "column outcome: 'teleported' is not a valid"),
        ("outcome", '{"passes": 3}', "column outcome: method missing"),
        (
            "plan",
            '{"arm_handover": "yes", "arm_slow_down": false, "blackout_budget": 1}',
            "column plan: arm_handover: not true or false: 'yes'",
        ),
        ("restart", '{"count": 1, "pending": true}', "column restart: pending without the plan"),
        ("restart", '"pending"', "column restart: a JSON str, not an object"),
    ],
)
def test_a_corrupt_part_names_its_row_column_and_key(
    store: Store, column: str, text: str, reason: str
) -> None:
    _row(store.path, **{column: text})
    with pytest.raises(CorruptRecord) as raised:
        store.get("m-1")
    assert raised.value.migration_id == "m-1"
    assert str(raised.value).startswith(f"store row for migration m-1 cannot be read: {reason}")
    records_read, problems = store.scan()
    assert records_read == [] and [p.migration_id for p in problems] == ["m-1"]


def test_an_update_writes_only_the_columns_it_changes(store: Store) -> None:
    record = MigrationRecord(
        id="m-2",
        instance="vm",
        source="a",
        destination="b",
        labels={"team": "x"},
        requested_profile=None,
        profile_name="default",
        profile_reason="fallback",
        profile={"name": "default"},
        memory_bytes=1 << 30,
        state=State.COPYING,
        created_at=100.0,
        plan=PLAN,
    )
    store.insert(record, "accepted")
    updated = store.update(record, progress=PROGRESS)
    assert updated.progress is PROGRESS  # the value itself: nothing decoded again
    assert store.flush()
    with sqlite3.connect(store.path) as db:
        db.execute("UPDATE migrations SET plan=? WHERE id='m-2'", (records.encode("plan", None),))
    store.update(updated, outcome=OUTCOME)  # the plan column is left as the file has it
    assert store.flush()
    reread = Store.open(store.path)
    try:
        assert reread.get("m-2") == dataclasses.replace(updated, plan=None, outcome=OUTCOME)
    finally:
        reread.close()
