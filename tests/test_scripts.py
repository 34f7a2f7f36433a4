"""The README's set-up commands install into a project virtual environment, never into
the Python they were started with (Debian's refuses that: "externally-managed")."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

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
