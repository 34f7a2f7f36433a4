"""Estimates from a migration's samples: passes, the dirtying model, floor, ETA, blackout.

Section 4 of DESIGN.md in code. Everything here is a pure function of its inputs.

The change rate a hypervisor reports is the number of *distinct* bytes dirtied
during a pass divided by the pass's duration. A guest rewriting the same working
set saturates it, so `remainder ≈ reported rate × pass time` is circular. Instead,
each pair (duration of pass n, remainder at the start of pass n+1) observed is a
point of the function `f(t)` = distinct bytes dirtied in `t` seconds, modelled as

    f(t) = W · (1 − exp(−D·t / W))

(`D` the write rate, `W` the working set; a large `W` makes it linear, `D·t`). The
model is fitted to the recent pairs; a pass of `R / B` seconds leaves `f(R / B)`,
so projecting pass after pass tells whether copying converges, the floor it
settles at, and when it finishes. The final stop lasts the remainder's copy time
plus the host pair's switchover cost.

The hypervisor does not send a pass to its end: it counts the changed pages again
as soon as what the pass still has to send falls below the threshold `B · T`
(transfer rate × blackout budget), checked before each burst it sends, and stops
the guest if the new count is below the threshold too. The rest of a pass is
carried into the next, and the hypervisor's bitmap counts a page once: a page the
guest rewrites while it is still in the unsent rest adds nothing. A random writer
touches each page of `W` alike, so of the `f(duration)` distinct pages it dirtied
those outside the rest, `f(duration)·(1 − rest/W)`, are added
(`DirtyModel.next_count`, the one calculation the fit, the pair rates and the
projection share). The first pass's rest lies all over memory, and only its part in
the working set overlaps what the guest dirties.
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from lmwatch.model import GIB, MigrationContext, Phase, Prediction, Sample
from lmwatch.policies.track import KEPT_PASSES, RECENT, Pair, PassSeen, Track
from lmwatch.units import format_duration, format_size


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """Tunables of the estimators and the decision rules."""

    blackout_step_factor: float = 2.0  # each raise multiplies the budget...
    blackout_min_step: float = 0.05  # ...by at least this many seconds
    initial_blackout: float = 0.3  # seconds; never above what max_blackout leaves
    # Seconds of budget held while the first pass copies the bulk of memory: a stop
    # there copies a budget's worth of memory never sent, whatever the guest rewrites,
    # and a final stop can be neither watched nor cut short. After the first pass what
    # is left is what the guest rewrote, and the budget goes up to the plan's.
    first_pass_blackout: float = 0.05
    ewma_alpha: float = 0.3
    # A transfer-rate reading this share below the average is believed at once: a link
    # slows in steps (another flow, a failed path) and stays slow a while, so a
    # prediction must not lean on the speed it had; a faster link is believed slowly.
    rate_drop: float = 0.2
    max_slowdown: float = 0.99
    # A predicted degraded time or pause, times a margin, must fit its bound; the margin
    # is at least these and grows with how much the transfer rate has varied (a pass
    # start's remainder is known; what the link will carry meanwhile is the doubt).
    handover_safety: float = 1.03
    pause_safety: float = 1.03
    # In the first pass a handover must fit `max_degraded` this many times over: the
    # link may slow under it and a handover cannot be taken back (a pause the link
    # stretches past its bound is cancelled), while waiting for the pass to end
    # shrinks what is left to about the working set.
    first_pass_headroom: float = 1.5
    rate_variation_weight: float = 2.0
    switchover_seconds: float = 0.05  # assumed switchover cost when nothing was measured
    # Seconds from stopping a job to the instance running on the source again: the
    # hypervisor resumes it only once the destination has let go of its half (on the
    # rig 1.5-2.1 s after the stop was asked, whatever the bandwidth and the guest's size
    # (128 MiB to 6 GiB), the longest with the host loaded; this leaves room). A pause
    # of ours that may outlast its bound must be stopped this long before the bound's end.
    cancel_resume: float = 3.0
    # The change rate is measured before a start only when one pass of all memory over
    # the link takes at least this many times the measurement's window (`measuring_pays`).
    measure_min_pass_windows: float = 3.0
    # Pages the hypervisor's page-sampling measurement hashes per GiB of guest memory
    # (the hypervisor's default, which the driver keeps): how far one reading scatters.
    measure_pages_per_gib: int = 512
    budget_margin: float = 1.1  # a budget is set this much above the bare need
    plateau_ratio: float = 0.9  # a pass-start remainder above ratio * previous = no shrink
    slow_down_passes_per_step: int = 2  # the hypervisor raises the throttle this often
    slow_down_bad_ratio: float = 0.5  # a pass is "bad" when it dirtied this share of its size
    slow_down_initial: float = 0.2  # start level when nothing says more is needed
    max_initial_slowdown: float = 0.8  # cap on a higher start level chosen at start
    slow_down_step: float = 0.1  # the hypervisor raises the level by this much each time
    # A start level is chosen to finish within this share of the deadline (the rest is
    # for a measurement before the start that saw less than the guest writes).
    slowdown_deadline_share: float = 0.5
    # A slowed migration whose guest outgrew its start plan may be started again at a
    # higher start level this many times; starting again (stopping the job, starting
    # the new one) is assumed to cost `restart_seconds`.
    max_restarts: int = 1
    restart_seconds: float = 10.0
    # After a failed job (the instance still on the source), a new job is tried this
    # often until the deadline no longer leaves time for it, and for
    # `restart_wait_seconds` at most.
    restart_retry_seconds: float = 5.0
    restart_wait_seconds: float = 600.0
    # ...and, deadline or not, when the new job would take at most this share of the
    # time the current one still needs, taking no more of the guest's time in slowing:
    # starting again throws away what was copied, so only a win that outlasts the
    # projections' error is worth it. Measured on the bench (docs/benchmark.md), a
    # projection's actual/predicted lies between about 0.7 (p10) and 1.4 (p90), 1.0 at
    # the median: a new job projected at 65 % of the current one's time comes out
    # slower only when its ratio exceeds the current one's by 1 / 0.65 ≈ 1.54, which
    # takes the two near opposite tails (1.4 / 0.7 = 2).
    restart_gain: float = 0.65
    fit_pairs: int = 4  # most recent (pass duration, remainder) pairs the model is fitted to
    # The hypervisor sends in bursts this long and checks before each one whether what is
    # left is below the threshold (transfer rate × budget); it judges the slow-down over
    # periods of at least `slow_down_period` seconds.
    recount_interval: float = 0.1
    slow_down_period: float = 1.0
    steady_variation: float = 0.15  # pass rates varying less than this are steady
    steady_pairs: int = 4  # pairs needed before steadiness counts as evidence
    # This many passes in a row at one budget, the last count no smaller than the
    # others, are a plateau above the threshold, whatever a fit projects.
    plateau_passes: int = 8
    # Giving up early on steady, hopeless readings waits this share of the deadline
    # window. Readings steady for T seconds say a phase lasts about that long: the
    # chance that it changes within the S seconds left is then about S / (T + S), under
    # a quarter only once T > 3 S, after three quarters of the window. Without a
    # deadline, `min_patience` seconds.
    patience: float = 0.75
    min_patience: float = 300.0
    max_wait: float = 3600.0  # without a deadline, no hope keeps a migration waiting longer
    convergence_margin: float = 0.1  # start plan: D above B * (1 - margin) will not converge
    measure_window: float = 10.0  # longest window a measurement before start covers, seconds
    # The disk copy's outlook is read from samples at least this many seconds apart,
    # once this share of the disks has been copied (the first moments say little).
    disk_window: float = 10.0
    disk_evidence_share: float = 0.05
    # Passes remembered (and pairs read from samples several passes apart): older ones
    # no longer count as evidence, so what is kept per migration stays bounded.
    kept_passes: int = KEPT_PASSES


DEFAULT = PolicySettings()

History = Sequence[Sample] | Track  # a migration's samples, as a list or folded


def tracked(history: History, settings: PolicySettings = DEFAULT) -> Track:
    """`history` folded into a track (itself when it is one)."""
    if isinstance(history, Track):
        return history
    return Track.of(history, settings.kept_passes, settings.disk_window)


# Seconds without a byte moved after which the link is taken to carry nothing: the
# transfer-rate reading keeps its last value while it does, and everything read from it
# (a time to go, a pause's or a handover's length) with it. One still second may be a
# lull; two are not.
LINK_STILL_SECONDS = 2.0
_MAX_PROJECTED_PASSES = 400
_NO_WRITES = 1e-3  # bytes/s of disk writes below which there are none


@dataclass(frozen=True, slots=True)
class PassRecord:
    """One pass whose start was observed."""

    number: int
    started: float  # clock seconds (estimated from the samples around the boundary)
    size: float  # bytes it had to send
    duration: float | None  # seconds, once the next pass has started
    slowdown: float  # guest slow-down while it ran
    carried: float = 0.0  # of `size`, the rest the pass before left unsent (not rewritten)
    # of `size`, bytes lying all over memory: the first pass's, and what later passes
    # carried of them (the rest of the count lies in the working set)
    spread: float = 0.0


@dataclass(frozen=True, slots=True)
class DirtyModel:
    """Distinct bytes the guest dirties in `t` seconds: `W·(1 − exp(−D·t/W))`."""

    rate: float  # D, bytes/s (unslowed)
    working_set: float  # W, bytes

    def dirtied(self, seconds: float, slowdown: float = 0.0) -> float:
        written = self.rate * max(0.0, 1.0 - slowdown) * max(0.0, seconds)
        if self.working_set <= 0:
            return 0.0
        return self.working_set * -math.expm1(-written / self.working_set)

    def overlap(self, rest: float, outside: float = 0.0) -> float:
        """Share of the working set an unsent rest covers (`outside` of it lies
        elsewhere): the share of the pages the guest dirties that are in it already."""
        return _covered(self.working_set, rest, outside)

    def next_count(
        self, rest: float, seconds: float, slowdown: float = 0.0, outside: float = 0.0
    ) -> float:
        """What the next count holds after a pass of `seconds` that left `rest` unsent
        (`outside` of it outside the working set): the rest, and the pages dirtied
        meanwhile outside it (the hypervisor counts a page once)."""
        return rest + self.added(seconds, slowdown, self.overlap(rest, outside))

    def added(self, seconds: float, slowdown: float, overlap: float) -> float:
        """Of the pages dirtied in `seconds`, those not in a rest that covers `overlap`
        of the working set (what they add to the count)."""
        return self.dirtied(seconds, slowdown) * (1.0 - overlap)

    def outside(self, spread: float, memory: float) -> float:
        """Of `spread` bytes lying all over memory (the first pass's unsent rest), those
        outside the working set (never rewritten)."""
        return _outside(self.working_set, spread, memory)

    def with_rate(self, rate: float) -> DirtyModel:
        return DirtyModel(rate=rate, working_set=self.working_set)


def _covered(working_set: float, rest: float, outside: float) -> float:
    """`DirtyModel.overlap` for a working set of `working_set` bytes."""
    if working_set <= 0:
        return 0.0
    inside = max(0.0, rest - max(0.0, outside))
    return min(1.0, inside / working_set)


def _outside(working_set: float, spread: float, memory: float) -> float:
    """`DirtyModel.outside` for a working set of `working_set` bytes."""
    if memory <= 0 or spread <= 0:
        return 0.0
    return spread * max(0.0, 1.0 - working_set / memory)


@dataclass(frozen=True, slots=True)
class Projection:
    """Passes projected from now on with a model, a bandwidth and a budget."""

    converges: bool
    seconds: float | None  # until the job completes (final stop included); None if never
    floor: float  # remainder copying settles at (0 when it converges)
    passes: int
    # guest-seconds the slowing takes until the job completes (each pass's duration
    # times the level in force during it); what the guest pays for finishing this way
    slowed: float = 0.0
    stop: float = 0.0  # seconds of the final stop (copy and switchover) when it converges

    @property
    def taken(self) -> float:
        """Guest-seconds finishing this way takes: the slowing, then the final stop."""
        return self.slowed + self.stop


def project(
    model: DirtyModel,
    bandwidth: float,
    budget: float,
    *,
    unsent: float,
    elapsed_in_pass: float,
    overhead: float,
    switchover: float,
    slowdown: float = 0.0,
    slow_step: float = 0.0,
    slow_initial: float = 0.0,
    slow_armed: bool = False,
    outside: float = 0.0,
    settings: PolicySettings | None = None,
) -> Projection:
    """Follow passes until a count fits `bandwidth * budget` or stops shrinking.

    Like the hypervisor, a pass sends until what it has left is below the threshold
    (checked before each burst: on average half a burst past it, at least one burst,
    at most all of it; the current pass, whose bursts began at its start
    `elapsed_in_pass` ago, up to the first check after that, even one already below
    it, e.g. with a budget just raised), then counts again: the next pass has that
    rest plus what the
    guest dirtied meanwhile outside it (`DirtyModel.next_count`). A count below the
    threshold stops the guest. `outside`: bytes of `unsent` outside the working set
    (the first pass's, lying all over memory), never rewritten; what a pass sends
    takes from them in proportion.

    With slowing armed, the throttle rises like the hypervisor raises it: after
    `slow_down_passes_per_step` periods (of at least `slow_down_period` seconds) in a
    row that rewrote at least `slow_down_bad_ratio` of what they sent.
    """
    s = settings or DEFAULT
    capacity = bandwidth * budget
    window = max(s.recount_interval, 1e-3)
    burst = bandwidth * window

    def sends(size: float, first: bool) -> float:
        """Bytes a pass of `size` sends before it is counted again."""
        if first:
            below = max(0.0, elapsed_in_pass) + max(size - capacity, 0.0) / bandwidth
            check = max(1, math.ceil(below / window - 1e-9)) * window
            return min(size, bandwidth * (check - max(0.0, elapsed_in_pass)))
        return min(size, max(size - capacity + burst / 2, burst))

    sent = sends(unsent, True)
    seconds = sent / bandwidth  # the rest of the current pass
    slowed = seconds * slowdown
    duration = elapsed_in_pass + seconds
    rest = unsent - sent
    outside = min(max(0.0, outside), unsent) * (rest / unsent if unsent > 0 else 0.0)
    period = [elapsed_in_pass, bandwidth * elapsed_in_pass + sent, 0.0]  # time, sent, dirty
    level = slowdown
    bad = 0
    previous = math.inf
    for n in range(1, _MAX_PROJECTED_PASSES + 1):
        left = model.next_count(rest, duration, level, outside)
        dirtied = left - rest
        if left <= capacity:
            stop = left / bandwidth + switchover
            return Projection(True, seconds + stop, 0.0, n, slowed, stop)
        raised = False
        if slow_armed:
            period[2] += dirtied
            if period[0] >= s.slow_down_period:
                bad = bad + 1 if period[2] >= s.slow_down_bad_ratio * period[1] else 0
                period = [0.0, 0.0, 0.0]
                if bad >= s.slow_down_passes_per_step:
                    bad = 0
                    raised = level < s.max_slowdown
                    level = slow_initial if level <= 0 else level + slow_step
                    level = min(s.max_slowdown, level)
        # settled: no longer shrinking, and no slowing left to come (a level raised just
        # now has not acted on `left` yet)
        settled = (
            not math.isinf(previous)
            and abs(left - previous) <= 0.005 * previous
            and (not slow_armed or (level >= s.max_slowdown and not raised))
        )
        if settled:
            return Projection(False, None, left, n, slowed)
        previous = left
        sent = sends(left, False)
        outside *= (left - sent) / left if left > 0 else 0.0
        rest = left - sent
        duration = sent / bandwidth + overhead
        seconds += duration
        slowed += duration * level
        period[0] += duration
        period[1] += sent
    return Projection(False, None, previous, _MAX_PROJECTED_PASSES, slowed)


@dataclass(frozen=True, slots=True)
class Analysis:
    """Everything the decision rules need, derived from the samples."""

    latest: Sample | None
    transfer_rate: float | None  # B, bytes/s; None when never measured
    change_rate: float | None  # what the hypervisor reports (distinct bytes per pass second)
    remaining: int  # R now: bytes the current pass still has to send
    memory: int  # M
    passes: int  # pass in progress, as the hypervisor counts (1 = first full pass)
    records: tuple[PassRecord, ...]  # passes whose start was observed
    model: DirtyModel | None  # fitted to the recent pairs; None before there is evidence
    best_model: DirtyModel | None  # the quietest rate observed, for "is there hope"
    pairs: int  # (pass duration, next remainder) pairs observed
    overhead: float  # seconds per pass when nothing is sent (bitmap sync and the like)
    floor: int | None  # remainder copying settles at with the current budget
    converges: bool | None  # finishes on its own with the current budget
    eta: float | None
    confidence: float
    shrinking: bool  # pass-start remainders still shrinking
    steady: bool  # pass readings steady enough that waiting will not change them
    finish_remaining: int  # bytes left to move if the guest stopped now (expected)
    finish_bound: int  # the same, assuming the fastest writing seen (for acting on it)
    fresh: bool  # the current pass began moments ago, so what it left is well known
    switchover: float
    in_pass: float = 0.0  # seconds since the current pass began (0 when not seen)
    rate_variation: float = 0.0  # coefficient of variation of recent transfer rates
    poll: float = 1.0  # seconds between the last two samples (1 with fewer samples)
    # of `remaining`, bytes lying all over memory (the first pass's), not only in the
    # working set
    spread: float = 0.0
    # Every window seen filled the working set, so the write rate is known only from
    # below; copying converges at that least rate, not at a faster one, and the current
    # pass will tell (`converges` is then None).
    saturated: bool = False
    # One pass seen, and it cannot tell whether copying converges: with no measurement
    # before the start, read as a writer over all of memory it does, read as one that
    # filled a working set of the pass's count it does not; or the pass shows that the
    # guest's writing changed (`rose_to`). The current pass will tell (`converges` is
    # then None).
    either_way: bool = False
    # With `either_way` after a measured first pass: bytes/s the guest dirtied on
    # average over that pass, more than the measurement before the start (its rate then)
    # allows for any steady writer (`rose_during_pass`): its writing changed.
    rose_to: float | None = None
    # With `either_way` after a measured first pass that filled the working set
    # (`filled_after_measurement`): its count cannot show whether the guest still writes
    # as measured; at `FASTER_READING` times that rate copying would not converge.
    pass_filled: bool = False
    # Clock time of the first sample of a pass after memory's first (None before): since
    # then the passes show the guest's rate pass by pass; the first pass averages it.
    passes_since: float | None = None
    # Seconds the bytes moved have not grown, up to the latest sample (0 while they
    # grow). The hypervisor's transfer-rate reading keeps its last value while the link
    # carries nothing, so only the bytes moved show a stalled link.
    still_for: float = 0.0

    @property
    def link_still(self) -> bool:
        """Nothing has moved for `LINK_STILL_SECONDS`: the link carries nothing, and what
        is read from its last transfer-rate reading says nothing of now."""
        return self.still_for >= LINK_STILL_SECONDS

    def outside(self, model: DirtyModel) -> float:
        """Bytes of `remaining` outside `model`'s working set (never rewritten)."""
        return model.outside(self.spread, self.memory)

    def margin(self, minimum: float, settings: PolicySettings) -> float:
        """Factor a predicted duration is multiplied by before it is held to a bound."""
        return max(minimum, 1.0 + settings.rate_variation_weight * self.rate_variation)

    def project_with(
        self,
        ctx: MigrationContext,
        budget: float,
        settings: PolicySettings,
        *,
        slowing: bool = True,
        model: DirtyModel | None = None,
    ) -> Projection | None:
        """Passes from now on with a blackout budget (None without a model).

        With `slowing`, the throttle keeps rising as the hypervisor raises it when the
        migration started with slowing armed; without, it stays where it is. `model`:
        another reading of the guest's writing than the fitted one.
        """
        model = model or self.model
        if model is None or not self.transfer_rate or self.latest is None:
            return None
        plan = ctx.plan
        return project(
            model,
            self.transfer_rate,
            budget,
            unsent=float(self.remaining),
            elapsed_in_pass=self.in_pass,
            overhead=self.overhead,
            switchover=ctx.switchover,
            slowdown=self.latest.slowdown,
            slow_step=plan.slow_down_step,
            slow_initial=plan.slow_down_initial,
            slow_armed=plan.arm_slow_down and slowing,
            outside=self.outside(model),
            settings=settings,
        )

    @property
    def pass_starts(self) -> tuple[int, ...]:
        return tuple(int(r.size) for r in self.records)

    def seconds_for(self, size: float) -> float | None:
        """Time to move `size` bytes at the transfer rate."""
        if not self.transfer_rate:
            return None
        return size / self.transfer_rate

    def stop_seconds(self) -> float | None:
        """A final stop now: copying what is left (at most) plus the switchover cost."""
        copy = self.seconds_for(self.finish_bound)
        return None if copy is None else copy + self.switchover

    def prediction(self) -> Prediction:
        return Prediction(
            transfer_rate=self.transfer_rate or 0.0,
            change_rate=self.change_rate or 0.0,
            remaining=self.remaining,
            eta_seconds=self.eta,
            blackout_seconds=self.stop_seconds(),
            converges=self.converges,
            floor_bytes=self.floor,
            confidence=self.confidence,
        )


@dataclass(frozen=True, slots=True)
class DiskOutlook:
    """The copy of an instance's local disks, while they are not yet in sync.

    The guest's writes land on blocks at random: those already copied must be copied
    again, so what is left, R of T, moves as dR/dt = −B + w·(T − R)/T at the copy's
    rate B and the guest's disk write rate w. It reaches 0 only if w < B; the time it
    takes follows from the same equation. `writes` is w as the samples show it.
    """

    total: int
    remaining: int
    rate: float | None  # B, bytes/s the copy moves (None: not reported yet)
    writes: float | None  # w, bytes/s (None: not enough seen yet)
    seconds: float | None  # until in sync (math.inf: never; None: unknown)
    evidence: bool  # seen long enough, and far enough into the copy, to act on

    @property
    def never(self) -> bool:
        return self.seconds is not None and math.isinf(self.seconds)


def disk_sync_seconds(remaining: float, total: float, rate: float, writes: float) -> float:
    """Seconds until a disk copy with `remaining` of `total` left is in sync (math.inf:
    never), copying at `rate` while the guest writes at `writes` (bytes/s)."""
    if remaining <= 0:
        return 0.0
    if rate <= 0 or total <= 0:
        return math.inf
    if writes <= _NO_WRITES:
        return remaining / rate
    if writes >= rate:
        return math.inf  # what is left settles near T·(1 − B/w), never 0
    # ln((R − S)/−S)·T/w with S = T·(w − B)/w, kept precise for tiny w
    return math.log1p(remaining * writes / (total * (rate - writes))) * total / writes


def disk_outlook(history: History, settings: PolicySettings = DEFAULT) -> DiskOutlook | None:
    """The disk copy's outlook; None when there are no local disks or they are in sync."""
    track = tracked(history, settings)
    latest = track.latest
    if latest is None:
        return None
    if latest.disk_total <= 0 or latest.disks_in_sync or latest.phase is not Phase.COPYING:
        return None
    total = float(latest.disk_total)
    copying = track.copying
    rates = [s.disk_rate for s in itertools.islice(reversed(copying), RECENT) if s.disk_rate > 0]
    rates.reverse()
    rate = _ewma(rates, settings.ewma_alpha)
    writes: float | None = None
    evidence = False
    earlier = next(
        (s for s in reversed(copying) if s.time <= latest.time - settings.disk_window), None
    )
    if earlier is not None and rate:
        span = latest.time - earlier.time
        between = [s.disk_rate for s in copying if earlier.time < s.time <= latest.time]
        moving = statistics.fmean(between) if between else rate
        copied = total - (earlier.disk_remaining + latest.disk_remaining) / 2
        if copied >= settings.disk_evidence_share * total:
            # the integral of (T − R)/T over the span is (T − R_mean)/T · span
            rewritten = latest.disk_remaining - earlier.disk_remaining + moving * span
            writes = max(0.0, rewritten * total / (copied * span))
            evidence = True
    seconds: float | None = None
    if rate:
        seconds = disk_sync_seconds(latest.disk_remaining, total, rate, writes or 0.0)
    return DiskOutlook(
        total=latest.disk_total,
        remaining=latest.disk_remaining,
        rate=rate,
        writes=writes,
        seconds=seconds,
        evidence=evidence,
    )


def _ewma(values: Sequence[float], alpha: float) -> float | None:
    if not values:
        return None
    value = values[0]
    for reading in values[1:]:
        value = alpha * reading + (1 - alpha) * value
    return value


def _variation(values: Sequence[float]) -> float:
    """Coefficient of variation (0 = perfectly steady)."""
    if len(values) < 2:
        return 0.0
    mean = statistics.fmean(values)
    if mean <= 0:
        return 0.0
    # In floats: statistics.pstdev computes exactly, in fractions, at every decision.
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values)) / mean


