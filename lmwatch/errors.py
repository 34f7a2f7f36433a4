"""Errors that reach callers as problem+json: each carries its HTTP status and kind."""

from __future__ import annotations


class ProblemError(Exception):
    """An error with a clear message that the API answers with `status`."""

    status = 500
    kind = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EngineError(ProblemError):
    """Raised by the engine to its callers."""


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


class StoreUnavailable(EngineError):
    """The store cannot take new work now (full disk, file deleted); retry later."""

    status = 503
    kind = "store-unavailable"
