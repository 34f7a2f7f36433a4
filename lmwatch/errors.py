"""Errors the engine raises to its callers (the API maps them to problem+json)."""

from __future__ import annotations


class EngineError(Exception):
    status = 500
    kind = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(EngineError):
    status = 404
    kind = "not-found"


class Conflict(EngineError):
    """The request is valid but impossible in the migration's current state."""

    status = 409
    kind = "conflict"


class Invalid(EngineError):
    status = 422
    kind = "invalid"