STEP_HELD = 3  # readings a link's new level must hold before it is judged on its own


def _since_step(readings: Sequence[float], drop: float) -> int:
    """Where the link's current level began: the index of the reading at which it
    stepped down (more than `drop` below every reading since the step before) and
    stayed down (every reading from there on as low, two at least: the latest reading
    alone may be a dip, which `_transfer_rate` tells by the bytes moved), or 0."""
    following = [0.0] * len(readings)  # the highest reading from each index on
    highest = 0.0
    for i in range(len(readings) - 1, -1, -1):
        highest = max(highest, readings[i])
        following[i] = highest
    start = 0
    lowest = readings[0] if readings else 0.0  # the lowest since `start`
    for i in range(1, len(readings) - 1):
        if following[i] < (1 - drop) * lowest:
            start, lowest = i, readings[i]
        else:
            lowest = min(lowest, readings[i])
    return start


def _rate_variation(readings: Sequence[float], since: Sequence[float]) -> float:
    """How much the link's rate varies: over `since` (the readings since its last step
    down, `_since_step`) once the new level has held for `STEP_HELD` readings, else over
    all of `readings`. A link that slowed in one step and stays there is as steady as
    it has been since."""
    held = STEP_HELD <= len(since) < len(readings)
    return _variation(since if held else readings)


