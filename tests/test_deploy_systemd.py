"""deploy/systemd: the unit passes `systemd-analyze verify` (alone and with the libvirt
drop-in), and says what the daemon's notify support and the hardening rely on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
UNIT = DEPLOY / "lmwatch.service"
DROP_IN = DEPLOY / "lmwatch-libvirt.conf"
INSTALLED_BINARY = "/usr/local/bin/lmwatch"


def tool(name: str, package: str) -> str:
    """The tool's path; skip without it, except under CI=true, where it must be there."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found (Debian package {package}; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def settings(text: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (keys may repeat; comments and sections dropped)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def venv_lmwatch() -> str:
    """This environment's `lmwatch` entry point (what ExecStart names once installed)."""
    path = Path(sys.executable).parent / "lmwatch"
    assert path.is_file(), f"{path} missing: install lmwatch into this environment"
    return str(path)


def verify(directory: Path, unit_text: str, drop_in: str | None = None) -> None:
    analyze = tool("systemd-analyze", "systemd")
    assert INSTALLED_BINARY in unit_text
    unit = directory / "lmwatch.service"
    unit.write_text(unit_text.replace(INSTALLED_BINARY, venv_lmwatch()))
    if drop_in is not None:
        (directory / "lmwatch.service.d").mkdir()
        (directory / "lmwatch.service.d" / "libvirt.conf").write_text(drop_in)
    done = subprocess.run(
        [analyze, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    # Unknown keys and bad values are only warnings (exit 0): any output is a failure.
    problems = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 0 and not problems, "\n".join(problems)


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    verify(tmp_path, UNIT.read_text())


def test_the_unit_with_the_libvirt_drop_in_every_option_enabled_passes_verify(
    tmp_path: Path,
) -> None:
    drop_in = re.sub(r"(?m)^#(?=[A-Z][A-Za-z]+=)", "", DROP_IN.read_text())
    assert "DynamicUser=no" in drop_in and "LoadCredential=clientkey.pem" in drop_in
    verify(tmp_path, UNIT.read_text(), drop_in)


def test_a_mistake_in_the_unit_is_caught(tmp_path: Path) -> None:
    broken = UNIT.read_text().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomes=yes")
    with pytest.raises(AssertionError, match="ProtectHomes"):
        verify(tmp_path, broken)


def test_the_unit_is_a_watched_notify_service_with_state_config_and_hardening() -> None:
    found = settings(UNIT.read_text())
    one = {key: values[-1] for key, values in found.items()}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert int(one["WatchdogSec"]) >= 10
    assert one["ExecStart"].startswith(INSTALLED_BINARY + " serve")
    assert "--config /etc/lmwatch/lmwatch.yaml" in one["ExecStart"]
    assert one["DynamicUser"] == "yes"
    assert one["StateDirectory"] == "lmwatch"
    assert one["ConfigurationDirectory"] == "lmwatch"
    assert "LMWATCH_STORE_PATH=/var/lib/lmwatch/lmwatch.db" in found["Environment"]
    assert "LMWATCH_TOKEN_FILE=%d/token" in found["Environment"]
    assert one["RestartPreventExitStatus"] == "2"  # daemon.EXIT_STARTUP
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "PrivateDevices": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "CapabilityBoundingSet": "",
    }.items():
        assert one[key] == value, key


def test_the_example_config_loads_with_what_the_unit_sets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmwatch.config import load_settings

    token = tmp_path / "token"
    token.write_text("secret\n")
    monkeypatch.setenv("LMWATCH_STORE_PATH", str(tmp_path / "lmwatch.db"))
    monkeypatch.setenv("LMWATCH_TOKEN_FILE", str(token))
    loaded = load_settings(DEPLOY / "lmwatch.yaml")
    assert loaded.token_file == token
    assert loaded.port == 8787
