"""The availability profile: what an instance tolerates, in its users' terms.

Values are written the way people write them (`300ms`, `2s`, `5m`, `1GiB`,
`90s per GiB`) and stored in base units (seconds, bytes).
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from lmwatch.units import parse_duration, parse_per_gib

UNITS_REQUIRED = "units_required"
"""Validation-context key: when true, a duration must carry its unit (`300` is refused).

The profile loader sets it, so that `max_blackout: 300` in a file is an error rather
than a silent five-minute blackout budget; Python callers may still pass seconds.
"""

LOCATED_ERROR = "located"
"""Error type whose `ctx["at"]` extends the error's location (e.g. to point at the
second of two profiles with the same name, not at the whole file)."""

_BARE_NUMBER = re.compile(r"\s*\d+(?:\.\d+)?\s*")


def _unit_missing(value: Any, info: ValidationInfo) -> bool:
    if not (info.context or {}).get(UNITS_REQUIRED):
        return False
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return value != 0
    return isinstance(value, str) and bool(_BARE_NUMBER.fullmatch(value)) and float(value) != 0


def _duration(value: Any, info: ValidationInfo) -> float:
    if _unit_missing(value, info):
        raise ValueError(f"{value!r} has no unit (write e.g. {value}s or {value}ms)")
    return parse_duration(value)


def _per_gib(value: Any, info: ValidationInfo) -> float:
    if _unit_missing(value, info):
        raise ValueError(f"{value!r} has no unit (write e.g. {value}s per GiB)")
    return parse_per_gib(value)


Seconds = Annotated[float, BeforeValidator(_duration), Field(ge=0)]
"""A duration in seconds; written `300ms`, `2s`, `5m`, `1h30m`."""
SecondsPerGiB = Annotated[float, BeforeValidator(_per_gib), Field(gt=0)]
"""Seconds per GiB of instance memory; written `90s` (under `per_gib:`) or `90s per GiB`."""

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HandoverPolicy(StrEnum):
    ALLOWED = "allowed"
    FORBIDDEN = "forbidden"


class OnDeadline(StrEnum):
    COMPLETE = "complete"  # finish in the least disruptive way the profile allows
    CANCEL = "cancel"


class Match(_Frozen):
    """Which instances a profile is for. Empty match = fallback for everything."""

    names: tuple[str, ...] = ()  # shell-style globs on the instance name
    uuids: tuple[str, ...] = ()
    labels: dict[str, str] = Field(default_factory=dict)  # all must be equal


class Deadline(_Frozen):
    """How long a migration may take: fixed, or proportional with bounds."""

    fixed: Seconds | None = None
    per_gib: SecondsPerGiB | None = None
    min: Seconds | None = None
    max: Seconds | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_scalar(cls, value: Any) -> Any:
        if isinstance(value, int | float | str):
            text = str(value).lower()
            if "per" in text or "/" in text:
                return {"per_gib": text}
            return {"fixed": value}
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> Deadline:
        if (self.fixed is None) == (self.per_gib is None):
            raise ValueError("a deadline is either a duration or {per_gib: ...}, not both")
        if self.fixed is not None and (self.min is not None or self.max is not None):
            raise ValueError("min and max only bound a per_gib deadline, not a fixed one")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("deadline min is above its max")
        return self

    def seconds_for(self, memory_bytes: int) -> float:
        if self.fixed is not None:
            return self.fixed
        assert self.per_gib is not None
        value = self.per_gib * memory_bytes / 1024**3
        if self.min is not None:
            value = max(value, self.min)
        if self.max is not None:
            value = min(value, self.max)
        return value


class Profile(_Frozen):
    """What one class of instances tolerates while it migrates."""

    name: str = Field(min_length=1)  # letters, digits, `.`, `_`, `-`; starts alphanumeric
    description: str = ""
    match: Match = Field(default_factory=Match)
    max_blackout: Seconds = 0.5  # longest final pause acceptable, at any time
    may_slow_down: bool = False  # guest may be throttled while copying
    handover: HandoverPolicy = HandoverPolicy.FORBIDDEN  # resume on destination early
    max_degraded: Seconds = 30.0  # longest run on the destination while memory arrives
    may_pause: bool = False  # may be paused longer than max_blackout to finish
    max_pause: Seconds = 0.0  # longest such pause (at least max_blackout when may_pause)
    deadline: Deadline | None = None  # None: no deadline, decide from the rates alone
    on_deadline: OnDeadline = OnDeadline.CANCEL

    @field_validator("name")
    @classmethod
    def _name_shape(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a usable profile name "
                "(letters, digits, '.', '_' and '-', starting with a letter or digit)"
            )
        return value

    @property
    def handover_allowed(self) -> bool:
        return self.handover is HandoverPolicy.ALLOWED

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        if self.may_pause and self.max_pause < self.max_blackout:
            raise ValueError(
                f"max_pause ({self.max_pause:g}s) is below max_blackout "
                f"({self.max_blackout:g}s): a pause is never shorter than a blackout"
            )
        if not self.may_pause and self.max_pause > 0:
            raise ValueError("max_pause is set but may_pause is false")
        return self

    def deadline_seconds(self, memory_bytes: int) -> float | None:
        return None if self.deadline is None else self.deadline.seconds_for(memory_bytes)


class ProfileSet(_Frozen):
    """The whole profiles file."""

    version: Literal[1] = 1
    profiles: tuple[Profile, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> ProfileSet:
        first: dict[str, int] = {}
        for index, profile in enumerate(self.profiles):
            if profile.name in first:
                message = (
                    f"profile name {profile.name!r} is used twice "
                    f"(first by profiles[{first[profile.name]}])"
                )
                raise PydanticCustomError(
                    LOCATED_ERROR,
                    message,  # no braces: the template would substitute them
                    {"at": ("profiles", index, "name")},
                )
            first[profile.name] = index
        return self

    def by_name(self, name: str) -> Profile | None:
        return next((p for p in self.profiles if p.name == name), None)