def _transfer_rate(
    track: Track, readings: Sequence[float], alpha: float, drop: float
) -> float | None:
    """What the link carries now: the average of `readings` (the recent ones since its
    last step down, `_since_step`), or the latest one when it lies more than `drop`
    below that average and the bytes moved since the sample before say so too (the
    hypervisor's reading covers its last fraction of a second, which a dirty-bitmap
    sync alone may have slowed)."""
    rate = _ewma(readings, alpha)
    if rate is None:
        return _moved_rate(track)
    low = (1 - drop) * rate
    if readings[-1] < low:
        moved = _interval_rate(track)
        if moved is not None and moved < low:
            return readings[-1]
    return rate


def _interval_rate(track: Track) -> float | None:
    """Bytes moved per second between the last two samples (None across a new job)."""
    latest, before = track.latest, track.previous
    if latest is None or before is None or latest.time <= before.time:
        return None
    moved = latest.memory_transferred - before.memory_transferred
    return moved / (latest.time - before.time) if moved >= 0 else None


def _still_for(recent: Sequence[Sample]) -> float:
    """Seconds the bytes moved have not grown, up to the latest of `recent` (0 while
    they grow; counted from the earliest sample kept when none of them grew, and from
    the first with the disks in sync: memory does not move while they are copied)."""
    if not recent:
        return 0.0
    latest = recent[-1]
    since = latest.time
    for sample in reversed(recent):
        if sample.memory_transferred != latest.memory_transferred or not sample.disks_in_sync:
            break
        since = sample.time
    return latest.time - since


