"""`policies.placement.choose`: rejections, ranking, reasons, and properties."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from lmwatch.model import GIB
from lmwatch.policies.placement import Candidate, Need, choose

NEED = Need(instance="vm1", source="a", memory=4 * GIB, profile="default")


def host(name: str, free: int | None = 64 * GIB, **fields: object) -> Candidate:
    return Candidate(host=name, free_memory=free, **fields)  # type: ignore[arg-type]


def test_most_free_memory_wins_and_the_reason_says_so_and_names_the_rejected() -> None:
    placement = choose(
        NEED,
        [
            host("b", 32 * GIB, handover=False),
            host("c", 64 * GIB),
            host("d", 16 * GIB),
            host("e", refused="instance 'vm1' is pinned to host CPUs 8-9"),
        ],
        per_destination=2,
    )
    assert placement.host == "c"
    assert placement.reason.startswith("c: most free memory after reservations (64.0GiB)")
    assert "among 3 candidates" in placement.reason
    assert "e rejected: instance 'vm1' is pinned" in placement.reason
    assert placement.rejected == {"e": "instance 'vm1' is pinned to host CPUs 8-9"}


def test_reservations_count_against_free_memory_with_the_numbers() -> None:
    full = host("b", 16 * GIB, reserved=16 * GIB, reservations=4)
    placement = choose(NEED, [full], per_destination=8)
    assert placement.host is None
    assert placement.rejected["b"] == (
        "b has 16.0GiB free, 16.0GiB reserved by 4 migrations; vm1 needs 4.0GiB"
    )
    assert "no host can take vm1" in placement.reason
    # the same host with one reservation less takes it
    room = host("b", 16 * GIB, reserved=12 * GIB, reservations=3)
    assert choose(NEED, [room], per_destination=8).host == "b"
    # forced: capacity is not checked
    assert choose(NEED, [full], per_destination=8, forced=True).host == "b"


def test_a_free_arrival_slot_beats_more_memory() -> None:
    busy = host("b", 128 * GIB, arriving=2)
    idle = host("c", 8 * GIB)
    placement = choose(NEED, [busy, idle], per_destination=2)
    assert placement.host == "c"
    assert "free arrival slot" in placement.reason


def test_bandwidth_then_fewest_migrations_then_name_break_ties() -> None:
    assert (
        choose(NEED, [host("b", bandwidth=1e9), host("c", bandwidth=2e9)], per_destination=2).host
        == "c"
    )
    placement = choose(NEED, [host("b", leaving=1), host("c")], per_destination=2)
    assert placement.host == "c" and "fewest migrations" in placement.reason
    placement = choose(NEED, [host("c"), host("b")], per_destination=2)
    assert placement.host == "b" and "first by name" in placement.reason


def test_the_group_rule_and_handover_reject() -> None:
    need = Need(instance="db-2", source="a", memory=GIB, group="db", handover=True, profile="p")
    placement = choose(
        need,
        [host("b", groups=frozenset({"db"})), host("c", handover=False), host("d", 1 * GIB)],
        per_destination=2,
    )
    assert placement.host == "d"
    assert "group 'db'" in placement.rejected["b"]
    assert placement.rejected["c"] == "cannot take handover from a, which profile 'p' allows"
    # a forced placement never breaks the group rule
    forced = choose(need, [host("b", groups=frozenset({"db"}))], per_destination=2, forced=True)
    assert forced.host is None


def test_a_host_being_drained_is_rejected_forced_or_not() -> None:
    drained = host("b", 512 * GIB, drain="d-1")
    placement = choose(NEED, [drained, host("c", 8 * GIB)], per_destination=2)
    assert placement.host == "c"
    assert placement.rejected == {"b": "b is being drained (drain d-1)"}
    assert choose(NEED, [drained], per_destination=2, forced=True).host is None


def test_source_and_excluded_hosts_are_never_candidates() -> None:
    placement = choose(NEED, [host("a"), host("b"), host("c")], per_destination=2, exclude={"b"})
    assert placement.host == "c"
    assert [c.host for c in placement.candidates] == ["c"]
    none = choose(NEED, [host("a")], per_destination=2)
    assert none.host is None and "only its source" in none.reason


def test_unknown_free_memory_is_not_a_rejection_but_ranks_last() -> None:
    placement = choose(NEED, [host("b", None), host("c", 8 * GIB)], per_destination=2)
    assert placement.host == "c"
    assert choose(NEED, [host("b", None)], per_destination=2).host == "b"


# --- properties --------------------------------------------------------------------

NAMES = st.sampled_from(["a", "b", "c", "d", "e", "f"])
candidates = st.builds(
    Candidate,
    host=NAMES,
    free_memory=st.one_of(st.none(), st.integers(0, 64 * GIB)),
    reserved=st.integers(0, 32 * GIB),
    reservations=st.integers(0, 4),
    refused=st.one_of(st.none(), st.just("refused")),
    handover=st.booleans(),
    bandwidth=st.one_of(st.none(), st.floats(1e6, 1e10)),
    arriving=st.integers(0, 4),
    leaving=st.integers(0, 4),
    groups=st.frozensets(st.sampled_from(["x", "y"]), max_size=2),
    drain=st.one_of(st.none(), st.just("d-1")),
)
needs = st.builds(
    Need,
    instance=st.just("vm"),
    source=NAMES,
    memory=st.integers(1, 16 * GIB),
    group=st.one_of(st.none(), st.sampled_from(["x", "y"])),
    handover=st.booleans(),
)


def _unique(hosts: list[Candidate]) -> list[Candidate]:
    return list({c.host: c for c in hosts}.values())


@given(needs, st.lists(candidates, max_size=6).map(_unique), st.sets(NAMES, max_size=2))
def test_never_the_source_an_excluded_or_a_rejected_host(
    need: Need, hosts: list[Candidate], exclude: set[str]
) -> None:
    placement = choose(need, hosts, per_destination=2, exclude=exclude)
    if placement.host is not None:
        assert placement.host != need.source
        assert placement.host not in exclude
        assert placement.host not in placement.rejected
        chosen = next(c for c in hosts if c.host == placement.host)
        assert chosen.refused is None
        assert not (need.group and need.group in chosen.groups)
        assert chosen.drain is None
        assert chosen.available is None or chosen.available >= need.memory
    else:
        considered = {c.host for c in hosts} - exclude - {need.source}
        assert set(placement.rejected) == considered


@given(needs, st.lists(candidates, max_size=6).map(_unique))
def test_deterministic_whatever_the_order(need: Need, hosts: list[Candidate]) -> None:
    one = choose(need, hosts, per_destination=2)
    other = choose(need, list(reversed(hosts)), per_destination=2)
    assert (one.host, one.reason, dict(one.rejected)) == (
        other.host,
        other.reason,
        dict(other.rejected),
    )
