"""plan_start(), measuring_pays() and deadline_at()."""

from __future__ import annotations

import pytest

from lmwatch.model import GIB, MIB, Capabilities, InstanceInfo, StartPlan
from lmwatch.policies import (
    DEFAULT,
    deadline_at,
    learned_switchover,
    measuring_pays,
    plan_start,
)
from lmwatch.policies.start import start_projection
from lmwatch.profiles.schema import Deadline, Profile

INFO = InstanceInfo(name="vm1", uuid="u", host="a", memory_bytes=4 * GIB)


@pytest.mark.parametrize(
    ("profile", "caps", "arm_h", "arm_s", "budget"),
    [
        (Profile(name="p"), Capabilities(), False, False, 0.3),
        (Profile(name="p", handover="allowed"), Capabilities(), True, False, 0.3),
        (Profile(name="p", handover="allowed"), Capabilities(handover=False), False, False, 0.3),
        (Profile(name="p", may_slow_down=True), Capabilities(), False, True, 0.3),
        (Profile(name="p", may_slow_down=True), Capabilities(slow_down=False), False, False, 0.3),
        # 0.1s less the default 50ms switchover
        (Profile(name="p", max_blackout=0.1), Capabilities(), False, False, 0.05),
    ],
)
def test_arming_table(profile, caps, arm_h, arm_s, budget) -> None:  # type: ignore[no-untyped-def]
    plan = plan_start(profile, INFO, caps, None, None)
    assert plan.arm_handover is arm_h
    assert plan.arm_slow_down is arm_s
    assert plan.blackout_budget == pytest.approx(budget)
    assert plan.slow_down_initial == pytest.approx(DEFAULT.slow_down_initial)
    assert plan.reason
    if profile.handover_allowed and not caps.handover:
        assert "not supported" in plan.reason


@pytest.mark.parametrize(
    ("max_blackout", "switchover", "budget"),
    [
        (0.5, 0.04, 0.3),  # the initial budget fits: unchanged
        (0.3, 0.04, 0.26),  # 300ms of blackout, 40ms of it switching over
        (0.5, 0.3, 0.2),
        (0.1, 0.2, 0.0),  # the switchover alone exceeds the profile
    ],
)
def test_first_budget_leaves_room_for_the_switchover(
    max_blackout: float, switchover: float, budget: float
) -> None:
    profile = Profile(name="p", max_blackout=max_blackout)
    plan = plan_start(profile, INFO, Capabilities(), None, None, switchover=switchover)
    assert plan.blackout_budget == pytest.approx(budget)
    assert plan.blackout_budget + switchover <= max_blackout or plan.blackout_budget == 0.0
    assert "for the switchover" in plan.reason


def test_unknown_switchover_assumes_the_default() -> None:
    profile = Profile(name="p", max_blackout=0.3)
    plan = plan_start(profile, INFO, Capabilities(), None, None)
    assert plan.blackout_budget == pytest.approx(0.3 - DEFAULT.switchover_seconds)


def test_higher_initial_slowdown_when_start_estimate_says_stuck() -> None:
    profile = Profile(name="p", may_slow_down=True)
    plan = plan_start(profile, INFO, Capabilities(), 150 * MIB, 100 * MIB)
    assert plan.arm_slow_down
    assert DEFAULT.slow_down_initial < plan.slow_down_initial <= DEFAULT.max_initial_slowdown
    assert 150 * (1 - plan.slow_down_initial) < 100  # enough to bring D below B
    assert "150.0MiB/s" in plan.reason
    capped = plan_start(profile, INFO, Capabilities(), 1500 * MIB, 100 * MIB)
    assert capped.slow_down_initial == pytest.approx(DEFAULT.max_initial_slowdown)
    calm = plan_start(profile, INFO, Capabilities(), 10 * MIB, 100 * MIB)
    assert calm.slow_down_initial == pytest.approx(DEFAULT.slow_down_initial)


def test_stuck_without_slowing_says_so() -> None:
    plan = plan_start(Profile(name="p"), INFO, Capabilities(), 150 * MIB, 100 * MIB)
    assert not plan.arm_slow_down
    assert "not expected to converge" in plan.reason


