"""What the daemon-level rig tests check and print about a migration (its JSON)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import rigctl

JsonDict = dict[str, Any]


def timeline_text(migration: JsonDict) -> str:
    return "\n".join(
        f"  {e['at']} {e['kind']:<8} {e['action'] or e['state'] or '':<14} {e['reason']}"
        for e in migration.get("timeline", [])
    )


def explain(migration: JsonDict) -> str:
    return (
        f"state {migration['state']}, outcome {migration['outcome']}\n"
        f"timeline:\n{timeline_text(migration)}"
    )


def actions(migration: JsonDict) -> list[str]:
    return [e["action"] for e in migration["timeline"] if e["kind"] == "decision"]


CONVERGING = "copying finishes on its own"  # the policy's words for a guest converging


def said_converging(migration: JsonDict) -> list[str]:
    """The decisions that called copying converging (the issue's rig symptom for a guest
    that never converges: "copying finishes on its own ... settling near 0B", one pass
    before deciding the opposite)."""
    return [
        e["reason"]
        for e in migration["timeline"]
        if e["kind"] == "decision" and CONVERGING in e["reason"]
    ]


def assert_intact_on(name: str, host: str) -> None:
    """Runs on `host` only (shut off or gone on the other), its heartbeats go on and it
    lost no memory (bad=0)."""
    other = rigctl.other_host(host)
    assert rigctl.where_running(name) == [host], rigctl.domain_states(name)
    state = rigctl.domain_states(name)[other]
    assert state is None or state[0] == rigctl.libvirt.VIR_DOMAIN_SHUTOFF, state
    assert rigctl.heartbeats_continue(name, 2.0), f"{name}: heartbeats stopped on {host}"
    hb = rigctl.last_heartbeat(name)
    assert hb is not None and hb["host"] == host, hb
    assert hb["bad"] == 0, f"{name} lost memory: {hb}"


def module_daemon(profiles: str) -> Any:
    """A module's `daemon` fixture: one real daemon on `profiles` for all its tests
    (`daemon_factory`, tests/rig/conftest.py)."""

    @pytest.fixture(scope="module")
    def daemon(daemon_factory: Callable[[str], Any]) -> Any:
        return daemon_factory(profiles)

    return daemon


def module_guest(name: str, host: str = "a", **guest: Any) -> Any:
    """A module's guest, defined on `host` before its tests (`rigctl.define_guest`
    with `guest`) and destroyed everywhere after them."""

    @pytest.fixture(scope="module", autouse=True)
    def defined() -> Iterator[None]:
        rigctl.define_guest(host, name, **guest)
        yield
        rigctl.destroy_everywhere(name)

    return defined


def pause_profile(name: str, max_pause: float, deadline: str) -> str:
    """A profiles file of one profile, `name`, that may pause a guest for up to
    `max_pause` seconds and allows nothing else but a short final stop (no handover,
    no slowing), cancelled at `deadline`."""
    return f"""
version: 1
profiles:
  - name: {name}
    description: may pause; never handed over, never slowed
    max_blackout: 300ms
    may_slow_down: false
    handover: forbidden
    may_pause: true
    max_pause: {max_pause * 1000:.0f}ms
    deadline: {deadline}
    on_deadline: cancel
"""


def assert_started_again_after_a_pause(
    migration: JsonDict, name: str, destination: str, max_pause: float
) -> tuple[JsonDict, JsonDict, float]:
    """A migration whose pause lmwatch stopped, started again once and completed: one
    restart, one end of the pause within `max_pause`, no violation, `name` intact on
    `destination`. Returns the restart's and the pause end's timeline entries and how
    long the instance was stopped (seconds)."""
    m = migration
    timeline = m["timeline"]
    restarts = [e for e in timeline if e["action"] == "restart"]
    assert len(restarts) == 1, explain(m)
    ended = [e for e in timeline if e["reason"].startswith("the pause ended")]
    assert len(ended) == 1, explain(m)
    length = re.search(r"stopped for ([0-9.]+)s", ended[0]["reason"])
    assert length is not None, explain(m)
    stopped = float(length.group(1))
    assert stopped <= max_pause, explain(m)
    assert not [e for e in timeline if e["kind"] == "violation"], explain(m)
    assert m["state"] == "completed" and m["restarts"] == 1, explain(m)
    assert_intact_on(name, destination)
    return restarts[0], ended[0], stopped
