"""The six causes of issue 7, one test (or a small group) each, in the real simulator.

Each test drives `simphysics.Migration` (through the benchmark runner, or step by
step) or calls the policy on samples the simulator produced, and fails on the
policy before the rewrite:

1. the reported change rate saturates (distinct pages per pass second);
2. the blackout budget must leave room for the switchover cost;
3. one pass of evidence is enough when it says copying cannot converge;
4. cancelling early must weigh the time left before the deadline;
5. the ETA while the guest is slowed follows the throttle schedule;
6. after a restart the policy rebuilds evidence before it forces anything.

A property closes the file: without pause or handover, lmwatch never causes a
blackout above `max_blackout`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmwatch import policies
from lmwatch.bench.controller import Command, Controller, Setting
from lmwatch.bench.corpus import Workload, workload_from_mapping
from lmwatch.bench.judge import judge
from lmwatch.bench.lmwatch_controller import LmwatchController, lmwatch_factory
from lmwatch.bench.runner import Run, Simulation, run, setting_for
from lmwatch.drivers.inventory import ConstantRate, GrowingRate
from lmwatch.drivers.simphysics import Migration, Writer, measured_change_rate
from lmwatch.model import (
    GIB,
    MIB,
    Action,
    Decision,
    MigrationContext,
    Rule,
    Sample,
    StartPlan,
)
from lmwatch.policies.estimators import DirtyModel, analyse, quiet_rate
from lmwatch.policies.track import Pair
from lmwatch.profiles.schema import Deadline, HandoverPolicy, OnDeadline, Profile


def _workload(**fields: Any) -> Workload:
    data: dict[str, Any] = {"name": "w", "switchover": "40ms", **fields}
    return workload_from_mapping(data)


def _samples_of(migration: Migration, until: float, poll: float = 1.0) -> list[Sample]:
    """A sample every `poll` seconds from the start, as the engine takes them."""
    samples = []
    t = 0.0
    while t + poll <= until + 1e-9 and not migration.phase.finished:
        t += poll
        migration.advance(t - migration.elapsed)
        samples.append(migration.snapshot(t))
    return samples


def _decided_in_pass(
    profile: Profile, samples: list[Sample], ctx: MigrationContext, n: int, after: int = 0
) -> Decision:
    """The decision at the first sample of pass `n`, or `after` samples later."""
    at = next(i for i, s in enumerate(samples) if s.passes == n) + after
    return policies.decide(profile, samples[: at + 1], ctx, samples[at].time)


def _first_command_at(controller: LmwatchController, action: str) -> float | None:
    return next((t for t, a, _ in controller.reasons if a == action), None)


def _keeping(
    make: Callable[[Setting], LmwatchController],
) -> tuple[list[LmwatchController], Callable[[Setting], Controller]]:
    """A controller factory, and the list of the controllers it made (to read their
    decisions after the run)."""
    controllers: list[LmwatchController] = []

    def factory(setting: Setting) -> Controller:
        controllers.append(make(setting))
        return controllers[-1]

    return controllers, factory


# 500ms, nothing else, 10 minutes, cancel at the deadline
STRICT = Profile(
    name="strict", max_blackout=0.5, deadline=Deadline(fixed=600), on_deadline=OnDeadline.CANCEL
)


# -- 1. the reported change rate saturates ---------------------------------------------------


def test_1_a_saturating_random_writer_is_not_called_converging() -> None:
    """A guest writing 3x the link's rate at random over 1 GiB reports a change rate of
    a fraction of that (distinct pages per pass second). Read as the write rate it says
    copying converges; the remainders say it settles near the working set."""
    bandwidth = 100 * MIB
    plan = StartPlan(arm_handover=False, arm_slow_down=False, blackout_budget=0.3)
    migration = Migration(
        memory=4 * GIB,
        working_set=1 * GIB,
        change_rate=ConstantRate(rate=3 * bandwidth),
        bandwidth=bandwidth,
        plan=plan,
        writer=Writer.RANDOM,
    )
    samples = _samples_of(migration, until=120.0)
    ctx = MigrationContext(
        started_at=0.0, memory_bytes=4 * GIB, plan=plan, blackout_budget=0.3, deadline_at=None
    )
    fixed_point = 0.9405 * GIB  # R = W (1 - exp(-3 R / W))
    for n in range(3, 7):  # from the start of pass 3, once two passes were seen whole
        start = next(i for i, s in enumerate(samples) if s.passes == n)
        history = samples[: start + 1]
        assert 0 < history[-1].change_rate < 3 * bandwidth  # what the hypervisor reports
        prediction = policies.estimate(history, ctx)
        assert prediction.converges is False, f"pass {n}"
        assert prediction.eta_seconds is None
        assert prediction.floor_bytes is not None
        assert 0.75 * GIB <= prediction.floor_bytes <= 1.0 * GIB, f"pass {n}"
    # once the long first pass has left the fitted window, the floor is the fixed point
    assert prediction.floor_bytes == pytest.approx(fixed_point, rel=0.05)


@pytest.mark.parametrize(
    ("write_rate", "converges"),
    [
        pytest.param(2860 * MIB, False, id="rewrites-the-working-set-many-times-a-pass"),
        pytest.param(300 * MIB, True, id="fills-it-just-once-in-the-windows-seen"),
    ],
)
def test_1_windows_that_all_filled_the_working_set_give_no_eta_until_one_does_not(
    write_rate: float, converges: bool
) -> None:
    """A sequential writer over 468 MiB fills its working set in the 2 s measurement
    before the start and in the 5 s first pass alike: both count about W, which says
    only that it writes at least ~W/2 s. At that least rate copying converges; faster,
    it never does. The policy used to read the least rate and predict a finish in about
    a second for a guest that never converged (a first ETA 230x too short). Now it
    makes no prediction until the second pass, too short to fill W, has been counted."""
    bandwidth = 1038 * MIB
    working_set = 468 * MIB
    plan = StartPlan(arm_handover=False, arm_slow_down=False, blackout_budget=0.3)
    migration = Migration(
        memory=5632 * MIB,
        working_set=working_set,
        change_rate=ConstantRate(rate=write_rate),
        bandwidth=bandwidth,
        plan=plan,
        writer=Writer.SEQUENTIAL,
    )
    window = 2.0
    measured = measured_change_rate(
        ConstantRate(rate=write_rate), working_set, Writer.SEQUENTIAL, window
    )
    assert measured * window == pytest.approx(working_set)  # the window filled W
    ctx = MigrationContext(
        started_at=0.0,
        memory_bytes=5632 * MIB,
        plan=plan,
        blackout_budget=0.3,
        deadline_at=600.0,
        switchover=0.15,
        change_rate_before_start=measured,
        change_rate_window=window,
    )
    strict = Profile(name="strict", max_blackout=0.5, deadline=Deadline(fixed=600))
    samples = _samples_of(migration, until=8.0, poll=0.1)

    def decided_at_start_of(n: int) -> Decision:
        return _decided_in_pass(strict, samples, ctx, n)

    second = decided_at_start_of(2)
    assert second.rule is Rule.WINDOWS_FILLED and second.action is Action.CONTINUE
    assert second.prediction is not None
    assert second.prediction.converges is None and second.prediction.eta_seconds is None
    assert "at least" in second.reason
    third = decided_at_start_of(3)  # the second pass was counted: it tells
    assert third.prediction is not None and third.prediction.converges is converges
    assert (third.prediction.eta_seconds is not None) is converges


@pytest.mark.parametrize(
    ("write_rate", "converges"),
    [
        pytest.param(20 * GIB, False, id="fills-its-working-set-every-pass"),
        pytest.param(1 * GIB, True, id="a-steady-writer-over-memory"),
    ],
)
def test_1_one_unmeasured_pass_is_not_called_converging_when_it_may_have_filled_a_working_set(
    write_rate: float, converges: bool
) -> None:
    """Nothing measured before the start (a pass of about 2 s: measuring would cost as
    long), and the first pass counted about 2.5 GiB of 6 GiB, for a guest rewriting
    2 GiB at 20 GiB/s as for one writing 1 GiB/s all over its memory. Read as a
    steady writer over all of memory, copying converges; read as one that filled a
    working set of that count, every pass leaves it again and it never does.
    The policy said "copying finishes on its own" with an ETA on the hopeful reading,
    and a pass later the opposite (`s1-0184`: 32.8 GB/s over 3.9 GiB). Now it says
    that one pass cannot tell, with no ETA, until the second pass (shorter than what
    fills the working set) has been counted: then each guest gets its verdict."""
    bandwidth = 2.5 * GIB
    plan = StartPlan(arm_handover=False, arm_slow_down=False, blackout_budget=0.3)
    migration = Migration(
        memory=6 * GIB,
        working_set=2 * GIB if not converges else 6 * GIB,
        change_rate=ConstantRate(rate=write_rate),
        bandwidth=bandwidth,
        plan=plan,
        writer=Writer.SEQUENTIAL,
    )
    ctx = MigrationContext(
        started_at=0.0,
        memory_bytes=6 * GIB,
        plan=plan,
        blackout_budget=0.3,
        deadline_at=600.0,
        switchover=0.05,
    )
    samples = _samples_of(migration, until=6.0, poll=0.1)

    def decided_at_start_of(n: int) -> Decision:
        return _decided_in_pass(STRICT, samples, ctx, n)

    second = decided_at_start_of(2)
    counted = samples[next(i for i, s in enumerate(samples) if s.passes == 2)].memory_remaining
    assert 2.3 * GIB < counted < 2.8 * GIB  # what the first pass left, alike for both
    assert second.rule is Rule.ONE_PASS_EITHER_WAY and second.action is Action.CONTINUE
    assert second.prediction is not None
    assert second.prediction.converges is None and second.prediction.eta_seconds is None
    assert "finishes on its own" not in second.reason
    assert "one pass cannot tell" in second.reason
    third = decided_at_start_of(3)  # the second pass was counted: it tells
    assert third.prediction is not None and third.prediction.converges is converges
    assert (third.prediction.eta_seconds is not None) is converges


def _measured_64_gib_guest(
    pattern: GrowingRate | ConstantRate, working_set: int, writer: Writer, until: float
) -> Callable[[int], Decision]:
    """A guest of 64 GiB writing over `working_set`, measured for 1 s before the start
    as the daemon measures it, over a 500 MiB/s link, strict (0.3 s budget, nothing
    armed, an hour's deadline): the decision a sample into pass n (its start is then
    known), sampled every second up to `until`."""
    plan = StartPlan(arm_handover=False, arm_slow_down=False, blackout_budget=0.3)
    migration = Migration(
        memory=64 * GIB,
        working_set=working_set,
        change_rate=pattern,
        bandwidth=500 * MIB,
        plan=plan,
        writer=writer,
    )
    ctx = MigrationContext(
        started_at=0.0,
        memory_bytes=64 * GIB,
        plan=plan,
        blackout_budget=0.3,
        deadline_at=3600.0,
        switchover=0.05,
        change_rate_before_start=measured_change_rate(pattern, working_set, writer, 1.0),
        change_rate_window=1.0,
    )
    samples = _samples_of(migration, until=until)
    return lambda n: _decided_in_pass(STRICT, samples, ctx, n, after=1)


@pytest.mark.parametrize(
    ("pattern", "rose"),
    [
        pytest.param(
            GrowingRate(pattern="growing", start=100 * MIB, per_minute=120 * MIB),
            True,
            id="growing",
        ),
        pytest.param(ConstantRate(rate=100 * MIB), False, id="steady"),
    ],
)
def test_1_a_first_pass_that_dirtied_faster_than_the_measurement_allows_gives_no_verdict(
    pattern: GrowingRate | ConstantRate, rose: bool
) -> None:
    """A guest of 64 GiB writing at random over 32 GiB, measured at 100 MiB/s before the
    start, over a 500 MiB/s link (a first pass of 131 s). Growing by 120 MiB/s a minute,
    it dirtied about 230 MiB/s on average over the pass: more than any steady writer
    measured at 100 MiB/s can (the distinct pages of a longer window grow ever more
    slowly), beyond the measurement's page-sampling scatter. The fit of the two said
    copying finishes on its own within a minute, and the next pass the opposite (the
    guest then wrote 1.3 GiB/s: `s1-0291` in the benchmark). Now lmwatch says the
    writing changed and gives no verdict until the second pass is counted. The steady
    guest, measured alike, gets its verdict at once."""
    decided_in = _measured_64_gib_guest(pattern, 32 * GIB, Writer.RANDOM, until=200.0)

    second = decided_in(2)
    assert second.prediction is not None
    if rose:
        assert second.rule is Rule.ONE_PASS_EITHER_WAY, second.reason
        assert second.prediction.converges is None and second.prediction.eta_seconds is None
        assert "its writing changed" in second.reason
        third = decided_in(3)
        assert third.prediction is not None and third.prediction.converges is False
    else:
        assert second.rule is not Rule.ONE_PASS_EITHER_WAY, second.reason
        assert second.prediction.converges is not None


@pytest.mark.parametrize(
    ("pattern", "converges"),
    [
        pytest.param(
            GrowingRate(pattern="growing", start=100 * MIB, per_minute=600 * MIB, max=3 * GIB),
            False,
            id="growing",
        ),
        pytest.param(ConstantRate(rate=100 * MIB), True, id="steady"),
    ],
)
@pytest.mark.parametrize("writer", [Writer.SEQUENTIAL, Writer.RANDOM])
def test_1_a_first_pass_that_filled_the_working_set_gives_no_verdict_on_the_measurement_alone(
    pattern: GrowingRate | ConstantRate, converges: bool, writer: Writer
) -> None:
    """A guest of 64 GiB writing over 4 GiB, measured at 100 MiB/s before the start,
    over a 500 MiB/s link: the first pass (131 s) fills the working set whether the
    guest kept writing 100 MiB/s or grew to 1.4 GiB/s meanwhile, so its count says
    nothing of the rate now, and on the measurement alone the fit said "finishes on its
    own in a few seconds" for both; the growing guest then never converged (growing
    guests in the benchmark: `s2-0259` on batch, "finishes in 45 s", took 5.4 min;
    `s43-0215`, 32 s and 4.1 min). Now neither gets a verdict until the second pass,
    8 s and too short to fill the working set, is counted; then each gets its own."""
    decided_in = _measured_64_gib_guest(pattern, 4 * GIB, writer, until=160.0)

    second = decided_in(2)
    assert second.rule is Rule.ONE_PASS_EITHER_WAY, second.reason
    assert second.action is Action.CONTINUE
    assert second.prediction is not None
    assert second.prediction.converges is None and second.prediction.eta_seconds is None
    assert "filled the working set" in second.reason
    assert "finishes on its own" not in second.reason
    third = decided_in(3)
    assert third.prediction is not None and third.prediction.converges is converges, third.reason
    assert (third.prediction.eta_seconds is not None) is converges


@pytest.mark.parametrize("working_set", ["100MiB", "120MiB", "127MiB"])
@pytest.mark.parametrize("write_rate", ["1500MiB/s", "2530MiB/s", "5000MiB/s"])
@pytest.mark.parametrize("writer", ["sequential", "random"])
def test_1_when_every_window_filled_the_working_set_the_eta_holds_at_any_faster_rate(
    working_set: str, write_rate: str, writer: str
) -> None:
    """A guest rewriting 100-127 MiB of 2.75 GiB at 1.5-5 GiB/s, a 450 MiB/s link: the
    measurement before the start and the 6 s first pass both count the whole working
    set, which says only that the guest writes at least some least rate. The working
    set fits the budget, so copying converges at any rate; but how soon depends on it:
    at a faster rate every pass fills the working set, and only the first pass's rest
    lying outside it shrinks, a burst at a time. The first ETA was the least rate's,
    up to 1.76 times too short (`s4-0256`); it is now the longer of that and the
    faster reading's (`FASTER_READING`), the evidence being the same for every writer
    and rate here: never more than a third too short, and within a quarter of what
    happens, but for a count that lands just under the threshold at the slowest random
    writer (the first pass runs to its end under the budget it holds, and the count a
    burst into the second lands 1 % under the threshold at 1.5 GiB/s, while faster
    writers fill more of the working set and take 0.56-0.66 s): that one finishes in
    0.45 s, sooner than the ETA, which takes the longer reading (0.69).

    The reading before the start is a page-sampling count over one second, and it
    scatters: at 127 MiB it lands at 138 MiB (+2.2 standard deviations of its binomial
    count, the draw fixed by the workload's name), above the working set the pass then
    counts, and beside the pass it reads as a steady 138 MiB/s writer that the next,
    shorter pass would leave 45 MiB. That first ETA is up to 1.46 times too short (the
    issue's tolerance at p90 is 1.5); with the exact count (or the 2 s window read until
    the window became one second) it was within 1.01."""
    workload = _workload(
        memory="2816MiB",
        working_set=working_set,
        writer=writer,
        change_rate=write_rate,
        bandwidth="450.6MiB/s",
        switchover="65ms",
    )
    result = run(workload, STRICT, lmwatch_factory)
    assert result.outcome == "completed"
    knife_edge = (working_set, write_rate, writer) == ("127MiB", "1500MiB/s", "random")
    assert result.eta_ratio is not None and (0.65 if knife_edge else 0.75) <= result.eta_ratio
    scattered_above = working_set == "127MiB" and (writer, write_rate) != ("random", "1500MiB/s")
    limit = 1.5 if scattered_above else 1.33
    assert result.eta_ratio <= limit, (result.eta_predicted, result.eta_actual)


def _working_sets_read(
    workload: Workload, limit: float | None = None
) -> list[tuple[float, int, float]]:
    """(time, pass, working set fitted in MiB) at every sample from pass 3 on, as
    lmwatch reads it running `workload` under `STRICT`."""
    read: list[tuple[float, int, float]] = []

    class Watching(LmwatchController):
        def step(self, sample: Sample, now: float) -> Sequence[Command]:
            commands = super().step(sample, now)
            if sample.passes >= 3 and self.ctx is not None:
                model = analyse(self.track, self.ctx, self.settings).model
                assert model is not None
                read.append((now, sample.passes, model.working_set / MIB))
            return commands

    run(workload, STRICT, Watching, limit=limit)
    return read


@pytest.mark.parametrize("write_rate", ["2000MiB/s", "2860MiB/s", "4000MiB/s", "8000MiB/s"])
@pytest.mark.parametrize("switchover", ["100ms", "151ms"])
@pytest.mark.parametrize("bandwidth", ["1000MiB/s", "1038.3MiB/s"])
def test_1_passes_of_one_duration_do_not_pick_the_working_set(
    write_rate: str, switchover: str, bandwidth: str
) -> None:
    """A sequential writer sweeping 468 MiB of 5.5 GiB, faster than the link: after the
    5 s first pass, every pass ends at the threshold within 0.1-0.2 s, and what each
    left depends on where the sweep stood. Pairs of about one duration fix one point of
    the saturating curve; the fit used to take them alone (or with a pass hardly
    longer) and, from one sample to the next, read a working set of 1.6 GiB or all of
    memory at a twentieth of the rate. With it, a strict profile raised its budget on a
    projected floor below every count seen (`s7-0082`). The first pass, whose count
    shows how far the writes spread in 5 s, now takes part: the working set stays read
    as about what it is."""
    workload = _workload(
        memory="5632MiB",
        working_set="468MiB",
        writer="sequential",
        change_rate=write_rate,
        bandwidth=bandwidth,
        switchover=switchover,
    )
    read = _working_sets_read(workload, limit=15.0)
    assert len(read) > 20
    wrong = [(t, round(w)) for t, _, w in read if not 0.8 * 468 <= w <= 1.25 * 468]
    assert not wrong


@pytest.mark.parametrize(
    "write_rate",
    [
        pytest.param("150MiB/s", id="steady"),
        pytest.param("200MiB/s", id="steady-faster"),
        pytest.param(
            {"pattern": "growing", "start": "74.5MiB/s", "per_minute": "29.8MiB/s"},
            id="growing",
        ),
    ],
)
def test_1_the_first_pass_still_tells_the_working_set_after_a_hundred_passes(
    write_rate: str | Mapping[str, str],
) -> None:
    """A random writer over 629 MiB of 24 GiB, about as fast as a 136 MiB/s link: after
    the 3-minute first pass, passes of a few seconds follow, a hundred of them long
    before the deadline. Their pairs fix one point of the curve; the first pass's pair
    tells the working set. It used to leave the passes kept after a hundred more, and
    the fit then read anything from 348 MiB to all of memory (`s4-0071`, waiting out
    the deadline on a "quieter phase" that memory-wide reading implied). Memory's
    first passes are now kept however long the migration runs."""
    workload = _workload(
        memory="24GiB",
        working_set="629MiB",
        writer="random",
        change_rate=write_rate,
        bandwidth="1.14Gbit/s",
        switchover="24ms",
    )
    read = _working_sets_read(workload)
    assert max(n for _, n, _ in read) > 110  # well past a hundred passes
    wrong = [(n, round(w)) for _, n, w in read if not 0.8 * 629 <= w <= 1.25 * 629]
    assert not wrong


@pytest.mark.parametrize("memory", ["24GiB", "25.5GiB", "27GiB"])
@pytest.mark.parametrize("write_rate", ["40GiB/s", "64GiB/s"])
@pytest.mark.parametrize("writer", ["sequential", "random"])
def test_1_rewriting_an_unsent_working_set_adds_nothing_to_a_handover(
    writer: str, write_rate: str, memory: str
) -> None:
    """A guest rewriting 2 GiB at 4-6x a 10 GiB/s link: each pass after the first
    leaves the whole working set unsent, and passes (0.2 s) are shorter than the time
    between samples, so a decision falls up to a pass into one. What the guest wrote
    since the pass began was taken as new on top of the rest (up to a working set
    more), when the hypervisor counts a page once: the rest already holds every page
    the guest writes. A handover of 0.2 s was read as up to 0.28 s and refused
    against a 0.25 s bound, and the migration cancelled at the deadline; it now hands
    over, saying how long it runs degraded within a tenth."""
    profile = Profile(
        name="handover",
        max_blackout=0.1,
        handover=HandoverPolicy.ALLOWED,
        max_degraded=0.25,
        deadline=Deadline(fixed=1200),
        on_deadline=OnDeadline.COMPLETE,
    )
    workload = _workload(
        memory=memory,
        working_set="2GiB",
        writer=writer,
        change_rate=write_rate,
        bandwidth="10GiB/s",
        switchover="60ms",
    )
    controllers, factory = _keeping(LmwatchController)

    result = run(workload, profile, factory)
    assert result.outcome == "completed" and result.handed_over
    assert judge(result, profile, workload).clean
    handed_at = _first_command_at(controllers[0], "handover")
    said = dict(controllers[0].predictions).get(handed_at) if handed_at else None
    assert said is not None and result.degraded_seconds is not None
    assert said == pytest.approx(result.degraded_seconds, rel=0.1)


# -- 2. the switchover cost inside max_blackout -------------------------------------------


LATENCY_CRITICAL_LIKE = Profile(
    name="latency-critical-like",
    max_blackout=0.3,
    deadline=Deadline(fixed=1200),
    on_deadline=OnDeadline.COMPLETE,
)


@pytest.mark.parametrize(
    ("working_set", "completes"),
    [
        ("200MiB", True),  # ~195ms of copy + 40ms of switchover: fits 300ms
        # The first count after the first pass comes a burst into the sweep: ~250MiB of
        # the working set, ~244ms + 40ms, fits (the first pass ran to its end under the
        # held budget, so no tail of it is carried)
        ("280MiB", True),
        ("300MiB", False),  # the working set alone ~293ms + 40ms: nothing fits 300ms
    ],
)
def test_2_the_measured_blackout_stays_within_max_blackout(
    working_set: str, completes: bool
) -> None:
    """A sequential writer over a small working set: a pass of a full sweep or more
    leaves the whole working set behind, so the final copy needs up to W/B. The
    hypervisor stops the guest once a count fits the budget and the 40ms switchover
    comes on top."""
    workload = _workload(
        memory="4GiB",
        working_set=working_set,
        writer="sequential",
        change_rate="2GiB/s",
        bandwidth="1GiB/s",
    )
    result = run(workload, LATENCY_CRITICAL_LIKE, lmwatch_factory, limit=120.0)
    assert result.blackout_seconds is None or result.blackout_seconds <= 0.3
    assert (result.outcome == "completed") is completes
    if completes:
        assert result.blackout_seconds is not None and result.blackout_seconds > 0.2


def test_2_no_final_stop_copies_the_tail_of_the_first_pass() -> None:
    """A guest rewriting 33MiB, on a link that slows to 55% just before its first pass
    ends. With the whole budget (250ms) in force during the first pass, the hypervisor
    stopped the guest while 250ms of memory was still unsent, and the slower link
    stretched that stop to about 430ms, over the 300ms limit. The first pass now holds
    a 50ms budget: it runs to its end, and the stop copies what the guest rewrote."""
    workload = _workload(
        memory="2.5GiB",
        working_set="33MiB",
        writer="sequential",
        change_rate="14400MiB/s",
        bandwidth="18.4Gbit/s",
        switchover="10ms",
        link_events=[{"at": "1s", "kind": "bandwidth", "value": 0.55}],
    )
    result = run(workload, LATENCY_CRITICAL_LIKE, lmwatch_factory, limit=60.0)
    assert result.outcome == "completed"
    assert result.blackout_seconds is not None and result.blackout_seconds <= 0.1
    assert result.passes >= 2  # the stop came after the first pass


# -- 3. one pass is enough --------------------------------------------------------------------


class _MeasuredBeforeStart(LmwatchController):
    """lmwatch's controller with the change rate measured before the start (the engine
    takes that measurement when the profile may slow the guest; here it is given for a
    profile that may only pause)."""

    def start(self) -> StartPlan:
        plan = super().start()
        assert self.ctx is not None
        self.ctx = replace(self.ctx, change_rate_before_start=self.setting.change_rate)
        return plan


def test_3_a_hopeless_workload_is_paused_right_after_the_first_pass() -> None:
    """3x the link's rate over 1 GiB: the pre-start measurement and the first pass say it
    saturates, and a pause of the working set fits max_pause (all of memory would not).
    It pauses at the start of pass 2, not after a fixed count of passes."""
    profile = Profile(name="pause", max_blackout=0.3, may_pause=True, max_pause=15)
    workload = _workload(
        memory="2GiB",
        working_set="1GiB",
        writer="random",
        change_rate="300MiB/s",
        bandwidth="100MiB/s",
    )
    controllers, factory = _keeping(_MeasuredBeforeStart)

    result = run(workload, profile, factory)
    assert result.outcome == "completed" and result.paused
    assert result.passes == 2  # paused during the second pass
    paused_at = _first_command_at(controllers[0], "pause")
    # pass 1 ends once less than the budget's worth is left (at most max_blackout); the
    # job began once the measurement before it was over
    begun = controllers[0].started_at
    first_pass = begun + workload.memory / workload.bandwidth - profile.max_blackout
    assert paused_at is not None and first_pass < paused_at <= first_pass + 2.0
    assert result.pause_seconds is not None and result.pause_seconds <= profile.max_pause


def test_3_a_first_pass_handover_needs_room_for_the_link_to_slow() -> None:
    """3 GiB/s over 2 GiB of a 14 GiB guest, a 700 MiB/s link that drops to 40 % ten
    seconds in. The measurement before the start says copying cannot converge, and a
    handover at the first sample would mean about 20 s of degraded running: within the
    30 s limit, but not 1.5 times over. Handed over then, the drop stretched it to 35 s
    (34 s in `s4-0031`). Waiting for the first pass to end leaves only what the guest
    rewrote, about 2 GiB, and the handover then fits even at the slower rate."""
    profile = LATENCY_CRITICAL_LIKE.model_copy(
        update={"handover": HandoverPolicy.ALLOWED, "max_degraded": 30.0}
    )
    workload = _workload(
        memory="14GiB",
        working_set="2GiB",
        writer="random",
        change_rate="3GiB/s",
        bandwidth="700MiB/s",
        link_events=[{"at": "10s", "kind": "bandwidth", "value": 0.4}],
    )
    result = run(workload, profile, lmwatch_factory)
    assert result.outcome == "completed" and result.handed_over, result.actions
    assert result.degraded_seconds is not None
    assert result.degraded_seconds <= profile.max_degraded, result.actions
    handovers = [at for at, action, _ in result.actions if action == "handover"]
    assert handovers and handovers[0] > 30.0  # after the first pass (about 35 s)


# -- 4. time left is evidence too -------------------------------------------------------------


def _phased(*phases: tuple[str, str], repeat: bool) -> Mapping[str, Any]:
    """A phased change rate: (rate, duration) each."""
    return {
        "pattern": "phased",
        "repeat": repeat,
        "phases": [{"rate": rate, "duration": duration} for rate, duration in phases],
    }


def test_4_a_busy_phase_is_waited_out_when_the_deadline_is_far() -> None:
    """Busy for 200s (3x the link's rate), then quiet. A strict profile (500ms, nothing
    else, 10 minutes, cancel at the deadline) gives the busy phase time to pass."""
    workload = _workload(
        memory="2GiB",
        working_set="1GiB",
        writer="random",
        change_rate=_phased(("300MiB/s", "200s"), ("2MiB/s", "1h"), repeat=False),
        bandwidth="100MiB/s",
    )
    result = run(workload, STRICT, lmwatch_factory)
    assert result.outcome == "completed"
    assert 200 < result.total_seconds < 600
    assert result.blackout_seconds is not None and result.blackout_seconds <= 0.5


def test_4_patience_counts_from_when_passes_began_to_show_the_rate() -> None:
    """A 5-minute first pass (117 GiB over 400 MiB/s) averages a guest whose busy
    phases (540-640 MiB/s) give way to a quiet one (84 MiB/s) every 270 s. After it,
    passes show only busy writing, steady for 150 s by 450 s, when a patience counted
    from the start (three quarters of 600 s) gave up, 27 s before the quiet phase.
    Counted from when passes began to show the rate, a phase steady for 150 s with 150 s
    left still changes with a chance of about one half: lmwatch waits, and copying
    converges in the quiet phase."""
    busy_then_quiet = _phased(
        ("541MiB/s", "111s"), ("641MiB/s", "96s"), ("84MiB/s", "63s"), repeat=True
    )
    workload = _workload(
        memory="116.75GiB",
        working_set="3497MiB",
        writer="random",
        change_rate=busy_then_quiet,
        bandwidth="3.35Gbit/s",
    )
    result = run(workload, STRICT, lmwatch_factory)
    assert result.outcome == "completed", result.actions
    assert 477 < result.total_seconds < 540  # in the second quiet phase
    assert result.blackout_seconds is not None and result.blackout_seconds <= 0.5


@pytest.mark.parametrize("working_set", [30 * MIB, 34 * MIB, 40 * MIB])
@pytest.mark.parametrize("poll", [0.5, 1.0])
def test_4_a_steady_writer_shows_no_quieter_phase(working_set: int, poll: float) -> None:
    """The rig's busy guest: 40MiB/s at random over ~34MiB, a 16MiB/s link. Its long
    first pass saturates the working set, so the rate that pass implies through the
    model swings with the fitted W; read as a quieter phase, it kept a hopeless
    migration waiting until its deadline. A steady writer has no quieter phase."""
    plan = StartPlan(arm_handover=False, arm_slow_down=False, blackout_budget=0.3)
    migration = Migration(
        memory=128 * MIB,
        working_set=working_set,
        change_rate=ConstantRate(rate=40 * MIB),
        bandwidth=16 * MIB,
        plan=plan,
        writer=Writer.RANDOM,
    )
    samples = _samples_of(migration, until=60.0, poll=poll)
    ctx = MigrationContext(
        started_at=0.0,
        memory_bytes=128 * MIB,
        plan=plan,
        blackout_budget=0.3,
        deadline_at=60.0,
        change_rate_before_start=39 * MIB,
    )
    for end in range(2, len(samples)):
        a = analyse(samples[: end + 1], ctx)
        if a.model is not None:
            assert a.best_model == a.model, f"t={samples[end].time:g}s"


def test_4_only_passes_that_left_clearly_less_than_the_model_say_quieter() -> None:
    """From the rig's timeline: the fit (28.6MiB/s over 45.8MiB) and passes that each
    left 30-32MiB. The long first pass "implies" 8.8MiB/s through that fit; it left
    what the model predicts, so it is no quieter phase. A pass that left a sixth of
    the prediction is one, and its rate is what it implies."""
    model = DirtyModel(rate=28.6 * MIB, working_set=45.8 * MIB)
    busy = [Pair(5.5, 0.0, 30.0 * MIB), Pair(2.1, 0.0, 30.9 * MIB), Pair(2.0, 0.0, 31.4 * MIB)]
    assert quiet_rate(busy, model, 128 * MIB) is None
    quiet = Pair(2.0, 0.0, 5.0 * MIB)
    rate = quiet_rate([*busy, quiet], model, 128 * MIB)
    assert rate is not None
    assert rate == pytest.approx(-45.8 * math.log1p(-5.0 / 45.8) / 2.0 * MIB)


@pytest.mark.parametrize("draw", range(10))
def test_4_counts_that_fill_the_working_set_are_as_steady_as_they_look(draw: int) -> None:
    """The rig's busy guest (scenario 4): about 250MiB/s at random over 32MiB, a
    16.3MiB/s link, 60 s to the deadline, neither pause nor handover. On the real host
    the working set moves a few MiB from pass to pass (the guest's kernel and page
    cache: `jitter`), and every pass fills it. The rate such a count implies through
    the model swings by several times with those few MiB; read as varying rates, they
    kept lmwatch waiting for steadier readings until the deadline (in 6 of these 10
    draws of the jitter). The counts are steady: patience runs out as it does without
    the jitter, and lmwatch cancels before the deadline."""
    profile = Profile(
        name="neither", max_blackout=0.3, deadline=Deadline(fixed=60), on_deadline=OnDeadline.CANCEL
    )
    workload = _workload(
        name=f"rig-4-{draw}",
        memory="128MiB",
        working_set="32MiB",
        writer="random",
        change_rate="250MiB/s",
        bandwidth="16.3MiB/s",
        jitter=2 / 32,  # 30-34MiB a pass
    )
    result = run(workload, profile, lmwatch_factory)
    assert result.outcome == "cancelled", result.actions
    assert result.total_seconds < 55.0, result.actions
    cancels = [reason for _, action, reason in result.actions if action == "cancel"]
    assert cancels and "nothing this profile allows can finish it" in cancels[0]


@pytest.mark.parametrize("bandwidth", ["5.79Gbit/s", "6.5Gbit/s"])
@pytest.mark.parametrize("working_set", ["436MiB", "520MiB"])
@pytest.mark.parametrize("write_rate", ["1500MiB/s", "2490MiB/s", "4000MiB/s"])
def test_4_counts_that_nearly_fill_the_working_set_are_as_steady_as_they_look(
    write_rate: str, working_set: str, bandwidth: str
) -> None:
    """A sequential writer 2-6x faster than the link over 436-520 MiB of 16.75 GiB:
    after the first pass, passes of a fifth of a second end at the threshold, each
    leaving 70-75 % of the working set as the sweep stood, and the next one begins with
    about all of it. Their counts hold within a few per cent; the rates they imply
    through the model swing by ten times (a count near the working set is
    ill-conditioned), and read as varying rates they kept lmwatch waiting for steadier
    readings, up to the deadline (`s4-0272`). Steady counts are steady readings: from
    the first minute on, rule 12 waits only on patience."""
    workload = _workload(
        memory="16.75GiB",
        working_set=working_set,
        writer="sequential",
        change_rate=write_rate,
        bandwidth=bandwidth,
        switchover="29ms",
    )
    varying: list[float] = []

    class Watching(LmwatchController):
        def step(self, sample: Sample, now: float) -> Sequence[Command]:
            commands = super().step(sample, now)
            assert self.ctx is not None
            decision = policies.decide(self.setting.profile, self.track, self.ctx, now)
            if now > 60.0 and decision.rule is Rule.RATES_VARY:
                varying.append(now)
            return commands

    run(workload, STRICT, Watching, limit=150.0)
    assert not varying, (len(varying), varying[:3])


# -- 5. the slow-down ETA ---------------------------------------------------------------------


def test_5_slowing_that_finishes_well_before_the_deadline_is_waited_for() -> None:
    """2.5x the link's rate over 2 GiB; the profile may slow the guest and cancels at a
    5 minute deadline. The hypervisor raises the throttle step by step and copying
    converges after about two minutes: not cancelled, and the ETA made after the first
    pass is close to what it took."""
    profile = Profile(
        name="slow",
        max_blackout=0.5,
        may_slow_down=True,
        deadline=Deadline(fixed=300),
        on_deadline=OnDeadline.CANCEL,
    )
    workload = _workload(
        memory="4GiB",
        working_set="2GiB",
        writer="random",
        change_rate="250MiB/s",
        bandwidth="100MiB/s",
    )
    result = run(workload, profile, lmwatch_factory)
    assert result.outcome == "completed"
    assert result.max_slowdown > 0
    assert result.total_seconds < 0.5 * 300
    assert result.blackout_seconds is not None and result.blackout_seconds <= 0.5
    assert result.eta_predicted is not None and result.eta_actual is not None
    assert abs(result.eta_predicted - result.eta_actual) <= 0.5 * result.eta_actual


# -- 6. after a restart ------------------------------------------------------------------------


def _reattached(
    workload: Workload, profile: Profile, share: float, limit: float
) -> tuple[Run, LmwatchController, list[Decision]]:
    """Migrate without lmwatch until `share` of pass 9 is sent, then attach a fresh
    controller (as after a restart: the samples begin mid-pass) and run to the end."""
    setting = setting_for(workload, profile)
    simulation = Simulation(workload, LmwatchController(setting).start())
    migration = simulation.migration
    t = 0.0
    while not (
        migration.passes == 9
        and migration.reported_remaining <= (1 - share) * migration.pass_remainders[-1]
    ):
        t += 1.0
        simulation.advance_to(t)
        assert migration.passes <= 9 and not simulation.finished
    controller = LmwatchController(setting)
    controller.start()
    decisions: list[Decision] = []
    seen: list[Sample] = []  # what the controller has seen
    while t < limit:
        t += 1.0
        simulation.advance_to(t)
        if simulation.finished:
            break
        sample = simulation.sample()
        assert controller.ctx is not None
        seen.append(sample)
        decisions.append(policies.decide(profile, seen, controller.ctx, t))
        for command in controller.step(sample, t):
            controller.applied(command, simulation.apply(command))
    return simulation.record(profile=profile.name, controller="lmwatch"), controller, decisions


@pytest.mark.parametrize(
    ("max_pause", "pauses"),
    [
        (12.0, True),  # a pause of the working set (~10s) fits
        (5.0, False),  # it does not; the mid-pass remainder must not make it look so
    ],
)
def test_6_a_reattached_migration_rebuilds_evidence_before_pausing(
    max_pause: float, pauses: bool
) -> None:
    """3x the link's rate over 1 GiB; lmwatch comes back half-way through pass 9. The
    pass's start was not seen, so what the guest dirtied during it is unknown: it keeps
    going until it has seen passes whole, and a pause it then decides fits max_pause."""
    profile = Profile(
        name="pause",
        max_blackout=0.3,
        may_pause=True,
        max_pause=max_pause,
        deadline=Deadline(fixed=600),
        on_deadline=OnDeadline.CANCEL,
    )
    workload = _workload(
        memory="2GiB",
        working_set="1GiB",
        writer="random",
        change_rate="300MiB/s",
        bandwidth="100MiB/s",
    )
    result, controller, decisions = _reattached(workload, profile, share=0.5, limit=240.0)
    first = decisions[0]
    # Nothing forces it yet; the budget the first pass held (the daemon went away
    # during it) may go up to the plan's (rule 3b), since what is left is what the
    # guest rewrote.
    assert first.action.value in ("continue", "raise-blackout")
    assert "gathering evidence" in first.reason
    if result.paused:  # measured in the simulator: what the guest really had left
        assert result.pause_seconds is not None and result.pause_seconds <= max_pause
    assert result.paused is pauses
    if pauses:
        assert result.outcome == "completed"
        assert result.pause_seconds is not None and result.pause_seconds <= max_pause
        paused_at = _first_command_at(controller, "pause")
        assert paused_at is not None
        assert result.passes >= 10  # decided once a pass was seen from its start


# -- the blackout property -------------------------------------------------------------------


_rates = st.one_of(
    st.floats(0.0, 3.0).map(lambda share: ("constant", share)),
    st.tuples(st.floats(0.0, 0.5), st.floats(0.5, 4.0), st.floats(5.0, 60.0)).map(
        lambda bursty: ("bursty", *bursty)
    ),
)


def _rate(kind: tuple[Any, ...], bandwidth: float) -> Any:
    if kind[0] == "constant":
        return kind[1] * bandwidth
    _, base, peak, period = kind
    return {
        "pattern": "bursty",
        "base": base * bandwidth,
        "peak": peak * bandwidth,
        "period": period,
        "duty": 0.3,
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    memory_mib=st.integers(256, 4096),
    ws_share=st.floats(0.01, 1.0),
    rate=_rates,
    bandwidth_mib=st.integers(100, 2048),
    switchover=st.floats(0.0, 0.1),
    headroom=st.floats(0.05, 1.5),
    writer=st.sampled_from(["sequential", "random"]),
    slow=st.booleans(),
)
def test_without_pause_or_handover_the_blackout_never_exceeds_max_blackout(
    memory_mib: int,
    ws_share: float,
    rate: tuple[Any, ...],
    bandwidth_mib: int,
    switchover: float,
    headroom: float,
    writer: str,
    slow: bool,
) -> None:
    """Whatever the guest does, the budget lmwatch hands the hypervisor leaves room for
    the host pair's switchover (learned from earlier migrations): the measured blackout
    stays within max_blackout."""
    bandwidth = bandwidth_mib * MIB
    workload = _workload(
        memory=f"{memory_mib}MiB",
        working_set=f"{max(1, int(memory_mib * ws_share))}MiB",
        writer=writer,
        change_rate=_rate(rate, bandwidth),
        bandwidth=bandwidth,
        switchover=switchover,
    )
    profile = Profile(
        name="p",
        max_blackout=round(switchover + headroom, 3),
        may_slow_down=slow,
        deadline=Deadline(fixed=600),
        on_deadline=OnDeadline.COMPLETE,
    )
    limit = 3 * workload.first_pass + 60.0
    result: Run = run(workload, profile, lmwatch_factory, limit=limit)
    assert result.outcome in ("completed", "cancelled", "unfinished")
    assert not result.paused and not result.handed_over
    if result.outcome == "completed":
        assert result.blackout_seconds is not None
        assert result.blackout_seconds <= profile.max_blackout + 1e-6
