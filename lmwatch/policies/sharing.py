"""When a new move may join a link that other moves already use: a pure function.

Moves over one link share its bandwidth. The hypervisor stops a guest once what is
left fits `bandwidth x blackout budget` at the share the move has *then*, and copies
the rest with the guest stopped; a move started on the same link during that stop
takes part of the share, so the stop lasts longer than its budget (with two moves,
about twice the copy) and breaks `max_blackout`. The same holds for a pause (sized
against `max_pause`) and a handover's degraded running (against `max_degraded`):
each was sized with the share the move had. Starting a move later never takes
bandwidth from a stop already under way, so a new move waits for those to end.
"""

from __future__ import annotations

from collections.abc import Iterable

from lmwatch.model import Phase, Sample

# Phases in which a move finishes within a bound sized with its share of the link.
FINISHING = (Phase.COMPLETING, Phase.HANDOVER)
MIN_WAIT = 0.01  # seconds: a finishing move is waited for at least this long


def join_wait(others: Iterable[Sample], switchover: float) -> float:
    """Seconds a new move over a link should wait before starting, given the latest
    samples of the moves already on it: until the last of those that is finishing
    (guest stopped, or running on the destination while memory arrives) should have
    ended, at the rate it moves now; 0 when none is finishing."""
    wait = 0.0
    for sample in others:
        if sample.phase not in FINISHING:
            continue
        rate = sample.transfer_rate
        copy = sample.memory_remaining / rate if rate > 0 else sample.blackout_budget
        wait = max(wait, copy + max(0.0, switchover), MIN_WAIT)
    return wait
