"""Units people write: durations, sizes, rates and seconds per GiB."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmwatch.units import (
    format_duration,
    format_size,
    parse_duration,
    parse_per_gib,
    parse_rate,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("300ms", 0.3),
        ("2s", 2.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("5min", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1h 30m 15s", 5415.0),
        (" 2S ", 2.0),
        ("0", 0.0),
        ("90", 90.0),
        (2, 2.0),
        (0.25, 0.25),
    ],
)
def test_durations(text: Any, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "bad", ["3 sec", "soon", "", "ms", "5m!", "-1s", "1d", "1.s", True, None, [1], {"s": 1}]
)
def test_bad_durations(bad: Any) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512MiB", 512 * 1024**2),
        ("1GiB", 1024**3),
        ("1.5GiB", 3 * 512 * 1024**2),
        ("2GB", 2_000_000_000),
        ("4 KiB", 4096),
        ("1tib", 1024**4),
        ("100", 100),
        ("100b", 100),
        (4096, 4096),
    ],
)
def test_sizes(text: Any, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["1 GiBs", "GiB", "1 parsec", "-1GiB", "", False, None])
def test_bad_sizes(bad: Any) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("100MiB/s", 100 * 1024**2),
        ("10Gbit/s", 10e9 / 8),
        ("100 Mbit/s", 100e6 / 8),
        ("1GB/s", 1e9),
        (1000, 1000.0),
    ],
)
def test_rates(text: Any, rate: float) -> None:
    assert parse_rate(text) == pytest.approx(rate)


@pytest.mark.parametrize("bad", ["100MiB", "fast", "10 Gbit", None, True])
def test_bad_rates(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_rate(bad)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s per GiB", 90.0), ("90s/GiB", 90.0), ("2m per gib", 120.0), ("90s", 90.0), (45, 45.0)],
)
def test_per_gib(text: Any, seconds: float) -> None:
    assert parse_per_gib(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["90s per TiB", "per GiB", "fast/GiB", None, True])
def test_bad_per_gib(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_per_gib(bad)


@given(st.integers(0, 10_000), st.sampled_from([("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600)]))
def test_duration_scales_by_unit(number: int, unit: tuple[str, float]) -> None:
    suffix, scale = unit
    assert parse_duration(f"{number}{suffix}") == pytest.approx(number * scale)


@given(st.integers(0, 23), st.integers(0, 59), st.integers(0, 59))
def test_compound_durations_add_up(hours: int, minutes: int, seconds: int) -> None:
    text = f"{hours}h{minutes}m{seconds}s"
    assert parse_duration(text) == hours * 3600 + minutes * 60 + seconds


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0.3, "300ms"), (2, "2.0s"), (300, "5.0m"), (7200, "2.0h")],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    ("size", "text"),
    [(None, "-"), (512, "512B"), (2048, "2.0KiB"), (3 * 1024**2, "3.0MiB"), (1024**3, "1.0GiB")],
)
def test_format_size(size: float | None, text: str) -> None:
    assert format_size(size) == text
