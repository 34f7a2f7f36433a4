"""Instances with a local disk on the real rig, through the daemon's API.

The disk guest (rig/guest/diskw.c) has a raw 64 MiB virtio disk in its host's
storage pool, filled with random bytes, and writes stamped 4 KiB blocks into its
first 8 MiB at 512 KiB/s for 30 s, also while it migrates; each block is checked
before it is rewritten and all of them at the end (`diskbad=`), then the guest
prints the sha256 of its whole disk. After a migration a -> b the guest runs on b,
its memory and disk checks found nothing wrong, and the sha256 of b's image file,
computed on the machine, equals the guest's (and differs from the untouched image:
the check cannot pass by comparing two copies of nothing). A corrupted copy of that
image shows that the host-side block check catches one bad block.

The guest's own check is proven the same way: one bit flipped behind the disk
writer's back (lmw.dkselftest) shows as diskbad=1.

A drain of host a (POST /v1/drains) with two guests, one with the local disk, lands
both on b intact: running, no bad page or block, b's image sha256 = the guest's.

Pre-flight: a destination whose pool cannot hold the disk, or whose pool is not
active, is refused with 409 insufficient-resources before anything starts.

The driver alone (its samples during the disk copy) is checked in
test_driver_rig.py: libvirt's event loop can be registered on one asyncio loop per
process only, and that module owns it.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "rig"))
import rigctl

pytestmark = pytest.mark.rig

Daemon = Any  # tests/rig/conftest.py: Daemon (the real daemon, over HTTP)

NAME = "dk-guest"
DISK_MIB = 64
WRITE = {"rate_kib": 512, "secs": 30, "mib": 8}  # 2048 blocks, each rewritten ~2 times
PROFILES = """
version: 1
profiles:
  - name: dk-any
    match: {}
    max_blackout: 1s
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
def disk_guest() -> Iterator[str]:
    """NAME's image on host a (random bytes); the guest defined there by the test;
    guest and images removed from both hosts afterwards."""
    image = rigctl.make_disk_image("a", NAME, DISK_MIB, seed=9)
    try:
        yield image
    finally:
        rigctl.destroy_everywhere(NAME)
        for host in rigctl.HOSTS:
            rigctl.remove_disk_image(host, NAME)
        rigctl.refresh_pools()


def last_written(host: str) -> int:
    lines = [d for d in rigctl.disk_lines(NAME, host) if "w" in d]
    return int(lines[-1]["w"]) if lines else 0


def flip_one_stamped_block(path: Path) -> None:
    """Flip one bit in the middle of the first stamped block of an image copy."""
    with open(path, "r+b") as f:
        index = 0
        while True:
            block = f.read(rigctl.DISK_BLOCK)
            assert len(block) == rigctl.DISK_BLOCK, "no stamped block in the image"
            if int.from_bytes(block[:8], "little") == rigctl.DISK_MAGIC ^ index:
                break
            index += 1
        offset = index * rigctl.DISK_BLOCK + rigctl.DISK_BLOCK // 2
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


@pytest.mark.scenario("disk guest a->b")
def test_disk_guest_migrates_with_its_disk_while_writing(
    daemon: Daemon, disk_guest: str, summary: Any, tmp_path: Path
) -> None:
    untouched = rigctl.file_sha256(disk_guest)
    rigctl.define_guest("a", NAME, write_mib=16, rate_mib=4, disk=WRITE)
    rigctl.wait_heartbeat(NAME, 90.0, 1)
    deadline = time.monotonic() + 30
    while last_written("a") == 0:  # the disk writer is under way
        assert time.monotonic() < deadline, rigctl.disk_lines(NAME, "a")
        time.sleep(0.25)
    written_at_submit = last_written("a")

    daemon.mark_log()
    migration = daemon.submit(NAME, "a", "b")
    done = daemon.wait_finished(migration["id"], timeout=120)
    summary.outcome("disk guest a->b", done, "64 MiB local disk")
    assert done["state"] == "completed", done
    assert re.search(r"migration-started.*local_disks=vda", daemon.log(since_mark=True))

    # the instance runs on b and goes on
    assert rigctl.where_running(NAME) == ["b"]
    assert rigctl.heartbeats_continue(NAME, 3.0)
    # the guest wrote to its disk during the migration: a's log ends later than the
    # submit, b's log goes on from there
    assert last_written("a") > written_at_submit
    assert rigctl.disk_lines(NAME, "b"), "no disk writer line on b"

    final, guest_sum = rigctl.wait_disk_sum(NAME, "b", timeout=120)
    assert final["diskbad"] == 0, final
    assert final["w"] > final["blocks"] > 0  # blocks were rewritten (and checked first)
    hb = rigctl.last_heartbeat(NAME, "b")
    assert hb is not None and hb["bad"] == 0, hb

    on_b = rigctl.disk_image_path(NAME, "b")
    host_sum = rigctl.file_sha256(on_b)
    assert host_sum == guest_sum  # b's file is exactly the disk the guest sees
    assert host_sum != untouched
    check = rigctl.check_disk_image(on_b, WRITE["mib"])
    assert check == {"stamped": final["blocks"], "bad": 0}, (check, final)
    summary.note("disk guest a->b", f"{final['w']} blocks written, sha256 {host_sum[:12]} matches")

    # self-test: one flipped bit in a copy is caught by the block check and the sum
    copy = tmp_path / "corrupt.img"
    shutil.copyfile(on_b, copy)
    flip_one_stamped_block(copy)
    assert rigctl.check_disk_image(str(copy), WRITE["mib"]) == {
        "stamped": final["blocks"],
        "bad": 1,
    }
    assert rigctl.file_sha256(str(copy)) != guest_sum


