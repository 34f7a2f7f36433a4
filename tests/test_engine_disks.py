"""Instances with local disks, end to end on the simulator: the API view, the CLI
line, the metrics, pre-flight, an operator's finish during the disk copy."""

from __future__ import annotations

from pathlib import Path

import pytest
from apitools import Api
from enginerig import EngineRig
from prometheus_client.parser import text_string_to_metric_families

from lmwatch.clock import VirtualClock
from lmwatch.drivers.inventory import Inventory, load_inventory_text
from lmwatch.drivers.sim import SimDriver
from lmwatch.engine import Engine
from lmwatch.model import GIB, MigrationRequest, State
from lmwatch.render import migration_detail, progress_line

ONE_PROFILE = "profiles:\n  - name: default\n    max_blackout: 500ms\n"

DISK_INVENTORY = """
hosts:
  - {name: a, memory: 256GiB, disk: 500GiB}
  - {name: b, memory: 256GiB, disk: 100GiB}
  - {name: c, memory: 256GiB, disk: 10GiB}
links:
  - {between: [a, b], bandwidth: 10Gbit/s}
default_bandwidth: 1Gbit/s
instances:
  - {name: files, host: a, memory: 2GiB, working_set: 64MiB, change_rate: 1MiB/s,
     disk: 20GiB, disk_writes: 20MiB/s}
  - {name: quiet, host: a, memory: 2GiB, working_set: 128MiB, change_rate: 1MiB/s}
"""


@pytest.fixture
def inventory() -> Inventory:
    return load_inventory_text(DISK_INVENTORY, source="<disk inventory>")


def _metric(text: str, name: str, migration: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("migration") == migration:
                return float(sample.value)
    return None


async def test_an_instance_with_a_local_disk_moves_disk_first_then_memory(
    api: Api, clock: VirtualClock, engine: Engine, driver: SimDriver
) -> None:
    created = await api.post(
        "/v1/migrations", {"instance": "files", "source": "a", "destination": "b"}
    )
    assert created.status == 202
    migration_id = created.body["id"]
    await clock.advance(5.0)
    during = (await api.get(f"/v1/migrations/{migration_id}")).body
    assert during["state"] == "copying"
    progress = during["progress"]
    disk = progress["disk"]
    assert disk["total_bytes"] == 20 * GIB and not disk["in_sync"]
    assert 0 < disk["remaining_bytes"] < 20 * GIB
    assert 0 < disk["percent_copied"] < 100
    assert disk["rate_bytes_per_second"] > 1 * GIB
    assert progress["percent_copied"] == 0 and progress["memory_transferred_bytes"] == 0
    eta = during["prediction"]["eta_seconds"]
    assert eta is not None and eta > 5.0  # the rest of the disk, then memory
    line = progress_line(during)
    assert "disks" in line and "copied" in line and "left at" in line
    assert any("still to copy" in text for text in migration_detail(during))
    metrics = (await api.get("/metrics")).text
    remaining = _metric(metrics, "lmwatch_migration_disk_remaining_bytes", migration_id)
    assert remaining is not None and remaining > 0
    rate = _metric(metrics, "lmwatch_migration_disk_rate_bytes_per_second", migration_id)
    assert rate is not None and rate > 0

    assert await clock.run_until(lambda: engine.get(migration_id).state is State.COMPLETED)
    done = (await api.get(f"/v1/migrations/{migration_id}")).body
    assert done["outcome"]["method"] == "converged"
    assert driver.where("files") == "b"
    assert driver.free_storage("b") == 80 * GIB and driver.free_storage("a") == 520 * GIB
    messages = [entry["reason"] for entry in done["timeline"]]
    disk_at = next(i for i, m in enumerate(messages) if m.startswith("copying the disks first"))
    memory_at = next(i for i, m in enumerate(messages) if m.startswith("first pass"))
    assert disk_at < memory_at
    assert done["progress"]["disk"]["in_sync"]


async def test_a_migration_without_disks_shows_no_disk_progress(
    api: Api, clock: VirtualClock
) -> None:
    created = await api.post(
        "/v1/migrations", {"instance": "quiet", "source": "a", "destination": "b"}
    )
    await clock.advance(1.0)
    body = (await api.get(f"/v1/migrations/{created.body['id']}")).body
    assert body["progress"]["disk"] is None
    assert "disks" not in progress_line(body)


async def test_preflight_refuses_disks_the_destination_cannot_hold(api: Api) -> None:
    refused = await api.post(
        "/v1/migrations", {"instance": "files", "source": "a", "destination": "c"}
    )
    assert refused.status == 409
    assert refused.body["type"].endswith("insufficient-resources")
    assert refused.body["detail"] == (
        "c has 10.0GiB of local storage free, files's disks need 20.0GiB"
    )


async def test_an_operators_finish_during_the_disk_copy_applies_once_in_sync(
    api: Api, clock: VirtualClock, engine: Engine
) -> None:
    created = await api.post(
        "/v1/migrations", {"instance": "files", "source": "a", "destination": "b"}
    )
    migration_id = created.body["id"]
    await clock.advance(3.0)
    answer = await api.post(f"/v1/migrations/{migration_id}/force-complete", {})
    assert answer.status == 202, answer.body
    assert answer.body["decision"]["action"] == "continue"
    assert "once the disks are in sync" in answer.body["decision"]["reason"]
    assert engine.get(migration_id).paused is False
    assert await clock.run_until(lambda: engine.get(migration_id).state is State.COMPLETED)
    done = (await api.get(f"/v1/migrations/{migration_id}")).body
    assert done["outcome"]["method"] == "paused"
    timeline = done["timeline"]
    waited = next(i for i, e in enumerate(timeline) if "once the disks are in sync" in e["reason"])
    paused = next(i for i, e in enumerate(timeline) if e.get("action") == "pause")
    assert waited < paused
    assert timeline[paused]["reason"].startswith("finishing on request")


async def test_a_restart_mid_disk_copy_reattaches_and_finishes(tmp_path: Path) -> None:
    """lmwatch and the simulated hosts' world both restart while the disk is copied."""
    rig = EngineRig(tmp_path, DISK_INVENTORY, ONE_PROFILE, durable_world=True)
    await rig.engine.start()
    record, _ = await rig.engine.submit(MigrationRequest("files", "a", "b"))
    await rig.clock.advance(6.0)
    assert rig.engine.get(record.id).progress is not None
    second = await rig.restart(down_for=3.0)  # nobody watches; the disk copy goes on
    await rig.clock.advance(1.0)
    progress = second.get(record.id).progress
    assert progress is not None and 0 < progress.disk_remaining < 20 * GIB
    assert progress.memory_transferred == 0
    assert await rig.clock.run_until(lambda: second.finished([record.id]), limit=600)
    done = second.get(record.id)
    assert done.state is State.COMPLETED
    assert rig.driver.where("files") == "b" and rig.driver.free_storage("b") == 80 * GIB
    reasons = [e.reason for e in rig.store.events(record.id)]
    assert any("resumed after a restart" in r for r in reasons)
    assert sum(1 for e in rig.store.events(record.id) if e.state == "completed") == 1
    await second.stop()
