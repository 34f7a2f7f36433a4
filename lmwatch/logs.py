"""Structured log lines: `event key=value ...`, with the migration's context on every line."""

from __future__ import annotations

import logging
from typing import Any


def _format_value(value: Any) -> str:
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    return f'"{text}"' if (" " in text or not text) else text


def kv(event: str, **fields: Any) -> str:
    parts = [event] + [f"{key}={_format_value(v)}" for key, v in fields.items() if v is not None]
    return " ".join(parts)


class BoundLogger:
    """A logger that adds the same key=value context to every line."""

    def __init__(self, logger: logging.Logger, **context: Any) -> None:
        self._logger = logger
        self._context = context

    def bind(self, **context: Any) -> BoundLogger:
        return BoundLogger(self._logger, **{**self._context, **context})

    def info(self, event: str, **fields: Any) -> None:
        self._logger.info(kv(event, **self._context, **fields))

    def warning(self, event: str, **fields: Any) -> None:
        self._logger.warning(kv(event, **self._context, **fields))

    def error(self, event: str, **fields: Any) -> None:
        self._logger.error(kv(event, **self._context, **fields))

    def exception(self, event: str, **fields: Any) -> None:
        self._logger.exception(kv(event, **self._context, **fields))


def get_logger(name: str, **context: Any) -> BoundLogger:
    return BoundLogger(logging.getLogger(name), **context)


def configure(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
