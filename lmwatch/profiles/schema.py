"""The availability profile: what an instance tolerates, in its users' terms.

Values are written the way people write them (`300ms`, `2s`, `5m`, `1GiB`,
`90s per GiB`) and stored in base units (seconds, bytes).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from lmwatch.units import parse_duration, parse_per_gib

Seconds = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]
SecondsPerGiB = Annotated[float, BeforeValidator(parse_per_gib), Field(gt=0)]


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
            text = str(value)
            if "per" in text:
                return {"per_gib": text}
            return {"fixed": value}
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> Deadline:
        if (self.fixed is None) == (self.per_gib is None):
            raise ValueError("a deadline is either a duration or {per_gib: ...}, not both")
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
    name: str = Field(min_length=1)
    description: str = ""
    match: Match = Field(default_factory=Match)
    max_blackout: Seconds = 0.5
    may_slow_down: bool = False
    handover: HandoverPolicy = HandoverPolicy.FORBIDDEN
    max_degraded: Seconds = 30.0
    may_pause: bool = False
    max_pause: Seconds = 0.0
    deadline: Deadline | None = None
    on_deadline: OnDeadline = OnDeadline.CANCEL

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
        seen: set[str] = set()
        for profile in self.profiles:
            if profile.name in seen:
                raise ValueError(f"profile name {profile.name!r} is used twice")
            seen.add(profile.name)
        return self

    def by_name(self, name: str) -> Profile | None:
        return next((p for p in self.profiles if p.name == name), None)
