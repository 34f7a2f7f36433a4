"""The crash-trial harness itself (a few kills; the figures come from 200, docs/crash.md)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from lmwatch.bench import crash
from lmwatch.drivers.sim_world import SqliteWorld
from lmwatch.store import Store


def test_a_few_kills_end_with_every_migration_supervised_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert crash.main(["--kills", "3", "--instances", "6", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    assert "crash trials: 3 SIGKILLs" in out
    assert "supervised to their true end   6/6" in out
    assert "lost                           0" in out
    assert "duplicated                     0" in out


def test_the_check_finds_a_migration_the_store_lost(tmp_path: Path) -> None:
    """The verdict is not vacuous: an accepted id the store does not have is lost."""
    root = tmp_path
    Store.open(root / "lmwatch.db").close()
    world = SqliteWorld(str(root / "lmwatch.db"))
    world.save(pickle.dumps({"where": {"vm-0": "a"}}), 0.0, {})
    world.close()
    verdict = crash.check(root, {"never-stored": "vm-0"}, {"vm-0": "a"})
    assert verdict.lost == ["never-stored"] and not verdict.ok
