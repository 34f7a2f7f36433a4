"""Simulator fidelity (issue 7): how guests write, the switchover cost, phased workloads.

Pure: the model and the inventory only, no I/O (the driver tests run in virtual time).
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from samplingtools import page_sampling_spread

from lmwatch.clock import VirtualClock
from lmwatch.drivers.inventory import (
    BurstyRate,
    ConstantRate,
    Inventory,
    InventoryError,
    Phase,
    PhasedRate,
    load_inventory_text,
)
from lmwatch.drivers.sim import SimDriver
from lmwatch.drivers.simphysics import (
    Migration,
    RatePattern,
    Tuning,
    Writer,
    grow_dirty,
    measured_change_rate,
    page_sampled,
)
from lmwatch.model import GIB, MIB, MigrationRequest, StartPlan
from lmwatch.model import Phase as JobPhase

TUNING = Tuning()
DEVICE = TUNING.device_state
SYNC = TUNING.sync_time


def make(
    *,
    memory: int = 8 * GIB,
    working_set: int = 2 * GIB,
    rate: float = 0.0,
    bandwidth: float = 1 * GIB,
    budget: float = 0.05,
    writer: Writer = Writer.RANDOM,
    pattern: RatePattern | None = None,
    tuning: Tuning | None = None,
) -> Migration:
    return Migration(
        memory=memory,
        working_set=working_set,
        change_rate=pattern or ConstantRate(rate=rate),
        bandwidth=bandwidth,
        plan=StartPlan(arm_handover=False, arm_slow_down=False, blackout_budget=budget),
        tuning=tuning,
        writer=writer,
    )


def run_to_pass(model: Migration, passes: int, dt: float = 0.5, limit: float = 3600.0) -> None:
    end = model.elapsed + limit
    while model.passes < passes and model.elapsed < end and not model.phase.finished:
        model.advance(dt)


def run_to_end(model: Migration, dt: float = 0.5, limit: float = 3600.0) -> None:
    end = model.elapsed + limit
    while not model.phase.finished and model.elapsed < end:
        model.advance(dt)


def saturating(rate: float, seconds: float, working_set: float) -> float:
    return working_set * (1.0 - math.exp(-rate * seconds / working_set))


# ------------------------------------------------------------ random writers


@pytest.mark.parametrize("rate", [64 * MIB, 256 * MIB, 1 * GIB, 4 * GIB])
def test_random_writer_leaves_the_saturating_remainder_after_the_first_pass(
    rate: float,
) -> None:
    memory, working_set, bandwidth = 8 * GIB, 2 * GIB, 1 * GIB
    model = make(memory=memory, working_set=working_set, rate=rate, bandwidth=bandwidth)
    run_to_pass(model, 2)
    t = memory / bandwidth
    assert model.pass_remainders[1] == pytest.approx(saturating(rate, t, working_set), rel=0.01)


def test_random_writer_later_passes_follow_the_same_law() -> None:
    working_set, rate, bandwidth = 2 * GIB, 3 * GIB, 1 * GIB  # never converges
    model = make(working_set=working_set, rate=rate, bandwidth=bandwidth)
    run_to_pass(model, 8)
    for before, after in zip(model.pass_remainders[1:], model.pass_remainders[2:], strict=False):
        took = SYNC + before / bandwidth
        assert after == pytest.approx(saturating(rate, took, working_set), rel=0.01)
        assert after < working_set


def test_reported_change_rate_of_a_long_pass_saturates_for_random_writers() -> None:
    memory, working_set, rate, bandwidth = 16 * GIB, 1 * GIB, 2 * GIB, 1 * GIB
    model = make(memory=memory, working_set=working_set, rate=rate, bandwidth=bandwidth)
    run_to_pass(model, 2)
    t = memory / bandwidth  # 16 s: D·t = 32 W
    sample = model.snapshot(model.elapsed)
    assert sample.change_rate == pytest.approx(saturating(rate, t, working_set) / t, rel=0.01)
    assert sample.change_rate < rate / 3
    # and the circular estimate "remainder = reported rate × pass time" is all it gives
    assert model.pass_remainders[1] == pytest.approx(sample.change_rate * t, rel=0.01)


@pytest.mark.parametrize(
    ("rate", "expected"),
    [(256 * MIB, 256 * MIB * 16), (2 * GIB, 8 * GIB)],  # D·t below W, and capped at W
)
def test_sequential_writer_leaves_min_of_working_set_and_written(
    rate: float, expected: float
) -> None:
    memory, working_set, bandwidth = 16 * GIB, 8 * GIB, 1 * GIB
    model = make(
        memory=memory,
        working_set=working_set,
        rate=rate,
        bandwidth=bandwidth,
        writer=Writer.SEQUENTIAL,
    )
    run_to_pass(model, 2)
    t = memory / bandwidth
    assert expected == min(working_set, rate * t)
    assert model.pass_remainders[1] == pytest.approx(expected, rel=0.01)
    assert model.snapshot(model.elapsed).change_rate == pytest.approx(expected / t, rel=0.01)


def test_sequential_is_the_default_writer() -> None:
    model = Migration(
        memory=GIB,
        working_set=GIB,
        change_rate=ConstantRate(rate=MIB),
        bandwidth=GIB,
        plan=StartPlan(arm_handover=False, arm_slow_down=False, blackout_budget=0.3),
    )
    assert model.writer is Writer.SEQUENTIAL


def test_a_long_pass_of_a_random_writer_needs_few_steps() -> None:
    # 1 TiB at 1 GiB/s: a single pass of 1024 s; the closed form is exact per step
    model = make(memory=1024 * GIB, working_set=4 * GIB, rate=512 * MIB)
    steps = 0
    step = model._step

    def counting(h: float) -> None:
        nonlocal steps
        steps += 1
        step(h)

    model._step = counting  # type: ignore[method-assign]
    model.advance(1000.0)
    assert model.passes == 1
    assert steps <= 3
    assert model.dirtied == pytest.approx(saturating(512 * MIB, 1000.0, 4 * GIB), rel=1e-6)


@pytest.mark.parametrize("writer", list(Writer))
def test_step_size_does_not_change_the_result(writer: Writer) -> None:
    pattern = BurstyRate(pattern="bursty", base=20 * MIB, peak=900 * MIB, period=7.0, duty=0.3)
    coarse = make(pattern=pattern, writer=writer)
    fine = make(pattern=pattern, writer=writer)
    coarse.advance(60.0)
    for _ in range(6000):
        fine.advance(0.01)
    assert coarse.passes == fine.passes
    for a, b in zip(coarse.pass_remainders, fine.pass_remainders, strict=True):
        assert a == pytest.approx(b, rel=1e-6, abs=1.0)
    assert coarse.dirtied == pytest.approx(fine.dirtied, rel=1e-6, abs=1.0)


# ------------------------------------------------------- the switchover cost


def test_blackout_is_remainder_over_bandwidth_plus_switchover_and_may_pass_the_budget() -> None:
    bandwidth, rate, budget = 1 * GIB, 256 * MIB, 0.3
    model = make(rate=rate, bandwidth=bandwidth, budget=budget)
    run_to_end(model)
    assert model.phase is JobPhase.COMPLETED
    final = model.pass_remainders[-1]
    # stopped at the count that left a remainder below the threshold
    assert final <= bandwidth * budget + 1 < model.pass_remainders[-2]
    assert model.blackout == pytest.approx(final / bandwidth + DEVICE, rel=0.01)
    assert model.blackout is not None and model.blackout <= budget + DEVICE + 1e-6
    # it may pass the budget by the switchover cost: an idle guest whose remainder is
    # exactly the threshold at a count (8 GiB at 1 GiB/s: 0.3 GiB left at 7.7 s)
    idle = make(rate=0.0, bandwidth=bandwidth, budget=budget)
    run_to_end(idle)
    assert idle.blackout == pytest.approx(budget + DEVICE, rel=1e-6)
    assert idle.blackout > budget


def test_the_switchover_cost_is_the_tuning_constant() -> None:
    tuning = Tuning(device_state=0.25)
    # a budget of 0: an idle guest stops once everything is sent, only the switch is left
    model = make(rate=0.0, budget=0.0, tuning=tuning)
    run_to_end(model)
    assert model.phase is JobPhase.COMPLETED
    assert model.blackout == pytest.approx(0.25, abs=1e-6)
    # an idle guest stops as soon as what is unsent fits the budget: the full budget
    # goes to copying and the switch comes on top
    model = make(rate=0.0, budget=0.3, tuning=tuning)
    run_to_end(model)
    assert model.blackout == pytest.approx(0.3 + 0.25, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    writer=st.sampled_from(list(Writer)),
    memory_gib=st.integers(1, 16),
    ws_share=st.floats(0.05, 1.0),
    rate_share=st.floats(0.0, 0.5),
    bandwidth_mib=st.integers(100, 2000),
    # above the floor set by the sync time: D·sync/(B - D) <= sync for D <= B/2
    budget=st.floats(1.2 * SYNC, 1.0),
)
def test_blackout_never_passes_budget_plus_switchover(
    writer: Writer,
    memory_gib: int,
    ws_share: float,
    rate_share: float,
    bandwidth_mib: int,
    budget: float,
) -> None:
    bandwidth, memory = bandwidth_mib * MIB, memory_gib * GIB
    model = make(
        memory=memory,
        working_set=max(1, int(memory * ws_share)),
        rate=rate_share * bandwidth,
        bandwidth=bandwidth,
        budget=budget,
        writer=writer,
    )
    run_to_end(model, dt=2.0, limit=4 * memory / bandwidth + 60)
    assert model.phase is JobPhase.COMPLETED
    assert model.blackout is not None
    assert DEVICE - 1e-6 <= model.blackout <= budget + DEVICE + 1e-6


async def test_a_link_switchover_is_used_for_that_pair() -> None:
    inventory = load_inventory_text("""
