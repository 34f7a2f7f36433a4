"""Test helpers shared by the API and CLI tests: a small inventory, small profiles,
and an API client that checks every answer against the OpenAPI document.

(Kept out of conftest.py: tests/rig has a conftest of its own, and two modules
named `conftest` cannot both be imported by name.)"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp.test_utils import TestClient
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

# Link a<->b: 10 Gbit/s = 1.25e9 bytes/s; one GiB takes about 0.86 s per pass.
SMALL_INVENTORY = """
hosts:
  - {name: a, memory: 256GiB}
  - {name: b, memory: 256GiB}
  - {name: c, memory: 1GiB}
links:
  - {between: [a, b], bandwidth: 10Gbit/s}
default_bandwidth: 1Gbit/s
instances:
  - {name: quiet, host: a, memory: 2GiB, working_set: 128MiB, change_rate: 1MiB/s,
     labels: {tier: web}}
  - {name: quiet2, host: a, memory: 2GiB, working_set: 128MiB, change_rate: 1MiB/s}
  - {name: quiet3, host: a, memory: 2GiB, working_set: 128MiB, change_rate: 1MiB/s}
  - {name: db, host: a, memory: 8GiB, working_set: 2GiB, change_rate: 2GiB/s,
     labels: {tier: database}}
  - {name: strict, host: a, memory: 8GiB, working_set: 2GiB, change_rate: 2GiB/s,
     labels: {tier: strict}}
  - {name: big, host: a, memory: 4GiB, working_set: 64MiB, change_rate: 1MiB/s}
"""

SMALL_PROFILES = """
version: 1
profiles:
  - name: latency-critical
    match: {labels: {tier: database}}
    max_blackout: 300ms
    handover: allowed
    max_degraded: 60s
    deadline: 20m
    on_deadline: complete
  - name: strict
    match: {labels: {tier: strict}}
    max_blackout: 300ms
    may_slow_down: false
    handover: forbidden
    may_pause: false
    deadline: 2h
    on_deadline: cancel
  - name: default
    max_blackout: 500ms
    may_slow_down: true
    may_pause: true
    max_pause: 3s
    deadline: {per_gib: 120s, min: 5m}
    on_deadline: cancel
"""

TOKEN = "test-token-0123456789"


# --- the API, checked against its own OpenAPI document ------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    text: str
    body: Any  # parsed JSON, or None when the answer is not JSON
    content_type: str


class OpenApiChecker:
    """Validates real answers against the response schemas of the OpenAPI document."""

    URI = "urn:lmwatch:openapi"

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        resource = Resource.from_contents(document, default_specification=DRAFT202012)
        self.registry = Registry().with_resource(self.URI, resource)
        self.templates = [
            (re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"), template)
            for template in document["paths"]
        ]
        self.seen: set[tuple[str, str, str]] = set()

    def template(self, path: str) -> str:
        found = [template for pattern, template in self.templates if pattern.match(path)]
        assert found, f"{path} is not in the OpenAPI document"
        # The most literal template wins (/v1/profiles/reload over a parameter).
        return max(found, key=lambda t: len(re.sub(r"\{[^}]+\}", "", t)))

    def check(self, method: str, path: str, answer: Answer) -> None:
        template = self.template(path.split("?", 1)[0])
        operation = self.document["paths"][template].get(method.lower())
        assert operation is not None, f"{method} {template} is not documented"
        status = str(answer.status)
        response = operation["responses"].get(status)
        assert response is not None, f"{method} {template} answered {status}, not documented"
        self.seen.add((method.upper(), template, status))
        content = response.get("content", {})
        assert answer.content_type in content, (
            f"{method} {template} {status}: {answer.content_type} is not documented "
            f"({sorted(content)})"
        )
        for header in response.get("headers", {}):
            if header in ("Location", "WWW-Authenticate"):
                assert header in answer.headers, f"{status} without {header}"
        if answer.body is None:
            return
        escaped = "/".join(
            part.replace("~", "~0").replace("/", "~1")
            for part in ("paths", template, method.lower(), "responses", status, "content")
        )
        media = answer.content_type.replace("~", "~0").replace("/", "~1")
        schema = {"$ref": f"{self.URI}#/{escaped}/{media}/schema"}
        validator = Draft202012Validator(schema, registry=self.registry)
        errors = sorted(validator.iter_errors(answer.body), key=lambda e: list(e.path))
        assert not errors, f"{method} {path} {status}: " + "; ".join(
            f"{list(e.path)}: {e.message}" for e in errors
        )


class Api:
    """The real aiohttp test client, with the token and an OpenAPI check on each answer."""

    def __init__(self, client: TestClient, token: str, checker: OpenApiChecker) -> None:
        self.client = client
        self.token = token
        self.checker = checker

    async def call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: str | bytes | None = None,
        headers: Mapping[str, str] | None = None,
        auth: bool | str = True,
    ) -> Answer:
        sent = dict(headers or {})
        if auth is True:
            sent["Authorization"] = f"Bearer {self.token}"
        elif isinstance(auth, str):
            sent["Authorization"] = auth
        if json_body is not None:
            data = json.dumps(json_body)
            sent.setdefault("Content-Type", "application/json")
        response = await self.client.request(method, path, data=data, headers=sent)
        text = await response.text()
        content_type = response.content_type
        body = json.loads(text) if content_type.endswith("json") else None
        answer = Answer(response.status, dict(response.headers), text, body, content_type)
        self.checker.check(method, path, answer)
        return answer

    async def get(self, path: str, **kwargs: Any) -> Answer:
        return await self.call("GET", path, **kwargs)

    async def post(self, path: str, json_body: Any = None, **kwargs: Any) -> Answer:
        return await self.call("POST", path, json_body=json_body, **kwargs)
