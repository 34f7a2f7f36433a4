"""Which profile applies to an instance, and why — deterministic and explainable.

Order: an explicitly requested profile, then a uuid match, then a label match
(more matching labels first), then a name pattern (more literal characters first),
then the fallback (empty match). Profiles still equal after that: first in file.
A match listing several kinds (names and labels, say) must satisfy all of them.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

from lmwatch.profiles.schema import Profile, ProfileSet

_GLOB_SPECIAL = re.compile(r"\[[^\]]*\]|[*?]")


@dataclass(frozen=True, slots=True)
class Selection:
    """The profile chosen, a sentence saying why, and every profile's verdict."""

    profile: Profile
    reason: str
    candidates: list[tuple[str, str]]  # (profile name, why it matched or not), file order


class SelectionError(LookupError):
    """No profile can be chosen; `candidates` says why each one was not."""

    def __init__(self, message: str, candidates: list[tuple[str, str]]) -> None:
        super().__init__(message)
        self.message = message
        self.candidates = candidates

    def __str__(self) -> str:
        return self.message


class UnknownProfile(SelectionError):
    """The request names a profile that the loaded set does not have."""

    def __init__(self, name: str, known: list[str]) -> None:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        listed = ", ".join(repr(k) for k in known)
        super().__init__(f"no profile is named {name!r} (loaded: {listed}){hint}", [])
        self.name = name
        self.known = known


class NoProfile(SelectionError):
    """Nothing matches the instance and the set has no fallback profile."""


def literal_characters(pattern: str) -> int:
    """How specific a name pattern is: its characters that are not wildcards."""
    return len(_GLOB_SPECIAL.sub("", pattern))


@dataclass(frozen=True, slots=True)
class _Verdict:
    index: int
    profile: Profile
    matched: bool
    what: str  # "matches label tier=database" or why not
    uuid: bool = False
    labels: int = 0
    names: bool = False
    literal: int = 0

    @property
    def rank(self) -> tuple[int, int, int, int]:
        return (int(self.uuid), self.labels, int(self.names), self.literal)


def select_profile(
    profiles: ProfileSet,
    *,
    instance: str,
    uuid: str | None,
    labels: Mapping[str, str],
    requested: str | None = None,
) -> Selection:
    """Choose the profile for an instance; raise `UnknownProfile` or `NoProfile`."""
    if requested is not None:
        return _requested(profiles, requested)
    verdicts = [
        _judge(index, profile, instance, uuid, labels)
        for index, profile in enumerate(profiles.profiles)
    ]
    matching = sorted(
        (v for v in verdicts if v.matched),
        key=lambda v: (tuple(-part for part in v.rank), v.index),
    )
    if not matching:
        candidates = [(v.profile.name, f"no match: {v.what}") for v in verdicts]
        raise NoProfile(
            f"no profile matches instance {instance!r} ({_describe(uuid, labels)}) and no "
            "profile has an empty match to serve as the fallback; add a fallback profile "
            "or name a profile in the request",
            candidates,
        )
    winner = matching[0]
    runner_up = matching[1] if len(matching) > 1 else None
    candidates = []
    for v in verdicts:
        if v is winner:
            candidates.append((v.profile.name, f"selected: {v.what}"))
        elif v.matched:
            candidates.append((v.profile.name, f"{v.what}, outranked by {winner.profile.name!r}"))
        else:
            candidates.append((v.profile.name, f"no match: {v.what}"))
    return Selection(
        profile=winner.profile,
        reason=f"profile {winner.profile.name!r} {winner.what} ({_why(winner, runner_up)})",
        candidates=candidates,
    )


def _requested(profiles: ProfileSet, requested: str) -> Selection:
    profile = profiles.by_name(requested)
    if profile is None:
        raise UnknownProfile(requested, [p.name for p in profiles.profiles])
    candidates = [
        (p.name, "requested" if p is profile else f"not considered: {requested!r} was requested")
        for p in profiles.profiles
    ]
    reason = f"profile {requested!r} was requested explicitly (a request outranks every match)"
    return Selection(profile=profile, reason=reason, candidates=candidates)


def _judge(
    index: int, profile: Profile, instance: str, uuid: str | None, labels: Mapping[str, str]
) -> _Verdict:
    match = profile.match
    found: list[str] = []
    missed: list[str] = []
    uuid_hit = False
    if match.uuids:
        wanted = {u.lower() for u in match.uuids}
        uuid_hit = uuid is not None and uuid.lower() in wanted
        if uuid_hit:
            found.append(f"uuid {uuid}")
        elif uuid is None:
            missed.append("the instance's uuid is not known")
        else:
            missed.append(f"uuid {uuid} is not listed")
    if match.labels:
        wrong = []
        for key in sorted(match.labels):
            want = match.labels[key]
            have = labels.get(key)
            if have is None:
                wrong.append(f"label {key} is missing (wanted {want!r})")
            elif have != want:
                wrong.append(f"label {key} is {have!r} (wanted {want!r})")
        if wrong:
            missed.extend(wrong)
        else:
            pairs = ", ".join(f"{key}={match.labels[key]}" for key in sorted(match.labels))
            found.append(f"label{'s' if len(match.labels) > 1 else ''} {pairs}")
    best: str | None = None
    if match.names:
        hits = [p for p in match.names if fnmatchcase(instance, p)]
        if hits:
            best = max(hits, key=literal_characters)  # max keeps the first among equals
            found.append(f"name pattern {best!r}")
        else:
            patterns = ", ".join(repr(p) for p in match.names)
            missed.append(f"name {instance!r} matches none of {patterns}")
    if missed:
        return _Verdict(index, profile, False, "; ".join(missed))
    what = "matches " + " and ".join(found) if found else "is the fallback (empty match)"
    return _Verdict(
        index,
        profile,
        True,
        what,
        uuid=uuid_hit,
        labels=len(match.labels),
        names=best is not None,
        literal=literal_characters(best) if best is not None else 0,
    )


def _why(winner: _Verdict, runner_up: _Verdict | None) -> str:
    if runner_up is None:
        return "no other profile matches"
    other = runner_up.profile.name
    if winner.uuid and not runner_up.uuid:
        rule = "a uuid match outranks labels, name patterns and the fallback"
    elif winner.labels != runner_up.labels:
        if runner_up.labels:
            rule = f"more matching labels outrank fewer ({winner.labels} vs {runner_up.labels})"
        else:
            rule = "labels outrank name patterns and the fallback"
    elif winner.names and not runner_up.names:
        rule = "a name pattern outranks the fallback"
    elif winner.literal != runner_up.literal:
        rule = (
            "a more specific name pattern outranks a looser one "
            f"({winner.literal} vs {runner_up.literal} literal characters)"
        )
    else:
        return f"{other!r} matches as well; first in file among equals"
    return f"{rule}; next was {other!r}"


def _describe(uuid: str | None, labels: Mapping[str, str]) -> str:
    shown = ", ".join(f"{key}={labels[key]}" for key in sorted(labels)) or "none"
    return f"uuid {uuid or 'unknown'}, labels {shown}"
