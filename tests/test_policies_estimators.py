"""Estimators: rates, floor, convergence, ETA, blackout and confidence."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmwatch.model import MIB
from lmwatch.policies import DEFAULT, estimate

try:
    from test_policies_support import Workload, context, history, workload
except ImportError:  # tests collected as a package
    from tests.test_policies_support import (  # type: ignore[no-redef]
        Workload,
        context,
        history,
        workload,
    )


@pytest.mark.parametrize(
    ("w", "passes", "converges", "floor_mib"),
    [
        (workload(4096, 0, 100, 1024), 2, True, 0),  # idle
        (workload(2048, 30, 100, 512), 3, True, 0),  # busy, converging
        (workload(2048, 150, 100, 1024), 3, False, 1024),  # stuck at the working set
        (workload(2048, 150, 100, 100), 3, False, 100),  # small working set, needs ~1s
        (workload(2048, 95, 100, 2048), 2, False, None),  # D within the margin of B
    ],
)
def test_convergence_table(
    w: Workload, passes: int, converges: bool, floor_mib: int | None
) -> None:
    samples = history(w, max_passes=passes, polls_per_pass=2)
    assert samples[-1].passes == passes
    p = estimate(samples, context(w))
    assert p.converges is converges
    assert p.transfer_rate == pytest.approx(w.bandwidth)
    assert p.change_rate == pytest.approx(w.change)
    if floor_mib is not None:
        assert p.floor_bytes == pytest.approx(floor_mib * MIB, rel=0.01)
    assert (p.eta_seconds is not None) is converges
    assert p.blackout_seconds == pytest.approx(
        samples[-1].memory_remaining / w.bandwidth + DEFAULT.device_state_seconds
    )


def test_first_pass_has_no_verdict_and_ignores_zero_change_rate() -> None:
    w = workload(2048, 150, 100, 1024)
    samples = history(w, max_passes=1)[:1]
    p = estimate(samples, context(w))
    assert p.converges is None
    assert p.change_rate == 0.0
    assert p.confidence == 0.0
    assert p.eta_seconds is None
    assert p.blackout_seconds == pytest.approx(20.48 + DEFAULT.device_state_seconds)


def test_change_rate_inferred_from_pass_remainders_when_not_reported() -> None:
    w = workload(2048, 40, 100, 2048)
    samples = history(w, max_passes=3, report_change=False)
    p = estimate(samples, context(w))
    assert p.change_rate == pytest.approx(w.change, rel=0.05)


def test_transfer_rate_from_bytes_moved_when_not_reported() -> None:
    w = workload(2048, 150, 100, 1024)
    samples = [replace(s, transfer_rate=0.0) for s in history(w, max_passes=1, polls_per_pass=4)]
    p = estimate(samples, context(w))
    assert p.transfer_rate == pytest.approx(w.bandwidth)


@pytest.mark.parametrize("change_mib", [10, 30, 60])
def test_eta_matches_when_the_model_completes(change_mib: float) -> None:
    w = workload(2048, change_mib, 100, 1024)
    samples = history(w, max_passes=40)
    finished = samples[-1].time + samples[-1].memory_remaining / w.bandwidth
    second = next(i for i, s in enumerate(samples) if s.passes == 2)
    if samples[second].phase.finished or samples[second].phase.value != "copying":
        pytest.skip("completed at the end of the first pass")
    p = estimate(samples[: second + 1], context(w))
    assert p.converges is True and p.eta_seconds is not None
    expected = finished - samples[second].time + DEFAULT.device_state_seconds
    assert p.eta_seconds == pytest.approx(expected, rel=0.2, abs=0.2)


def test_confidence_grows_with_passes_and_drops_with_unsteady_rates() -> None:
    w = workload(2048, 150, 100, 1024)
    samples = history(w, max_passes=5)
    values = [estimate(samples[:cut], context(w)).confidence for cut in range(1, len(samples) + 1)]
    assert values == sorted(values)
    assert values[-1] == pytest.approx(1.0)
    noisy = [
        replace(s, transfer_rate=s.transfer_rate * (0.3 if i % 2 else 1.7))
        for i, s in enumerate(samples)
    ]
    assert estimate(noisy, context(w)).confidence < 0.6


def test_empty_history() -> None:
    w = workload(2048, 150, 100, 1024)
    p = estimate([], context(w))
    assert p.remaining == w.memory and p.converges is None and p.confidence == 0.0


@settings(max_examples=300, deadline=None)
@given(
    st.integers(64, 16384),
    st.floats(0.0, 2000.0),
    st.floats(1.0, 2000.0),
    st.integers(1, 16384),
    st.integers(1, 8),
    st.booleans(),
)
def test_estimate_is_sane_on_any_history(
    memory: int, change: float, bandwidth: float, ws: int, passes: int, report: bool
) -> None:
    w = Workload(memory * MIB, change * MIB, bandwidth * MIB, min(ws, memory) * MIB)
    samples = history(w, max_passes=passes, report_change=report)
    for cut in range(len(samples) + 1):
        p = estimate(samples[:cut], context(w))
        assert 0.0 <= p.confidence <= 1.0
        assert p.transfer_rate >= 0 and p.change_rate >= 0
        assert p.eta_seconds is None or p.eta_seconds >= 0
        if p.converges is not None:
            assert p.floor_bytes is not None and p.floor_bytes >= 0


def test_a_remainder_stuck_above_the_budget_is_not_called_converging() -> None:
    """Rates say 'converges' (D << B) but every pass leaves ~6 MiB: the floor is observed."""
    from lmwatch.model import MIB, Phase, Sample

    rate = 16 * MIB
    samples = [
        Sample(0.0, 128 * MIB, 128 * MIB, 0, rate, 0.0, 1, Phase.COPYING),
        Sample(8.0, 128 * MIB, 10 * MIB, 118 * MIB, rate, 0.0, 1, Phase.COPYING),
    ]
    t, moved = 9.0, 128 * MIB
    for n, left in enumerate([6.3, 5.0, 6.4, 5.1, 6.2, 5.0, 6.3, 5.2], start=2):
        remaining = int(left * MIB)
        samples.append(Sample(t, 128 * MIB, remaining, moved, rate, 3 * MIB, n, Phase.COPYING))
        t, moved = t + 0.4, moved + remaining
    w = workload(128, 3, 16, 6)
    p = estimate(samples, context(w))
    assert p.converges is False
    assert p.floor_bytes is not None and p.floor_bytes >= 4.9 * MIB
