"""The policies while an instance's local disks are copied: nothing forces completion
before they are in sync; the ETA and the deadline count the disk copy; a copy that
never gets in sync, or not before the deadline, is cancelled once the samples say so."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmwatch.drivers.inventory import ConstantRate
from lmwatch.drivers.simphysics import Migration
from lmwatch.model import (
    GIB,
    MIB,
    Action,
    Decision,
    MigrationContext,
    Phase,
    Rule,
    Sample,
    StartPlan,
)
from lmwatch.policies import DEFAULT, deadline_at, decide, force_complete
from lmwatch.policies.estimators import analyse, disk_outlook, disk_sync_seconds
from lmwatch.profiles.schema import Deadline, HandoverPolicy, OnDeadline, Profile

PERMISSIVE = Profile(
    name="permissive",
    max_blackout=1.0,
    may_pause=True,
    max_pause=600.0,
    handover=HandoverPolicy.ALLOWED,
    max_degraded=600.0,
    on_deadline=OnDeadline.COMPLETE,
)
ARMED = StartPlan(arm_handover=True, arm_slow_down=False, blackout_budget=0.3)


@dataclass
class Run:
    model: Migration
    decisions: list[tuple[float, Sample, Decision]] = field(default_factory=list)

    @property
    def synced(self) -> float | None:
        return self.model.disk_synced_at

    def before_sync(self) -> list[Decision]:
        return [d for _, s, d in self.decisions if not s.disks_in_sync]


def closed_loop(
    profile: Profile,
    *,
    disk: int,
    disk_writes: float,
    deadline: float | None = None,
    force_at: float | None = None,
    limit: float = 600.0,
    memory: int = 2 * GIB,
    change: float = 8 * MIB,
) -> Run:
    """The policy supervising the simulator's model, one sample a second."""
    model = Migration(
        memory=memory,
        working_set=256 * MIB,
        change_rate=ConstantRate(rate=change),
        bandwidth=1 * GIB,
        plan=ARMED,
        disk=disk,
        disk_writes=disk_writes,
    )
    run = Run(model)
    history: list[Sample] = []
    budget = ARMED.blackout_budget
    while not model.phase.finished and model.elapsed < limit:
        model.advance(1.0)
        sample = model.snapshot(model.elapsed)
        history.append(sample)
        if sample.phase.finished:
            break
        if model.cancelling:
            continue  # as in the engine: once a cancel was taken, nothing is decided
        ctx = MigrationContext(
            started_at=0.0,
            memory_bytes=memory,
            plan=ARMED,
            blackout_budget=budget,
            deadline_at=deadline,
            paused=model.paused,
            handed_over=model.handed_over,
            force=force_at is not None and model.elapsed >= force_at,
        )
        decision = decide(profile, history, ctx, model.elapsed)
        run.decisions.append((model.elapsed, sample, decision))
        if decision.action is Action.CANCEL:
            model.cancel()
        elif decision.action is Action.PAUSE:
            model.pause()
        elif decision.action is Action.HANDOVER:
            model.handover()
        elif decision.action is Action.RAISE_BLACKOUT:
            assert decision.blackout_budget is not None
            budget = decision.blackout_budget
            model.set_budget(budget)
    for _ in range(5):
        model.advance(1.0)
    return run


def test_a_converging_disk_copy_is_followed_by_memory_and_completes() -> None:
    run = closed_loop(Profile(name="p"), disk=20 * GIB, disk_writes=64 * MIB)
    assert run.model.phase is Phase.COMPLETED
    assert run.synced is not None and run.synced > 20.0
    before = run.before_sync()
    assert before and all(d.action is Action.CONTINUE for d in before)
    assert all(d.rule is Rule.DISK_COPY for d in before)
    assert "copying the disks first" in before[-1].reason
    assert run.model.finished_at is not None


def test_the_eta_counts_the_disk_copy_then_memory() -> None:
    run = closed_loop(Profile(name="p"), disk=20 * GIB, disk_writes=64 * MIB)
    finished = run.model.finished_at
    assert finished is not None
    # once the write rate is read (after the disk window), the ETA is close to the truth
    for at, _, decision in run.decisions:
        if at < DEFAULT.disk_window + 1 or decision.rule is not Rule.DISK_COPY:
            continue
        assert decision.prediction is not None and decision.prediction.eta_seconds is not None
        assert decision.prediction.eta_seconds == pytest.approx(finished - at, rel=0.1, abs=1.0)


