"""The simulator's inventory: hosts, the links between them, and the instances.

Written the way people write it (`256GiB`, `10Gbit/s`, `30s`) and stored in base
units (bytes, bytes/second, seconds). The same file format describes the daemon's
embedded default, the workloads `lmwatch simulate` replays, and test scenarios.
"""

from __future__ import annotations

import functools
import math
import uuid as uuidlib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from lmwatch.drivers.preflight import format_cpuset, parse_cpuset_strict
from lmwatch.units import parse_duration, parse_rate, parse_size

# Stable uuids for instances that do not name one: uuid5(this namespace, name).
UUID_NAMESPACE = uuidlib.UUID("6c6d7761-7463-4800-8000-73696d756c61")

Size = Annotated[int, BeforeValidator(parse_size), Field(ge=0)]
PositiveSize = Annotated[int, BeforeValidator(parse_size), Field(gt=0)]
Rate = Annotated[float, BeforeValidator(parse_rate), Field(ge=0)]
PositiveRate = Annotated[float, BeforeValidator(parse_rate), Field(gt=0)]
Duration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]


def _canonical_uuid(value: str) -> str:
    try:
        return str(uuidlib.UUID(value))
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a uuid") from exc


def _cpuset(value: Any) -> Any:
    """A set of host CPUs or memory nodes: "0-3,^2,8", a number, or a list of numbers."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a set of numbers like '0-3,^2,8'")
    if isinstance(value, int):
        value = str(value)
    if isinstance(value, str):
        return parse_cpuset_strict(value)
    return value


CpuSet = Annotated[frozenset[Annotated[int, Field(ge=0)]], BeforeValidator(_cpuset)]


class InventoryError(ValueError):
    """The inventory file cannot be read or does not describe a usable setup."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ConstantRate(_Frozen):
    """The guest rewrites memory at a steady rate."""

    pattern: Literal["constant"] = "constant"
    rate: Rate = 0.0

    def at(self, t: float) -> float:
        return self.rate

    def amount(self, t0: float, t1: float) -> float:
        """Bytes written between workload times t0 and t1."""
        return self.rate * max(0.0, t1 - t0)

    def next_change(self, t: float) -> float | None:
        """Workload time of the next change of rate after t; None if it never changes."""
        return None


class BurstyRate(_Frozen):
    """`peak` for the first `duty` fraction of every `period`, `base` the rest."""

    pattern: Literal["bursty"]
    base: Rate = 0.0
    peak: Rate
    period: Duration
    duty: float = Field(default=0.2, ge=0.0, le=1.0)

    def at(self, t: float) -> float:
        return self.peak if (t % self.period) < self.duty * self.period else self.base

    def _cumulative(self, t: float) -> float:
        cycles, within = divmod(max(0.0, t), self.period)
        burst = self.duty * self.period
        per_cycle = self.peak * burst + self.base * (self.period - burst)
        in_cycle = self.peak * min(within, burst) + self.base * max(0.0, within - burst)
        return cycles * per_cycle + in_cycle

    def amount(self, t0: float, t1: float) -> float:
        return max(0.0, self._cumulative(t1) - self._cumulative(t0))

    def next_change(self, t: float) -> float | None:
        if self.duty in (0.0, 1.0) or self.peak == self.base:
            return None
        start = math.floor(t / self.period) * self.period
        for edge in (start + self.duty * self.period, start + self.period):
            if edge > t + 1e-9:
                return edge
        return start + self.period + self.duty * self.period


