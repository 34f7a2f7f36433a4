"""The README's set-up commands install into a project virtual environment, never into
the Python they were started with (Debian's refuses that: "externally-managed")."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from pgtools import find_bindir

ROOT = Path(__file__).resolve().parent.parent


def test_run_sh_installs_into_its_own_virtual_environment(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    env = {
        **os.environ,
        "LMWATCH_VENV": str(venv),
        # pip refuses to install anywhere but a virtual environment
        "PIP_REQUIRE_VIRTUALENV": "true",
        "PATH": os.pathsep.join(
            p for p in os.environ.get("PATH", "").split(os.pathsep) if ".venv" not in p
        ),
    }
    env.pop("VIRTUAL_ENV", None)
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "run.sh"), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage: lmwatch serve" in done.stdout
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import lmwatch, sys; print(lmwatch.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert installed.stdout.strip().startswith(str(ROOT / "lmwatch"))


def test_postgres_sh_is_quick_and_changes_nothing_when_postgresql_is_installed() -> None:
    """.ci/run and scripts/test.sh run it before every test run."""
    bindir = find_bindir()
    if bindir is None:
        if os.environ.get("CI") == "true":
            raise AssertionError("PostgreSQL not installed under CI=true (scripts/postgres.sh)")
        pytest.skip("PostgreSQL not installed: scripts/postgres.sh would install it")
    began = time.monotonic()
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "postgres.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - began < 2.0
    assert done.stdout.strip() == f"postgres: server binaries in {bindir}"