hosts:
  - {name: a, memory: 64GiB}
  - {name: b, memory: 64GiB}
  - {name: c, memory: 64GiB}
links:
  - {between: [a, b], bandwidth: 1GiB/s, switchover: 200ms}
  - {between: [a, c], bandwidth: 1GiB/s}
instances:
  - {name: idle, host: a, memory: 1GiB, working_set: 64MiB}
  - {name: idle-2, host: a, memory: 1GiB, working_set: 64MiB}
""")
    clock = VirtualClock()
    driver = SimDriver(inventory, clock)
    plan = StartPlan(arm_handover=False, arm_slow_down=False, blackout_budget=0.3)
    await driver.start("slow", MigrationRequest(instance="idle", source="a", destination="b"), plan)
    await driver.start(
        "plain", MigrationRequest(instance="idle-2", source="a", destination="c"), plan
    )
    await clock.advance(10.0)
    slow, plain = await driver.result("slow"), await driver.result("plain")
    assert slow.phase is JobPhase.COMPLETED and plain.phase is JobPhase.COMPLETED
    # idle guests stop once the unsent rest fits the budget: budget + that pair's switch
    assert slow.blackout_seconds == pytest.approx(0.3 + 0.2, abs=1e-3)
    assert plain.blackout_seconds == pytest.approx(0.3 + driver.tuning.device_state, abs=1e-3)


# ---------------------------------------------------------- phased patterns

PHASES = (
    Phase(rate=10 * MIB, duration=30.0),
    Phase(rate=500 * MIB, duration=5.0),
    Phase(rate=100 * MIB, duration=15.0),
)


def numeric_amount(pattern: PhasedRate, t0: float, t1: float, n: int = 20000) -> float:
    h = (t1 - t0) / n
    return sum(pattern.at(t0 + (i + 0.5) * h) for i in range(n)) * h


@pytest.mark.parametrize("repeat", [True, False])
def test_phased_rate_values(repeat: bool) -> None:
    pattern = PhasedRate(pattern="phased", phases=PHASES, repeat=repeat)
    assert [pattern.at(t) for t in (0.0, 29.9, 30.0, 34.9, 35.0, 49.9)] == [
        10 * MIB,
        10 * MIB,
        500 * MIB,
        500 * MIB,
        100 * MIB,
        100 * MIB,
    ]
    assert pattern.at(50.0) == (10 * MIB if repeat else 100 * MIB)
    assert pattern.at(81.0) == (500 * MIB if repeat else 100 * MIB)
    assert pattern.at(-5.0) == 10 * MIB


@pytest.mark.parametrize("repeat", [True, False])
@pytest.mark.parametrize(("t0", "t1"), [(0, 30), (0, 50), (12.5, 33), (29, 131.7), (75, 75)])
def test_phased_rate_integral_is_exact(repeat: bool, t0: float, t1: float) -> None:
    pattern = PhasedRate(pattern="phased", phases=PHASES, repeat=repeat)
    exact = pattern.amount(t0, t1)
    assert exact == pytest.approx(numeric_amount(pattern, t0, t1), rel=1e-3, abs=1.0)
    # additive, so stepping cannot drift
    middle = (t0 + t1) / 2
    assert pattern.amount(t0, middle) + pattern.amount(middle, t1) == pytest.approx(exact)
    assert pattern.amount(t1, t0) == 0.0 or t0 == t1


def test_phased_rate_integral_by_hand() -> None:
    pattern = PhasedRate(pattern="phased", phases=PHASES)
    cycle = 30 * 10 * MIB + 5 * 500 * MIB + 15 * 100 * MIB
    assert pattern.amount(0, 50) == pytest.approx(cycle)
    assert pattern.amount(0, 100) == pytest.approx(2 * cycle)
    assert pattern.amount(25, 40) == pytest.approx(5 * 10 * MIB + 5 * 500 * MIB + 5 * 100 * MIB)
    once = PhasedRate(pattern="phased", phases=PHASES, repeat=False)
    assert once.amount(0, 100) == pytest.approx(cycle + 50 * 100 * MIB)


def test_phased_rate_next_change() -> None:
    pattern = PhasedRate(pattern="phased", phases=PHASES)
    assert pattern.next_change(0.0) == 30.0
    assert pattern.next_change(30.0) == 35.0
    assert pattern.next_change(40.0) == 50.0
    assert pattern.next_change(50.0) == 80.0
    assert pattern.next_change(149.0) == 150.0
    once = PhasedRate(pattern="phased", phases=PHASES, repeat=False)
    assert once.next_change(0.0) == 30.0
    assert once.next_change(36.0) is None  # the last phase goes on for ever
    # phases of the same rate are no change at all
    flat = PhasedRate(
        pattern="phased",
        phases=(Phase(rate=MIB, duration=3.0), Phase(rate=MIB, duration=4.0)),
    )
    assert flat.next_change(1.0) is None
    # neighbours of the same rate merge; the wrap-around counts when rates differ
    merged = PhasedRate(
        pattern="phased",
        phases=(
            Phase(rate=MIB, duration=3.0),
            Phase(rate=MIB, duration=4.0),
            Phase(rate=2 * MIB, duration=1.0),
        ),
    )
    assert merged.next_change(0.0) == 7.0
    assert merged.next_change(7.0) == 8.0
    assert merged.next_change(8.0) == 15.0


def test_phased_rate_in_a_migration_matches_its_integral() -> None:
    pattern = PhasedRate(pattern="phased", phases=PHASES)
    # one long pass (1 TiB at 1 GiB/s), a sequential writer with room: dirtied = written
    model = make(
        memory=1024 * GIB, working_set=1024 * GIB, pattern=pattern, writer=Writer.SEQUENTIAL
    )
    model.advance(123.4)
    assert model.dirtied == pytest.approx(pattern.amount(0, 123.4), rel=1e-9)


# ---------------------------------------------------------------- inventory

INVENTORY = """
hosts:
  - {name: a, memory: 64GiB}
  - {name: b, memory: 64GiB}
