"""Schemathesis hooks for tests/test_api_schemathesis.py (loaded by SCHEMATHESIS_HOOKS).

The OpenAPI document says that `source` and `destination` differ (`x-distinct` and the
field's description): JSON Schema has no keyword for two fields that must differ, so
the generator is told here, and a body naming one host twice (answered 422, as the
document says) is not taken for a schema-valid request the API refused. The same for
`force` without a destination (the document's `if`/`then`, which the generator may
not follow)."""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.hook
def filter_body(context: Any, body: Any) -> bool:
    if isinstance(body, dict) and body.get("force") is True and body.get("destination") is None:
        return False
    if isinstance(body, dict) and "source" in body and "destination" in body:
        return bool(body["source"] != body["destination"])
    # A drain's destinations must not name the drained host (`x-not-containing`).
    if isinstance(body, dict) and isinstance(body.get("destinations"), list):
        return body.get("host") not in body["destinations"]
    return True


# The profiles the daemon under test has loaded (the embedded profiles.yaml). The
# document says a `profile` must name a loaded profile (422 otherwise): which ones are
# loaded is the daemon's state, not something a schema can list.
LOADED_PROFILES = ("latency-critical", "batch", "default")


def _positive(case: Any) -> bool:
    meta = getattr(case, "meta", None)
    if meta is None:
        return True
    return str(getattr(meta.generation.mode, "value", meta.generation.mode)) == "positive"


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    if not _positive(case):
        return case
    query = case.query
    if isinstance(query, dict) and query.get("profile") not in (None, "", *LOADED_PROFILES):
        query["profile"] = "default"
    body = case.body
    if isinstance(body, dict) and body.get("profile") not in (None, *LOADED_PROFILES):
        body["profile"] = "default"
    if _stateful(case) and isinstance(body, dict) and isinstance(body.get("instance"), str):
        # Stateful scenarios start from migrations that exist: an instance of the
        # embedded inventory, moved from its host to the other one, so that the links
        # (get, cancel, force-complete) have something to act on.
        name, host = INSTANCES[sum(map(ord, body["instance"])) % len(INSTANCES)]
        body.update(instance=name, source=host, destination=OTHER_HOST[host])
    return case


# The embedded inventory's instances and their hosts.
INSTANCES = (
    ("web-1", "host-a"),
    ("web-2", "host-b"),
    ("cache-1", "host-a"),
    ("db-2", "host-b"),
    ("db-1", "host-a"),
    ("batch-1", "host-a"),
    ("batch-2", "host-b"),
)
OTHER_HOST = {"host-a": "host-b", "host-b": "host-a"}


def _stateful(case: Any) -> bool:
    meta = getattr(case, "meta", None)
    if meta is None:
        return False
    return str(getattr(meta.phase.name, "value", meta.phase.name)) == "stateful"