class GrowingRate(_Frozen):
    """Starts at `start` and grows by `per_minute` every minute, up to `max`."""

    pattern: Literal["growing"]
    start: Rate = 0.0
    per_minute: Rate
    max: Rate | None = None

    def at(self, t: float) -> float:
        value = self.start + self.per_minute * max(0.0, t) / 60.0
        return value if self.max is None else min(self.max, value)

    def _cumulative(self, t: float) -> float:
        t = max(0.0, t)
        slope = self.per_minute / 60.0
        if self.max is not None and self.start >= self.max:
            return self.max * t
        if self.max is None or slope == 0:
            return self.start * t + slope * t * t / 2
        t_cap = (self.max - self.start) / slope
        if t <= t_cap:
            return self.start * t + slope * t * t / 2
        return self.start * t_cap + slope * t_cap * t_cap / 2 + self.max * (t - t_cap)

    def amount(self, t0: float, t1: float) -> float:
        return max(0.0, self._cumulative(t1) - self._cumulative(t0))

    def next_change(self, t: float) -> float | None:
        if self.per_minute == 0 or (self.max is not None and self.at(t) >= self.max):
            return None
        return t  # changes continuously: callers step in small increments


class Phase(_Frozen):
    """One phase of a phased workload: `rate` for `duration`."""

    rate: Rate
    duration: Duration


class PhasedRate(_Frozen):
    """Phases in turn; after the last one it starts over from the first, or (with
    `repeat: false`) stays at the last phase's rate for ever."""

    pattern: Literal["phased"]
    phases: tuple[Phase, ...] = Field(min_length=1)
    repeat: bool = True

    @functools.cached_property
    def _cycle(self) -> float:
        return sum(p.duration for p in self.phases)

    def _within(self, t: float) -> tuple[int, float]:
        """(completed cycles, time into the current cycle); cycles stay 0 without repeat."""
        t = max(0.0, t)
        if not self.repeat:
            return 0, t
        cycles, within = divmod(t, self._cycle)
        return int(cycles), within

    def at(self, t: float) -> float:
        _, within = self._within(t)
        for phase in self.phases:
            if within < phase.duration:
                return phase.rate
            within -= phase.duration
        return self.phases[-1].rate

    def _partial(self, within: float) -> float:
        """Bytes written from a cycle's start to `within` into it (past the end of
        the phases: the last phase's rate goes on)."""
        total = 0.0
        for phase in self.phases:
            if within <= phase.duration:
                return total + phase.rate * within
            total += phase.rate * phase.duration
            within -= phase.duration
        return total + self.phases[-1].rate * within

    def _cumulative(self, t: float) -> float:
        cycles, within = self._within(t)
        per_cycle = sum(p.rate * p.duration for p in self.phases)
        return cycles * per_cycle + self._partial(within)

    def amount(self, t0: float, t1: float) -> float:
        return max(0.0, self._cumulative(t1) - self._cumulative(t0))

    def next_change(self, t: float) -> float | None:
        rates = [p.rate for p in self.phases]
        if all(r == rates[0] for r in rates):
            return None
        edges: list[float] = []  # times into a cycle where the rate changes
        into = 0.0
        for before, after in zip(self.phases, self.phases[1:], strict=False):
            into += before.duration
            if after.rate != before.rate:
                edges.append(into)
        if self.repeat and self.phases[-1].rate != self.phases[0].rate:
            edges.append(self._cycle)
        if not self.repeat:
            return next((e for e in edges if e > t + 1e-9), None)
        if not edges:
            return None
        start = math.floor(max(0.0, t) / self._cycle) * self._cycle
        for edge in edges:
            if start + edge > t + 1e-9:
                return start + edge
        return start + self._cycle + edges[0]


RatePattern = Annotated[
    ConstantRate | BurstyRate | GrowingRate | PhasedRate, Field(discriminator="pattern")
]


