"""A model of one live migration, advanced in time by `advance(dt)`. Pure: no clock, no I/O.

The numbers follow DESIGN.md §4. Pass 1 copies all of memory M at bandwidth B
while the guest writes at rate D over its writable working set W. What the next
pass must send is the *distinct* bytes dirtied since the pass began, which depends
on how the guest writes (`Writer`): after writing X bytes,

- sequential: d = min(W, X) — grows linearly up to the working set;
- random (uniform over W): d = W·(1 − e^(−X/W)) — saturates, never quite reaching W.

Where a pass ends follows the real hypervisor (its `migration_iteration_run` and
`ram_state_pending_estimate/_exact`): the migration thread sends in bursts of
100 ms (its rate-limit window, `Tuning.recount_interval`) and before each burst
compares what the bitmap still holds with the threshold B·T (bandwidth × blackout
budget). Only when it is below does it sync the dirty bitmap — a new pass (the
iteration count + 1) — so a pass ends at the first burst after its remainder
fell below B·T, or when it is fully sent, whichever comes first. The unsent rest
c is not dropped: the pages dirtied meanwhile are added to it, so
R(n+1) = c ∪ d(D·(1-s)·t_pass(n)) (s the slow-down level). If after the sync the
remainder is still below B·T the guest is stopped and the migration completes;
otherwise the next burst is sent and the check repeats, so near the threshold the
passes last one burst each and shrink by B·τ − d(D·τ) per burst. The sync itself
takes `Tuning.sync_time` (nothing is sent; the guest keeps writing).

What the hypervisor reports as the change rate is the bytes newly dirtied at the
syncs over a period of at least `Tuning.rate_period` seconds (the hypervisor's
dirty-pages rate, updated at most once a second) divided by the period, which
for a random writer falls far below D over long passes. The slow-down rises on
the same periods (the hypervisor's throttling: a period is bad when it dirtied at least
`slow_down_ratio` of what it sent).

When the guest stops, the rest is copied and the device state moved, so the
blackout is R/B plus the switchover cost (`Tuning.device_state`) and may exceed T
by up to that cost.

Local disks (`disk` bytes, written by the guest at `disk_writes` bytes/s) are
copied first, while the instance runs, at the whole link's bandwidth; memory is
not touched meanwhile (pass 1 begins when the disks are in sync). Blocks the
guest rewrites after they were copied must be copied again: with writes spread
uniformly over the disk, what is left to copy R follows

    dR/dt = −B + w·(T − R)/T          (T the disk's size, w its write rate)

which reaches 0 in finite time only if w < B; a disk written faster than the link
settles near T·(1 − B/w) and never syncs (the migration copies on until it is
cancelled). Once in sync the disks stay mirrored: every guest write goes to both
sides, taking w of the link from the memory copy until the guest stops.
Pause, handover, cancel and faults mirror what the real hypervisor was seen to
do (shared/RIG.md).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import numpy as np

from lmwatch.drivers.base import ActionRefused, handover_broke_text
from lmwatch.model import JobResult, Phase, Sample, StartPlan

_BYTE = 1.0  # tolerance on byte counts (floats)
_TICK = 1e-9  # tolerance on times
_NO_WRITES = 1e-3  # bytes/s of disk writes below which there are none


class RatePattern(Protocol):
    """How fast the guest rewrites memory over workload time (seconds since start)."""

    def at(self, t: float) -> float: ...

    def amount(self, t0: float, t1: float) -> float: ...

    def next_change(self, t: float) -> float | None: ...


class Writer(StrEnum):
    """How the guest spreads its writes over its working set."""

    SEQUENTIAL = "sequential"  # sweeps through it: distinct bytes grow linearly up to W
    RANDOM = "random"  # uniformly at random: distinct bytes saturate towards W


class Counting(StrEnum):
    """Which pages the count at a pass's end holds, besides the unsent rest.

    UNION: every page written since the pass began (the hypervisor's own dirty log on
    an emulating host, where the rig calibrated the simulator). AFTER_SEND: only pages
    written after they were sent in this pass, and pages not in the pass written at any
    time (a host whose kernel keeps the dirty log with manual protection has it cleared
    for a chunk of memory just before the chunk is sent, so a write before that is sent
    with the page and not counted again; modelled per page, not per chunk;
    docs/benchmark.md, "What the counts assume")."""

    UNION = "union"
    AFTER_SEND = "after-send"


_COUNT_STEPS = 32  # sub-steps of one step for the after-send count (the eligible pages grow)
_SWEEP_BUCKETS = 64  # batches of eligible pages a sequential writer's sweep is followed in


def grow_counted(counted: float, written: float, eligible: float, working_set: float) -> float:
    """A random writer's counted pages after `written` more bytes spread over its
    `working_set`, of the `eligible` pages whose writes count (`counted` of them
    already are): each is hit with the same chance."""
    cap = max(0.0, float(working_set))
    counted = min(max(0.0, counted), eligible)
    if written <= 0 or cap <= 0 or eligible <= counted:
        return counted
    return eligible - (eligible - counted) * math.exp(-written / cap)


def grow_dirty(writer: Writer, dirty: float, written: float, working_set: float) -> float:
    """Distinct bytes dirtied after `written` more bytes, starting from `dirty` distinct.

    Exact for any split of the writes (it depends only on how much was written), so
    a model may apply it per step of any length.
    """
    cap = max(0.0, float(working_set))
    dirty = min(max(0.0, dirty), cap)
    if written <= 0 or cap <= 0:
        return dirty
    if writer is Writer.RANDOM:
        return cap - (cap - dirty) * math.exp(-written / cap)
    return min(cap, dirty + written)


def measured_change_rate(
    pattern: RatePattern,
    working_set: int,
    writer: Writer,
    seconds: float,
    start: float = 0.0,
) -> float:
    """What a change-rate measurement over `seconds` from workload time `start` reports.

    Like the hypervisor's dirty-rate measurement: distinct bytes dirtied in the window
    divided by its length (a random writer saturates; a sequential one caps at W).
    """
    if seconds <= 0:
        return 0.0
    written = pattern.amount(start, start + seconds)
    return grow_dirty(writer, 0.0, written, working_set) / seconds


SAMPLE_PAGES_PER_GIB = 512
"""Pages the hypervisor's page-sampling measurement checks per GiB of guest memory
(its default, which the real driver does not change)."""


def page_sampled(rate: float, seconds: float, memory: int, seed: str) -> float:
    """What a page-sampling reading reports for a guest that dirties `rate` distinct
    bytes per second over `seconds`: the share of sampled pages found changed, times
    memory, over the window, in whole MiB/s (as the real driver receives it).

    The hypervisor hashes `SAMPLE_PAGES_PER_GIB` random pages per GiB at the window's
    start and again at its end, so the reading scatters as a binomial count: the
    fewer pages a window finds changed (a short window, a small working set in a large
    guest), the wider. The draw is fixed by `seed`, so every run of one workload reads
    the same figure."""
    if seconds <= 0 or memory <= 0 or rate <= 0:
        return 0.0
    samples = max(1, round(SAMPLE_PAGES_PER_GIB * memory / 2**30))
    share = min(1.0, rate * seconds / memory)
    generator = np.random.default_rng(zlib.crc32(seed.encode()))
    changed = int(generator.binomial(samples, share))
    return float(round(changed / samples * memory / seconds / 2**20) * 2**20)


def change_rate_reading(
    pattern: RatePattern,
    working_set: int,
    writer: Writer,
    memory: int,
    seconds: float,
    seed: str,
    start: float = 0.0,
) -> float:
    """What a change-rate measurement over `seconds` from workload time `start`
    reports: the distinct bytes dirtied in it over its length (`measured_change_rate`)
    as the hypervisor's page sampling reads them (`page_sampled`, drawn by `seed`)."""
    rate = measured_change_rate(pattern, working_set, writer, seconds, start=start)
    return page_sampled(rate, seconds, memory, seed)


