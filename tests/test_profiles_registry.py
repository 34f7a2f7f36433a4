"""The profile registry: reloads keep the last good set, count failures, tell subscribers."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from lmwatch.clock import VirtualClock
from lmwatch.profiles import (
    DEFAULT_SOURCE,
    ProfileError,
    ProfileRegistry,
    ProfileSet,
    default_profiles_text,
)

ONE = "profiles:\n  - name: one\n    max_blackout: 100ms\n"
TWO = "profiles:\n  - name: two\n    max_blackout: 200ms\n"
BAD = "profiles:\n  - name: two\n    max_blackout: later\n"


def write(path: Path, text: str, mtime_ns: int) -> None:
    """Write and set a distinct mtime, so the change never hides in the clock's resolution."""
    path.write_text(text)
    os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    file = tmp_path / "profiles.yaml"
    write(file, ONE, 1_000_000_000_000_000_000)
    return file


def names(registry: ProfileRegistry) -> list[str]:
    return [p.name for p in registry.current.profiles]


def test_first_load(path: Path) -> None:
    clock = VirtualClock()
    registry = ProfileRegistry(path, clock=clock)
    assert names(registry) == ["one"]
    assert registry.generation == 1
    assert registry.source == str(path)
    assert registry.loaded_at == clock.now()
    assert registry.failures == 0


def test_invalid_file_at_start_is_an_error(path: Path) -> None:
    path.write_text(BAD)
    with pytest.raises(ProfileError) as caught:
        ProfileRegistry(path)
    assert caught.value.problems[0].line == 3


def test_without_a_path_the_shipped_profiles_apply() -> None:
    registry = ProfileRegistry(None)
    assert registry.source == DEFAULT_SOURCE
    assert "default" in names(registry)
    assert registry.reload().ok


def test_default_text_is_used_without_a_path() -> None:
    registry = ProfileRegistry(None, default_text=TWO)
    assert names(registry) == ["two"]


def test_reload_picks_up_a_new_file_and_increments_generation(path: Path) -> None:
    clock = VirtualClock()
    registry = ProfileRegistry(path, clock=clock)
    seen: list[ProfileSet] = []
    registry.subscribe(seen.append)
    write(path, TWO, 1_000_000_001_000_000_000)
    result = registry.reload()
    assert (result.ok, result.generation, result.changed) == (True, 2, True)
    assert names(registry) == ["two"]
    assert seen == [registry.current]
    unchanged = registry.reload()
    assert (unchanged.generation, unchanged.changed) == (3, False)
    assert len(seen) == 2


def test_invalid_reload_keeps_last_good_set(path: Path) -> None:
    registry = ProfileRegistry(path)
    seen: list[ProfileSet] = []
    registry.subscribe(seen.append)
    before = registry.current
    path.write_text(BAD)
    result = registry.try_reload()
    assert not result.ok
    assert result.generation == 1
    assert [(p.line, p.column, p.path) for p in result.problems] == [
        (3, 19, "profiles[0].max_blackout")
    ]
    assert registry.current is before
    assert registry.generation == 1
    assert registry.failures == 1
    assert registry.last_problems == result.problems
    with pytest.raises(ProfileError) as caught:
        registry.reload()
    assert caught.value.problems == list(result.problems)
    assert registry.failures == 2
    assert seen == []
    path.write_text(TWO)
    assert registry.reload().generation == 2
    assert registry.last_problems == ()
    assert registry.failures == 2


def test_missing_file_on_reload_keeps_last_good_set(path: Path) -> None:
    registry = ProfileRegistry(path)
    path.unlink()
    result = registry.try_reload()
    assert not result.ok
    assert "cannot read" in result.problems[0].message
    assert names(registry) == ["one"]


