"""The neutral vocabulary is a contract: hypervisor words stay inside the libvirt driver."""

from __future__ import annotations

from pathlib import Path

from neutral import HYPERVISOR_WORDS

from lmwatch.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = HYPERVISOR_WORDS


def _hits(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if FORBIDDEN.search(line)]


def test_package_outside_the_libvirt_driver_is_neutral() -> None:
    offenders: dict[str, list[str]] = {}
    for path in sorted((ROOT / "lmwatch").rglob("*")):
        if path.is_dir() or path.suffix not in (".py", ".yaml", ".json", ".html"):
            continue
        if path.parent.name == "drivers" and path.name.startswith("libvirt"):
            continue
        if path.parent.name == "bench" and path.name == "baselines.py":
            continue  # re-implementations of other systems describe them in their words
        hits = _hits(path.read_text())
        if hits:
            offenders[str(path.relative_to(ROOT))] = hits
    assert offenders == {}


def test_bench_output_names_baselines_neutrally() -> None:
    """The baselines' names reach the CLI's table: they stay neutral too."""
    from lmwatch.bench.baselines import BASELINES

    assert [name for name in BASELINES if FORBIDDEN.search(name)] == []


def test_example_profiles_are_neutral() -> None:
    assert _hits((ROOT / "profiles.yaml").read_text()) == []


def test_metric_names_and_help_are_neutral() -> None:
    metrics = Metrics()
    for family in metrics.registry.collect():
        assert family.name.startswith("lmwatch_")
        assert not FORBIDDEN.search(family.name), family.name
        assert not FORBIDDEN.search(family.documentation), family.documentation


def test_the_forbidden_pattern_catches_each_word() -> None:
    for word in ("post-copy", "postcopy", "Suspend", "downtime", "auto-converge", "QEMU"):
        assert FORBIDDEN.search(word), word