def test_a_disk_written_faster_than_the_link_is_cancelled_once_the_samples_show_it() -> None:
    run = closed_loop(PERMISSIVE, disk=20 * GIB, disk_writes=2 * GIB)
    assert run.model.phase is Phase.CANCELLED
    assert all(d.action is Action.CONTINUE for d in run.before_sync()[:-1])
    at, sample, last = run.decisions[-1]
    assert last.action is Action.CANCEL and last.rule is Rule.DISKS_NEVER_SYNC
    assert not sample.disks_in_sync
    assert "the disks cannot get in sync" in last.reason
    assert DEFAULT.disk_window <= at <= DEFAULT.disk_window + 3
    assert last.prediction is not None and last.prediction.converges is False


def test_a_disk_copy_that_cannot_be_in_sync_before_the_deadline_is_cancelled_early() -> None:
    # 60 GiB at 1 GiB/s: about a minute of disk copy; the deadline is in 30 s.
    profile = PERMISSIVE.model_copy(update={"deadline": Deadline(fixed=30.0)})
    run = closed_loop(profile, disk=60 * GIB, disk_writes=16 * MIB, deadline=30.0)
    assert run.model.phase is Phase.CANCELLED
    at, _, last = run.decisions[-1]
    assert last.rule is Rule.DISKS_MISS_DEADLINE and last.action is Action.CANCEL
    assert at < 30.0 - 10.0  # well before the deadline
    assert "past the deadline" in last.reason


def test_a_disk_copy_that_will_be_in_sync_in_time_is_not_cancelled() -> None:
    profile = PERMISSIVE.model_copy(update={"deadline": Deadline(fixed=120.0)})
    run = closed_loop(profile, disk=20 * GIB, disk_writes=16 * MIB, deadline=120.0)
    assert run.model.phase is Phase.COMPLETED


def test_at_the_deadline_with_disks_behind_the_migration_is_cancelled_not_forced() -> None:
    # on_deadline complete, pausing and handover allowed: none of it may happen yet
    profile = PERMISSIVE.model_copy(update={"deadline": Deadline(fixed=5.0)})
    run = closed_loop(profile, disk=60 * GIB, disk_writes=0.0, deadline=5.0)
    assert run.model.phase is Phase.CANCELLED
    at, sample, last = run.decisions[-1]
    assert not sample.disks_in_sync and at >= 5.0
    assert last.rule is Rule.DEADLINE and last.action is Action.CANCEL
    assert "with the disks not in sync" in last.reason
    assert not run.model.paused and not run.model.handed_over


def test_an_operators_finish_waits_for_the_sync_then_applies() -> None:
    run = closed_loop(PERMISSIVE, disk=10 * GIB, disk_writes=0.0, force_at=2.0)
    forced_before = [d for at, _, d in run.decisions if at >= 2.0 and d.rule is Rule.DISK_COPY]
    assert forced_before and all(d.action is Action.CONTINUE for d in forced_before)
    assert "the request to finish applies once the disks are in sync" in forced_before[0].reason
    after = [d for _, s, d in run.decisions if s.disks_in_sync]
    assert after[0].rule is Rule.OPERATOR_FINISH
    assert after[0].action in (Action.HANDOVER, Action.PAUSE)
    assert run.model.phase is Phase.COMPLETED and run.model.handed_over


def _disk_samples(total: int, lefts: list[int], rate: float, step: float = 1.0) -> list[Sample]:
    return [
        Sample(
            time=step * (i + 1),
            memory_total=4 * GIB,
            memory_remaining=4 * GIB,
            memory_transferred=0,
            transfer_rate=0.0,
            change_rate=0.0,
            passes=1,
            phase=Phase.COPYING,
            blackout_budget=0.3,
            disk_total=total,
            disk_remaining=left,
            disk_rate=rate,
        )
        for i, left in enumerate(lefts)
    ]


def _ctx(**kw: object) -> MigrationContext:
    values: dict[str, object] = {
        "started_at": 0.0,
        "memory_bytes": 4 * GIB,
        "plan": ARMED,
        "blackout_budget": 0.3,
        "deadline_at": None,
    }
    values.update(kw)
    return MigrationContext(**values)  # type: ignore[arg-type]


def test_force_complete_during_the_disk_copy_is_accepted_and_waits() -> None:
    history = _disk_samples(40 * GIB, [39 * GIB, 38 * GIB], 1 * GIB)
    decision = force_complete(PERMISSIVE, history, _ctx(), 2.0, accept_pause=True)
    assert decision.action is Action.CONTINUE
    assert "once the disks are in sync" in decision.reason
    # the same request with the disks in sync forces at once
    synced = [
        replace(s, disk_remaining=0, memory_remaining=3 * GIB, transfer_rate=GIB) for s in history
    ]
    forced = force_complete(PERMISSIVE, synced, _ctx(), 2.0, accept_pause=True)
    assert forced.action in (Action.HANDOVER, Action.PAUSE, Action.RAISE_BLACKOUT)


