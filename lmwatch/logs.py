"""Structured log lines, with the migration's context on every line.

Two formats (setting `log_format`): `text`, one `time level logger event key=value ...`
line per record, and `json`, one JSON object per line with `time`, `level`, `logger`,
`event` and every key=value field as a field of its own (`migration`, `instance`, ...).
"""

from __future__ import annotations

import json
import logging
import math
from datetime import UTC, datetime
from typing import IO, Any, Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Attributes BoundLogger puts on each record for the JSON formatter.
EVENT_ATTR = "lmwatch_event"
FIELDS_ATTR = "lmwatch_fields"
_BASE_KEYS = ("time", "level", "logger", "event")


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

    def _log(self, level: int, event: str, fields: dict[str, Any], exc_info: bool = False) -> None:
        if not self._logger.isEnabledFor(level):
            return
        merged = {**self._context, **fields}
        self._logger.log(
            level,
            kv(event, **merged),
            exc_info=exc_info,
            extra={EVENT_ATTR: event, FIELDS_ATTR: merged},
            stacklevel=3,
        )

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields, exc_info=True)


def get_logger(name: str, **context: Any) -> BoundLogger:
    return BoundLogger(logging.getLogger(name), **context)


def _json_value(value: Any) -> Any:
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per record. Records from BoundLogger carry their event and
    fields; any other record (a library's) has its message as the event."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.fromtimestamp(record.created, UTC)
        line: dict[str, Any] = {
            "time": created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
        }
        event = getattr(record, EVENT_ATTR, None)
        fields = getattr(record, FIELDS_ATTR, None)
        if isinstance(event, str) and isinstance(fields, dict):
            line["event"] = event
            for key, value in fields.items():
                if value is None:
                    continue
                name = str(key)
                line[f"field_{name}" if name in _BASE_KEYS else name] = _json_value(value)
        else:
            line["event"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def formatter(log_format: LogFormat = "text") -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    return logging.Formatter(TEXT_FORMAT)


def handler(log_format: LogFormat = "text", stream: IO[str] | None = None) -> logging.Handler:
    """A handler writing `log_format` lines to `stream` (default: standard error)."""
    made = logging.StreamHandler(stream)
    made.setFormatter(formatter(log_format))
    return made


def configure(level: str = "INFO", log_format: LogFormat = "text") -> None:
    """Log to standard error in `log_format` (once: nothing changes when the root logger
    already has handlers, as under a test runner)."""
    logging.basicConfig(level=level.upper(), handlers=[handler(log_format)])
