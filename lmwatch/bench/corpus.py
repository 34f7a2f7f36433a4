"""The benchmark's workloads: what each simulated migration moves, and over what link.

A corpus file is YAML, written with the units people write (the same as the
simulator's inventory; the change-rate patterns are the inventory's own):

```yaml
workloads:
  - name: db-large
    memory: 64GiB            # guest memory
    working_set: 8GiB        # memory the guest keeps rewriting (default: all of it)
    writer: random           # sequential (default) | random: how it spreads its writes
    change_rate: {pattern: bursty, base: 100MiB/s, peak: 2GiB/s, period: 30s, duty: 0.2}
    bandwidth: 10Gbit/s      # nominal link between the two hosts
    switchover: 50ms         # final-stop cost of this host pair (device state, resume)
    link_events:             # optional, in time order
      - {at: 90s, kind: bandwidth, value: 0.4}   # the link drops to 40 % of nominal
      - {at: 200s, kind: break}                  # the link breaks...
      - {at: 215s, kind: restore}                # ...and comes back
```

`change_rate` is a number or text (`500MiB/s`) for a constant rate, or one of the
inventory's patterns: `constant`, `bursty`, `phased`, `growing`.

`generate(seed, count)` draws a corpus; each workload comes from its own
`random.Random` seeded from (seed, index), so a corpus of 60 is the first 60 of a
corpus of 320 with the same seed. docs/benchmark.md describes the distributions.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmwatch.drivers.inventory import Instance, RatePattern
from lmwatch.units import parse_duration, parse_rate, parse_size

GIB = 1024**3
MIB = 1024**2
GBIT = 125e6  # bytes/s in 1 Gbit/s

WriterName = Literal["sequential", "random"]
CountingName = Literal["union", "after-send"]
EventKind = Literal["bandwidth", "break", "restore"]
SHAPES = ("constant", "bursty", "phased", "growing")
WRITERS: tuple[WriterName, WriterName] = ("sequential", "random")

DEV_SEEDS = (1, 2, 3)
REPORT_SEED = 20261202
MAX_FIRST_PASS = 900.0  # seconds: the generator keeps one full copy of memory below this
MAX_JITTER = 0.5  # the largest share a workload's working set may move by a pass
MAX_WRITE_RATE = 32.0 * GIB  # bytes/s: the generator's typical change rate stays below this


class CorpusError(ValueError):
    """A corpus file that cannot be read or does not describe usable workloads."""


class LinkEvent(NamedTuple):
    """Something that happens to the link `at` seconds after the run began (the job
    begins then, or once lmwatch's measurement before the start is over).

    `bandwidth`: the link now carries `value` × its nominal bandwidth (a drop);
    `break`: the link stops carrying anything; `restore`: it carries again.
    """

    at: float
    kind: EventKind
    value: float | None = None


@dataclass(frozen=True, slots=True)
class Workload:
    """One migration to run: the guest, its writing, and the link. Base units."""

    name: str
    memory: int  # bytes
    working_set: int  # bytes the guest keeps rewriting
    writer: WriterName
    change_rate: RatePattern  # the inventory's pattern model (parsed)
    bandwidth: float  # bytes/s, nominal
    switchover: float  # seconds of final-stop cost for this host pair
    link_events: tuple[LinkEvent, ...] = ()
    # the host's own writing: each pass's working set moves by up to ± this share of it
    # (`simphysics.jittered`), and each transfer-rate reading as much
    # (`simphysics.read_rate`); 0 in generated corpora, `lmwatch bench --jitter` sets it
    jitter: float = 0.0
    # which pages the hypervisor counts at a pass's end besides the unsent rest
    # (`simphysics.Counting`): "union", every page written since the pass began (the
    # default, as the rig counts); "after-send", only those written after they were sent
    # (as hosts that clear the guest's dirty log just before sending it count)
    counting: CountingName = "union"

    @property
    def first_pass(self) -> float:
        """Seconds one full copy of memory takes at the nominal bandwidth."""
        return self.memory / self.bandwidth


# -- the file format ------------------------------------------------------------------------


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _EventSpec(_Frozen):
    at: float = Field(ge=0)
    kind: EventKind
    value: float | None = None

    @field_validator("at", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)

    def event(self) -> LinkEvent:
        if self.kind == "bandwidth":
            if self.value is None or not 0 <= self.value <= 1:
                raise ValueError("a bandwidth event needs a value between 0 and 1 (of nominal)")
        elif self.value is not None:
            raise ValueError(f"a {self.kind} event takes no value")
        return LinkEvent(self.at, self.kind, self.value)


class _WorkloadSpec(_Frozen):
    name: str = Field(min_length=1)
    memory: Any
    working_set: Any = None
    writer: Any = None
    change_rate: Any = 0
    bandwidth: float = Field(gt=0)
    switchover: float = Field(default=0.05, ge=0)
    link_events: tuple[_EventSpec, ...] = ()
    jitter: float = Field(default=0.0, ge=0, le=MAX_JITTER)
    counting: CountingName = "union"

    @field_validator("bandwidth", mode="before")
    @classmethod
    def _rate(cls, value: Any) -> float:
        return parse_rate(value)

    @field_validator("switchover", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)


class _CorpusSpec(_Frozen):
    workloads: tuple[_WorkloadSpec, ...] = Field(min_length=1)
    seed: int | None = None  # informational: the generator's seed, when generated
    description: str = ""


def _where(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _problems(error: ValidationError, prefix: Sequence[int | str] = ()) -> list[str]:
    problems = []
    for detail in error.errors():
        where = _where((*prefix, *detail["loc"]))
        message = detail["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return problems


def workload_from_mapping(data: Mapping[str, Any], *, where: str = "") -> Workload:
    """One workload from its file form (a mapping with units); raises CorpusError."""
    prefix: tuple[int | str, ...] = (where,) if where else ()
    try:
        spec = _WorkloadSpec.model_validate(dict(data))
    except ValidationError as error:
        raise CorpusError("; ".join(_problems(error, prefix))) from None
    try:
        # Memory, working set and change rate go through the inventory's own model,
        # so a workload is written exactly like a simulated instance.
        instance = Instance.model_validate(
            {
                "name": spec.name,
                "host": "source",
                "memory": spec.memory,
                "working_set": spec.working_set,
                "change_rate": spec.change_rate,
                **({"writer": spec.writer} if spec.writer is not None else {}),
            }
        )
    except ValidationError as error:
        raise CorpusError("; ".join(_problems(error, prefix))) from None
    events: list[LinkEvent] = []
    for index, event in enumerate(spec.link_events):
        try:
            events.append(event.event())
        except ValueError as error:
            raise CorpusError(f"{_where((*prefix, 'link_events', index))}: {error}") from None
    if any(later.at < earlier.at for earlier, later in itertools.pairwise(events)):
        raise CorpusError(f"{_where((*prefix, 'link_events'))}: events must be in time order")
    return Workload(
        name=spec.name,
        memory=instance.memory,
        working_set=instance.working_set,
        writer=instance.writer,
        change_rate=instance.change_rate,
        bandwidth=spec.bandwidth,
        switchover=spec.switchover,
        link_events=tuple(events),
        jitter=spec.jitter,
        counting=spec.counting,
    )


def load_corpus_text(text: str, *, source: str = "<corpus>") -> list[Workload]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise CorpusError(f"{source}: not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise CorpusError(f"{source}: expected a mapping with a 'workloads:' list")
    raw = data.get("workloads")
    if raw == [] or raw is None:
        raise CorpusError(f"{source}: no workloads: 'workloads:' needs at least one")
    try:
        _CorpusSpec.model_validate(
            {**data, "workloads": [_skeleton(item) for item in raw or []] or raw}
        )
    except ValidationError as error:
        raise CorpusError(f"{source}: " + "; ".join(_problems(error))) from None
    assert isinstance(raw, list)
    workloads = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise CorpusError(f"{source}: workloads[{index}]: expected a mapping")
        try:
            workloads.append(workload_from_mapping(item, where=f"workloads[{index}]"))
        except CorpusError as error:
            raise CorpusError(f"{source}: {error}") from None
    names = [w.name for w in workloads]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CorpusError(f"{source}: workload names used twice: {', '.join(duplicates)}")
    return workloads


def _skeleton(item: Any) -> Any:
    """A stand-in that passes the file-level check (workloads are checked one by one)."""
    if isinstance(item, dict):
        return {"name": "x", "memory": 1, "bandwidth": 1}
    return item


def load_corpus(path: str | Path) -> list[Workload]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise CorpusError(f"{path}: cannot read: {error.strerror or error}") from None
    return load_corpus_text(text, source=str(path))


# -- writing --------------------------------------------------------------------------------

_SIZE_UNITS = (("TiB", 1024**4), ("GiB", GIB), ("MiB", MIB), ("KiB", 1024))
_RATE_FIELDS = frozenset({"rate", "base", "peak", "start", "per_minute", "max"})
_DURATION_FIELDS = frozenset({"period", "duration"})


def _number(value: float) -> str:
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return text or "0"


def format_size_exact(size: int) -> str:
    """`64GiB`, `1536MiB`...: the largest unit that writes the size exactly."""
    for unit, scale in _SIZE_UNITS:
        if size and size % scale == 0:
            return f"{size // scale}{unit}"
        text = f"{_number(size / scale)}{unit}"
        if size >= scale and parse_size(text) == size and len(text) <= 12:
            return text
    return str(size)


def format_rate_exact(rate: float) -> str | float:
    """`10Gbit/s`, `500MiB/s`...: a text that parses back to exactly `rate`, else the number."""
    candidates = [f"{_number(rate * 8 / 1e9)}Gbit/s"]
    candidates += [f"{_number(rate / scale)}{unit}/s" for unit, scale in _SIZE_UNITS]
    usable = [text for text in candidates if parse_rate(text) == rate and float(rate) != 0]
    if usable:
        return min(usable, key=len)
    return int(rate) if float(rate).is_integer() else rate


def format_duration_exact(seconds: float) -> str | float:
    candidates = [f"{_number(seconds)}s", f"{_number(seconds * 1000)}ms"]
    if seconds >= 60:
        candidates.append(f"{_number(seconds / 60)}m")
    usable = [text for text in candidates if parse_duration(text) == seconds]
    return min(usable, key=len) if usable else seconds


def _pattern_data(value: Any, field: str = "") -> Any:
    if isinstance(value, BaseModel):
        value = value.model_dump()
    if isinstance(value, dict):
        return {key: _pattern_data(item, key) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_pattern_data(item, field) for item in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        if field in _RATE_FIELDS:
            return format_rate_exact(float(value))
        if field in _DURATION_FIELDS:
            return format_duration_exact(float(value))
    return value


def workload_to_mapping(workload: Workload) -> dict[str, Any]:
    """The file form of a workload (units written out; parses back to an equal workload)."""
    pattern = _pattern_data(workload.change_rate)
    if isinstance(pattern, dict) and pattern.get("pattern") == "constant":
        pattern = pattern.get("rate", 0)
    data: dict[str, Any] = {
        "name": workload.name,
        "memory": format_size_exact(workload.memory),
        "working_set": format_size_exact(workload.working_set),
        "writer": workload.writer,
        "change_rate": pattern,
        "bandwidth": format_rate_exact(workload.bandwidth),
        "switchover": format_duration_exact(workload.switchover),
    }
    if workload.link_events:
        events = []
        for event in workload.link_events:
            entry: dict[str, Any] = {"at": format_duration_exact(event.at), "kind": event.kind}
            if event.value is not None:
                entry["value"] = event.value
            events.append(entry)
        data["link_events"] = events
    if workload.jitter:
        data["jitter"] = workload.jitter
    if workload.counting != "union":
        data["counting"] = workload.counting
    return data


class _FlowDumper(yaml.SafeDumper):
    """Block style for the list of workloads, flow style inside each one's parts."""


def _represent_dict(dumper: yaml.SafeDumper, data: dict[str, Any]) -> yaml.Node:
    flow = "name" not in data and "workloads" not in data
    return dumper.represent_mapping("tag:yaml.org,2002:map", data.items(), flow_style=flow)


_FlowDumper.add_representer(dict, _represent_dict)


def dump_corpus(
    workloads: Iterable[Workload],
    path: str | Path | None = None,
    *,
    seed: int | None = None,
    description: str = "",
) -> str:
    """The corpus as YAML text (also written to `path` when given)."""
    document: dict[str, Any] = {}
    if description:
        document["description"] = description
    if seed is not None:
        document["seed"] = seed
    document["workloads"] = [workload_to_mapping(w) for w in workloads]
    text = yaml.dump(
        document, Dumper=_FlowDumper, sort_keys=False, default_flow_style=False, width=200
    )
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


# -- the generator ----------------------------------------------------------------------------


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _sig(value: float, digits: int = 3) -> float:
    """`value` rounded to `digits` significant digits."""
    return float(f"{value:.{digits}g}")


def _rate(value: float) -> float:
    """A change rate as a corpus file writes it: 3 significant digits of MiB/s, whole bytes."""
    return float(parse_rate(f"{_number(_sig(value / MIB))}MiB/s"))


def _seconds(value: float) -> float:
    return parse_duration(f"{_number(round(value))}s")


def _instant(value: float) -> float:
    """A moment as a corpus file writes it: milliseconds."""
    return parse_duration(f"{_number(round(value, 3))}s")


def _change_rate(rng: random.Random, shape: str, level: float) -> Any:
    """A pattern whose typical rate is about `level` bytes/s."""
    if shape == "constant":
        return _rate(level)
    if shape == "bursty":
        duty = round(rng.uniform(0.1, 0.5), 2)
        ratio = _log_uniform(rng, 3.0, 30.0)  # peak / base
        base = level / (duty * ratio + 1.0 - duty)
        return {
            "pattern": "bursty",
            "base": _rate(base),
            "peak": _rate(base * ratio),
            "period": _seconds(rng.uniform(10.0, 120.0)),
            "duty": duty,
        }
    if shape == "phased":
        phases = [
            {
                "rate": _rate(level * _log_uniform(rng, 1 / 8, 8.0)),
                "duration": _seconds(rng.uniform(20.0, 300.0)),
            }
            for _ in range(rng.randint(2, 4))
        ]
        return {"pattern": "phased", "phases": phases, "repeat": True}
    if shape == "growing":
        start = level * rng.uniform(0.05, 0.5)
        top = level * rng.uniform(1.0, 3.0)
        minutes = rng.uniform(1.0, 20.0)
        return {
            "pattern": "growing",
            "start": _rate(start),
            "per_minute": _rate((top - start) / minutes),
            "max": _rate(top),
        }
    raise ValueError(f"unknown shape {shape!r}")


def draw(seed: int, index: int) -> Workload:
    """Workload number `index` of the corpus with this seed (see docs/benchmark.md)."""
    rng = random.Random(f"lmwatch-bench:{seed}:{index}")
    shape = SHAPES[index % len(SHAPES)]
    writer = WRITERS[(index // len(SHAPES)) % len(WRITERS)]
    memory = max(1, round(_log_uniform(rng, 1.0, 512.0) * 4)) * GIB // 4  # quarter GiB
    working_set = max(16, round(memory * _log_uniform(rng, 0.01, 1.0) / MIB)) * MIB
    working_set = min(working_set, memory)
    gbits = _log_uniform(rng, 1.0, 100.0)
    if memory / (gbits * GBIT) > MAX_FIRST_PASS:  # one full copy must fit in 15 minutes
        gbits = _log_uniform(rng, memory / MAX_FIRST_PASS / GBIT, 100.0)
    bandwidth = parse_rate(f"{_number(_sig(gbits))}Gbit/s")
    # The change rate relative to the link, no faster than a guest can write memory.
    level = min(bandwidth * _log_uniform(rng, 0.5, 50.0), MAX_WRITE_RATE)
    pattern = _change_rate(rng, shape, level)
    switchover = parse_duration(f"{round(_log_uniform(rng, 10.0, 300.0))}ms")
    first_pass = memory / bandwidth
    events = _link_events(rng, first_pass, ORDINARY_LINKS)
    return workload_from_mapping(
        {
            "name": f"s{seed}-{index:04d}",
            "memory": memory,
            "working_set": working_set,
            "writer": writer,
            "change_rate": pattern,
            "bandwidth": bandwidth,
            "switchover": switchover,
            "link_events": events,
        }
    )


@dataclass(frozen=True, slots=True)
class LinkTrouble:
    """How often and how a workload's link drops or breaks (docs/benchmark.md).

    Times are shares of one full copy of memory at the nominal bandwidth, in
    milliseconds; one earlier than `earliest` is drawn again between `earliest` and
    twice that; a drop leaves `drop_to` of nominal; a broken link
    comes back after `restore_after` seconds, or never."""

    drop_chance: float
    drop_at: tuple[float, float]
    drop_to: tuple[float, float]
    recover_chance: float  # a drop ends (back to nominal) after `recover_after`
    recover_after: tuple[float, float]
    break_chance: float
    break_at: tuple[float, float]
    restore_chance: float
    restore_after: tuple[float, float]
    earliest: float


# What the generator draws: a drop in about one workload of seven, a break in one of twenty.
ORDINARY_LINKS = LinkTrouble(
    drop_chance=0.15,
    drop_at=(0.2, 2.0),
    drop_to=(0.2, 0.7),
    recover_chance=0.0,
    recover_after=(0.0, 0.0),
    break_chance=0.05,
    break_at=(0.2, 2.0),
    restore_chance=0.7,
    restore_after=(5.0, 60.0),
    earliest=1.0,
)
# `--links harsh`: twice as many drops, deeper, sooner or later, half of them ending;
# twice as many breaks, from the first seconds on. A check that lmwatch was not fitted
# to the generator's own faults.
HARSH_LINKS = LinkTrouble(
    drop_chance=0.3,
    drop_at=(0.05, 3.0),
    drop_to=(0.1, 0.8),
    recover_chance=0.5,
    recover_after=(1.0, 120.0),
    break_chance=0.1,
    break_at=(0.05, 3.0),
    restore_chance=0.6,
    restore_after=(2.0, 90.0),
    earliest=1.0,
)
LINKS = {"ordinary": ORDINARY_LINKS, "harsh": HARSH_LINKS}


def _link_events(
    rng: random.Random, first_pass: float, trouble: LinkTrouble
) -> list[dict[str, Any]]:
    """The link events of one workload whose full copy takes `first_pass` seconds."""

    def when(share: tuple[float, float]) -> float:
        # Anywhere in a second, as a real fault strikes: whole seconds lined every
        # fault up with the controllers' one-second polls, and the short migrations'
        # faults all on `earliest`.
        at = first_pass * rng.uniform(*share)
        if at < trouble.earliest:
            at = trouble.earliest * (1.0 + rng.random())
        return _instant(at)

    events: list[dict[str, Any]] = []
    if rng.random() < trouble.drop_chance:
        at = when(trouble.drop_at)
        events.append(
            {"at": at, "kind": "bandwidth", "value": round(rng.uniform(*trouble.drop_to), 2)}
        )
        # No draw at all when drops never end: the generator's corpora keep their events.
        if trouble.recover_chance and rng.random() < trouble.recover_chance:
            back = _instant(at + rng.uniform(*trouble.recover_after))
            events.append({"at": back, "kind": "bandwidth", "value": 1.0})
    if rng.random() < trouble.break_chance:
        at = when(trouble.break_at)
        events.append({"at": at, "kind": "break"})
        if rng.random() < trouble.restore_chance:
            events.append(
                {"at": _instant(at + rng.uniform(*trouble.restore_after)), "kind": "restore"}
            )
    events.sort(key=lambda event: cast(float, event["at"]))
    return events


def with_links(workloads: Iterable[Workload], trouble: LinkTrouble) -> list[Workload]:
    """`workloads` with their link events drawn anew from `trouble`, each from its own
    name (so a workload's faults do not depend on which others are in the corpus)."""
    redrawn = []
    for workload in workloads:
        rng = random.Random(f"lmwatch-bench-links:{workload.name}")
        events = _link_events(rng, workload.memory / workload.bandwidth, trouble)
        data = {**workload_to_mapping(workload), "link_events": events}
        redrawn.append(workload_from_mapping(data))
    return redrawn


def generate(seed: int, count: int) -> list[Workload]:
    """`count` workloads drawn deterministically from `seed`.

    Shapes take turns (constant, bursty, phased, growing) and writers alternate every
    four workloads, so every shape meets both writers in equal shares.
    """
    if count < 0:
        raise ValueError("count must not be negative")
    return [draw(seed, index) for index in range(count)]