def jittered(base: int, memory: int, jitter: float, seed: int, number: int) -> int:
    """The working set during pass `number`: `base` moved by up to ±`jitter` of it.

    On a real host the pages a busy guest dirties per pass are not one fixed set: its
    kernel, page cache and other processes add or spare a few per cent from pass to
    pass (on the rig, 30-33MiB for a writer of 32MiB). The draw is fixed by `seed`
    and the pass number, so every run of one workload sees the same sequence."""
    return max(1, min(memory, round(_scattered(base, jitter, f"{seed}:{number}"))))


def _scattered(value: float, jitter: float, key: str) -> float:
    """`value` moved by up to ±`jitter` of it, by a draw fixed by `key`."""
    draw = zlib.crc32(key.encode()) / 0xFFFFFFFF  # in [0, 1]
    return value * (1.0 + jitter * (2.0 * draw - 1.0))


def read_rate(rate: float, jitter: float, seed: int, time: float) -> float:
    """The transfer rate the hypervisor reports at `time`: `rate` moved by up to
    ±`jitter` of it. A real host's reading covers its last fraction of a second, which
    a dirty-bitmap sync, the guest's own traffic or the network's scheduling slow or
    speed by a few per cent from one reading to the next; the bytes moved are what the
    link carried. Fixed by `seed` and the time (to the millisecond), like `jittered`."""
    if not jitter or rate <= 0:
        return rate
    return _scattered(rate, jitter, f"{seed}:rate:{time:.3f}")


class Side(StrEnum):
    SOURCE = "source"
    DESTINATION = "destination"
    NOWHERE = "nowhere"  # lost: a broken link while handed over