def refused(daemon: Daemon, says: str) -> None:
    """The migration of NAME a -> b is refused with 409 insufficient-resources saying
    `says`; nothing is recorded, started or moved."""
    before = daemon.list()
    got, answer = daemon.request(
        "POST", "/v1/migrations", {"instance": NAME, "source": "a", "destination": "b"}
    )
    if got == 202:  # accepted: end it, so that the module's daemon is free again
        daemon.request("POST", f"/v1/migrations/{answer['id']}/cancel")
        ended = daemon.wait_finished(answer["id"], timeout=120)
        pytest.fail(f"accepted instead of refused; it ended {ended['state']}: {ended}")
    assert got == 409, answer
    assert answer["type"] == "urn:lmwatch:problem:insufficient-resources", answer
    assert says in answer["detail"], answer
    # the pool's directory is the operator's path, shown as it is; the rest is neutral
    assert not FORBIDDEN.search(str(answer).replace(rigctl.POOL_TARGET, "<pool>")), answer
    assert daemon.list() == before
    assert rigctl.where_running(NAME) == ["a"]
    dom = rigctl.lookup("a", NAME)
    assert dom is not None and dom.jobInfo()[0] == 0  # no job: nothing started
    assert not Path(rigctl.disk_image_path(NAME, "b")).exists()


def test_destination_without_room_for_the_disk_is_refused(daemon: Daemon, disk_guest: str) -> None:
    """A sparse 1 TiB disk: its capacity is what the destination must hold."""
    with open(disk_guest, "r+b") as f:
        f.truncate(1 << 40)
    rigctl.refresh_pools()
    rigctl.define_guest("a", NAME, disk=WRITE)  # pre-flight needs no booted guest
    refused(daemon, "instance 'dk-guest' needs 1048576 MiB for its local disks there")


def test_destination_pool_not_active_is_refused(daemon: Daemon, disk_guest: str) -> None:
    rigctl.define_guest("a", NAME, disk=WRITE)
    conn = rigctl.connect("b")
    pool = conn.storagePoolLookupByName(rigctl.POOL)
    pool.destroy()
    try:
        refused(daemon, f"storage pool '{rigctl.POOL}' for {rigctl.POOL_TARGET} on b is not active")
    finally:
        pool.create(0)
        conn.close()


def test_guest_disk_check_catches_a_flipped_bit() -> None:
    """The guest's own check means something: a block written with one wrong bit
    behind the writer's back (lmw.dkselftest) is counted as diskbad=1."""
    name = f"{NAME}-self"
    rigctl.make_disk_image("a", name, 16, seed=3)
    try:
        rigctl.define_guest("a", name, disk={"rate_kib": 512, "secs": 6, "mib": 1, "selftest": 2})
        final, _ = rigctl.wait_disk_sum(name, "a", timeout=90)
        assert final["diskbad"] == 1, final
    finally:
        rigctl.destroy_everywhere(name)
        rigctl.remove_disk_image("a", name)


@pytest.mark.scenario("drain a: memory + disk guest")
def test_drain_of_a_host_with_a_disk_guest_lands_everything_intact(
    daemon: Daemon, disk_guest: str, summary: Any
) -> None:
    """POST /v1/drains empties host a of two guests, one of them with a local disk it
    keeps writing; both land on b and run, no page and no block was lost, and b's
    image is the disk the guest sees."""
    other = f"{NAME}-mem"
    untouched = rigctl.file_sha256(disk_guest)
    try:
        rigctl.define_guest("a", other, write_mib=16, rate_mib=4)
        rigctl.define_guest("a", NAME, write_mib=16, rate_mib=4, disk={**WRITE, "secs": 45})
        for name in (other, NAME):
            rigctl.wait_heartbeat(name, 90.0, 1)
        answer = daemon.expect(202, "POST", "/v1/drains", {"host": "a"})
        assert sorted(i["instance"] for i in answer["instances"]) == [NAME, other], answer
        assert answer["blocked"] == [], answer
        deadline = time.monotonic() + 180
        while True:
            drain = daemon.expect(200, "GET", f"/v1/drains/{answer['id']}")
            if drain["state"] not in ("running", "cancelling"):
                break
            assert time.monotonic() < deadline, drain
            time.sleep(0.5)
        summary.note(
            "drain a: memory + disk guest",
            f"{drain['state']}: "
            + ", ".join(
                f"{i['instance']} {i['state']} to {i['destination']}" for i in drain["instances"]
            ),
        )
        assert drain["state"] == "completed", drain
        assert drain["instances_remaining"] == 0, drain
        assert {i["state"] for i in drain["instances"]} == {"moved"}, drain
        for name in (other, NAME):
            assert rigctl.where_running(name) == ["b"], name
            assert rigctl.heartbeats_continue(name, 3.0), name
            hb = rigctl.last_heartbeat(name, "b")
            assert hb is not None and hb["bad"] == 0, (name, hb)
        final, guest_sum = rigctl.wait_disk_sum(NAME, "b", timeout=120)
        assert final["diskbad"] == 0, final
        on_b = rigctl.disk_image_path(NAME, "b")
        assert rigctl.file_sha256(on_b) == guest_sum != untouched
        assert rigctl.check_disk_image(on_b, WRITE["mib"]) == {
            "stamped": final["blocks"],
            "bad": 0,
        }
    finally:
        rigctl.destroy_everywhere(other)
