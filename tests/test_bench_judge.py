"""The judge: each rule on its own, on hand-made runs."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from lmwatch.bench.corpus import GBIT, GIB, Workload
from lmwatch.bench.judge import judge
from lmwatch.bench.runner import Run
from lmwatch.drivers.inventory import ConstantRate
from lmwatch.profiles.schema import Profile

WORKLOAD = Workload(
    name="w",
    memory=8 * GIB,
    working_set=GIB,
    writer="random",
    change_rate=ConstantRate(rate=0.0),
    bandwidth=10 * GBIT,
    switchover=0.03,
)
LATENCY = Profile.model_validate(
    {
        "name": "latency-critical",
        "max_blackout": "300ms",
        "may_slow_down": False,
        "handover": "allowed",
        "max_degraded": "30s",
        "may_pause": False,
        "max_pause": "0s",
        "deadline": "20m",
        "on_deadline": "complete",
    }
)
BATCH = Profile.model_validate(
    {
        "name": "batch",
        "max_blackout": "1s",
        "may_slow_down": True,
        "handover": "forbidden",
        "may_pause": True,
        "max_pause": "5s",
        "deadline": {"per_gib": "60s", "min": "5m"},
        "on_deadline": "complete",
    }
)
COMPLETED = Run(
    workload="w",
    profile="p",
    controller="c",
    outcome="completed",
    total_seconds=100.0,
    blackout_seconds=0.2,
    paused=False,
    pause_seconds=None,
    handed_over=False,
    degraded_seconds=None,
    max_slowdown=0.0,
)


def verdict(profile: Profile = LATENCY, **changes: Any) -> tuple[bool, tuple[str, ...]]:
    result = judge(replace(COMPLETED, **changes), profile, WORKLOAD)
    return result.clean, result.violations


def test_a_completion_within_the_profile_is_clean() -> None:
    assert verdict() == (True, ())
    assert verdict(blackout_seconds=0.3) == (True, ())  # exactly at the limit


def test_blackout_over_max_blackout() -> None:
    assert verdict(blackout_seconds=0.31) == (False, ("blackout 0.31s over 300ms",))
    no_pause = Profile(name="no-pause", max_blackout=1.0)
    assert verdict(no_pause, blackout_seconds=1.5) == (False, ("blackout 1.5s over 1s",))


def test_where_pausing_is_allowed_a_final_stop_may_last_as_long_as_a_pause() -> None:
    # batch: max_blackout 1 s, pausing allowed up to 5 s. A final stop that ran 1.5 s
    # (the link slowed during it) stopped the guest no longer than a pause may.
    assert verdict(BATCH, blackout_seconds=1.5) == (True, ())
    assert verdict(BATCH, blackout_seconds=5.0) == (True, ())
    assert verdict(BATCH, blackout_seconds=5.5) == (False, ("blackout 5.5s over 5s",))
    # ... and so does one that ended without completing (the guest resumed on the
    # source): not clean, since it did not finish, but no promise was broken
    failed = {"outcome": "failed", "blackout_seconds": 1.5}
    assert verdict(BATCH, **failed) == (False, ())
    # a profile whose max_pause is below max_blackout keeps max_blackout
    short = BATCH.model_copy(update={"max_pause": 0.5})
    assert verdict(short, blackout_seconds=0.9) == (True, ())
    assert verdict(short, blackout_seconds=1.2) == (False, ("blackout 1.2s over 1s",))


def test_pause_is_judged_against_max_pause() -> None:
    paused = {"paused": True, "blackout_seconds": 4.0, "pause_seconds": 4.0}
    assert verdict(BATCH, **paused) == (True, ())  # 4 s over max_blackout, within max_pause
    over = {**paused, "blackout_seconds": 6.2, "pause_seconds": 6.2}
    assert verdict(BATCH, **over) == (False, ("pause 6.2s over 5s",))


def test_pause_where_pausing_is_not_allowed() -> None:
    long: dict[str, Any] = {"paused": True, "blackout_seconds": 2.0, "pause_seconds": 2.0}
    assert verdict(**long) == (False, ("paused though not allowed",))
    # As short as a blackout may be: the instance's users cannot tell the difference.
    short: dict[str, Any] = {"paused": True, "blackout_seconds": 0.1, "pause_seconds": 0.1}
    assert verdict(**short) == (True, ())


def test_handover_rules() -> None:
    handed: dict[str, Any] = {
        "handed_over": True,
        "blackout_seconds": 0.03,
        "degraded_seconds": 12.0,
    }
    assert verdict(**handed) == (True, ())
    assert verdict(**{**handed, "degraded_seconds": 41.0}) == (False, ("degraded 41.0s over 30s",))
    assert verdict(BATCH, **handed) == (False, ("handed over though forbidden",))
    switch = {**handed, "blackout_seconds": 0.4}
    assert verdict(**switch) == (False, ("blackout 0.40s over 300ms",))


def test_slowing_where_it_is_not_allowed() -> None:
    assert verdict(max_slowdown=0.2) == (False, ("slowed though not allowed",))
    assert verdict(BATCH, max_slowdown=0.2) == (True, ())


def test_deadline_fixed_and_per_gib() -> None:
    assert verdict(total_seconds=1201.0) == (False, ("finished after the deadline",))
    assert verdict(total_seconds=1200.0) == (True, ())
    # batch: 60 s per GiB of 8 GiB = 480 s (above the 5 min minimum).
    assert verdict(BATCH, total_seconds=479.0) == (True, ())
    assert verdict(BATCH, total_seconds=481.0) == (False, ("finished after the deadline",))
    assert verdict(Profile(name="open"), total_seconds=1e6) == (True, ())


def test_unfinished_cancelled_and_failed() -> None:
    unfinished = judge(
        replace(COMPLETED, outcome="unfinished", total_seconds=1320.0), LATENCY, WORKLOAD
    )
    assert not unfinished.clean and unfinished.unfinished
    assert unfinished.violations == ("did not finish",)
    cancelled = judge(
        replace(COMPLETED, outcome="cancelled", blackout_seconds=None), LATENCY, WORKLOAD
    )
    assert not cancelled.clean and cancelled.cancelled and cancelled.violations == ()
    failed = judge(replace(COMPLETED, outcome="failed", blackout_seconds=None), LATENCY, WORKLOAD)
    assert not failed.clean and failed.failed and failed.violations == ()


def test_violations_add_up() -> None:
    run: dict[str, Any] = {
        "handed_over": True,
        "degraded_seconds": 50.0,
        "max_slowdown": 0.5,
        "total_seconds": 2000.0,
    }
    clean, violations = verdict(**run)
    assert not clean
    assert violations == (
        "degraded 50.0s over 30s",
        "slowed though not allowed",
        "finished after the deadline",
    )


@pytest.mark.parametrize("outcome", ["cancelled", "failed", "unfinished"])
def test_what_happened_before_an_unclean_end_still_counts(outcome: str) -> None:
    run = replace(COMPLETED, outcome=outcome, blackout_seconds=None, max_slowdown=0.1)
    assert "slowed though not allowed" in judge(run, LATENCY, WORKLOAD).violations


def test_a_final_stop_that_ended_in_a_failure_counts_as_blackout() -> None:
    # The link broke during the final copy: the guest stayed stopped on the source until
    # the job failed (the runner records that stop as the blackout).
    stopped = replace(COMPLETED, outcome="failed", blackout_seconds=30.4)
    verdict = judge(stopped, LATENCY, WORKLOAD)
    assert verdict.failed and not verdict.clean
    assert verdict.violations == ("blackout 30.4s over 300ms",)
    short = judge(replace(stopped, blackout_seconds=0.2), LATENCY, WORKLOAD)
    assert short.failed and short.violations == ()
