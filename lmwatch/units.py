"""Parsing the units people write: `300ms`, `2s`, `5m`, `1h30m`, `1GiB`, `90s per GiB`."""

from __future__ import annotations

import re
from typing import Any

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|min|s|m|h)")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_PER_GIB = re.compile(r"^\s*(.+?)\s*(?:per|/)\s*gib\s*$", re.IGNORECASE)


def parse_duration(value: Any) -> float:
    """Seconds from a number (seconds) or text such as `300ms`, `2s`, `1h30m`."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 300ms, 2s or 5m, not a boolean")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration such as 300ms, 2s or 5m, got {value!r}")
    text = value.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{value!r} is not a duration (write e.g. 300ms, 2s, 5m, 1h30m)")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def parse_size(value: Any) -> int:
    """Bytes from a number (bytes) or text such as `512MiB`, `1GiB`, `2GB`."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512MiB or 1GiB, not a boolean")
    if isinstance(value, int | float):
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a size such as 512MiB or 1GiB, got {value!r}")
    match = _SIZE.match(value)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size (write e.g. 512MiB, 1GiB, 2GB)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_rate(value: Any) -> float:
    """Bytes/second from `100MiB/s`, `1Gbit/s`... or a number (bytes/s)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a rate such as 100MiB/s, got {value!r}")
    text = value.strip()
    bits = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG])bit/s", text, re.IGNORECASE)
    if bits:
        scale = {"k": 1e3, "m": 1e6, "g": 1e9}[bits.group(2).lower()]
        return float(bits.group(1)) * scale / 8
    if not text.endswith("/s"):
        raise ValueError(f"{value!r} is not a rate (write e.g. 100MiB/s or 10Gbit/s)")
    return float(parse_size(text[:-2]))


def parse_per_gib(value: Any) -> float:
    """Seconds per GiB from `90s per GiB`, `90s/GiB` or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected e.g. '90s per GiB', got {value!r}")
    match = _PER_GIB.match(value)
    return parse_duration(match.group(1) if match else value)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def format_size(size: float | None) -> str:
    if size is None:
        return "-"
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(size) >= scale:
            return f"{size / scale:.1f}{unit}"
    return f"{size:.0f}B"
