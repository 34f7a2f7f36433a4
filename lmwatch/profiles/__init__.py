"""Availability profiles: schema, loading with positions, selection, hot reload."""

from lmwatch.profiles.loader import (
    DEFAULT_SOURCE,
    ProfileError,
    ProfileProblem,
    default_profiles_text,
    load_default_profiles,
    load_profiles,
    load_profiles_bytes,
    load_profiles_text,
)
from lmwatch.profiles.registry import ProfileRegistry, ReloadResult
from lmwatch.profiles.schema import (
    Deadline,
    HandoverPolicy,
    Match,
    OnDeadline,
    Profile,
    ProfileSet,
)
from lmwatch.profiles.selection import (
    NoProfile,
    Selection,
    SelectionError,
    UnknownProfile,
    select_profile,
)

__all__ = [
    "DEFAULT_SOURCE",
    "Deadline",
    "HandoverPolicy",
    "Match",
    "NoProfile",
    "OnDeadline",
    "Profile",
    "ProfileError",
    "ProfileProblem",
    "ProfileRegistry",
    "ProfileSet",
    "ReloadResult",
    "Selection",
    "SelectionError",
    "UnknownProfile",
    "default_profiles_text",
    "load_default_profiles",
    "load_profiles",
    "load_profiles_bytes",
    "load_profiles_text",
    "select_profile",
]