@dataclass(frozen=True, slots=True)
class Tuning:
    """Constants of the model; the defaults resemble what the real rig showed."""

    # The switchover cost: seconds of the final stop spent on top of copying the
    # remainder (stop the guest, move device state, resume on the destination). The
    # blackout is remainder/bandwidth + this, so it may exceed the budget by this much.
    device_state: float = 0.03
    # Seconds at each pass start when nothing is sent (the dirty-bitmap sync). The rig's
    # passes near the threshold start 0.10 s apart and shrink by B·τ − D·τ within
    # 0.3 MiB at 16 MiB/s: the sync costs under 10 ms of sending.
    sync_time: float = 0.005
    # Seconds per burst: the remainder is compared with the threshold before each one
    # (the hypervisor's rate-limit window, BUFFER_DELAY = 100 ms).
    recount_interval: float = 0.1
    rate_period: float = 1.0  # the reported change rate and the slow-down use periods this long
    # Seconds from a cancel to the instance running alone again on the source: the
    # hypervisor lets the destination go first. The rig took 1.65-2.04 s from the abort
    # to the end of the job, at 2 to 50 MiB/s, the guest paused or not (1.51-2.11 s
    # through the daemon, from its decision to the guest running again).
    cancel_delay: float = 1.8
    link_timeout: float = 30.0  # seconds a broken link stalls before the job fails
    source_grace: float = 30.0  # seconds a vanished source host keeps migrating
    refuse_delay: float = 0.5  # seconds until a refusing destination fails the job
    slow_down_ratio: float = 0.5  # a period is "bad" when it dirtied this share of what it sent
    slow_down_passes: int = 2  # bad periods in a row before slowing starts (and per step)
    slow_down_max: float = 0.99
    max_step: float = 0.1  # seconds per internal step while the change rate varies


def disk_after(left: float, total: float, bandwidth: float, writes: float, h: float) -> float:
    """What the disk copy has left after `h` seconds (exact solution of the model above)."""
    if h <= 0 or total <= 0:
        return left
    if writes <= _NO_WRITES:
        return max(0.0, left - bandwidth * h)
    k = writes / total
    settles = total * (writes - bandwidth) / writes  # below 0 when the copy converges
    # settles + (left − settles)·e^(−kh), written so that tiny writes lose no precision
    value = left * math.exp(-k * h) - settles * math.expm1(-k * h)
    return min(float(total), max(0.0, value))


def disk_sync_in(left: float, total: float, bandwidth: float, writes: float) -> float:
    """Seconds until the disk copy is in sync; infinite when it never will be."""
    if left <= _BYTE:
        return 0.0
    if bandwidth <= 0 or total <= 0:
        return math.inf
    if writes <= _NO_WRITES:
        return left / bandwidth
    if writes >= bandwidth:
        return math.inf
    # ln((left − settles)/−settles)·T/w with settles = T·(w − B)/w, kept precise for tiny w
    return math.log1p(left * writes / (total * (bandwidth - writes))) * total / writes


