"""Pre-flight and placement against the real rig: a name the destination already
defines; a destination lmwatch chooses, and one forced.

libvirt refuses an incoming instance whose name the destination defines with another
uuid (or whose uuid it defines under another name) only once the migration has
started; the daemon refuses it before, over the API, and starts nothing. A
definition with the same name and uuid (shut off, left from an earlier migration)
does not stand in the way: that migration is accepted and completes.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "rig"))
import rigctl

pytestmark = pytest.mark.rig

Daemon = Any  # tests/rig/conftest.py: Daemon (the real daemon, over HTTP)

NAME = "pf-clash"
OTHER_UUID = "0badc0de-5eed-4000-8000-00000000c1a5"
PROFILES = """
version: 1
profiles:
  - name: pf-any
    match: {}
    max_blackout: 300ms
    may_slow_down: false
    handover: forbidden
    may_pause: false
"""
FORBIDDEN = re.compile(
    r"post.?copy|suspend|downtime|auto.?converge|xbzrle|libvirt|qemu|virDomain", re.IGNORECASE
)


@pytest.fixture(scope="module")
def daemon(daemon_factory: Any) -> Daemon:
    d: Daemon = daemon_factory(PROFILES)
    return d


@pytest.fixture
def source_uuid() -> Iterator[str]:
    """NAME running on host a (booting is not needed: pre-flight asks libvirt only);
    destroyed and undefined on both hosts afterwards."""
    dom = rigctl.define_guest("a", NAME)
    try:
        yield str(dom.UUIDString())
    finally:
        rigctl.destroy_everywhere(NAME)


def define_on_b(name: str, uuid: str) -> None:
    """A shut-off definition on host b with the given name and uuid."""
    xml = rigctl.domain_xml(name).replace("</name>", f"</name>\n  <uuid>{uuid}</uuid>", 1)
    conn = rigctl.connect("b")
    try:
        conn.defineXML(xml)
    finally:
        conn.close()


def uuid_on(host: str, name: str) -> str | None:
    dom = rigctl.lookup(host, name)
    return None if dom is None else str(dom.UUIDString())


def job_type_on_a(name: str) -> int:
    dom = rigctl.lookup("a", name)
    assert dom is not None
    return int(dom.jobInfo()[0])


def refused(daemon: Daemon, expect: str) -> dict[str, Any]:
    before = daemon.list()
    got, answer = daemon.request(
        "POST", "/v1/migrations", {"instance": NAME, "source": "a", "destination": "b"}
    )
    if got == 202:  # accepted: end it, so that the module's daemon is free for the next test
        daemon.request("POST", f"/v1/migrations/{answer['id']}/cancel")
        ended = daemon.wait_finished(answer["id"], timeout=120)
        pytest.fail(f"accepted instead of refused; it ended {ended['state']}: {ended}")
    assert got == 409, answer
    assert answer["type"] == "urn:lmwatch:problem:name-taken", answer
    assert expect in answer["detail"], answer
    assert not FORBIDDEN.search(str(answer)), answer
    assert daemon.list() == before  # nothing recorded
    assert rigctl.where_running(NAME) == ["a"]  # nothing started, nothing moved
    assert job_type_on_a(NAME) == 0  # VIR_DOMAIN_JOB_NONE
    return dict(answer)


def test_name_defined_on_destination_with_another_uuid_is_refused(
    daemon: Daemon, source_uuid: str
) -> None:
    assert source_uuid != OTHER_UUID
    define_on_b(NAME, OTHER_UUID)
    refused(
        daemon,
        f"host b already defines an instance named '{NAME}' with another identity "
        f"(uuid {OTHER_UUID}); remove or rename it there first",
    )
    assert uuid_on("b", NAME) == OTHER_UUID  # the other instance is left alone


def test_identity_defined_on_destination_under_another_name_is_refused(
    daemon: Daemon, source_uuid: str
) -> None:
    other_name = f"{NAME}-old"
    define_on_b(other_name, source_uuid)
    try:
        refused(daemon, f"under another name, '{other_name}'")
        assert uuid_on("b", other_name) == source_uuid
    finally:
        rigctl.destroy_everywhere(other_name)


def test_same_name_and_uuid_defined_on_destination_migrates(
    daemon: Daemon, source_uuid: str
) -> None:
    define_on_b(NAME, source_uuid)  # what an earlier migration back leaves behind
    rigctl.wait_heartbeat(NAME, 90.0, 2)
    migration = daemon.submit(NAME, "a", "b")
    done = daemon.wait_finished(migration["id"], timeout=120)
    assert done["state"] == "completed", done
    assert rigctl.where_running(NAME) == ["b"]
    assert uuid_on("b", NAME) == source_uuid


def test_destination_chosen_explained_and_forced(daemon: Daemon, source_uuid: str) -> None:
    """Without a destination lmwatch chooses one (b, the only other host) and says why,
    the explain call says the same without moving anything, and a forced move back
    is recorded as forced; the guest runs intact after both."""
    rigctl.wait_heartbeat(NAME, 90.0, 2)
    explained = daemon.expect(200, "GET", f"/v1/instances/{NAME}/placement")
    assert explained["destination"] == "b", explained
    assert explained["reason"].startswith("b:"), explained
    assert rigctl.where_running(NAME) == ["a"]  # explaining moved nothing
    got, chosen = daemon.request("POST", "/v1/migrations", {"instance": NAME, "source": "a"})
    assert got == 202, chosen
    assert chosen["destination"] == "b", chosen
    assert chosen["placement"]["how"] == "chosen", chosen
    assert chosen["placement"]["reason"].startswith("b:"), chosen
    assert not FORBIDDEN.search(str(chosen["placement"])), chosen
    done = daemon.wait_finished(chosen["id"], timeout=120)
    assert done["state"] == "completed", done
    assert rigctl.where_running(NAME) == ["b"]
    body = {"instance": NAME, "source": "b", "destination": "a", "force": True}
    got, forced = daemon.request("POST", "/v1/migrations", body)
    assert got == 202, forced
    assert forced["placement"]["how"] == "forced", forced
    done = daemon.wait_finished(forced["id"], timeout=120)
    assert done["state"] == "completed", done
    assert rigctl.where_running(NAME) == ["a"]
    assert rigctl.heartbeats_continue(NAME, 3.0)
    hb = rigctl.last_heartbeat(NAME, "a")
    assert hb is not None and hb["bad"] == 0, hb