def _rate_pattern(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value
    if isinstance(value, dict):
        return value if "pattern" in value else {"pattern": "constant", **value}
    return {"pattern": "constant", "rate": value}


class Definition(_Frozen):
    """An instance a host defines but does not run (another one, or a leftover)."""

    name: str = Field(min_length=1)
    uuid: Annotated[str, AfterValidator(_canonical_uuid)]


class Host(_Frozen):
    name: str = Field(min_length=1)
    memory: Size  # free memory for incoming instances
    handover: bool = True
    slow_down: bool = True
    # Host CPUs 0..cpus-1 and memory (NUMA) nodes 0..numa_nodes-1, for instances
    # pinned to some; None: not modelled, any pinning fits.
    cpus: int | None = Field(default=None, gt=0)
    numa_nodes: int | None = Field(default=None, gt=0)
    # Instances this host defines without running them; an incoming instance whose
    # name is defined here with another uuid (or uuid under another name) is refused.
    defined: tuple[Definition, ...] = ()
    # Local storage free for the disks of incoming instances; None: not modelled,
    # any disk fits.
    disk: Size | None = None

    @property
    def cpu_ids(self) -> frozenset[int] | None:
        return None if self.cpus is None else frozenset(range(self.cpus))

    @property
    def node_ids(self) -> frozenset[int] | None:
        return None if self.numa_nodes is None else frozenset(range(self.numa_nodes))


class Link(_Frozen):
    between: tuple[str, str]
    bandwidth: PositiveRate  # bytes/s, each direction
    # Seconds of switchover cost (stop, device state, resume) between these hosts;
    # None: the simulator's global default (Tuning.device_state).
    switchover: Duration | None = None


class Instance(_Frozen):
    name: str = Field(min_length=1)
    uuid: Annotated[str, AfterValidator(_canonical_uuid)]
    host: str
    memory: PositiveSize
    working_set: Size  # bytes the guest keeps rewriting (defaults to all of memory)
    change_rate: Annotated[RatePattern, BeforeValidator(_rate_pattern)] = ConstantRate()
    # How the guest spreads its writes over the working set: "sequential" dirties
    # distinct bytes as fast as it writes (up to the working set); "random" dirties
    # W·(1 - e^(-written/W)), so what the hypervisor reports saturates (DESIGN.md §4).
    writer: Literal["sequential", "random"] = "sequential"
    labels: dict[str, str] = Field(default_factory=dict)
    # Host CPUs and memory (NUMA) nodes the instance is pinned to ("0-3,^2,8");
    # empty: not pinned. A destination without them refuses the instance.
    pinned_cpus: CpuSet = frozenset()
    pinned_nodes: CpuSet = frozenset()
    # Bytes of disk local to its host, copied with it (0: its storage is shared), and
    # how fast the guest writes to it (blocks rewritten after their copy move again).
    disk: Size = 0
    disk_writes: Rate = 0.0
    # A real host's noise: each pass's working set, and each transfer-rate reading,
    # moves by up to ± this share (`simphysics.jittered`, `simphysics.read_rate`).
    jitter: float = Field(default=0.0, ge=0.0, le=0.5)

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, value: Any) -> Any:
        if isinstance(value, dict):
            value = dict(value)
            if value.get("uuid") is None and isinstance(value.get("name"), str):
                value["uuid"] = str(uuidlib.uuid5(UUID_NAMESPACE, value["name"]))
            if value.get("working_set") is None and "memory" in value:
                try:
                    value["working_set"] = parse_size(value["memory"])
                except ValueError:
                    value["working_set"] = 0  # the error about memory says it all
        return value

    @model_validator(mode="after")
    def _working_set_fits(self) -> Instance:
        if self.disk_writes and not self.disk:
            raise ValueError("disk_writes is given but the instance has no disk")
        if self.working_set > self.memory:
            raise ValueError(
                f"working_set ({self.working_set} bytes) is larger than memory "
                f"({self.memory} bytes)"
            )
        return self