class Migration:
    """One migration from `source` to `destination`, starting at elapsed time `start`.

    `start` is where the guest's rate pattern is when the job begins: 0 for a first
    job; for a job started again after a cancel, the time the guest already ran
    since the first (its writing goes on where it was, e.g. a growing writer)."""

    # Class defaults, so that a model kept by an older version (without disks) reads back.
    disk_total: int = 0
    started: float = 0.0
    disk_writes: float = 0.0
    disk_synced_at: float | None = 0.0
    _disk_left: float = 0.0
    _disk_rate: float = 0.0
    jitter: float = 0.0
    jitter_seed: int = 0
    _base_working_set: int | None = None
    counting: Counting = Counting.UNION
    _eligible: float = 0.0
    _counted: float = 0.0
    _swept: float = 0.0
    _counted_full: float = 0.0

    def __init__(
        self,
        *,
        memory: int,
        working_set: int,
        change_rate: RatePattern,
        bandwidth: float,
        plan: StartPlan,
        source: str = "source",
        destination: str = "destination",
        tuning: Tuning | None = None,
        writer: Writer = Writer.SEQUENTIAL,
        disk: int = 0,
        disk_writes: float = 0.0,
        start: float = 0.0,
        jitter: float = 0.0,
        jitter_seed: int = 0,
        counting: Counting = Counting.UNION,
    ) -> None:
        if memory <= 0 or bandwidth <= 0:
            raise ValueError("memory and bandwidth must be positive")
        if not 0.0 <= jitter < 1.0:
            raise ValueError("jitter must be at least 0 and below 1")
        if disk < 0 or disk_writes < 0:
            raise ValueError("disk and disk_writes cannot be negative")
        self.disk_total = disk
        self.disk_writes = float(disk_writes)
        self._disk_left = float(disk)  # bytes of disk still to copy (0 once in sync)
        self._disk_rate = 0.0  # bytes/s the disk copy last moved
        start = max(0.0, float(start))
        self.disk_synced_at = start if disk == 0 else None  # elapsed time the disks synced
        self.memory = memory
        self.working_set = min(working_set, memory)
        self._base_working_set = self.working_set
        self.jitter = float(jitter)
        self.jitter_seed = jitter_seed
        self.pattern = change_rate
        self.plan = plan
        self.source = source
        self.destination = destination
        self.tuning = tuning or Tuning()
        self.writer = Writer(writer)
        self.counting = Counting(counting)

        self.link_bandwidth = float(bandwidth)
        self.cap: float | None = plan.bandwidth
        self.budget = plan.starting_budget
        self.phase = Phase.COPYING
        self.elapsed = start
        self.started = start
        self.passes = 1
        self.running_on = Side.SOURCE
        self.error: str | None = None
        self.finished_at: float | None = None  # elapsed time the job ended
        self.pass_remainders: list[float] = [float(memory)]  # bytes to send, per pass
        self.pass_starts: list[float] = [start]  # elapsed time each pass began

        self._unsent = float(memory)  # bytes still to send in this pass
        self._dirty = 0.0  # distinct bytes dirtied since this pass began
        # after-send counting: bytes of the working set whose writes count now (not in
        # this pass, or sent in it already), and those counted
        self._eligible = 0.0
        self._counted = 0.0
        self._swept = 0.0  # bytes a sequential writer wrote this pass
        self._counted_full = 0.0  # of the batches below, those the sweep passed
        self._batches: dict[int, list[float]] = {}  # eligible bytes, by when they joined
        self._sync_left = 0.0
        self._window = self._window_at(start)  # the last burst boundary whose check was made
        self._pass_started = start
        self._period_started = start  # the change-rate period (>= 1 s between updates)
        self._period_dirty = 0.0  # bytes newly dirtied at the syncs of this period
        self._period_sent = 0.0  # bytes transferred when the period began
        self._stretch = 0.0  # distinct bytes the previous pass dirtied
        self._outside = 0.0  # share of the unsent bytes outside the working set (from pass 1)
        self._left = 0.0  # bytes still to move while completing or handed over
        self._device_left = 0.0
        self.transferred = 0.0
        self.measured_change = 0.0  # of the last completed pass
        self.slowdown = 0.0
        self.max_slowdown = 0.0
        self._bad_passes = 0
        self.paused = False
        # The hypervisor stopped the guest itself for the final copy (not our pause):
        # it serves no command until that copy ends (`cancel`).
        self.final_copy = False
        self.handed_over = False
        self._stopped_at: float | None = None
        self.blackout: float | None = None
        self._blackout_known = True
        self._cancel_at: float | None = None
        self._refuse_at: float | None = None
        self.link_up = True
        self._link_broken_at: float | None = None
        self._source_lost_at: float | None = None
        self._frozen: tuple[float, float, float, float] | None = None  # stats at a break
        self._last_rate = 0.0

    # ----------------------------------------------------------------- state

    @property
    def disks_in_sync(self) -> bool:
        return self.disk_synced_at is not None

    @property
    def disk_remaining(self) -> float:
        return 0.0 if self.disks_in_sync else self._disk_left

    @property
    def bandwidth(self) -> float:
        """Bytes/s actually available now (link share or cap, whichever is lower) for
        what is being copied; while the disks are mirrored, less the guest's disk writes."""
        if not self.link_up:
            return 0.0
        available = self.link_bandwidth if self.cap is None else min(self.link_bandwidth, self.cap)
        if self.disk_total and self.disks_in_sync and self.phase is Phase.COPYING:
            available -= self.disk_writes
        return max(0.0, available)

    @property
    def remaining(self) -> float:
        if self.phase in (Phase.COMPLETING, Phase.HANDOVER):
            return self._left
        if self.phase is Phase.COMPLETED:
            return 0.0
        return self._merged()

    def _merged(self) -> float:
        """Unsent pages and pages rewritten since the pass began, each counted once.

        A random writer writes all over its domain (memory in pass 1, the working set
        later), so a rewritten page is still unsent with probability unsent/domain. A
        sequential writer rewrites a page W/D seconds after it wrote it: the unsent
        rest lies in the stretch it wrote during the previous pass, and this pass's
        stretch reaches into it only once both together exceed the working set (the
        rig: near the threshold each burst took B·τ − D·τ off the remainder, the
        rewritten pages adding to the rest, not overlapping it). The unsent rest may
        also hold pages outside the working set, carried over from pass 1.
        """
        memory = float(self.memory)
        if self.counting is Counting.AFTER_SEND:
            return min(memory, self._unsent + self._counted)
        if self.passes <= 1:
            share = min(self._unsent, memory) / memory
            return min(memory, self._unsent + self._dirty * (1.0 - share))
        working_set = float(max(self.working_set, 1))
        outside = self._unsent * self._outside  # never rewritten
        inside = self._unsent - outside
        if self.writer is Writer.SEQUENTIAL:
            stretch = self._stretch
            wraps = self._dirty + stretch - working_set
            share = min(1.0, max(0.0, wraps) / stretch) if stretch > 0 else 0.0
            rewritten = min(inside + self._dirty - inside * share, max(inside, working_set))
        else:
            share = min(inside, working_set) / working_set
            rewritten = inside + self._dirty * (1.0 - share)
        return min(memory, outside + rewritten)

    @property
    def dirtied(self) -> float:
        """Distinct bytes the guest has dirtied since the current pass began."""
        return self._dirty

    @property
    def reported_remaining(self) -> float:
        """What the hypervisor reports: while copying, only what this pass still has
        to send (pages rewritten meanwhile are counted at the next pass boundary)."""
        if self.phase is Phase.COPYING:
            return self._unsent
        return self.remaining

    @property
    def stopped_seconds(self) -> float | None:
        """How long the guest was stopped for a final copy that did not complete (a
        break or a cancel during it): the hypervisor resumes it on the source when the
        job ends, so the stop lasted until then. None when it was not stopped, or the
        job completed (then `blackout` is the stop) or has not ended yet."""
        if self._stopped_at is None or self.finished_at is None:
            return None
        if self.phase is Phase.COMPLETED or self.running_on is not Side.SOURCE:
            return None
        return max(0.0, self.finished_at - self._stopped_at)

    @property
    def cancelling(self) -> bool:
        return self._cancel_at is not None and not self.phase.finished

    @property
    def moving(self) -> bool:
        """Whether the job uses its link now (for sharing bandwidth between jobs)."""
        return (
            not self.phase.finished
            and self._cancel_at is None
            and self._refuse_at is None
            and self.link_up
        )

    def change_rate_now(self) -> float:
        """Bytes/s the guest writes now (0 while it is stopped)."""
        if self.phase is Phase.COMPLETING or self.phase.finished:
            return 0.0
        return self.pattern.at(self.elapsed) * (1.0 - self.slowdown)

    def _threshold(self) -> float:
        # Like the hypervisor: the remainder must fit bandwidth × budget; the switchover
        # cost comes on top of it in the measured blackout.
        return self.bandwidth * max(0.0, self.budget)

    def _fits(self, size: float) -> bool:
        return size <= self._threshold() + _BYTE

    def _window_at(self, t: float) -> int:
        """Index of the last burst boundary at or before elapsed time `t`."""
        return math.floor((t + _TICK) / self.tuning.recount_interval)

    def _first_check(self, after: float, rate: float) -> float:
        """Seconds until the first burst that begins with the remainder below the
        threshold, sending from `after` seconds on (the pass ends there)."""
        below = self.elapsed + after + max(0.0, self._unsent - self._threshold()) / rate
        check = self._window_from(below)
        if self._window_at(check) <= self._window:  # this boundary was checked
            check = (self._window + 1) * self.tuning.recount_interval
        return check - self.elapsed

    def _window_from(self, t: float) -> float:
        """Elapsed time of the first burst boundary at or after `t`."""
        interval = self.tuning.recount_interval
        return math.ceil((t - _TICK) / interval) * interval

    # --------------------------------------------------------------- controls

    def set_budget(self, seconds: float) -> None:
        self._refuse_if_ended()
        self.budget = max(0.0, seconds)
        self._settle()

    def set_cap(self, bytes_per_second: float | None) -> None:
        self._refuse_if_ended()
        self.cap = bytes_per_second
        self._settle()

    def set_link_bandwidth(self, bytes_per_second: float) -> None:
        """The share of the link this job gets (the driver divides links between jobs)."""
        self.link_bandwidth = max(0.0, bytes_per_second)

    def pause(self) -> None:
        """Stop the guest until the rest is copied; the blackout lasts until completion."""
        self._refuse_if_ended()
        self._refuse_if_disks_behind()
        if self.phase is Phase.HANDOVER:
            raise ActionRefused("the instance already runs on the destination")
        if self.phase is Phase.COMPLETING:
            self.paused = True
            return
        self.paused = True
        self._stop_and_copy()
        self._settle()

    def handover(self) -> None:
        """Resume on the destination now; the rest is fetched while it runs."""
        self._refuse_if_ended()
        if not self.plan.arm_handover:
            raise ActionRefused("handover was not armed when the migration started")
        if self.phase is Phase.HANDOVER:
            return
        if self.phase is Phase.COMPLETING:
            raise ActionRefused("the instance is already stopped for the final copy")
        if not self.link_up:
            raise ActionRefused("the link to the destination is down")
        self._refuse_if_disks_behind()
        self._left = self.remaining
        self.phase = Phase.HANDOVER
        self.handed_over = True
        self.running_on = Side.DESTINATION
        self.blackout = self.tuning.device_state
        self._settle()

    def cancel(self) -> None:
        """Stop migrating; the instance keeps running on the source shortly after.

        Not during the hypervisor's own final stop: the real one holds its main lock
        from stopping the guest to the end of the final copy, and an abort waits for
        it; by then the job has completed, or failed with the link (docs/benchmark.md,
        "Could lmwatch cut short a final stop"). A stop that is our pause is pre-copy
        with the guest stopped, and an abort is served then."""
        if self.phase is Phase.HANDOVER:
            raise ActionRefused("cannot cancel once handed over")
        self._refuse_if_ended()
        if self.phase is Phase.COMPLETING and self.final_copy:
            raise ActionRefused(
                "the guest is stopped for its final copy; the hypervisor takes no command "
                "until that copy ends"
            )
        if self._cancel_at is None:
            self._cancel_at = self.elapsed + self.tuning.cancel_delay

    def again(self, plan: StartPlan, at: float) -> Migration:
        """A new job of the same guest over the same link, started at elapsed time `at`
        (after this one ended): copying begins anew (disks first, then memory) with
        `plan`, the guest's writing goes on where it was, and the link stays as it is
        (its share, and a break still counting towards the link's timeout)."""
        if not self.phase.finished:
            raise ActionRefused("the migration has not ended yet")
        new = Migration(
            memory=self.memory,
            working_set=self.base_working_set,
            change_rate=self.pattern,
            bandwidth=self.link_bandwidth,
            plan=plan,
            source=self.source,
            destination=self.destination,
            tuning=self.tuning,
            writer=self.writer,
            disk=self.disk_total,
            disk_writes=self.disk_writes,
            start=max(at, self.elapsed),
            jitter=self.jitter,
            jitter_seed=self.jitter_seed,
            counting=self.counting,
        )
        if not self.link_up:
            new.link_up = False
            broken = self._link_broken_at
            new._link_broken_at = new.elapsed if broken is None else broken
        return new

    # ----------------------------------------------------------------- faults

    def break_link(self) -> None:
        if self.link_up and not self.phase.finished:
            self._frozen = (
                self.reported_remaining,
                self.transferred,
                self.measured_change,
                self._rate(),
            )
            self._link_broken_at = self.elapsed
        self.link_up = False

    def restore_link(self) -> None:
        self.link_up = True
        self._link_broken_at = None
        self._frozen = None
        self._settle()

    def lose_source(self) -> None:
        """The source host went away: the job goes on for a grace period, unwatched."""
        if self._source_lost_at is None and not self.phase.finished:
            self._source_lost_at = self.elapsed
            self._blackout_known = False

    def refuse(self) -> None:
        """The destination refuses the incoming instance: the job fails shortly."""
        if self._refuse_at is None and not self.phase.finished:
            self._refuse_at = self.elapsed + self.tuning.refuse_delay

    # ------------------------------------------------------------------- time

    def advance(self, dt: float) -> None:
        """Move the model forward by dt seconds."""
        end = self.elapsed + max(0.0, dt)
        self._settle()
        while not self.phase.finished and self.elapsed < end - _TICK:
            step = max(self._time_to_event(minor=True), 1e-6)  # always make progress
            self._step(min(end - self.elapsed, step))
            self._settle()
        if self.phase.finished or self.elapsed < end:
            self.elapsed = max(self.elapsed, end)

    def next_event_in(self) -> float | None:
        """Seconds until the next pass boundary or phase change, at current rates."""
        if self.phase.finished:
            return None
        value = self._time_to_event(minor=False)
        return None if math.isinf(value) else value

    def _rate(self) -> float:
        return self.bandwidth if self.moving else 0.0

    def _time_to_event(self, *, minor: bool) -> float:
        times = [math.inf]
        for at in (self._cancel_at, self._refuse_at):
            if at is not None:
                times.append(at - self.elapsed)
        if self._link_broken_at is not None:
            times.append(self._link_broken_at + self.tuning.link_timeout - self.elapsed)
        if self._source_lost_at is not None and self.phase is not Phase.HANDOVER:
            times.append(self._source_lost_at + self.tuning.source_grace - self.elapsed)
        if self._cancel_at is not None or self._refuse_at is not None:
            return max(0.0, min(times))
        rate = self._rate()
        if self.phase is Phase.COPYING and not self.disks_in_sync:
            times.append(disk_sync_in(self._disk_left, self.disk_total, rate, self.disk_writes))
            return max(0.0, min(times))
        if self.phase is Phase.COPYING:
            writes = self.change_rate_now()
            if self._sync_left > 0:
                if minor:
                    times.append(self._sync_left)
                elif rate > 0:
                    times.append(self._sync_left + self._unsent / rate)  # the pass's end
                    times.append(self._first_check(self._sync_left, rate))  # ...or sooner
            elif rate > 0:
                times.append(self._unsent / rate)  # fully sent: synced at once
                times.append(self._first_check(0.0, rate))
            if minor:
                if (
                    self.writer is Writer.SEQUENTIAL
                    and writes > 0
                    and self._dirty < self.working_set
                ):
                    # The dirty set fills up (a random writer only approaches W, and
                    # its growth is exact per step: no event is needed).
                    times.append((self.working_set - self._dirty) / writes)
                change = self.pattern.next_change(self.elapsed)
                if change is not None:
                    times.append(max(change - self.elapsed, 0.0) or self.tuning.max_step)
        elif self.phase is Phase.COMPLETING:
            if self._left > _BYTE:
                if rate > 0:
                    times.append(self._left / rate)
            else:
                times.append(self._device_left)
        elif self.phase is Phase.HANDOVER and rate > 0:
            times.append(self._left / rate)
        return max(0.0, min(times))

    def _step(self, h: float) -> None:
        if h <= 0:
            return
        rate = self._rate()
        start = self.elapsed
        self.elapsed += h
        if rate > 0:
            self._last_rate = rate
        if self._cancel_at is not None or self._refuse_at is not None:
            return
        if self.phase is Phase.COPYING and not self.disks_in_sync:
            # Only the disks move; memory copying begins once they are in sync.
            left = disk_after(self._disk_left, self.disk_total, rate, self.disk_writes, h)
            self._disk_rate = rate
            self._disk_left = left
            return
        if self.phase is Phase.COPYING:
            sent = 0.0
            if self._sync_left > 0:
                self._sync_left = max(0.0, self._sync_left - h)
            else:
                sent = min(self._unsent, rate * h)
                self._unsent -= sent
                self.transferred += sent
            written = self.pattern.amount(start, self.elapsed) * (1.0 - self.slowdown)
            self._dirty = grow_dirty(self.writer, self._dirty, written, self.working_set)
            if self.counting is Counting.AFTER_SEND:
                self._count_after_send(sent, written)
        elif self.phase in (Phase.COMPLETING, Phase.HANDOVER):
            if self._left > _BYTE or self.phase is Phase.HANDOVER:
                sent = min(self._left, rate * h)
                self._left -= sent
                self.transferred += sent
            else:
                self._device_left = max(0.0, self._device_left - h)

    def _count_after_send(self, sent: float, written: float) -> None:
        """After-send counting over one step: the pages sent join those whose writes
        count (in proportion to the working set's share of the pass), while the guest
        writes (both spread over the step).

        A random writer hits any page with the same chance (`grow_counted`). A
        sequential writer sweeps its working set: a page is counted once the sweep,
        which was at a random place relative to it when it was sent, has passed it,
        i.e. after the guest wrote some amount uniform in [0, W) since: pages are kept
        in batches by how much the guest had written this pass when they became
        eligible (`_batches`)."""
        working_set = float(max(self.working_set, 1))
        share = self._inside_share()
        steps = _COUNT_STEPS if sent > 0 and written > 0 else 1
        for _ in range(steps):
            joined = max(0.0, min(working_set - self._eligible, sent * share / steps))
            self._eligible += joined
            if self.writer is Writer.RANDOM:
                self._counted = grow_counted(
                    self._counted, written / steps, self._eligible, working_set
                )
            else:
                self._batch(joined, working_set)
                self._swept += written / steps
        if self.writer is not Writer.RANDOM:
            self._counted = self._swept_count(working_set)

    def _batch(self, joined: float, working_set: float) -> None:
        """Pages that became eligible when the sweep had written `_swept` this pass."""
        if joined <= 0:
            return
        key = int(self._swept * _SWEEP_BUCKETS / working_set)
        batch = self._batches.setdefault(key, [0.0, 0.0])
        batch[0] += joined * self._swept
        batch[1] += joined

    def _swept_count(self, working_set: float) -> float:
        """The pages the sweep has passed since they became eligible."""
        total = self._counted_full
        for key in list(self._batches):
            weighted, amount = self._batches[key]
            since = self._swept - weighted / amount
            if since >= working_set:
                self._counted_full += amount
                total += amount
                del self._batches[key]
            else:
                total += amount * max(0.0, since) / working_set
        return min(total, self._eligible)

    def _inside_share(self) -> float:
        """Share of what this pass sends that lies in the working set."""
        return 1.0 - self._outside_share()

    def _outside_share(self) -> float:
        """Share of what this pass sends that lies outside the working set (pass 1's
        rest lies all over memory; later passes carry what they were left of it)."""
        if self.passes <= 1:
            return 1.0 - min(self.working_set, self.memory) / self.memory
        return self._outside

    def _settle(self) -> None:
        """Apply every discrete change that is due at the current elapsed time."""
        if self.phase.finished:
            return
        now = self.elapsed + _TICK
        if self._cancel_at is not None and self._cancel_at <= now:
            self._end(Phase.CANCELLED, Side.SOURCE)
            return
        if self._refuse_at is not None and self._refuse_at <= now:
            self._end(
                Phase.FAILED,
                Side.SOURCE,
                f"{self.destination} refused the incoming instance; "
                f"it keeps running on {self.source}",
            )
            return
        if (
            self._link_broken_at is not None
            and self._link_broken_at + self.tuning.link_timeout <= now
        ):
            if self.phase is Phase.HANDOVER:
                # Whole on neither host: the instance is stuck on the destination
                # until the move is resumed, which lmwatch does not do.
                self._end(
                    Phase.FAILED, Side.NOWHERE, handover_broke_text(self.source, self.destination)
                )
            else:
                self._end(
                    Phase.FAILED,
                    Side.SOURCE,
                    f"the link between {self.source} and {self.destination} broke; "
                    f"the instance keeps running on {self.source}",
                )
            return
        if (
            self._source_lost_at is not None
            and self.phase is not Phase.HANDOVER
            and self._source_lost_at + self.tuning.source_grace <= now
        ):
            self._end(
                Phase.FAILED,
                Side.SOURCE,
                f"{self.source} went away before the migration could finish; "
                f"the instance keeps running on {self.source}",
            )
            return
        if self._cancel_at is not None or self._refuse_at is not None:
            return
        if self.phase is Phase.COPYING and not self.disks_in_sync:
            if self._disk_left > _BYTE:
                return
            self._disks_synced()
        if self.phase is Phase.COPYING and self._sync_left <= 0 and self.bandwidth > 0:
            # Like the hypervisor: before each burst, and when the pass is fully sent, a remainder
            # below the threshold is re-counted (a new pass: the unsent rest plus what
            # was rewritten); if the count is still below it, the guest is stopped.
            window = self._window_at(self.elapsed)
            burst = window > self._window
            self._window = max(self._window, window)
            if self._unsent <= _BYTE or (burst and self._fits(self._unsent)):
                self._end_pass()
                if self._fits(self._unsent):
                    self.final_copy = True
                    self._stop_and_copy()
        if self.phase is Phase.COMPLETING and self._left <= _BYTE and self._device_left <= _TICK:
            assert self._stopped_at is not None
            self.blackout = self.elapsed - self._stopped_at
            self._end(Phase.COMPLETED, Side.DESTINATION)
        elif self.phase is Phase.HANDOVER and self._left <= _BYTE:
            self._end(Phase.COMPLETED, Side.DESTINATION)

    def _disks_synced(self) -> None:
        """The disks are in sync (mirrored from now on): memory's pass 1 begins now."""
        self._disk_left = 0.0
        self.disk_synced_at = self.elapsed
        self._pass_started = self.elapsed
        self.pass_starts[0] = self.elapsed
        self._period_started = self.elapsed
        self._window = self._window_at(self.elapsed)

    def _end_pass(self) -> None:
        merged = self._merged()
        outside = self._unsent * self._outside_share()
        self._outside = min(1.0, outside / merged) if merged > 0 else 0.0
        self._period_dirty += max(0.0, merged - self._unsent)  # newly dirty at this sync
        period = self.elapsed - self._period_started
        if period >= self.tuning.rate_period - _TICK:
            dirtied = self._period_dirty
            sent = self.transferred - self._period_sent
            self.measured_change = dirtied / period
            if self.plan.arm_slow_down and dirtied >= self.tuning.slow_down_ratio * sent:
                self._bad_passes += 1
                if self._bad_passes >= self.tuning.slow_down_passes:
                    self._bad_passes = 0
                    if self.slowdown == 0:
                        self.slowdown = self.plan.slow_down_initial
                    else:
                        self.slowdown += self.plan.slow_down_step
                    self.slowdown = min(self.tuning.slow_down_max, max(0.0, self.slowdown))
                    self.max_slowdown = max(self.max_slowdown, self.slowdown)
            else:
                self._bad_passes = 0
            self._period_started = self.elapsed
            self._period_dirty = 0.0
            self._period_sent = self.transferred
        self.passes += 1
        self._pass_started = self.elapsed
        self.pass_remainders.append(merged)
        self.pass_starts.append(self.elapsed)
        self._stretch = min(self._dirty, float(self.working_set))
        self._unsent = merged
        self._dirty = 0.0
        self._sync_left = self.tuning.sync_time
        if self.jitter:
            self.working_set = jittered(
                self.base_working_set, self.memory, self.jitter, self.jitter_seed, self.passes
            )
        self._eligible = 0.0
        self._counted = 0.0
        self._swept = 0.0
        self._counted_full = 0.0
        self._batches = {}
        if self.counting is Counting.AFTER_SEND:
            # what the new pass sends of the working set is not eligible until sent
            inside = merged * (1.0 - self._outside)
            self._eligible = max(0.0, float(self.working_set) - inside)
            if self.writer is not Writer.RANDOM:
                self._batch(self._eligible, float(max(self.working_set, 1)))

    @property
    def base_working_set(self) -> int:
        """The working set without the host's jitter (`jittered`)."""
        return self.working_set if self._base_working_set is None else self._base_working_set

    def _stop_and_copy(self) -> None:
        self._left = self.remaining
        self._device_left = self.tuning.device_state
        self._sync_left = 0.0
        self._stopped_at = self.elapsed
        self.phase = Phase.COMPLETING

    def _end(self, phase: Phase, side: Side, error: str | None = None) -> None:
        self.phase = phase
        self.finished_at = self.elapsed
        self.running_on = side
        self.error = error
        self._cancel_at = None
        self._refuse_at = None

    def _refuse_if_disks_behind(self) -> None:
        if not self.disks_in_sync:
            raise ActionRefused(
                f"the disks are not in sync yet ({round(self._disk_left)} bytes still to copy)"
            )

    def _refuse_if_ended(self) -> None:
        if self.phase.finished:
            raise ActionRefused(f"the migration has already ended ({self.phase.value})")
        if self.cancelling:
            raise ActionRefused("the migration is being cancelled")

    # ---------------------------------------------------------------- reports

    def snapshot(self, time: float) -> Sample:
        remaining, transferred, change, rate = (
            self._frozen
            if self._frozen is not None and not self.phase.finished
            else (
                self.reported_remaining,
                self.transferred,
                self.measured_change,
                self._current_rate(),
            )
        )
        expected: float | None = None
        if self.phase in (Phase.COPYING, Phase.COMPLETING) and self.bandwidth > 0:
            expected = remaining / self.bandwidth
        if not self.disks_in_sync and not self.phase.finished:
            rate, expected = 0.0, None  # memory has not begun moving
        rate = read_rate(rate, self.jitter, self.jitter_seed, time)
        return Sample(
            time=time,
            memory_total=self.memory,
            memory_remaining=round(remaining),
            memory_transferred=round(transferred),
            transfer_rate=rate,
            change_rate=0.0 if self.passes <= 1 else change,
            passes=self.passes,
            phase=self.phase,
            blackout_budget=self.budget,
            slowdown=self.slowdown,
            expected_blackout=expected,
            disk_total=self.disk_total,
            disk_remaining=round(self.disk_remaining),
            disk_rate=self._disk_rate,
        )

    def _current_rate(self) -> float:
        if self.phase.finished:
            return self._last_rate
        return self._rate()

    def result(self) -> JobResult:
        hosts = {Side.SOURCE: self.source, Side.DESTINATION: self.destination}
        blackout = self.blackout if self.phase is Phase.COMPLETED else self.stopped_seconds
        return JobResult(
            phase=self.phase,
            blackout_seconds=blackout if self._blackout_known else None,
            transferred=round(self.transferred),
            passes=self.passes,
            paused=self.paused,
            handed_over=self.handed_over,
            slowdown=self.max_slowdown,
            error=self.error,
            running_on=hosts.get(self.running_on),
        )