def _moved_rate(track: Track) -> float | None:
    """Bytes moved per second since memory began moving, when the hypervisor reports no
    transfer rate."""
    first, last = track.first_synced, track.last_synced  # memory moves only once in sync
    if track.synced >= 2 and first is not None and last is not None:
        moved = last.memory_transferred - first.memory_transferred
        elapsed = last.time - first.time
        if moved > 0 and elapsed > 0:
            return moved / elapsed
    return None


def _rate_then(seen: PassSeen, following: Sample) -> float | None:
    """The rate a pass sent at: the bytes moved between its first and last sample (no
    dirty-bitmap sync lies between them, so this is the link's rate then, not a single
    reading a sync may have slowed); with one sample, its reading; where it reported
    none either, the bytes moved from it to `following` (the next pass's first sample);
    None when nothing moved."""
    head, last = seen.head, seen.last
    moved = last.memory_transferred - head.memory_transferred
    if last.time > head.time and moved > 0:
        return moved / (last.time - head.time)
    if last.transfer_rate > 0:
        return last.transfer_rate
    moved = following.memory_transferred - last.memory_transferred
    if following.time > last.time and moved > 0:
        return moved / (following.time - last.time)
    return None


def observe_passes(
    history: History,
    ctx: MigrationContext,
    interval: float = DEFAULT.recount_interval,
    settings: PolicySettings = DEFAULT,
) -> list[PassRecord]:
    """Passes whose start the samples show, with their sizes and durations.

    A pass's start is known when the samples show the pass before it (the boundary
    lies between the last sample of one and the first of the next), or for pass 1,
    which starts with the migration. After a restart the samples begin mid-pass:
    that pass is not counted, so evidence is rebuilt from what is seen, never
    guessed from a single sample. Only the passes the track keeps count (memory's
    first two, and the last `kept_passes + 1`, the first of which only as the pass
    before the others: as if the samples began with it).

    The pass before was counted again once what it had left fell below the threshold
    (transfer rate × the budget then), before the next burst of `interval` seconds
    (half a burst past it on average), or was all sent; its rest is carried into the
    new pass. Where the boundary lies between two samples does not change what was
    rewritten: what is left now, plus what was sent since, minus what was left then.

    The rate then is the one the pass before sent at (`_rate_then`), not the latest
    reading: a pass that has ended keeps the record it had, however the link changes
    later, so the records are the same for every sample of the next pass, as they were
    for the hypervisor (and `_evidence` builds them once per change of the passes).
    """
    track = tracked(history, settings)
    memory_start = track.memory_start(
        ctx.started_at if ctx.job_started_at is None else ctx.job_started_at
    )
    starts: list[tuple[int, float, float, float, float]] = []  # number, start, size, slow, rest
    previous: PassSeen | None = None
    for seen in track.passes():
        n, head = seen.number, seen.head
        start: float | None = None
        carried = 0.0
        if n == 1:
            start = memory_start
            size = float(max(seen.peak, head.memory_total or ctx.memory_bytes))
        elif (
            previous is not None
            and previous.number == n - 1
            and (bandwidth := _rate_then(previous, head))
        ):
            tail = previous.last
            threshold = bandwidth * max(0.0, tail.blackout_budget)
            moved = max(0.0, float(head.memory_transferred - tail.memory_transferred))
            # what the pass before still sent: down to the threshold, or all of it
            past = bandwidth * interval / 2
            left = float(tail.memory_remaining)
            before = min(moved, left, max(0.0, left - threshold + past))
            end = tail.time + before / bandwidth
            start = min(max(end, tail.time), head.time)
            carried = left - before
            # Bytes sent of this pass before its first sample: what was moved between
            # the two samples beyond that (no more than the link could move; nothing is
            # sent while the pass starts up).
            sent = min(moved - before, bandwidth * (head.time - start))
            size = max(float(seen.peak), head.memory_remaining + sent)
            carried = min(carried, size)
        if start is not None:
            starts.append((n, start, size, head.slowdown, carried))
        previous = seen
    records: list[PassRecord] = []
    for i, (n, start, size, slow, carried) in enumerate(starts):
        duration = None
        if i + 1 < len(starts) and starts[i + 1][0] == n + 1:
            duration = max(starts[i + 1][1] - start, 1e-6)
        # pass 1 sends memory; a pass carries on what its predecessor left of that
        spread = size if n == 1 else 0.0
        if n > 1 and records and records[-1].number == n - 1 and records[-1].size > 0:
            prior = records[-1]
            spread = min(carried, prior.spread * carried / prior.size)
        records.append(PassRecord(n, start, size, duration, slow, carried, spread))
    return records


