"""What a profile edit cannot change for a migration already started."""

from __future__ import annotations

from lmwatch.model import StartPlan
from lmwatch.profiles.schema import Profile


def review_profile_change(old: Profile, new: Profile, plan: StartPlan) -> list[str]:
    """Sentences for edits that cannot apply to this migration; empty when all apply.

    Handover and slow-down are armed (or not) when a migration starts: granting
    them later cannot arm them, and withdrawing slow-down cannot disarm it.
    """
    notes: list[str] = []
    if new.handover_allowed and not old.handover_allowed and not plan.arm_handover:
        notes.append(
            f"profile {new.name!r} now allows handover, but this migration started without "
            "it armed; it applies from the next migration"
        )
    if new.may_slow_down and not old.may_slow_down and not plan.arm_slow_down:
        notes.append(
            f"profile {new.name!r} now allows slowing the guest, but this migration started "
            "without it armed; it applies from the next migration"
        )
    if not new.may_slow_down and old.may_slow_down and plan.arm_slow_down:
        notes.append(
            f"profile {new.name!r} no longer allows slowing the guest, but slowing was armed "
            "when this migration started and cannot be withdrawn from it"
        )
    return notes
