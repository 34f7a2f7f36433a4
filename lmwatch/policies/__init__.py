"""The pure decision core: estimators, start plan, decide, force-complete, profile edits.

No I/O, no clock, no randomness: every function depends only on its arguments.
"""

from lmwatch.policies.completion import decide
from lmwatch.policies.estimators import DEFAULT, PolicySettings, duration_text, estimate, tracked
from lmwatch.policies.forcing import ForceRefused, force_complete, next_look_in
from lmwatch.policies.restart import restart_after_failure, restart_plan
from lmwatch.policies.review import review_profile_change
from lmwatch.policies.start import (
    deadline_at,
    measurement_skipped,
    measuring_pays,
    plan_start,
)
from lmwatch.policies.track import Track
from lmwatch.policies.violations import (
    Finish,
    Violation,
    learned_switchover,
    measured_switchover,
    violations,
)

__all__ = [
    "DEFAULT",
    "Finish",
    "ForceRefused",
    "PolicySettings",
    "Track",
    "Violation",
    "deadline_at",
    "decide",
    "duration_text",
    "estimate",
    "force_complete",
    "learned_switchover",
    "measured_switchover",
    "measurement_skipped",
    "measuring_pays",
    "next_look_in",
    "plan_start",
    "restart_after_failure",
    "restart_plan",
    "review_profile_change",
    "tracked",
    "violations",
]
