"""The scheduler: which queued migrations may start, under the per-host limits."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from lmwatch.engine.scheduler import HostLimits, Slot, startable

TWO = HostLimits(per_source=2, per_destination=2)


def slot(id: str, source: str = "a", destination: str = "b", at: float = 0.0) -> Slot:
    return Slot(id=id, source=source, destination=destination, created_at=at)


def test_nothing_queued_starts_nothing() -> None:
    assert startable([], [slot("r")], TWO) == []


def test_oldest_first_up_to_the_source_limit() -> None:
    queued = [slot("late", at=3.0), slot("early", at=1.0), slot("middle", at=2.0)]
    assert startable(queued, [], TWO) == ["early", "middle"]


def test_same_time_goes_by_id() -> None:
    queued = [slot("y", at=1.0), slot("x", at=1.0), slot("z", at=1.0)]
    assert startable(queued, [], HostLimits(per_source=5, per_destination=5)) == ["x", "y", "z"]


def test_running_migrations_take_their_hosts_slots() -> None:
    running = [slot("r1", "a", "c"), slot("r2", "a", "d")]
    queued = [slot("q1", "a", "b", 1.0), slot("q2", "e", "b", 2.0)]
    assert startable(queued, running, TWO) == ["q2"]  # a has two leaving already


def test_destination_limit() -> None:
    running = [slot("r1", "x", "b"), slot("r2", "y", "b")]
    queued = [slot("q1", "a", "b", 1.0), slot("q2", "a", "c", 2.0)]
    assert startable(queued, running, TWO) == ["q2"]


def test_a_blocked_migration_does_not_hold_back_younger_ones_elsewhere() -> None:
    limits = HostLimits(per_source=1, per_destination=1)
    running = [slot("r", "a", "b")]
    queued = [slot("old", "a", "c", 1.0), slot("young", "d", "e", 2.0)]
    assert startable(queued, running, limits) == ["young"]


def test_each_start_counts_against_the_limits_of_later_ones() -> None:
    limits = HostLimits(per_source=2, per_destination=1)
    queued = [slot("q1", "a", "b", 1.0), slot("q2", "a", "b", 2.0), slot("q3", "a", "c", 3.0)]
    # q2 would be the second arrival at b; q3 may still use a's second slot.
    assert startable(queued, [], limits) == ["q1", "q3"]


def test_a_host_is_a_source_and_a_destination_independently() -> None:
    limits = HostLimits(per_source=1, per_destination=1)
    running = [slot("r", "a", "b")]
    queued = [slot("back", "b", "a", 1.0)]  # b is busy receiving, not sending
    assert startable(queued, running, limits) == ["back"]


def test_limits_of_zero_start_nothing() -> None:
    assert startable([slot("q")], [], HostLimits(per_source=0, per_destination=2)) == []


def test_the_inputs_are_not_changed() -> None:
    queued = (slot("q2", at=2.0), slot("q1", at=1.0))
    running = (slot("r", "c", "d"),)
    startable(queued, running, TWO)
    assert queued == (slot("q2", at=2.0), slot("q1", at=1.0))
    assert running == (slot("r", "c", "d"),)


HOSTS = st.sampled_from("abcd")
SLOTS = st.lists(
    st.builds(slot, id=st.uuids().map(str), source=HOSTS, destination=HOSTS, at=st.floats(0, 9)),
    max_size=12,
)


@given(queued=SLOTS, running=SLOTS, per_source=st.integers(0, 3), per_destination=st.integers(0, 3))
def test_within_the_limits_and_nothing_left_that_could_start(
    queued: list[Slot], running: list[Slot], per_source: int, per_destination: int
) -> None:
    limits = HostLimits(per_source, per_destination)
    started = set(startable(queued, running, limits))
    leaving = Counter(s.source for s in running)
    arriving = Counter(s.destination for s in running)
    for s in queued:
        if s.id in started:
            assert leaving[s.source] < limits.per_source
            assert arriving[s.destination] < limits.per_destination
            leaving[s.source] += 1
            arriving[s.destination] += 1
    for s in queued:
        if s.id not in started:
            assert (
                leaving[s.source] >= limits.per_source
                or arriving[s.destination] >= limits.per_destination
            )