def _pairs(records: Sequence[PassRecord], track: Track) -> list[Pair]:
    """Pass n's duration and slow-down, what pass n+1 had to send less the rest pass n
    carried over to it (the pages dirtied outside that rest), and that rest; oldest first.

    From consecutive passes whose boundaries the samples show; and where passes are
    shorter than the time between samples (several passes between two samples), from
    their average: k passes in `dt` seconds that sent `moved` bytes each lasted about
    `dt / k` and left about `moved / k` for the next.
    """
    timed: list[tuple[float, Pair]] = []
    for rec_a, rec_b in itertools.pairwise(records):
        if rec_a.duration is not None and rec_b.number == rec_a.number + 1:
            rewritten = max(0.0, rec_b.size - rec_b.carried)
            pair = Pair(rec_a.duration, rec_a.slowdown, rewritten, rec_b.carried, rec_b.spread)
            timed.append((rec_b.started, pair))
    timed.extend(track.jumps)  # the last `kept_passes` of them
    timed.sort(key=lambda item: item[0])
    return [pair for _, pair in timed]


# Recent pairs whose durations span this factor tell the working set from the rate.
_TELLING_SPAN = 2.0


def _telling(pairs: Sequence[Pair], recent: Sequence[Pair]) -> list[Pair]:
    """The recent pairs, and, when their durations span less than `_TELLING_SPAN`, the
    older pair whose duration lies farthest from theirs.

    Pairs of about one duration fix one point of `f`, which cannot tell the working set
    from the rate: passes that end at the threshold of a steady guest all last alike,
    and the noise in what they left (a sequential writer's position in its sweep, a real
    host's jitter) then picks any working set, from one sample to the next. The pass
    most unlike them tells most: often the long first pass, whose count shows how far
    the guest's writes spread when given time."""
    durations = [p.duration for p in recent]
    if len(recent) < 2 or max(durations) >= _TELLING_SPAN * min(durations):
        return list(recent)
    low, high = min(durations) / 1.1, max(durations) * 1.1
    older = [p for p in pairs[: len(pairs) - len(recent)] if not low <= p.duration <= high]
    if not older:
        return list(recent)
    middle = math.sqrt(low * high)
    other = max(reversed(older), key=lambda p: abs(math.log(p.duration / middle)))
    return [other, *recent]


_FITS_KEPT = 4096  # fits kept: one per migration supervised, with room to spare


@functools.lru_cache(maxsize=_FITS_KEPT)
def _rate_now(model: DirtyModel, recent: tuple[Pair, ...], memory: float) -> DirtyModel:
    """`model`'s working set, with the rate the recent pairs read through it. An older
    pair of another duration (`_telling`) told the working set from the rate; the
    guest may write faster or slower now than when that pass was counted."""
    points = fit_points(recent, None, None)
    found = _fit_at([model.working_set], points, memory) if points else None
    return model if found is None else found[2]


# A window in which the guest dirtied this share of its working set or more bounds its
# write rate from below only (the count cannot grow past the working set).
SATURATED = 0.9
# What "faster" means for a rate bounded from below only: this many times the least
# rate the windows allow (a pass this much shorter would be as full as they were).
FASTER_READING = 10.0
_MOST_OVERLAP = 0.9  # a rest covering more of the working set is read as covering this


def _rewrites(model: DirtyModel, pair: Pair, memory: float) -> float:
    """What the model says the next pass had beyond the rest `pair`'s pass left."""
    outside = model.outside(pair.spread, memory)
    return model.next_count(pair.rest, pair.duration, pair.slowdown, outside) - pair.rest


def _overlap(pair: Pair, working_set: float, memory: float) -> float:
    """Share of a working set of `working_set` bytes the pair's rest covered."""
    return _covered(working_set, pair.rest, _outside(working_set, pair.spread, memory))


def _distinct(pair: Pair, overlap: float) -> float:
    """`f(duration)` read from a pair whose rest covered `overlap` of the working set:
    what the guest dirtied outside the rest is the share of its pages the rest did not
    cover (taken as at least 1 − `_MOST_OVERLAP`: beyond, the pair says little of `f`)."""
    return pair.rewritten / (1.0 - min(_MOST_OVERLAP, overlap))


def _written(working_set: float, distinct: float) -> float:
    """Bytes written to dirty `distinct` bytes of the working set (`f` inverted)."""
    return -working_set * math.log1p(-min(distinct / working_set, 0.999999))


def _solve_working_set(rate: float, pair: Pair, memory: float, cap: float) -> float:
    """W in [pair.rewritten, cap] with which writing at `rate` explains the pair."""
    if _rewrites(DirtyModel(rate, cap), pair, memory) <= pair.rewritten:
        return cap
    lo, hi = pair.rewritten, cap
    for _ in range(60):
        mid = (lo + hi) / 2
        if _rewrites(DirtyModel(rate, mid), pair, memory) < pair.rewritten:
            lo = mid
        else:
            hi = mid
    return hi