@pytest.mark.parametrize(
    ("deadline", "memory", "expected"),
    [
        (None, 4 * GIB, None),
        (Deadline(fixed=600), 4 * GIB, 1600.0),
        (Deadline(per_gib=60, min=300), 4 * GIB, 1300.0),
        (Deadline(per_gib=60, min=300), 1 * GIB, 1300.0),
        (Deadline(per_gib=60, max=100), 4 * GIB, 1100.0),
    ],
)
def test_deadline_at(deadline: Deadline | None, memory: int, expected: float | None) -> None:
    assert deadline_at(Profile(name="p", deadline=deadline), memory, 1000.0) == expected


def _big_stuck_guest() -> tuple[Profile, InstanceInfo]:
    profile = Profile(
        name="p", may_slow_down=True, may_pause=True, max_pause=8, deadline=Deadline(fixed=1500)
    )
    return profile, InstanceInfo(name="big", uuid="u", host="a", memory_bytes=300 * GIB)


def _barely_stuck(deadline: float | None, disk: int = 0) -> StartPlan:
    """32GiB rewritten at 210MiB/s over a 200MiB/s link: the least level (20%) brings
    the guest under the link and, of all levels, takes the least of its time."""
    profile = Profile(
        name="p",
        may_slow_down=True,
        may_pause=True,
        max_pause=1,
        deadline=None if deadline is None else Deadline(fixed=deadline),
    )
    info = InstanceInfo(name="vm", uuid="u", host="a", memory_bytes=32 * GIB, local_disk_bytes=disk)
    return plan_start(profile, info, Capabilities(), 210 * MIB, 200 * MIB)


def test_start_level_high_enough_to_finish_before_a_near_deadline() -> None:
    # The least level converges slowly (each pass leaves 84% of the one before): it
    # takes about 9.3 minutes. Within half of a 16.7-minute deadline only 40% and
    # above finish; of those, 40% takes the least of the guest's time.
    far, unbounded, near = _barely_stuck(86400), _barely_stuck(None), _barely_stuck(1000)
    assert far.slow_down_initial == unbounded.slow_down_initial == pytest.approx(0.2)
    assert near.slow_down_initial == pytest.approx(0.4)
    assert "of the levels from 20% that finish within 8.3m (of the 16.7m deadline)" in (near.reason)
    assert "it takes the least of the guest's time" in near.reason


def test_start_level_takes_the_least_of_the_guests_time() -> None:
    """The hypervisor raises the level only every two passes that rewrite half of what
    they sent or more, and passes over 300GiB last minutes: starting at the least level
    that converges (55%) slows the guest for longer, through the levels the schedule
    raises it to, and takes more of its time in all (level x time, and the final
    stop) than starting higher. With no deadline to meet, the plan starts at the level
    that takes the least."""
    profile, info = _big_stuck_guest()
    unbounded = profile.model_copy(update={"deadline": None})
    plan = plan_start(unbounded, info, Capabilities(), 2000 * MIB, 1000 * MIB)
    assert plan.slow_down_initial == pytest.approx(DEFAULT.max_initial_slowdown)
    taken = {
        level: start_projection(
            unbounded, info.memory_bytes, 2000 * MIB, 1000 * MIB, 0.3, 0.05, level
        ).taken
        for level in (0.55, 0.65, 0.75, 0.8)
    }
    assert min(taken, key=lambda level: taken[level]) == pytest.approx(plan.slow_down_initial)
    assert taken[0.55] > 1.2 * taken[0.8]
    assert "it takes the least of the guest's time (about 5.0m slowed or stopped" in plan.reason


def test_chosen_start_level_finishes_where_the_least_level_runs_out_of_time() -> None:
    # Closed loop over the test workload model (not the projection plan_start uses).
    from dataclasses import replace

    from lmwatch.policies import decide

    try:
        from test_policies_support import simulate, workload
    except ImportError:  # tests collected as a package
        from tests.test_policies_support import simulate, workload  # type: ignore[no-redef]

    profile, info = _big_stuck_guest()
    w = workload(memory_mib=300 * 1024, change_mib=2000, bandwidth_mib=1000, ws_mib=300 * 1024)
    plan = plan_start(profile, info, Capabilities(), 2000 * MIB, 1000 * MIB)
    chosen = simulate(decide, profile, w, plan, deadline_at=1500, max_passes=200)
    least = simulate(
        decide, profile, w, replace(plan, slow_down_initial=0.55), deadline_at=1500, max_passes=200
    )
    assert chosen.outcome in ("completed", "pause") and chosen.ended_at is not None
    assert chosen.ended_at < 1500
    assert chosen.blackout is not None and chosen.blackout <= 8
    assert least.outcome == "cancel"