links:
  - {between: [a, b], bandwidth: 10Gbit/s, switchover: 40ms}
instances:
  - name: db
    host: a
    memory: 16GiB
    working_set: 4GiB
    writer: random
    change_rate:
      pattern: phased
      repeat: false
      phases:
        - {rate: 10MiB/s, duration: 2m}
        - {rate: 1GiB/s, duration: 30s}
  - {name: web, host: b, memory: 2GiB, change_rate: 5MiB/s}
"""


def test_inventory_reads_writer_phases_and_switchover() -> None:
    inv = load_inventory_text(INVENTORY)
    db, web = inv.instance("db"), inv.instance("web")
    assert db is not None and web is not None
    assert db.writer == "random" and web.writer == "sequential"
    assert db.change_rate == PhasedRate(
        pattern="phased",
        repeat=False,
        phases=(Phase(rate=10 * MIB, duration=120.0), Phase(rate=GIB, duration=30.0)),
    )
    assert inv.switchover("a", "b") == pytest.approx(0.04)
    assert inv.switchover("b", "a") == pytest.approx(0.04)
    assert inv.links[0].switchover == pytest.approx(0.04)


def test_inventory_round_trip() -> None:
    inv = load_inventory_text(INVENTORY)
    again = Inventory.model_validate(inv.model_dump())
    assert again == inv
    assert Inventory.model_validate_json(inv.model_dump_json()) == inv


def test_links_without_switchover_use_the_default() -> None:
    inv = load_inventory_text(INVENTORY.replace(", switchover: 40ms", ""))
    assert inv.switchover("a", "b") is None
    assert inv.switchover("a", "nowhere") is None


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("writer: random", "writer: chaotic", "writer"),
        (
            "phases:\n        - {rate: 10MiB/s, duration: 2m}\n"
            "        - {rate: 1GiB/s, duration: 30s}",
            "phases: []",
            "phases",
        ),
        ("duration: 30s", "duration: 0s", "duration"),
        ("switchover: 40ms", "switchover: soon", "switchover"),
    ],
)
def test_bad_new_fields_are_reported(old: str, new: str, message: str) -> None:
    assert old in INVENTORY
    with pytest.raises(InventoryError, match=message):
        load_inventory_text(INVENTORY.replace(old, new))


# ----------------------------------------------------- measured change rate


def test_measured_change_rate_values() -> None:
    working_set = 1 * GIB
    slow, fast = ConstantRate(rate=50 * MIB), ConstantRate(rate=400 * MIB)
    # sequential: the write rate while the window's writes fit W, then W / window
    assert measured_change_rate(slow, working_set, Writer.SEQUENTIAL, 10) == pytest.approx(50 * MIB)
    assert measured_change_rate(fast, working_set, Writer.SEQUENTIAL, 10) == pytest.approx(GIB / 10)
    # random: W·(1 - e^(-D·t/W)) / t, below D even in short windows
    for pattern in (slow, fast):
        expected = saturating(pattern.rate, 10, working_set) / 10
        got = measured_change_rate(pattern, working_set, Writer.RANDOM, 10)
        assert got == pytest.approx(expected, rel=1e-9)
        assert got < pattern.rate
    assert measured_change_rate(fast, working_set, Writer.RANDOM, 10) < 400 * MIB / 3
    assert measured_change_rate(fast, working_set, Writer.RANDOM, 0) == 0.0
    assert measured_change_rate(fast, 0, Writer.RANDOM, 10) == 0.0


def test_measured_change_rate_depends_on_when_it_is_measured() -> None:
    pattern = PhasedRate(pattern="phased", phases=PHASES)
    quiet = measured_change_rate(pattern, 64 * GIB, Writer.SEQUENTIAL, 10, start=0)
    busy = measured_change_rate(pattern, 64 * GIB, Writer.SEQUENTIAL, 5, start=30)
    assert quiet == pytest.approx(10 * MIB)
    assert busy == pytest.approx(500 * MIB)


async def test_the_driver_measures_distinct_bytes() -> None:
    inventory = load_inventory_text("""
