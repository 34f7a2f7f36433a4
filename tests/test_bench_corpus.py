"""The benchmark corpus: file format, round trip, and the seeded generator."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from lmwatch.bench.corpus import (
    GBIT,
    GIB,
    HARSH_LINKS,
    MAX_FIRST_PASS,
    MIB,
    ORDINARY_LINKS,
    CorpusError,
    LinkEvent,
    LinkTrouble,
    Workload,
    dump_corpus,
    generate,
    load_corpus,
    load_corpus_text,
    with_links,
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


def test_counting_is_read_written_and_the_union_by_default() -> None:
    text = "workloads:\n  - {name: a, memory: 1GiB, bandwidth: 1GiB/s, counting: after-send}"
    (after,) = load_corpus_text(text)
    assert after.counting == "after-send"
    assert "counting: after-send" in dump_corpus([after])
    assert all(w.counting == "union" for w in generate(7, 24))
    assert "counting" not in dump_corpus(generate(7, 24))


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
        ("workloads:\n  - {name: a, memory: 1GiB, bandwidth: 1GiB/s, counting: kvm}", "counting"),
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


def test_harsh_links_redraw_only_the_link_events_from_each_workloads_name() -> None:
    """`--links harsh`: each workload's drops and breaks drawn anew, as often as
    docs/benchmark.md says, from its own name; nothing else about it changes."""
    workloads = [replace(w, jitter=0.05) for w in generate(5, 2000)]
    harsh = with_links(workloads, HARSH_LINKS)
    for before, after in zip(workloads, harsh, strict=True):
        assert replace(after, link_events=before.link_events) == before
    assert with_links(workloads[7:9], HARSH_LINKS) == harsh[7:9]  # not from the corpus
    drops = [
        w for w in harsh if any(e.kind == "bandwidth" and e.value != 1.0 for e in w.link_events)
    ]
    breaks = [w for w in harsh if any(e.kind == "break" for e in w.link_events)]
    assert 0.27 < len(drops) / len(harsh) < 0.33
    assert 0.08 < len(breaks) / len(harsh) < 0.12
    ordinary = [w for w in workloads if any(e.kind == "break" for e in w.link_events)]
    assert len(breaks) > 1.6 * len(ordinary)  # the generator breaks one link in twenty
    for workload in harsh:
        times = [e.at for e in workload.link_events]
        assert times == sorted(times) and all(t >= 1.0 for t in times)
        kinds = [e.kind for e in workload.link_events if e.kind != "bandwidth"]
        assert kinds in ([], ["break"], ["break", "restore"])
        levels = [e.value for e in workload.link_events if e.kind == "bandwidth"]
        assert levels[1:] in ([], [1.0])  # a drop, then maybe back to nominal
        assert all(v is not None and 0.1 <= v <= 0.8 for v in levels[:1])
    # Unlike the generator's, some come within the first fifth of a full copy.
    assert any(e.at < 0.2 * w.memory / w.bandwidth - 1.0 for w in harsh for e in w.link_events)


def test_ordinary_links_keep_the_generators_shares() -> None:
    redrawn = with_links(generate(5, 2000), ORDINARY_LINKS)
    breaks = sum(any(e.kind == "break" for e in w.link_events) for w in redrawn)
    drops = sum(any(e.kind == "bandwidth" for e in w.link_events) for w in redrawn)
    # within three standard deviations of 5 % and 15 % over 2,000 draws
    assert 0.035 < breaks / 2000 < 0.065 and 0.125 < drops / 2000 < 0.175


@pytest.mark.parametrize("trouble", [ORDINARY_LINKS, HARSH_LINKS], ids=["ordinary", "harsh"])
def test_link_faults_strike_anywhere_in_a_second(trouble: LinkTrouble) -> None:
    """Faults at whole seconds struck at the instant every controller's one-second poll
    looked (which then saw each one before acting), and those of short migrations all
    at `earliest`: times are milliseconds, the early ones spread over a second."""
    events = [e.at for w in with_links(generate(5, 2000), trouble) for e in w.link_events]
    whole = sum(at == round(at) for at in events)
    assert whole < 0.01 * len(events), whole
    early = [at for at in events if at < 2 * trouble.earliest]
    assert len(early) > 20 and max(Counter(early).values()) <= 3
    assert all(at >= trouble.earliest for at in events)