def test_start_level_leaves_the_disk_copy_its_share_of_the_deadline() -> None:
    # 25 minutes: half of it is time enough for the least level alone; 100GiB of local
    # disk copied first (8.5 minutes at the link's rate) leaves half of the rest, in
    # which only 40% and above finish.
    alone, with_disk = _barely_stuck(1500), _barely_stuck(1500, disk=100 * GIB)
    assert alone.slow_down_initial == pytest.approx(0.2)
    assert with_disk.slow_down_initial == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("measured", "planned"),
    [
        ((), DEFAULT.switchover_seconds),  # nothing measured yet
        ((0.04,), 0.04),
        ((0.04, 0.36), 0.36),  # two figures cannot tell a disturbed one: the larger
        ((0.04, 0.05, 0.06), 0.06),  # steady: the largest, never less than measured
        ((0.05, 0.36, 0.04, 0.05), 0.05),  # one final stop slowed by something else
        ((0.05, 0.12, 0.06), 0.12),  # within 3x the median: a real spread, kept
        ((0.36, 0.38, 0.35), 0.38),  # a slow pair is slow: all of it kept
    ],
)
def test_the_learned_switchover_leaves_out_a_disturbed_measurement(
    measured: tuple[float, ...], planned: float
) -> None:
    assert learned_switchover(measured, DEFAULT.switchover_seconds) == pytest.approx(planned)


def test_one_disturbed_final_stop_does_not_leave_a_profile_without_budget() -> None:
    """A 356 ms figure among steady 50 ms ones (the link shared during one final
    stop) must not take a 300 ms profile's whole budget: with no budget nothing
    completes, and nothing would ever correct the figure."""
    switchover = learned_switchover((0.05, 0.05, 0.356, 0.05), DEFAULT.switchover_seconds)
    profile = Profile(name="p", max_blackout=0.3)
    plan = plan_start(profile, INFO, Capabilities(), None, None, switchover=switchover)
    assert plan.blackout_budget == pytest.approx(0.25)


def test_the_first_pass_holds_a_lower_budget_and_the_plan_says_so() -> None:
    plan = plan_start(Profile(name="p"), INFO, Capabilities(), None, None)
    assert plan.blackout_budget == pytest.approx(0.3)
    assert plan.first_pass_budget == pytest.approx(DEFAULT.first_pass_blackout)
    assert plan.starting_budget == pytest.approx(DEFAULT.first_pass_blackout)
    assert "a 50ms blackout budget during the first pass and a 300ms blackout budget after it" in (
        plan.reason
    )


def test_no_first_pass_budget_when_the_plan_is_already_that_low() -> None:
    plan = plan_start(Profile(name="p", max_blackout=0.1), INFO, Capabilities(), None, None)
    assert plan.blackout_budget == pytest.approx(0.05)
    assert plan.first_pass_budget is None
    assert plan.starting_budget == pytest.approx(0.05)
    assert "first pass" not in plan.reason


def test_the_change_rate_is_measured_before_a_start_only_where_the_first_pass_is_longer() -> None:
    """A measurement delays the start by its window; a first pass of a few windows
    tells as much, so only longer passes are worth it (and an unknown link is)."""
    link = GIB  # bytes/s: a pass takes as many seconds as memory has GiB
    window = 2.0
    times = DEFAULT.measure_min_pass_windows
    assert not measuring_pays(1 * GIB, link, window)
    assert not measuring_pays(int((times * window - 1) * GIB), link, window)
    assert measuring_pays(int(times * window * GIB), link, window)
    assert measuring_pays(64 * GIB, link, window)
    assert measuring_pays(1 * GIB, None, window)  # nothing says the pass is short
    assert measuring_pays(1 * GIB, 0.0, window)
