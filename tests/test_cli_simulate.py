"""`lmwatch simulate`: argument handling and output of a what-if run."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from neutral import HYPERVISOR_WORDS

from lmwatch import cli

PROFILES = """
profiles:
  - name: hand
    match: {labels: {tier: database}}
    max_blackout: 300ms
    handover: allowed
    max_degraded: 60s
    deadline: 20m
    on_deadline: complete
  - name: strict
    max_blackout: 300ms
    deadline: 1h
    on_deadline: cancel
"""

INVENTORY = """
hosts:
  - {name: left, memory: 64GiB}
  - {name: right, memory: 64GiB}
links:
  - {between: [left, right], bandwidth: 2GiB/s}
instances:
  - {name: web-7, host: left, memory: 2GiB, working_set: 64MiB, change_rate: 1MiB/s}
"""


async def _simulate(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await cli.run(["simulate", *argv], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def profiles(tmp_path: Path) -> Path:
    path = tmp_path / "profiles.yaml"
    path.write_text(PROFILES)
    return path


async def test_an_idle_instance_prints_outcome_timeline_and_timing(profiles: Path) -> None:
    code, out, err = await _simulate(
        "--memory", "4GiB", "--change-rate", "1MiB/s", "--working-set", "64MiB",
        "--bandwidth", "1GiB/s", "--profiles", str(profiles),
    )  # fmt: skip
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "instance-1: memory 4.0GiB, host-a -> host-b at 1.0GiB/s"
    assert lines[1].startswith("profile strict: ")
    assert lines[2].startswith("outcome  completed (converged)  total ")
    timeline = [line.strip() for line in lines if re.match(r"\s+\+\d+\.\ds ", line)]
    assert timeline[0].startswith("+0.0s state queued")
    assert timeline[-1].startswith("+") and "state completed" in timeline[-1]
    assert not any(
        re.search(r"decision (pause|handover|cancel|raise-blackout)", line) for line in timeline
    )
    assert re.fullmatch(r"simulated \d+\.\ds of migration in \d+\.\d\ds", lines[-1])


async def test_labels_select_the_profile_and_busy_instances_follow_it(profiles: Path) -> None:
    base = ("--memory", "64GiB", "--working-set", "8GiB", "--change-rate", "3GiB/s")
    base += ("--bandwidth", "8Gbit/s", "--profiles", str(profiles))
    code, out, _ = await _simulate(*base, "--labels", "tier=database")
    assert code == 0
    assert out.splitlines()[1].startswith("profile hand: ")
    assert "outcome  completed (handover)" in out
    assert re.search(r"\+\d+\.\ds decision handover: ", out)

    code, out, _ = await _simulate(*base)
    assert code == 0
    assert "outcome  cancelled (cancelled)" in out
    assert re.search(r"\+\d+\.\ds decision cancel: ", out)


async def test_json_output_parses(profiles: Path) -> None:
    code, out, _ = await _simulate(
        "--memory", "2GiB", "--change-rate", "5MiB/s", "--bandwidth", "1GiB/s",
        "--profiles", str(profiles), "--json",
    )  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert data["state"] == "completed"
    assert data["outcome"]["method"] == "converged"
    assert data["memory_bytes"] == 2 * 1024**3
    assert data["timeline"][0]["at"] == 0.0
    assert data["duration_seconds"] == pytest.approx(data["outcome"]["total_seconds"], abs=1.0)


async def test_folded_and_verbose_timelines(profiles: Path) -> None:
    args = ("--memory", "128GiB", "--change-rate", "1MiB/s", "--bandwidth", "1GiB/s")
    args += ("--profiles", str(profiles))
    _, folded, _ = await _simulate(*args)
    _, verbose, _ = await _simulate(*args, "--verbose")
    assert "more like it" in folded
    assert "more like it" not in verbose
    assert len(verbose.splitlines()) > len(folded.splitlines())


async def test_an_instance_from_an_inventory_file(tmp_path: Path, profiles: Path) -> None:
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(INVENTORY)
    code, out, err = await _simulate(
        "--inventory", str(inventory), "--instance", "web-7", "--profiles", str(profiles), "--json"
    )
    assert code == 0, err
    data = json.loads(out)
    assert (data["instance"], data["source"], data["destination"]) == ("web-7", "left", "right")
    assert data["outcome"]["method"] == "converged"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--change-rate", "1MiB/s", "--bandwidth", "1GiB/s"), "--memory and --bandwidth"),
        (("--memory", "1GiB", "--bandwidth", "1GiB/s"), "--change-rate is required"),
        (("--memory", "1GiB", "--bandwidth", "1GiB/s", "--pattern", "bursty"), "--peak"),
        (("--memory", "1GiB", "--bandwidth", "1GiB/s", "--pattern", "growing"), "--per-minute"),
        (("--inventory", "x.yaml"), "--inventory needs --instance"),
        (
            ("--memory", "1GiB", "--working-set", "2GiB", "--change-rate", "0",
             "--bandwidth", "1GiB/s"),
            "working_set",
        ),
        (
            ("--memory", "1GiB", "--change-rate", "0", "--bandwidth", "1GiB/s",
             "--profile", "nonesuch"),
            "no profile is named 'nonesuch'",
        ),
    ],
)  # fmt: skip
async def test_bad_input_exits_2_with_a_message(argv: tuple[str, ...], message: str) -> None:
    code, out, err = await _simulate(*argv)
    assert code == 2
    assert message in err
    assert out == ""


async def test_unparseable_sizes_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = await _simulate("--memory", "lots", "--change-rate", "0", "--bandwidth", "1GiB/s")
    assert code == 2
    assert "'lots' is not a size" in capsys.readouterr().err


async def test_simulate_output_is_neutral(profiles: Path) -> None:
    texts = []
    for extra in ((), ("--labels", "tier=database"), ("--json",)):
        code, out, err = await _simulate(
            "--memory", "16GiB", "--working-set", "4GiB", "--change-rate", "3GiB/s",
            "--bandwidth", "1GiB/s", "--profiles", str(profiles), "--verbose", *extra,
        )  # fmt: skip
        assert code == 0
        texts += [out, err]
    text = "\n".join(texts)
    assert "handover" in text and "cancel" in text
    assert HYPERVISOR_WORDS.search(text) is None


async def test_an_instance_of_the_built_in_inventory() -> None:
    code, out, err = await _simulate("--instance", "web-1", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert (data["instance"], data["source"]) == ("web-1", "host-a")
    assert data["outcome"]["method"] == "converged"


def test_main_runs_a_command_in_its_own_loop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "profiles.yaml"
    path.write_text(PROFILES)
    assert cli.main(["profiles", "check", str(path)]) == 0
    assert capsys.readouterr().out == "2 profiles OK: hand, strict\n"


def test_serve_hands_the_given_options_to_the_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmwatch import daemon

    seen: list[dict[str, object]] = []

    def fake_main(options: dict[str, object]) -> int:
        seen.append(dict(options))
        return 3

    monkeypatch.setattr(daemon, "main", fake_main)
    code = cli.main(["serve", "--port", "9999", "--profiles", "p.yaml", "--store", "s.db"])
    assert code == 3
    assert seen == [{"port": 9999, "profiles": "p.yaml", "store": "s.db"}]


async def test_a_what_if_with_a_local_disk_copies_it_first() -> None:
    code, out, err = await _simulate(
        "--memory", "2GiB", "--working-set", "64MiB", "--change-rate", "1MiB/s",
        "--bandwidth", "1GiB/s", "--disk", "20GiB", "--disk-writes", "10MiB/s",
    )  # fmt: skip
    assert code == 0, err
    assert "local disk 20.0GiB" in out
    assert "copying the disks first" in out
    _, plain, _ = await _simulate(
        "--memory", "2GiB", "--working-set", "64MiB", "--change-rate", "1MiB/s",
        "--bandwidth", "1GiB/s",
    )  # fmt: skip
    assert "copying the disks first" not in plain and "local disk" not in plain


async def test_the_built_in_instance_with_a_local_disk_migrates() -> None:
    code, out, err = await _simulate("--instance", "files-1", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["outcome"]["method"] == "converged"
    reasons = [entry.get("reason", "") for entry in data["timeline"]]
    assert any(r.startswith("copying the disks first") for r in reasons)
    assert data["duration_seconds"] > 15.0  # the 20 GiB disk first, then memory
