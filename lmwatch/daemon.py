"""The daemon: wires store, profiles, driver, engine and API together and serves.

Start-up problems (store, profiles file, configuration, port) end the process with
a clear message on stderr and exit code 2. SIGTERM/SIGINT stop it gracefully: the
engine stops supervising but migrations are not cancelled; the next start takes
them back. SIGHUP and edits of the profiles file reload the profiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import pkgutil
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from lmwatch.api import create_app
from lmwatch.clock import Clock, WallClock
from lmwatch.config import ConfigError, Settings, load_settings
from lmwatch.drivers.base import Driver
from lmwatch.drivers.inventory import InventoryError, default_inventory, load_inventory
from lmwatch.engine import Engine, EngineSettings
from lmwatch.logs import configure, get_logger
from lmwatch.metrics import Metrics
from lmwatch.profiles import ProfileError, ProfileRegistry
from lmwatch.sdnotify import Notifier
from lmwatch.store import Store, StoreError

log = get_logger("lmwatch.daemon")

EXIT_STARTUP = 2

__all__ = [
    "EXIT_STARTUP",
    "Daemon",
    "StartupError",
    "build",
    "create_app",
    "main",
    "resolve_token",
    "run",
    "serve",
]


class StartupError(Exception):
    """The daemon cannot start; the message is for the operator."""


@dataclass
class Daemon:
    """Everything a running daemon holds (built by `build`, closed by `close`)."""

    settings: Settings
    store: Store
    registry: ProfileRegistry
    driver: Driver
    engine: Engine
    metrics: Metrics
    token: str
    clock: Clock
    app: web.Application
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.engine.stop()
        with contextlib.suppress(Exception):
            await self.driver.close()
        self.store.close()


def resolve_token(settings: Settings) -> str:
    """The API token: configured, read from token_file, or generated and written (0600)."""
    if settings.token is not None:
        return settings.token.get_secret_value().strip()
    if settings.token_file is not None:
        try:
            token = settings.token_file.read_text(encoding="utf-8").strip()
        except OSError as error:
            raise StartupError(
                f"cannot read token file {settings.token_file}: {error.strerror}"
            ) from None
        if not token:
            raise StartupError(f"token file {settings.token_file} is empty")
        return token
    token = secrets.token_urlsafe(32)
    path = settings.token_path()
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), 0o600)
            file.write(token + "\n")
    except OSError as error:
        raise StartupError(
            f"cannot write the generated token to {path}: {error.strerror}"
        ) from None
    log.info("token-generated", path=str(path), note="no token configured; wrote a new one")
    return token


STALL_AFTER = 120.0  # seconds without a supervision round before the watchdog is withheld


def supervisor_problem(daemon: Daemon) -> str | None:
    """What keeps the systemd watchdog from being fed: a migration whose supervision
    has not come round for a while (None: alive). The watchdog task itself runs on the
    event loop, so a blocked loop stops the pings too."""
    stall_after = max(STALL_AFTER, 20 * daemon.settings.poll_interval)
    stalled = daemon.engine.stalled(stall_after)
    if stalled:
        return f"supervision of {', '.join(stalled)} stalled for over {stall_after:.0f}s"
    return None


def real_drivers() -> list[str]:
    """Names of the real drivers shipped: modules `lmwatch/drivers/<name>_driver.py`,
    each with `build_<name>_driver(hosts, clock)`."""
    import lmwatch.drivers as package

    return sorted(
        module.name.removesuffix("_driver")
        for module in pkgutil.iter_modules(package.__path__)
        if module.name.endswith("_driver")
    )


def _host_options(settings: Settings) -> dict[str, dict[str, Any]]:
    """The hosts section as the driver reads it (rates spelled with their unit)."""
    hosts: dict[str, dict[str, Any]] = {}
    for name, host in settings.hosts.items():
        options = host.model_dump(exclude_none=True)
        if host.bandwidth is not None:
            options["bandwidth"] = f"{host.bandwidth}B/s"
        hosts[name] = options
    return hosts


def _make_driver(settings: Settings, clock: Clock) -> Driver:
    if settings.driver != "sim":
        available = real_drivers()
        if settings.driver not in available:
            known = ", ".join(["sim", *available])
            raise StartupError(f"unknown driver {settings.driver!r} (available: {known})")
        module = importlib.import_module(f"lmwatch.drivers.{settings.driver}_driver")
        build_driver = getattr(module, f"build_{settings.driver}_driver")
        try:
            driver: Driver = build_driver(_host_options(settings), clock)
        except ValueError as error:
            raise StartupError(f"invalid hosts configuration: {error}") from None
        return driver
    from lmwatch.drivers.sim import SimDriver

    try:
        inventory = (
            default_inventory()
            if settings.inventory_path is None
            else load_inventory(settings.inventory_path)
        )
    except InventoryError as error:
        raise StartupError(f"invalid inventory: {error}") from None
    return SimDriver(inventory, clock)


def _open_profiles(settings: Settings, clock: Clock) -> ProfileRegistry:
    try:
        return ProfileRegistry(settings.profiles_path, clock=clock)
    except ProfileError as error:
        lines = "\n".join(f"  {problem}" for problem in error.problems)
        raise StartupError(f"invalid profiles file:\n{lines}") from None


def _open_store(settings: Settings) -> Store:
    try:
        return Store.open(settings.store_path)
    except StoreError as error:
        raise StartupError(f"cannot open the store: {error}") from None


async def build(settings: Settings, *, clock: Clock | None = None) -> Daemon:
    """Open everything and start the engine (not yet listening)."""
    clock = clock or WallClock()
    store = _open_store(settings)
    try:
        registry = _open_profiles(settings, clock)
        token = resolve_token(settings)
        driver = _make_driver(settings, clock)
    except BaseException:
        store.close()
        raise
    metrics = Metrics()
    engine = Engine(
        driver=driver,
        store=store,
        profiles=registry,
        clock=clock,
        metrics=metrics,
        settings=EngineSettings(
            poll_interval=settings.poll_interval,
            max_per_source=settings.max_per_source,
            max_per_destination=settings.max_per_destination,
        ),
    )
    await engine.start()
    app = create_app(engine, registry, metrics, token)
    daemon = Daemon(settings, store, registry, driver, engine, metrics, token, clock, app)
    daemon.tasks.append(asyncio.create_task(registry.watch(clock, settings.profile_check_interval)))
    return daemon


async def run(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[list[tuple[str, int]]], Awaitable[None] | None] | None = None,
    handle_signals: bool = True,
) -> None:
    """Serve until `stop` is set or SIGTERM/SIGINT arrives. Raises StartupError."""
    stop = stop or asyncio.Event()
    daemon = await build(settings)
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    sighup = False
    if handle_signals:
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, stop.set)
            installed.append(number)
        sighup = daemon.registry.install_sighup(loop)
    runner = web.AppRunner(daemon.app, access_log=None, handle_signals=False)
    try:
        await runner.setup()
        site = web.TCPSite(runner, settings.listen_host, settings.port)
        try:
            await site.start()
        except OSError as error:
            raise StartupError(
                f"cannot listen on {settings.listen_host}:{settings.port}: {error.strerror}"
            ) from None
        addresses: list[tuple[str, int]] = [(str(a[0]), int(a[1])) for a in runner.addresses]
        log.info(
            "listening",
            addresses=" ".join(f"{host}:{port}" for host, port in addresses),
            store=str(settings.store_path),
            profiles=daemon.registry.source,
            driver=daemon.driver.name,
        )
        systemd = Notifier()
        listening = " ".join(f"{host}:{port}" for host, port in addresses)
        systemd.ready(f"listening on {listening}; supervising")
        daemon.tasks.append(asyncio.create_task(systemd.feed(lambda: supervisor_problem(daemon))))
        if on_ready is not None:
            maybe = on_ready(addresses)
            if maybe is not None:
                await maybe
        await stop.wait()
        systemd.stopping()
        log.info("stopping", note="migrations in flight continue; a restart takes them back")
    finally:
        for number in installed:
            loop.remove_signal_handler(number)
        if sighup:
            daemon.registry.remove_sighup(loop)
        await runner.cleanup()
        await daemon.close()


_OPTION_NAMES = {
    "host": "listen_host",
    "store": "store_path",
    "profiles": "profiles_path",
    "inventory": "inventory_path",
}


def settings_from(options: Mapping[str, Any]) -> Settings:
    """Settings from command-line style options (`config`, `host`, `port`, `store`, ...)."""
    values = {_OPTION_NAMES.get(key, key): value for key, value in options.items()}
    config = values.pop("config", None)
    return load_settings(config, **values)


def serve(settings: Settings) -> int:
    """Run the daemon in its own event loop; the process exit code."""
    configure(settings.log_level)
    try:
        asyncio.run(run(settings))
    except StartupError as error:
        print(f"lmwatch: {error}", file=sys.stderr)
        return EXIT_STARTUP
    except KeyboardInterrupt:
        return 0
    return 0


def main(options: Mapping[str, Any] | None = None) -> int:
    """Entry point for `lmwatch serve`: options as given on the command line."""
    try:
        settings = settings_from(options or {})
    except ConfigError as error:
        print(f"lmwatch: {error}", file=sys.stderr)
        return EXIT_STARTUP
    return serve(settings)


if __name__ == "__main__":
    sys.exit(main())