class Inventory(_Frozen):
    hosts: tuple[Host, ...] = Field(min_length=1)
    links: tuple[Link, ...] = ()
    default_bandwidth: PositiveRate = 1024**3
    instances: tuple[Instance, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> Inventory:
        names = [h.name for h in self.hosts]
        _no_duplicates("host name", names)
        _no_duplicates("instance name", [i.name for i in self.instances])
        _no_duplicates("instance uuid", [i.uuid for i in self.instances])
        known = set(names)
        pairs: set[frozenset[str]] = set()
        for link in self.links:
            a, b = link.between
            for end in (a, b):
                if end not in known:
                    raise ValueError(f"link names unknown host {end!r}")
            if a == b:
                raise ValueError(f"link between {a!r} and itself")
            pair = frozenset((a, b))
            if pair in pairs:
                raise ValueError(f"link between {a!r} and {b!r} is listed twice")
            pairs.add(pair)
        by_name = {h.name: h for h in self.hosts}
        for instance in self.instances:
            if instance.host not in known:
                raise ValueError(
                    f"instance {instance.name!r} runs on unknown host {instance.host!r}"
                )
            host = by_name[instance.host]
            for what, pinned, has in (
                ("CPUs", instance.pinned_cpus, host.cpu_ids),
                ("memory nodes", instance.pinned_nodes, host.node_ids),
            ):
                if has is not None and pinned - has:
                    raise ValueError(
                        f"instance {instance.name!r} is pinned to {what} "
                        f"{format_cpuset(pinned - has)} that its host {host.name!r} lacks"
                    )
        return self

    # Indexes built on first use (the model is frozen): a lookup costs the same
    # with three hosts or thousands (the simulator asks on every poll).
    @functools.cached_property
    def _hosts_by_name(self) -> dict[str, Host]:
        return {h.name: h for h in self.hosts}

    @functools.cached_property
    def _instances_by_key(self) -> dict[str, Instance]:
        index: dict[str, Instance] = {}
        for instance in reversed(self.instances):  # the first one listed wins
            index[instance.uuid] = instance
            index[instance.name] = instance
        return index

    @functools.cached_property
    def _links_by_pair(self) -> dict[frozenset[str], Link]:
        return {frozenset(link.between): link for link in self.links}

    def host(self, name: str) -> Host | None:
        return self._hosts_by_name.get(name)

    def instance(self, name_or_uuid: str) -> Instance | None:
        return self._instances_by_key.get(name_or_uuid)

    def link(self, a: str, b: str) -> Link | None:
        """The link listed between two hosts (links are symmetric), if any."""
        return self._links_by_pair.get(frozenset((a, b)))

    def bandwidth(self, a: str, b: str) -> float:
        """Bytes/s between two hosts (links are symmetric)."""
        link = self.link(a, b)
        return self.default_bandwidth if link is None else link.bandwidth

    def switchover(self, a: str, b: str) -> float | None:
        """Seconds of switchover cost between two hosts; None when not given."""
        link = self.link(a, b)
        return None if link is None else link.switchover


def _no_duplicates(what: str, values: list[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{what} {value!r} is used twice")
        seen.add(value)


def _location(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_inventory_text(text: str, *, source: str = "<inventory>") -> Inventory:
    """Parse and validate an inventory; raises InventoryError with a readable message."""
    try:
        # libyaml when there is one: a 2,000-instance inventory parses in a tenth of
        # the time (it is read at every start).
        data = yaml.load(text, Loader=_LOADER)
    except yaml.YAMLError as exc:
        raise InventoryError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise InventoryError(f"{source}: expected a mapping with hosts, links and instances")
    try:
        return Inventory.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = _location(tuple(error["loc"]))
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{where}: {message}" if where else message)
        raise InventoryError(f"{source}: " + "; ".join(problems)) from exc


def load_inventory(path: str | Path) -> Inventory:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InventoryError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return load_inventory_text(text, source=str(path))


def default_inventory() -> Inventory:
    """The small inventory embedded in the package (lmwatch/data/inventory.yaml)."""
    text = resources.files("lmwatch").joinpath("data/inventory.yaml").read_text(encoding="utf-8")
    return load_inventory_text(text, source="lmwatch/data/inventory.yaml")
