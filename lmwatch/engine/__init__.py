"""The supervisor of live migrations, laid out as the flow goes.

- `admission` — validation, idempotency, profile selection of a new request;
- `scheduler` — which queued migrations may start under the per-host limits (pure);
- `supervision` — one migration's loop: start or re-attach, sample, decide, apply;
- `machine` — the pure state machine of one migration, `(status, event) -> (status, effects)`;
- `effects` — the one place that calls the driver, writes the store, counts metrics;
- `recovery` — re-attach after a restart, back-off through outages, giving up;
- `learned` — switchover costs and change rates earlier migrations taught;
- `records` — the runtime state kept per migration; `settings` — the knobs;
- `core` — `Engine`, which the daemon, the API and the CLI use.
"""

from lmwatch.engine.core import MAX_PAGE, Engine
from lmwatch.engine.settings import EngineSettings

__all__ = ["MAX_PAGE", "Engine", "EngineSettings"]
