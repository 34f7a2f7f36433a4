"""`join_wait`: a new move waits for the finishing moves already on its link."""

from __future__ import annotations

import pytest

from lmwatch.model import Phase, Sample
from lmwatch.policies.sharing import MIN_WAIT, join_wait

GIB = 1 << 30


def sample(phase: Phase, remaining: int, rate: float, budget: float = 0.3) -> Sample:
    return Sample(
        time=100.0,
        memory_total=4 * GIB,
        memory_remaining=remaining,
        memory_transferred=4 * GIB - remaining,
        transfer_rate=rate,
        change_rate=0.0,
        passes=3,
        phase=phase,
        blackout_budget=budget,
    )


def test_nothing_to_wait_for_when_no_move_on_the_link_is_finishing() -> None:
    assert join_wait([], 0.03) == 0.0
    assert join_wait([sample(Phase.COPYING, GIB, 1e9)], 0.03) == 0.0


def test_waits_for_the_rest_of_a_final_stop_at_the_rate_it_moves() -> None:
    others = [sample(Phase.COPYING, GIB, 1e9), sample(Phase.COMPLETING, 800_000_000, 3.2e9)]
    assert join_wait(others, 0.03) == pytest.approx(0.25 + 0.03)


def test_waits_for_the_longest_of_several_finishes_handover_included() -> None:
    others = [
        sample(Phase.COMPLETING, 100_000_000, 1e9),
        sample(Phase.HANDOVER, 2_000_000_000, 1e9),
    ]
    assert join_wait(others, 0.05) == pytest.approx(2.0 + 0.05)


def test_a_stop_with_no_rate_known_is_waited_for_its_budget_and_never_for_nothing() -> None:
    assert join_wait([sample(Phase.COMPLETING, GIB, 0.0, budget=0.2)], 0.03) == pytest.approx(0.23)
    assert join_wait([sample(Phase.COMPLETING, 0, 1e9)], 0.0) == MIN_WAIT
