"""The profiles in force, and their hot reload (file change, SIGHUP or API).

A reload that finds an invalid file keeps the last good set: a typo made while
editing must never leave running migrations without a profile.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lmwatch.clock import Clock, WallClock
from lmwatch.profiles.loader import (
    DEFAULT_SOURCE,
    ProfileError,
    ProfileProblem,
    default_profiles_text,
    load_profiles_bytes,
    unreadable,
)
from lmwatch.profiles.schema import ProfileSet
from lmwatch.profiles.selection import Selection, select_profile

log = logging.getLogger(__name__)

Subscriber = Callable[[ProfileSet], object]
_Fingerprint = tuple[int, int, int, int]  # device, inode, size, mtime in ns


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    generation: int  # the generation in force after the attempt
    problems: tuple[ProfileProblem, ...] = ()
    changed: bool = False  # the new set differs from the one it replaced


class ProfileRegistry:
    """Holds the current `ProfileSet`, where it came from, and reloads it.

    With a `path`, the file must load at construction (`ProfileError` otherwise).
    Without one, the profiles come from `default_text`, or from the profiles file
    shipped with lmwatch. The first set is generation 1; each successful reload
    adds one.
    """

    def __init__(
        self,
        path: Path | str | None,
        *,
        default_text: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._path = Path(path) if path is not None else None
        self._default_text = default_text
        self._clock: Clock = clock or WallClock()
        self._subscribers: list[Subscriber] = []
        self._failure_listeners: list[Callable[[ProfileError], None]] = []
        self._seen_stat: _Fingerprint | None = None
        self._seen_digest: str | None = None
        self.failures = 0
        self.generation = 0
        self.last_problems: tuple[ProfileProblem, ...] = ()
        self.loaded_at = 0.0
        self._current = self._load()
        self._installed()

    @property
    def current(self) -> ProfileSet:
        return self._current

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def source(self) -> str:
        if self._path is not None:
            return str(self._path)
        return DEFAULT_SOURCE if self._default_text is None else "<default text>"

    def explain(
        self,
        instance: str,
        uuid: str | None = None,
        labels: Mapping[str, str] | None = None,
        requested: str | None = None,
    ) -> Selection:
        """Which profile applies to this instance and why (see `select_profile`)."""
        return select_profile(
            self._current, instance=instance, uuid=uuid, labels=labels or {}, requested=requested
        )

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(new_set)` after each successful reload; returns an unsubscribe."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def on_failure(self, callback: Callable[[ProfileError], None]) -> None:
        """Call `callback(error)` whenever a reload is rejected (file change, SIGHUP or API)."""
        self._failure_listeners.append(callback)

    def reload(self) -> ReloadResult:
        """Load the source again; raise `ProfileError` (keeping the old set) if invalid."""
        result = self.try_reload()
        if not result.ok:
            raise ProfileError(result.problems)
        return result

    def try_reload(self) -> ReloadResult:
        """Load the source again; on problems keep the old set and report them."""
        return self._attempt(None)

    def poll(self) -> ReloadResult | None:
        """Reload if the file changed since last seen; None when it did not."""
        if self._path is None:
            return None
        stat = _fingerprint(self._path)
        if stat is not None and stat == self._seen_stat:
            return None
        content = _read(self._path)
        self._seen_stat = stat
        if _digest(content) == self._seen_digest:
            return None
        return self._attempt(content)

    async def watch(self, clock: Clock, interval: float = 1.0) -> None:
        """Poll the file every `interval` seconds and reload on change, until cancelled."""
        if self._path is None:
            return
        while True:
            await clock.sleep(interval)
            try:
                self.poll()
            except Exception:  # keep watching whatever one poll met
                log.exception("checking %s for changes failed", self._path)

    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Reload on SIGHUP; False where the platform has no SIGHUP."""
        number = getattr(signal, "SIGHUP", None)
        if number is None:
            return False
        loop.add_signal_handler(number, self._on_sighup)
        return True

    def remove_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        number = getattr(signal, "SIGHUP", None)
        if number is not None:
            loop.remove_signal_handler(number)

    # --- internals ------------------------------------------------------------

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading profiles from %s", self.source)
        self.try_reload()

    def _attempt(self, content: bytes | OSError | None) -> ReloadResult:
        try:
            new = self._load(content)
        except ProfileError as error:
            self.failures += 1
            self.last_problems = tuple(error.problems)
            for listener in list(self._failure_listeners):
                try:
                    listener(error)
                except Exception:
                    log.exception("a reload-failure listener failed")
            log.warning(
                "profiles in %s not loaded, keeping generation %d:\n%s",
                self.source,
                self.generation,
                error,
            )
            return ReloadResult(False, self.generation, self.last_problems)
        changed = new != self._current
        self._current = new
        self._installed()
        log.info("profiles loaded from %s (generation %d)", self.source, self.generation)
        for callback in list(self._subscribers):
            try:
                callback(new)
            except Exception:
                log.exception("a profiles subscriber failed on generation %d", self.generation)
        return ReloadResult(True, self.generation, (), changed)

    def _installed(self) -> None:
        self.generation += 1
        self.loaded_at = self._clock.now()
        self.last_problems = ()

    def _load(self, content: bytes | OSError | None = None) -> ProfileSet:
        """Load the source (or `content` already read from the file)."""
        if self._path is None:
            text = self._default_text
            if text is None:
                text = default_profiles_text()
            return load_profiles_bytes(text.encode("utf-8"), source=self.source)
        if content is None:
            self._seen_stat = _fingerprint(self._path)
            content = _read(self._path)
        self._seen_digest = _digest(content)
        if isinstance(content, OSError):
            raise ProfileError([unreadable(self.source, content)])
        return load_profiles_bytes(content, source=self.source)


def _fingerprint(path: Path) -> _Fingerprint | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _read(path: Path) -> bytes | OSError:
    try:
        return path.read_bytes()
    except OSError as error:
        return error


def _digest(content: bytes | OSError) -> str:
    if isinstance(content, OSError):
        return f"unreadable: {content.errno}"
    return hashlib.sha256(content).hexdigest()
