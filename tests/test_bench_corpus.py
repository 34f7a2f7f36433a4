"""The benchmark corpus: file format, round trip, and the seeded generator."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from lmwatch.bench.corpus import (
    GBIT,
    GIB,
    MAX_FIRST_PASS,
    MIB,
    CorpusError,
    LinkEvent,
    Workload,
    dump_corpus,
    generate,
    load_corpus,
    load_corpus_text,
)
from lmwatch.drivers.inventory import BurstyRate, ConstantRate, GrowingRate, PhasedRate

EXAMPLE = """
workloads:
  - name: db-large
    memory: 64GiB
    working_set: 8GiB
    writer: random
    change_rate: {pattern: bursty, base: 100MiB/s, peak: 2GiB/s, period: 30s, duty: 0.2}
    bandwidth: 10Gbit/s
    switchover: 50ms
    link_events:
      - {at: 90s, kind: bandwidth, value: 0.4}
      - {at: 200s, kind: break}
      - {at: 215s, kind: restore}
  - name: idle
    memory: 2GiB
    change_rate: 0
    bandwidth: 1GiB/s
  - name: phased
    memory: 16GiB
    working_set: 4GiB
    writer: sequential
    change_rate:
      pattern: phased
      phases: [{rate: 50MiB/s, duration: 2m}, {rate: 3GiB/s, duration: 30s}]
      repeat: true
    bandwidth: 25Gbit/s
    switchover: 120ms
  - name: growing
    memory: 8GiB
    change_rate: {pattern: growing, start: 10MiB/s, per_minute: 100MiB/s, max: 1GiB/s}
    bandwidth: 1Gbit/s
"""


def test_the_documented_format_loads_in_base_units() -> None:
    db, idle, phased, growing = load_corpus_text(EXAMPLE)
    assert db == Workload(
        name="db-large",
        memory=64 * GIB,
        working_set=8 * GIB,
        writer="random",
        change_rate=BurstyRate(
            pattern="bursty", base=100 * MIB, peak=2 * GIB, period=30.0, duty=0.2
        ),
        bandwidth=10 * GBIT,
        switchover=0.05,
        link_events=(
            LinkEvent(90.0, "bandwidth", 0.4),
            LinkEvent(200.0, "break"),
            LinkEvent(215.0, "restore"),
        ),
    )
    assert idle.working_set == idle.memory == 2 * GIB  # defaults like the inventory's
    assert idle.writer == "sequential"
    assert idle.change_rate == ConstantRate(rate=0.0)
    assert idle.switchover == 0.05
    assert idle.link_events == ()
    assert isinstance(phased.change_rate, PhasedRate)
    assert phased.change_rate.phases[0].duration == 120.0
    assert isinstance(growing.change_rate, GrowingRate)
    assert growing.first_pass == pytest.approx(8 * GIB / GBIT)


def test_jitter_is_read_written_and_absent_by_default() -> None:
    text = "workloads:\n  - {name: a, memory: 1GiB, bandwidth: 1GiB/s, jitter: 0.05}"
    (jittery,) = load_corpus_text(text)
    assert jittery.jitter == 0.05
    assert "jitter: 0.05" in dump_corpus([jittery])
    assert all(w.jitter == 0.0 for w in generate(7, 24))
    assert "jitter" not in dump_corpus(generate(7, 24))


def test_dump_and_load_round_trip(tmp_path: Path) -> None:
    workloads = load_corpus_text(EXAMPLE) + generate(7, 24)
    path = tmp_path / "corpus.yaml"
    text = dump_corpus(workloads, path, seed=7, description="test")
    assert load_corpus(path) == workloads
    assert "64GiB" in text and "10Gbit/s" in text and "50ms" in text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("workloads: []", "workloads"),
        ("[1, 2]", "expected a mapping"),
        ("workloads:\n  - {name: a, memory: lots, bandwidth: 1GiB/s}", "workloads[0].memory"),
        (
            "workloads:\n  - {name: a, memory: 1GiB, working_set: 2GiB, bandwidth: 1GiB/s}",
            "larger than memory",
        ),
        ("workloads:\n  - {name: a, memory: 1GiB}", "workloads[0].bandwidth"),
        (
            "workloads:\n  - {name: a, memory: 1GiB, bandwidth: 1GiB/s, writer: diagonal}",
            "workloads[0].writer",
        ),
        (
            "workloads:\n  - {name: a, memory: 1GiB, bandwidth: 1GiB/s,"
            " link_events: [{at: 5s, kind: bandwidth}]}",
            "workloads[0].link_events[0]",
        ),
        (
            "workloads:\n  - {name: a, memory: 1GiB, bandwidth: 1GiB/s,"
            " link_events: [{at: 5s, kind: break}, {at: 1s, kind: restore}]}",
            "time order",
        ),
        (
            "workloads:\n  - {name: a, memory: 1GiB, bandwidth: 1GiB/s}\n"
            "  - {name: a, memory: 1GiB, bandwidth: 1GiB/s}",
            "used twice",
        ),
        ("workloads:\n  - {name: a, memory: 1GiB, bandwidth: 1GiB/s, colour: red}", "colour"),
        ("workloads:\n  - {name: a, memory: 1GiB, bandwidth: 1GiB/s, jitter: 0.8}", "jitter"),
    ],
)
def test_bad_corpus_files_say_where(text: str, message: str) -> None:
    with pytest.raises(CorpusError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_corpus_text(text, source="c.yaml")


def test_unreadable_file() -> None:
    with pytest.raises(CorpusError, match="cannot read"):
        load_corpus("/nonexistent/corpus.yaml")


def test_generator_is_deterministic_and_prefix_stable() -> None:
    first = generate(1, 40)
    assert generate(1, 40) == first
    assert generate(1, 12) == first[:12]
    assert generate(2, 40) != first
    assert len({w.name for w in first}) == 40


def test_generator_covers_every_shape_writer_and_event_at_320() -> None:
    workloads = generate(20261202, 320)
    shapes = Counter(type(w.change_rate) for w in workloads)
    assert shapes == {ConstantRate: 80, BurstyRate: 80, PhasedRate: 80, GrowingRate: 80}
    # Every shape meets both writers equally.
    pairs = Counter((w.change_rate.pattern, w.writer) for w in workloads)
    assert set(pairs.values()) == {40}
    events = Counter(e.kind for w in workloads for e in w.link_events)
    assert events["bandwidth"] >= 25  # about 15 %
    assert events["break"] >= 6  # about 5 %
    assert 0 < events["restore"] < events["break"]  # some breaks are never restored
    for workload in workloads:
        assert GIB <= workload.memory <= 512 * GIB
        assert 0 < workload.working_set <= workload.memory
        assert GBIT <= workload.bandwidth <= 100 * GBIT
        assert 0.01 <= workload.switchover <= 0.3
        assert workload.first_pass <= MAX_FIRST_PASS * 1.01
        times = [e.at for e in workload.link_events]
        assert times == sorted(times)
    # Change rates span well below to well above the link.
    ratios = [
        w.change_rate.at(0.0) / w.bandwidth
        for w in workloads
        if w.change_rate.pattern == "constant"
    ]
    assert min(ratios) < 0.8 and max(ratios) > 10
