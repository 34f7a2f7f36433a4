"""Estimates from a migration's samples: rates, remainder floor, ETA, blackout.

Section 4 of DESIGN.md in code. With transfer rate `B`, change rate `D` and the
remainder `R(n)` at the start of pass `n`, copying shrinks the remainder by about
`D / B` a pass (capped by the writable working set); the hypervisor completes on
its own once `R <= B * budget`. Everything here is a pure function of its inputs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from lmwatch.model import MigrationContext, Prediction, Sample
from lmwatch.units import format_duration, format_size


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """Tunables of the estimators and the decision rules."""

    blackout_step_factor: float = 2.0  # each raise multiplies the budget...
    blackout_min_step: float = 0.05  # ...by at least this many seconds
    initial_blackout: float = 0.3  # seconds; never above profile.max_blackout
    ewma_alpha: float = 0.3
    min_passes_for_verdict: int = 2  # completed passes before "never converges"
    max_slowdown: float = 0.99
    handover_safety: float = 1.2  # predicted degraded time * this must fit max_degraded
    pause_safety: float = 1.2  # predicted pause * this must fit max_pause
    device_state_seconds: float = 0.05  # fixed part of any blackout
    budget_margin: float = 1.1  # a budget is set this much above the bare need
    convergence_margin: float = 0.1  # D must stay below B * (1 - margin) to shrink
    plateau_ratio: float = 0.9  # a pass-start remainder above ratio * previous = no shrink
    min_pass_seconds: float = 0.0  # shortest pass the hypervisor makes (sets a floor)
    slow_down_passes_per_step: int = 2  # the hypervisor raises the throttle this often
    slow_down_initial: float = 0.2  # start level when nothing says more is needed
    max_initial_slowdown: float = 0.6  # cap on a higher start level chosen at start
    hope_confidence: float = 0.5  # below this, unstable rates still leave hope
    max_hope_passes: int = 6  # completed passes after which instability is no excuse


DEFAULT = PolicySettings()


@dataclass(frozen=True, slots=True)
class Analysis:
    """Everything the decision rules need, derived from the samples."""

    latest: Sample | None
    transfer_rate: float | None  # B, bytes/s; None when never measured
    change_rate: float | None  # D as measured (already slowed), None when unknown
    remaining: int  # R now
    memory: int  # M
    passes: int  # pass in progress (1 = first full pass)
    pass_starts: tuple[int, ...]  # remainder at the start of each observed pass
    pass_seconds: float | None  # duration of the latest completed pass
    floor: int | None  # remainder copying settles at
    converges: bool | None  # finishes on its own with the current budget
    eta: float | None
    confidence: float
    shrinking: bool  # remainder still shrinking from pass to pass

    @property
    def passes_done(self) -> int:
        return max(0, self.passes - 1)

    @property
    def finish_remaining(self) -> int:
        """Remainder to move if finished now (pages dirtied this pass included)."""
        return max(self.remaining, self.floor or 0)

    def seconds_for(self, size: float) -> float | None:
        """Time to move `size` bytes at the transfer rate."""
        if not self.transfer_rate:
            return None
        return size / self.transfer_rate

    def prediction(self, device_state_seconds: float) -> Prediction:
        seconds = self.seconds_for(self.remaining)
        return Prediction(
            transfer_rate=self.transfer_rate or 0.0,
            change_rate=self.change_rate or 0.0,
            remaining=self.remaining,
            eta_seconds=self.eta,
            blackout_seconds=None if seconds is None else seconds + device_state_seconds,
            converges=self.converges,
            floor_bytes=self.floor,
            confidence=self.confidence,
        )


def _ewma(values: Sequence[float], alpha: float) -> float | None:
    if not values:
        return None
    value = values[0]
    for reading in values[1:]:
        value = alpha * reading + (1 - alpha) * value
    return value


def _variation(values: Sequence[float]) -> float:
    """Coefficient of variation of the last few readings (0 = perfectly steady)."""
    recent = list(values[-5:])
    if len(recent) < 2:
        return 0.0
    mean = statistics.fmean(recent)
    if mean <= 0:
        return 0.0
    return statistics.pstdev(recent) / mean


def _pass_starts(history: Sequence[Sample], memory: int) -> tuple[list[int], list[float]]:
    """Remainder at the start of each observed pass and the time each started."""
    starts: dict[int, int] = {}
    times: dict[int, float] = {}
    for sample in history:
        n = sample.passes
        if n < 1:
            continue
        starts[n] = max(starts.get(n, 0), sample.memory_remaining)
        times.setdefault(n, sample.time)
    if 1 in starts:
        starts[1] = max(starts[1], memory)
    ordered = sorted(starts)
    return [starts[n] for n in ordered], [times[n] for n in ordered]


_STALL_WINDOW = 3  # recent passes whose remainders are compared with the ones before


def _stalled(starts: Sequence[int], ratio: float) -> bool:
    """The remainder has stopped shrinking over several passes (noise tolerated).

    Rates can say copying converges while every pass leaves the same few megabytes
    behind (the hypervisor cannot make a pass shorter than its bookkeeping); then
    the observed remainders, not the rates, tell the floor.
    """
    if len(starts) < 2 * _STALL_WINDOW + 1:  # pass 1 (all memory) is never compared
        return False
    recent = min(starts[-_STALL_WINDOW:])
    before = min(starts[-2 * _STALL_WINDOW : -_STALL_WINDOW])
    return recent >= ratio * before


def _transfer_rate(history: Sequence[Sample], alpha: float) -> float | None:
    readings = [s.transfer_rate for s in history if s.transfer_rate > 0]
    rate = _ewma(readings, alpha)
    if rate is not None:
        return rate
    if len(history) >= 2:
        moved = history[-1].memory_transferred - history[0].memory_transferred
        elapsed = history[-1].time - history[0].time
        if moved > 0 and elapsed > 0:
            return moved / elapsed
    return None


def _change_rate(
    history: Sequence[Sample], starts: Sequence[int], times: Sequence[float], alpha: float
) -> float | None:
    """EWMA of measured change rates; inferred from pass remainders when unmeasured."""
    readings = [s.change_rate for s in history if s.passes >= 2 and s.change_rate > 0]
    rate = _ewma(readings, alpha)
    if rate is not None:
        return rate
    # What a pass leaves behind was dirtied while the previous pass ran.
    if len(starts) >= 2 and times[-1] > times[-2]:
        return starts[-1] / (times[-1] - times[-2])
    return None


def eta_seconds(
    remaining: float, rate: float, change: float, budget: float, floor: float, device: float
) -> float:
    """Seconds until completion, simulating passes until the remainder fits the budget."""
    seconds = remaining / rate
    left = max(floor, change * seconds)
    for _ in range(1000):
        if left <= rate * budget:
            break
        pass_time = left / rate
        seconds += pass_time
        left = max(floor, change * pass_time)
    return seconds + left / rate + device


def analyse(
    history: Sequence[Sample], ctx: MigrationContext, settings: PolicySettings = DEFAULT
) -> Analysis:
    """Derive rates, floor, convergence and ETA from the samples so far."""
    latest = history[-1] if history else None
    memory = latest.memory_total if latest and latest.memory_total > 0 else ctx.memory_bytes
    remaining = latest.memory_remaining if latest else memory
    passes = latest.passes if latest else 0
    starts, times = _pass_starts(history, memory)
    rate = _transfer_rate(history, settings.ewma_alpha)
    change = _change_rate(history, starts, times, settings.ewma_alpha) if passes >= 2 else None
    pass_seconds = times[-1] - times[-2] if len(times) >= 2 else None
    shrinking = len(starts) >= 2 and starts[-1] < settings.plateau_ratio * starts[-2]
    plateau = len(starts) >= 3 and not shrinking
    stalled = _stalled(starts, settings.plateau_ratio)

    floor: int | None = None
    converges: bool | None = None
    eta: float | None = None
    if rate and change is not None and passes >= 2:
        if change < rate * (1 - settings.convergence_margin):
            value = change * settings.min_pass_seconds
            if plateau:  # the samples say it stopped shrinking, whatever the rates say
                value = max(value, min(starts[-1], starts[-2]))
            if stalled:  # passes keep leaving about the same remainder behind
                value = max(value, min(starts[-_STALL_WINDOW:]))
        else:  # it will not shrink: the remainder stays at (or grows to) the working set
            value = max(starts[-1], remaining)
        floor = int(value)
        converges = floor <= rate * ctx.blackout_budget
        if converges:
            eta = eta_seconds(
                remaining,
                rate,
                change,
                ctx.blackout_budget,
                floor,
                settings.device_state_seconds,
            )

    confidence = 0.0
    if passes >= 2 and rate:
        evidence = min(1.0, (passes - 1) / max(1, settings.min_passes_for_verdict))
        rates = [s.transfer_rate for s in history if s.transfer_rate > 0]
        changes = [s.change_rate for s in history if s.passes >= 2 and s.change_rate > 0]
        steadiness = 1.0 - min(1.0, max(_variation(rates), _variation(changes)))
        confidence = round(evidence * steadiness, 3)

    return Analysis(
        latest=latest,
        transfer_rate=rate,
        change_rate=change,
        remaining=remaining,
        memory=memory,
        passes=passes,
        pass_starts=tuple(starts),
        pass_seconds=pass_seconds,
        floor=floor,
        converges=converges,
        eta=eta,
        confidence=confidence,
        shrinking=shrinking,
    )


def estimate(
    history: Sequence[Sample], ctx: MigrationContext, settings: PolicySettings = DEFAULT
) -> Prediction:
    """The prediction reported on every migration (ETA, blackout, convergence)."""
    return analyse(history, ctx, settings).prediction(settings.device_state_seconds)


def rate_text(rate: float | None) -> str:
    """`40.0MiB/s`, or `unknown`."""
    return "unknown" if rate is None else f"{format_size(rate)}/s"


def duration_text(seconds: float | None) -> str:
    """`3.1s`, or `unknown`; infinite values read as `forever`."""
    if seconds is None:
        return "unknown"
    if math.isinf(seconds):
        return "forever"
    return format_duration(seconds)