def test_unsubscribe_and_failing_subscriber(path: Path) -> None:
    registry = ProfileRegistry(path)
    calls: list[str] = []

    def broken(_: ProfileSet) -> None:
        calls.append("broken")
        raise RuntimeError("subscriber bug")

    unsubscribe = registry.subscribe(broken)
    registry.subscribe(lambda _: calls.append("fine"))
    assert registry.reload().ok  # one subscriber's bug does not fail the reload
    assert calls == ["broken", "fine"]
    unsubscribe()
    registry.reload()
    assert calls == ["broken", "fine", "fine"]


def test_explain_uses_the_current_set(path: Path) -> None:
    registry = ProfileRegistry(path)
    assert registry.explain("vm-1").profile.name == "one"
    write(path, TWO, 1_000_000_001_000_000_000)
    registry.reload()
    selection = registry.explain("vm-1", None, {"tier": "x"})
    assert selection.profile.name == "two"
    assert registry.explain("vm-1", requested="two").reason.startswith("profile 'two' was")


async def test_watch_reloads_on_change_under_virtual_time(path: Path) -> None:
    clock = VirtualClock()
    registry = ProfileRegistry(path, clock=clock)
    generations: list[int] = []
    registry.subscribe(lambda _: generations.append(registry.generation))
    task = asyncio.create_task(registry.watch(clock, interval=1.0))
    try:
        await clock.advance(5)
        assert registry.generation == 1  # nothing changed: no reload
        write(path, TWO, 1_000_000_001_000_000_000)
        await clock.advance(0.5)
        assert names(registry) == ["one"]  # the next poll has not come yet
        await clock.advance(0.5)
        assert names(registry) == ["two"]
        assert registry.loaded_at == clock.now()
        assert generations == [2]

        write(path, BAD, 1_000_000_002_000_000_000)
        await clock.advance(3)
        assert names(registry) == ["two"]
        assert registry.failures == 1  # counted once, not on every poll

        os.utime(path, ns=(1_000_000_003_000_000_000,) * 2)  # touched, same content
        await clock.advance(2)
        assert registry.failures == 1

        write(path, ONE, 1_000_000_004_000_000_000)
        await clock.advance(1)
        assert names(registry) == ["one"]
        assert generations == [2, 3]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watch_ignores_a_rewrite_with_the_same_content(path: Path) -> None:
    clock = VirtualClock()
    registry = ProfileRegistry(path, clock=clock)
    task = asyncio.create_task(registry.watch(clock, interval=1.0))
    try:
        write(path, ONE, 1_000_000_009_000_000_000)
        await clock.advance(3)
        assert registry.generation == 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watch_sees_an_atomic_replace(path: Path) -> None:
    clock = VirtualClock()
    registry = ProfileRegistry(path, clock=clock)
    task = asyncio.create_task(registry.watch(clock, interval=1.0))
    try:
        replacement = path.with_suffix(".new")
        write(replacement, TWO, 1_000_000_000_000_000_000)  # same mtime as the old file
        os.replace(replacement, path)
        await clock.advance(1)
        assert names(registry) == ["two"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watch_without_a_file_returns() -> None:
    registry = ProfileRegistry(None, default_text=ONE)
    await asyncio.wait_for(registry.watch(VirtualClock()), timeout=5)


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on this platform")
async def test_sighup_reloads(path: Path) -> None:
    loop = asyncio.get_running_loop()
    registry = ProfileRegistry(path)
    reloaded: asyncio.Future[ProfileSet] = loop.create_future()

    def resolve(new: ProfileSet) -> None:
        if not reloaded.done():
            reloaded.set_result(new)

    registry.subscribe(resolve)
    assert registry.install_sighup(loop)
    try:
        write(path, TWO, 1_000_000_001_000_000_000)
        os.kill(os.getpid(), signal.SIGHUP)
        new = await asyncio.wait_for(reloaded, timeout=5)
    finally:
        registry.remove_sighup(loop)
    assert [p.name for p in new.profiles] == ["two"]
    assert registry.generation == 2


def test_shipped_text_is_what_the_registry_loads() -> None:
    registry = ProfileRegistry(None)
    assert registry.current == ProfileRegistry(None, default_text=default_profiles_text()).current
