"""Lease decisions without a database: when to renew, when to stop acting, who gets
which host."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmwatch.policies.leases import (
    LeaseTerms,
    acting_until,
    assign_hosts,
    host_changes,
    may_act,
    next_renewal,
)

TERMS = LeaseTerms(lease=10.0, renew_every=3.0, margin=2.0, retry_after=0.5)


def test_terms_refuse_a_renewal_interval_that_leaves_no_time_to_renew() -> None:
    with pytest.raises(ValueError, match="shorter than the lease"):
        LeaseTerms(lease=10.0, renew_every=8.0, margin=2.0, retry_after=0.5)
    with pytest.raises(ValueError, match="positive"):
        LeaseTerms(lease=10.0, renew_every=3.0, margin=0.0, retry_after=0.5)
    terms = LeaseTerms.for_lease(6.0)
    assert terms.renew_every + terms.margin < terms.lease


def test_a_member_acts_until_a_margin_before_the_lease_it_last_renewed() -> None:
    assert acting_until(100.0, TERMS) == 108.0
    assert may_act(107.9, 100.0, TERMS)
    assert not may_act(108.0, 100.0, TERMS)
    assert not may_act(0.0, None, TERMS)  # never registered


def test_renewals_come_every_renew_every_and_back_off_after_failures() -> None:
    assert next_renewal(None, 0, 5.0, TERMS) == 5.0  # not yet registered: now
    assert next_renewal(100.0, 0, 100.0, TERMS) == 103.0
    # Failures: 0.5, 1, 2, then every renew_every, counted from the last attempt.
    assert next_renewal(100.0, 1, 104.0, TERMS) == 104.5
    assert next_renewal(None, 2, 50.0, TERMS) == 51.0
    assert next_renewal(None, 3, 50.0, TERMS) == 52.0
    assert next_renewal(None, 9, 50.0, TERMS) == 53.0
    assert next_renewal(100.0, 5000, 200.0, TERMS) == 203.0  # no overflow


@given(st.floats(0, 1e6), st.integers(1, 10_000), st.floats(0, 1e3))
def test_a_failing_member_retries_soon_but_never_in_a_busy_loop(
    sent: float, failures: int, since: float
) -> None:
    last_attempt = sent + since
    due = next_renewal(sent, failures, last_attempt, TERMS)
    assert last_attempt + TERMS.retry_after <= due <= last_attempt + TERMS.renew_every


hosts_st = st.sets(st.text("abcdefgh0123456789", min_size=1, max_size=6), max_size=60)
members_st = st.sets(st.text("xyz123", min_size=1, max_size=4), min_size=1, max_size=7)


@given(hosts_st, members_st)
def test_every_host_goes_to_exactly_one_member_and_shares_are_even(
    hosts: set[str], members: set[str]
) -> None:
    assignment = assign_hosts(hosts, members)
    assert set(assignment) == hosts
    assert set(assignment.values()) <= members
    bound = math.ceil(len(hosts) / len(members))
    for member in members:
        assert list(assignment.values()).count(member) <= bound


@given(hosts_st, members_st)
def test_the_assignment_depends_only_on_the_sets(hosts: set[str], members: set[str]) -> None:
    assert assign_hosts(sorted(hosts), sorted(members)) == assign_hosts(
        sorted(hosts, reverse=True), sorted(members, reverse=True)
    )


def test_a_member_joining_takes_hosts_from_the_others_and_moves_few_besides() -> None:
    hosts = [f"host-{i}" for i in range(60)]
    before = assign_hosts(hosts, ["a", "b"])
    after = assign_hosts(hosts, ["a", "b", "c"])
    to_c = {h for h, m in after.items() if m == "c"}
    assert len(to_c) == 20
    moved_between_others = [h for h in hosts if h not in to_c and before[h] != after[h]]
    # Not a reshuffle: round robin over the sorted names moves 20 between a and b.
    assert len(moved_between_others) <= 6


def test_no_members_no_assignment() -> None:
    assert assign_hosts(["a", "b"], []) == {}


def test_host_changes_claim_the_assigned_and_release_the_rest() -> None:
    assignment = {"h1": "me", "h2": "me", "h3": "other"}
    changes = host_changes(assignment, held=["h2", "h3", "gone"], me="me")
    assert changes.claim == ("h1",)
    assert changes.release == ("gone", "h3")