hosts:
  - {name: a, memory: 64GiB}
instances:
  - {name: r, host: a, memory: 4GiB, working_set: 1GiB, change_rate: 400MiB/s, writer: random}
  - {name: s, host: a, memory: 4GiB, working_set: 1GiB, change_rate: 400MiB/s}
""")
    driver = SimDriver(inventory, VirtualClock())
    random_rate = await driver.measure_change_rate("r", "a")
    sequential_rate = await driver.measure_change_rate("s", "a")
    assert random_rate is not None and sequential_rate is not None
    # Over the second the real driver measures: 400 MiB written, all of it distinct for
    # the sequential writer, fewer for the random one (as page sampling reads them).
    assert random_rate.window == sequential_rate.window == 1.0
    distinct = saturating(400 * MIB, 1.0, GIB)
    assert random_rate.bytes_per_second == pytest.approx(
        distinct, abs=page_sampling_spread(distinct, 1.0, 4 * GIB)
    )
    assert sequential_rate.bytes_per_second == pytest.approx(
        400 * MIB, abs=page_sampling_spread(400 * MIB, 1.0, 4 * GIB)
    )


def test_a_page_sampling_reading_scatters_as_the_pages_it_samples() -> None:
    """The hypervisor hashes 512 random pages per GiB before and after the window, so a
    reading is a binomial count: centred on the distinct rate, as wide as the count of
    changed pages says, in whole MiB/s, fixed by its seed."""
    memory, rate = 16 * GIB, 300 * MIB
    readings = [page_sampled(rate, 1.0, memory, f"w:{i}") for i in range(400)]
    assert all(reading % MIB == 0 for reading in readings)
    assert page_sampled(rate, 1.0, memory, "w:7") == readings[7]
    mean = sum(readings) / len(readings)
    deviation = math.sqrt(sum((r - mean) ** 2 for r in readings) / (len(readings) - 1))
    samples = 512 * 16
    share = rate / memory
    expected = math.sqrt(samples * share * (1 - share)) / samples * memory
    assert mean == pytest.approx(rate, abs=4 * expected / math.sqrt(len(readings)) + MIB)
    assert deviation == pytest.approx(expected, rel=0.2)
    # a longer window finds more pages changed: relatively narrower
    longer = [page_sampled(rate, 4.0, memory, f"w:{i}") for i in range(400)]
    spread_longer = math.sqrt(sum((r - rate) ** 2 for r in longer) / len(longer))
    assert spread_longer < 0.7 * deviation
    assert page_sampled(0.0, 1.0, memory, "w") == 0.0
    assert page_sampled(rate, 0.0, memory, "w") == 0.0


# --------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None)
@given(
    writer=st.sampled_from(list(Writer)),
    working_set=st.integers(1, 64 * GIB),
    rate=st.floats(0.0, 16 * GIB),
    t1=st.floats(0.0, 3600.0),
    t2=st.floats(0.0, 3600.0),
)
def test_distinct_dirtied_bytes_grow_with_time_and_never_exceed_the_working_set(
    writer: Writer, working_set: int, rate: float, t1: float, t2: float
) -> None:
    early, late = sorted((t1, t2))
    pattern = ConstantRate(rate=rate)
    d_early = grow_dirty(writer, 0.0, pattern.amount(0, early), working_set)
    d_late = grow_dirty(writer, 0.0, pattern.amount(0, late), working_set)
    assert 0.0 <= d_early <= d_late <= working_set
    # what a measurement reports is the same count over the window
    if late > 0:
        measured = measured_change_rate(pattern, working_set, writer, late)
        assert measured * late == pytest.approx(d_late, rel=1e-9, abs=1e-6)
    # written in pieces or at once: the same
    middle = grow_dirty(writer, d_early, pattern.amount(early, late), working_set)
    assert middle == pytest.approx(d_late, rel=1e-9, abs=1e-3)


@settings(max_examples=60, deadline=None)
@given(
    writer=st.sampled_from(list(Writer)),
    ws_gib=st.integers(1, 64),
    rate_mib=st.integers(0, 8192),
    times=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=8),
)
def test_a_migration_dirties_monotonically_within_a_pass(
    writer: Writer, ws_gib: int, rate_mib: int, times: list[float]
) -> None:
    working_set, rate = ws_gib * GIB, rate_mib * MIB
    # 1 TiB at 1 GiB/s: the first pass outlasts every advance below
    model = make(memory=1024 * GIB, working_set=working_set, rate=rate, writer=writer)
    last = 0.0
    for dt in times:
        model.advance(dt)
        assert model.passes == 1
        assert last - 1e-6 <= model.dirtied <= working_set
        last = model.dirtied
    if writer is Writer.RANDOM:
        expected = saturating(rate, model.elapsed, working_set)
    else:
        expected = min(working_set, rate * model.elapsed)
    assert model.dirtied == pytest.approx(expected, rel=1e-6, abs=1.0)