def _fit_at(
    working_sets: Sequence[float], points: Sequence[Pair], memory: float
) -> tuple[float, int, DirtyModel] | None:
    """The best model with one of these working sets: (error, its index, model).

    For each working set `w`, each pair's rest covers its share of `w` (`_overlap`),
    through which the pair reads bytes written (`_written` of `_distinct`). The
    candidate rates are the least-squares line through the origin of those readings,
    and the rate each pair implies on its own (a saturated pair says little; a short
    pass says most). A candidate's error is the squared log error of what
    `DirtyModel(d, w)` says each next pass had beyond its rest (`_rewrites`) against
    what it had. Every working set, candidate and pair is computed at once, as arrays:
    this is most of what a decision costs.
    """
    if not working_sets or not points:
        return None
    w = np.asarray(working_sets, dtype=float)[:, None]  # (working sets, 1)
    duration = np.array([p.duration for p in points])
    rest = np.array([p.rest for p in points])
    spread = np.array([p.spread for p in points])
    rewritten = np.array([p.rewritten for p in points])
    unslowed = np.array([max(0.0, 1.0 - p.slowdown) for p in points])
    time = np.maximum(duration, 0.0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # `_outside`, `_covered`, `_distinct`, `_written` for every (working set, pair)
        if memory > 0:
            outside = np.where(spread > 0, spread * np.maximum(0.0, 1.0 - w / memory), 0.0)
        else:
            outside = np.zeros_like(w * spread)
        inside = np.maximum(0.0, rest - np.maximum(0.0, outside))
        share = np.where(w > 0, np.minimum(1.0, inside / w), 0.0)
        distinct = rewritten / (1.0 - np.minimum(_MOST_OVERLAP, share))
        ys = -w * np.log1p(-np.minimum(distinct / w, 0.999999))
        slope = (ys * duration).sum(axis=1, keepdims=True) / (duration * duration).sum()
        rates = np.concatenate([slope, ys / duration], axis=1)  # (working sets, candidates)
        # `DirtyModel(d, w).added`, as `_rewrites` reads it, for every candidate and pair
        exposure = (rates[:, :, None] * unslowed) * time  # (working sets, candidates, pairs)
        wide = w[:, :, None]
        dirtied = np.where(wide > 0, wide * -np.expm1(-exposure / wide), 0.0)
        added = dirtied * (1.0 - share)[:, None, :]
        error = (np.log(np.maximum(added, 1.0) / rewritten) ** 2).sum(axis=2)
    error = np.where((rates > 0) & np.isfinite(error), error, np.inf)
    best = int(np.argmin(error))  # the first of equals: the smallest working set
    k, c = divmod(best, error.shape[1])
    if not math.isfinite(float(error[k, c])):
        return None
    return float(error[k, c]), k, DirtyModel(float(rates[k, c]), float(working_sets[k]))


def _log_steps(low: float, high: float, steps: int) -> list[float]:
    return [low * (high / low) ** (k / steps) for k in range(steps + 1)]


def fit_model(
    pairs: Sequence[Pair],
    memory: float,
    measured_rate: float | None = None,
    measured_window: float | None = None,
) -> DirtyModel | None:
    """The dirtying model that best explains the pairs (least squares in log space):
    `_fit`, whose latest results are kept. The fit searches working sets and is most
    of what a decision costs, while the pairs change only when a pass ends: every
    other sample of a pass (and of each of up to thousands of migrations) asks for
    the same fit again."""
    return _fit(tuple(pairs), float(memory), measured_rate, measured_window)


@functools.lru_cache(maxsize=_FITS_KEPT)
def _fit(
    pairs: tuple[Pair, ...],
    memory: float,
    measured_rate: float | None,
    measured_window: float | None,
) -> DirtyModel | None:
    """The dirtying model that best explains the pairs (least squares in log space).

    One pair fixes one point of `f`: what the next pass had beyond the rest is what
    the guest dirtied outside that rest, `f(t)·(1 − rest/W)` (`DirtyModel.next_count`),
    so each candidate working set reads `f(t)` from the pair its own way. A change rate
    measured before the start is another point: the hypervisor counts the distinct
    bytes dirtied in its window, so it is `f(window) / window`, saturated like any
    pass; with its window known the two points fix both the rate and the working set.
    Without the window, the measurement is taken as the write rate when it exceeds the
    least rate that explains the pair; without a measurement that least rate is taken:
    the curve through the pair's count with all of memory as the working set, the most
    hopeful reading, which the next pair corrects. (Not the straight line through the
    count: over all of memory the curve at that rate falls below the count itself, and
    a first pass that left nearly all of memory dirty read as converging.)
    """
    if not pairs:
        return None
    points = fit_points(pairs, measured_rate, measured_window)
    if not points:  # passes left nothing behind: the guest does not write
        return DirtyModel(rate=0.0, working_set=max(memory, 1.0))
    cap = max(memory, max(p.rewritten for p in points) * 1.0001)
    if len(points) == 1:
        (point,) = points
        # the least rate that explains the pass: writing over all of memory
        least = _written(cap, _distinct(point, _overlap(point, cap, memory))) / point.duration
        if measured_rate is not None and measured_rate > least * 1.2:
            working_set = _solve_working_set(measured_rate, point, memory, cap)
            return DirtyModel(measured_rate, working_set)
        return DirtyModel(least, cap)
    low = max(p.rewritten for p in points) * 1.0005
    if cap <= low:
        found = _fit_at([cap], points, memory)
        return None if found is None else found[2]
    # a coarse grid of working sets, then a finer one around the best of it
    coarse = _log_steps(low, cap, 40)
    found = _fit_at(coarse, points, memory)
    if found is None:
        return None
    k = found[1]
    fine = _log_steps(coarse[max(0, k - 1)], coarse[min(len(coarse) - 1, k + 1)], 10)
    refined = _fit_at(fine, points, memory)
    if refined is not None and refined[0] < found[0]:
        found = refined
    return found[2]


def fit_points(
    pairs: Sequence[Pair], measured_rate: float | None, measured_window: float | None
) -> list[Pair]:
    """The points `_fit` fits: the pairs that show writing, with the slow-down taken
    into the time the guest wrote at its full rate; and, beside a single pair, the
    measurement before the start with its window: one more point of the same curve
    (distinct bytes dirtied in the window), which with the pass fixes both the rate
    and the working set."""
    usable = [p for p in pairs if p.duration > 0 and p.rewritten > 0 and p.slowdown < 1]
    points = [replace(p, duration=p.duration * (1 - p.slowdown), slowdown=0.0) for p in usable]
    if len(points) == 1 and measured_rate and measured_window:
        points.append(Pair(measured_window, 0.0, measured_rate * measured_window))
    return points


def filled(model: DirtyModel, seconds: float) -> bool:
    """Would the guest, writing as `model` says, dirty nearly all of its working set
    (`SATURATED`) in `seconds`? Such a window says only that it writes at least that
    fast: the hypervisor counts a page once, however often it is rewritten."""
    w = model.working_set
    return w > 0 and model.dirtied(seconds) >= SATURATED * w


def filled_after_measurement(
    telling: Sequence[Pair], ctx: MigrationContext, model: DirtyModel
) -> bool:
    """One pass seen and a measurement before the start, and the pass filled the working
    set while the measurement's window did not: the model fits both exactly, but only
    the measurement says how fast the guest writes, and it was taken before the pass."""
    measured, window = ctx.change_rate_before_start, ctx.change_rate_window
    if len(telling) != 1 or not measured or not window:
        return False
    first = telling[0]
    return filled(model, first.duration * (1.0 - first.slowdown)) and not filled(model, window)


def rose_during_pass(
    telling: Sequence[Pair], ctx: MigrationContext, memory: float, settings: PolicySettings
) -> float | None:
    """The rate the guest dirtied pages at on average over its one pass seen, when that
    is more than the measurement before the start allows for a guest that writes
    steadily (None otherwise, or without both).

    For any steady writer the distinct bytes dirtied in `t` seconds, `f(t)`, grow ever
    more slowly (each write can only land on a page already dirty or a new one), so a
    pass longer than the measurement's window dirties at most the measured rate per
    second on average. More than that, beyond three standard deviations of the
    measurement's page sampling, means the writing changed during the pass."""
    measured, window = ctx.change_rate_before_start, ctx.change_rate_window
    if len(telling) != 1 or not measured or not window or memory <= 0:
        return None
    first = telling[0]
    writing = first.duration * (1.0 - first.slowdown)
    if first.duration <= window or writing <= 0:
        return None
    average = first.rewritten / writing
    pages = settings.measure_pages_per_gib * memory / GIB
    share = min(1.0, measured * window / memory)
    scatter = math.sqrt((1.0 - share) / (pages * share)) if 0 < share < 1 else 0.0
    return average if average > measured * (1.0 + 3.0 * scatter) else None


def filling(point: Pair) -> DirtyModel:
    """The reading of one window in which the guest filled a working set of what it
    dirtied there: that working set, written `FASTER_READING` times as fast as the least
    rate that fills it (`SATURATED`) in the window, as `filled` and rule 5b read a rate
    bounded from below only."""
    working_set = max(point.rewritten, 1.0)
    least = _written(working_set, SATURATED * working_set) / max(point.duration, 1e-9)
    return DirtyModel(rate=least * FASTER_READING, working_set=working_set)


def _pair_rates(pairs: Sequence[Pair], model: DirtyModel, memory: float) -> list[float]:
    """The write rate each pair implies, given the fitted working set."""
    w = model.working_set
    rates = []
    for p in pairs:
        effective = p.duration * (1 - p.slowdown)
        if effective <= 0 or p.rewritten <= 0 or w <= 0:
            rates.append(0.0)
            continue
        rates.append(_written(w, _distinct(p, _overlap(p, w, memory))) / effective)
    return rates


def _filled_counts(pairs: Sequence[Pair], model: DirtyModel, memory: float) -> list[float] | None:
    """What `pairs` measured, when every one of them filled the working set: the part
    of it each next count held (the rest the pass left there, and what the guest
    dirtied beside it); None when one did not (then the write rate each implies,
    `_pair_rates`, is the reading).

    A count that filled the working set bounds the write rate from below only, and the
    rate it implies through the model is ill-conditioned: on a real host a few MiB more
    or less from pass to pass (the guest's kernel, page-cache writeback) swing it by
    several times, and those swings, read as a varying rate, kept a hopeless migration
    waiting for steadier readings until its deadline. Such passes are steady when their
    counts are. What decides is how much of the working set the count holds, not what
    the pass dirtied alone: with a rest covering `o` of it and a count covering `c`, the
    rate read is proportional to log((1 − o) / (1 − c)), which a count near all of it
    swings however large the rest (a sequential writer's passes ending at the threshold
    leave 60-75 % of its working set and the next count holds nearly all of it). The
    largest count is measured against the fitted working set, the others against the
    smaller of the two: a fit of counts that all filled the working set can read it a
    few per cent above all of them.
    """
    w = model.working_set
    if w <= 0 or not pairs:
        return None
    held = [_overlap(p, w, memory) * w + p.rewritten for p in pairs]
    top = max(held)
    if top < SATURATED * w or min(held) < SATURATED * min(w, top):
        return None
    return held


def quiet_rate(
    pairs: Sequence[Pair],
    model: DirtyModel,
    memory: float,
    below: float = 0.5,
    *,
    rates: Sequence[float] | None = None,
) -> float | None:
    """The lowest write rate a pass showed, counting only passes that left clearly
    less than the model says (under half): a quieter phase seen, not a reading.

    The rate a pair implies through the model is ill-conditioned where the pass
    saturated the working set (the remainder near W): a long first pass then
    "implies" a rate a third of the true one when the fitted W shifts by a few MiB,
    and that phantom quiet phase would keep a hopeless migration waiting. A remainder
    measured well under the model's prediction is a fact about the guest instead.
    `rates`: the pairs' rates as `_pair_rates` reads them, when already at hand.
    """
    if rates is None:
        rates = _pair_rates(pairs, model, memory)
    quiet = [
        rate
        for p, rate in zip(pairs, rates, strict=True)
        if rate > 0 and p.rewritten < below * _rewrites(model, p, memory)
    ]
    return min(quiet) if quiet else None


def _evidence(
    track: Track, ctx: MigrationContext, settings: PolicySettings
) -> tuple[tuple[object, ...], tuple[PassRecord, ...], tuple[Pair, ...]]:
    """The pass records and pairs the samples show, and the key they are kept under.

    They change only when a pass begins (or a jump, a larger remainder, the disks'
    sync is seen: `Track.evidence`), while every kept pass is read to build them: they
    are built once per change and kept on the track, not at every sample."""
    key = (
        track.evidence,
        ctx.started_at,
        ctx.job_started_at,
        ctx.memory_bytes,
        settings.recount_interval,
    )
    kept = track.derived.get("evidence")
    if kept is not None and kept[0] == key:
        records, pairs = kept[1]
        return key, records, pairs
    records = tuple(observe_passes(track, ctx, settings.recount_interval, settings))
    pairs = tuple(_pairs(records, track))
    track.derived["evidence"] = (key, (records, pairs))
    return key, records, pairs


def _readings(
    track: Track,
    key: tuple[object, ...],
    pairs: Sequence[Pair],
    model: DirtyModel,
    memory: float,
    settings: PolicySettings,
) -> tuple[Sequence[float], DirtyModel, bool]:
    """What the pairs say through `model`: the write rate each implies
    (`_pair_rates`), the model at the quietest rate seen (`quiet_rate`), and whether
    the last `steady_pairs` are steady. Kept on the track under the evidence's `key`
    and the model, which stay the same for every sample of a pass."""
    full = (key, model, memory, settings.steady_pairs, settings.steady_variation)
    kept = track.derived.get("readings")
    if kept is not None and kept[0] == full:
        readings: tuple[Sequence[float], DirtyModel, bool] = kept[1]
        return readings
    rates = tuple(_pair_rates(pairs, model, memory))
    quiet = quiet_rate(pairs, model, memory, rates=rates)
    best = model if quiet is None else model.with_rate(quiet)
    window = _filled_counts(pairs[-settings.steady_pairs :], model, memory)
    if window is None:
        window = list(rates[-settings.steady_pairs :])
    steady = len(window) >= settings.steady_pairs and _variation(window) < settings.steady_variation
    track.derived["readings"] = (full, (rates, best, steady))
    return rates, best, steady


def analyse(
    history: History, ctx: MigrationContext, settings: PolicySettings = DEFAULT
) -> Analysis:
    """Derive rates, the dirtying model, floor, convergence and ETA from the samples."""
    track = tracked(history, settings)
    recent = track.recent
    latest = track.latest
    before = track.previous
    memory = latest.memory_total if latest and latest.memory_total > 0 else ctx.memory_bytes
    remaining = latest.memory_remaining if latest else memory
    passes = latest.passes if latest else 0
    # the link's transfer-rate readings, and those since its last step down
    readings = [s.transfer_rate for s in recent if s.transfer_rate > 0]
    since = readings[_since_step(readings, settings.rate_drop) :]
    rate = _transfer_rate(track, since, settings.ewma_alpha, settings.rate_drop)
    key, records, pairs = _evidence(track, ctx, settings)
    last_pairs = pairs[-settings.fit_pairs :]
    telling = _telling(pairs, last_pairs)
    points = fit_points(telling, ctx.change_rate_before_start, ctx.change_rate_window)
    model = fit_model(telling, memory, ctx.change_rate_before_start, ctx.change_rate_window)
    if model is not None and len(telling) > len(last_pairs):
        model = _rate_now(model, last_pairs, memory)
    # the time a pass took beyond sending what it sent (its size less the rest carried on)
    overheads = [
        max(0.0, d - (a.size - b.carried) / rate)
        for a, b in itertools.pairwise(records)
        if rate and (d := a.duration) is not None and a.number >= 2 and b.number == a.number + 1
    ]
    overhead = statistics.median(overheads[-5:]) if overheads else 0.0
    reported = [s.change_rate for s in recent if s.passes >= 2 and s.change_rate > 0]
    change = _ewma(reported, settings.ewma_alpha)

    level = latest.slowdown if latest else 0.0
    current = records[-1] if records and records[-1].number == passes else None
    in_pass = max(0.0, latest.time - current.started) if latest and current else 0.0
    poll = latest.time - before.time if latest and before else 1.0
    fresh = current is None or in_pass <= max(2.0 * poll, 0.1 * current.size / (rate or 1.0))
    if latest and before and latest.passes - before.passes >= 2:
        fresh = True  # passes are shorter than the time between samples
    if current is not None:
        spread = current.spread * remaining / current.size if current.size > 0 else 0.0
    else:
        spread = float(remaining) if passes <= 1 else 0.0
    finish = float(remaining)
    outside = 0.0 if model is None else model.outside(spread, memory)
    if model is not None:
        finish = min(float(memory), model.next_count(remaining, in_pass, level, outside))
    elif passes <= 1 and ctx.change_rate_before_start and latest is not None:
        finish = min(memory, remaining + ctx.change_rate_before_start * in_pass)
    # What the guest dirtied since the pass began is not reported until it ends: for
    # acting on it, assume it wrote up to twice the fastest rate seen so far.
    fastest = max(
        [
            model.rate * (1 - level) if model else 0.0,
            ctx.change_rate_before_start or 0.0,
            *reported[-5:],
        ]
    )
    written = 2 * fastest * in_pass if latest is not None and current else 0.0
    if model is not None and len(points) >= 2:
        # A fitted working set bounds it too: the guest writes only there, and a page
        # still unsent is counted once however often it is rewritten, so what writing
        # adds is at most the part of the working set the unsent rest does not hold.
        # Fitted means told by two points of the curve at least: two passes, or one and
        # the measurement before the start (one pass alone is read as a writer over all
        # of memory, `_fit`).
        written = min(written, model.working_set * (1.0 - model.overlap(remaining, outside)))
    bound = remaining + written
    if latest is not None and current is None:  # the pass's start was not seen
        bound = float(max(remaining, memory if passes <= 1 else remaining))
    finish_bound = max(finish, min(float(memory), bound))

    best_model: DirtyModel | None = None
    steady = False
    rates: Sequence[float] = ()  # the write rate each pair implies (with the model's W)
    if model is not None and pairs:
        rates, best_model, steady = _readings(track, key, pairs, model, memory, settings)

    floor: int | None = None
    converges: bool | None = None
    eta: float | None = None

    sizes = [r.size for r in records if r.number >= 2]
    shrinking = len(sizes) >= 2 and sizes[-1] < settings.plateau_ratio * sizes[-2]
    confidence = 0.0
    if model is not None and len(last_pairs) >= 1:
        evidence = min(1.0, len(last_pairs) / 3)
        variation = _variation(rates[-len(last_pairs) :]) if len(last_pairs) >= 2 else 0.5
        confidence = round(evidence * (1.0 - min(1.0, variation)), 3)

    analysis = Analysis(
        latest=latest,
        transfer_rate=rate,
        change_rate=change,
        remaining=remaining,
        memory=memory,
        passes=passes,
        records=tuple(records),
        model=model,
        best_model=best_model,
        pairs=len(pairs),
        overhead=overhead,
        floor=floor,
        converges=converges,
        eta=eta,
        confidence=confidence,
        shrinking=shrinking,
        steady=steady,
        finish_remaining=int(finish),
        finish_bound=int(finish_bound),
        fresh=fresh,
        switchover=ctx.switchover,
        in_pass=in_pass,
        rate_variation=_rate_variation(readings, since),
        poll=poll,
        spread=min(spread, float(remaining)),
        passes_since=None if track.repeating is None else track.repeating.time,
        still_for=_still_for(recent),
    )
    # "Converges" means on its own at the current slow-down; the ETA counts the
    # slow-down the hypervisor will add when it was armed at start.
    alone = analysis.project_with(ctx, ctx.blackout_budget, settings, slowing=False)
    if alone is None:
        return analysis
    alone_converges, settles, eta = alone.converges, alone.floor, alone.seconds
    # A stop projected at the next count or the one after, while the passes keep ending
    # above the threshold at this budget, is the fit's error: the plateau is the floor.
    if alone_converges and alone.passes <= 2 and rate:
        above = plateau_above(records, track, ctx.blackout_budget, settings.plateau_passes)
        if above is not None:
            alone_converges, settles, eta = False, max(above, rate * ctx.blackout_budget), None
    if alone_converges and model is not None and rate and current is not None:
        this_pass_tells = not filled(model, in_pass + remaining / rate)
        # Every window seen filled the working set: the guest writes at least the fitted
        # rate, maybe far faster. When copying converges only at the least of those rates
        # and the current pass is short enough not to fill it, its count tells which.
        if points and all(filled(model, p.duration) for p in points):
            worst = _at_faster_reading(analysis, ctx, settings, model)
            if worst is not None and not worst.converges and this_pass_tells:
                return replace(
                    analysis, converges=None, floor=int(worst.floor), eta=None, saturated=True
                )
            if worst is not None and worst.converges and worst.seconds is not None:
                # converging either way: finishing takes as long as the faster reading says
                # (every pass then fills the working set, and only what lies outside it
                # shrinks), or as the fitted rate says, whichever is longer
                eta = max(eta or 0.0, worst.seconds)
        elif filled_after_measurement(telling, ctx, model):
            # The one pass filled the working set: its count cannot show whether the
            # guest still writes as measured before the start, a whole pass ago (a
            # growing guest looks the same). Converging at the measured rate but not at
            # a far faster one, the current pass, too short to fill, tells which (5c).
            worst = _at_faster_reading(analysis, ctx, settings, model)
            if worst is not None and not worst.converges and this_pass_tells:
                return replace(
                    analysis,
                    converges=None,
                    floor=int(worst.floor),
                    eta=None,
                    either_way=True,
                    pass_filled=True,
                )
        elif (rose := rose_during_pass(telling, ctx, memory, settings)) is not None:
            # The pass's count says the guest wrote faster than the measurement before the
            # start allows for a steady writer: its rate changed (it grows, or a burst), so
            # the fit of the two says little of the rate now; the next pass tells (5c).
            return replace(
                analysis,
                converges=None,
                floor=int(settles),
                eta=None,
                either_way=True,
                rose_to=rose,
            )
        elif len(points) == 1 and ctx.change_rate_before_start is None:
            # One pass and no measurement: the fit reads the pass as a writer's over all
            # of memory (`_fit`, the most hopeful reading), but it may as well have filled
            # a working set of its count, which every later pass fills again. Converging
            # either way, finishing takes as long as the longer reading says, as above.
            reading = filling(points[0])
            worst = analysis.project_with(
                ctx, ctx.blackout_budget, settings, slowing=False, model=reading
            )
            if worst is not None and not worst.converges:
                # Not converging so read. The current pass tells which: as short as the
                # first pass's count takes to send, it leaves less than that count (in
                # the share count / memory) if the guest writes over all of memory, and
                # that count again if it filled a working set of it (rule 5c).
                return replace(
                    analysis, converges=None, floor=int(worst.floor), eta=None, either_way=True
                )
            if worst is not None and worst.converges and worst.seconds is not None:
                eta = max(eta or 0.0, worst.seconds)
    if not alone_converges and ctx.plan.arm_slow_down:
        slowed = analysis.project_with(ctx, ctx.blackout_budget, settings)
        eta = None if slowed is None else slowed.seconds
    return replace(analysis, converges=alone_converges, floor=int(settles), eta=eta)


def _at_faster_reading(
    analysis: Analysis, ctx: MigrationContext, settings: PolicySettings, model: DirtyModel
) -> Projection | None:
    """Copying from now on at the current budget, the guest writing `FASTER_READING`
    times as fast as `model` says (unslowed from here): the other reading of windows
    that say only "at least", or of a measurement a pass may have outlived."""
    faster = model.with_rate(model.rate * FASTER_READING)
    return analysis.project_with(ctx, ctx.blackout_budget, settings, slowing=False, model=faster)


def plateau_above(
    records: Sequence[PassRecord], track: Track, budget: float, passes: int
) -> float | None:
    """The largest count recorded of the last `passes` passes begun (0 when none was
    recorded), when they are a plateau above the threshold (None otherwise).

    Every pass the hypervisor begins is a count that did not fit the threshold, else
    it would have stopped the guest. So `passes` passes begun in a row, all at the
    current budget, the last count recorded no smaller than the ones before, say
    copying is not converging at this budget, whatever a fit projects: near the
    threshold passes last a burst or two, and a fit a few per cent optimistic projects
    a stop at every sample while the guest runs on to the deadline (a working set just
    above the threshold). Passes shorter than the time between samples begin unseen:
    the pass count says how many began, and only the passes whose start the samples
    show (`records`) say what they held."""
    seen = [(p.number, p.head.blackout_budget) for p in track.passes()]
    if passes < 2 or not seen:
        return None
    first = seen[-1][0] - passes + 1  # the first pass of the last `passes` begun
    if first < 2:
        return None
    # A pass seen began at the budget of its first sample; one begun unseen, at the
    # budget of the pass seen before it (a budget changes by command, and a command is
    # followed by a sample).
    before = [b for n, b in seen if n <= first]
    since = [b for n, b in seen if n > first]
    if not before or any(abs(b - budget) > 1e-9 for b in (before[-1], *since)):
        return None
    sizes = [r.size for r in records if r.number >= first]
    if len(sizes) >= 2 and sizes[-1] < min(sizes[:-1]):
        return None  # still shrinking
    return max(sizes, default=0.0)


def estimate(
    history: History, ctx: MigrationContext, settings: PolicySettings = DEFAULT
) -> Prediction:
    """The prediction reported on every migration (ETA, blackout, convergence)."""
    return analyse(history, ctx, settings).prediction()


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