def test_the_guest_disk_write_rate_is_read_from_the_samples() -> None:
    total, rate, writes = 40 * GIB, 1 * GIB, 200 * MIB
    model = Migration(
        memory=GIB,
        working_set=GIB,
        change_rate=ConstantRate(),
        bandwidth=rate,
        plan=ARMED,
        disk=total,
        disk_writes=writes,
    )
    history = []
    for _ in range(15):
        model.advance(1.0)
        history.append(model.snapshot(model.elapsed))
    outlook = disk_outlook(history)
    assert outlook is not None and outlook.evidence
    assert outlook.writes == pytest.approx(writes, rel=0.05)
    truth = disk_sync_seconds(history[-1].disk_remaining, total, rate, writes)
    assert outlook.seconds == pytest.approx(truth, rel=0.05)
    # too early to tell: no write rate, no evidence
    early = disk_outlook(history[:3])
    assert early is not None and early.writes is None and not early.evidence


def test_memory_pass_one_starts_when_the_disks_are_in_sync() -> None:
    lefts = [30 * GIB, 20 * GIB, 10 * GIB]
    disk = _disk_samples(40 * GIB, lefts, 10 * GIB)
    synced = Sample(
        time=5.0,
        memory_total=4 * GIB,
        memory_remaining=3 * GIB,
        memory_transferred=GIB,
        transfer_rate=GIB,
        change_rate=0.0,
        passes=1,
        phase=Phase.COPYING,
        disk_total=40 * GIB,
        disk_remaining=0,
        disk_rate=10 * GIB,
    )
    a = analyse([*disk, synced], _ctx())
    assert a.records and a.records[0].number == 1
    assert a.records[0].started == pytest.approx(4.0)  # 3 s + 10 GiB at 10 GiB/s


def test_a_per_gib_deadline_counts_the_disk_bytes() -> None:
    profile = Profile(name="p", deadline=Deadline(per_gib=2.0))
    assert deadline_at(profile, 4 * GIB, 100.0) == pytest.approx(108.0)
    assert deadline_at(profile, 4 * GIB, 100.0, disk_bytes=20 * GIB) == pytest.approx(148.0)
    fixed = Profile(name="f", deadline=Deadline(fixed=60.0))
    assert deadline_at(fixed, 4 * GIB, 0.0, disk_bytes=20 * GIB) == 60.0


PROFILES = st.builds(
    Profile,
    name=st.just("p"),
    max_blackout=st.floats(0.1, 5.0),
    handover=st.sampled_from(list(HandoverPolicy)),
    max_degraded=st.floats(1.0, 600.0),
    may_pause=st.just(True),
    max_pause=st.floats(5.0, 600.0),
    on_deadline=st.sampled_from(list(OnDeadline)),
    deadline=st.one_of(st.none(), st.builds(Deadline, fixed=st.floats(1.0, 200.0))),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    profile=PROFILES,
    total=st.integers(1 * GIB, 200 * GIB),
    shares=st.lists(st.floats(0.0001, 1.0), min_size=1, max_size=30),
    rate=st.floats(0.0, 2.0 * GIB),
    step=st.floats(0.1, 5.0),
    budget=st.floats(0.0, 10.0),
    force=st.booleans(),
    accept_pause=st.booleans(),
    deadline=st.one_of(st.none(), st.floats(0.0, 300.0)),
    now_extra=st.floats(0.0, 100.0),
)
def test_no_decision_forces_completion_while_the_disks_are_out_of_sync(
    profile: Profile,
    total: int,
    shares: list[float],
    rate: float,
    step: float,
    budget: float,
    force: bool,
    accept_pause: bool,
    deadline: float | None,
    now_extra: float,
) -> None:
    lefts = [max(1, int(total * share)) for share in shares]
    history = _disk_samples(total, lefts, rate, step)
    ctx = _ctx(blackout_budget=budget, deadline_at=deadline, force=force, accept_pause=accept_pause)
    now = history[-1].time + now_extra
    decision = decide(profile, history, ctx, now)
    assert decision.action in (Action.CONTINUE, Action.CANCEL)
    forced = force_complete(profile, history, ctx, now, accept_pause)
    assert forced.action is Action.CONTINUE
