"""The daemon: wires store, profiles, driver, engine and API together and serves.

Start-up problems (store, profiles file, configuration, port) end the process with
a clear message on stderr and exit code 2. SIGTERM/SIGINT stop it gracefully: the
engine stops supervising but migrations are not cancelled; the next start takes
them back. SIGHUP and edits of the profiles file reload the profiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import hmac
import importlib
import ipaddress
import os
import pkgutil
import secrets
import signal
import socket
import sqlite3
import ssl
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from lmwatch import server
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
from lmwatch.store import Store, StoreError, StoreLock, StoreLocked

if TYPE_CHECKING:
    from lmwatch.cluster.membership import Membership

log = get_logger("lmwatch.daemon")

EXIT_STARTUP = 2

__all__ = [
    "EXIT_STARTUP",
    "Daemon",
    "StartupError",
    "build",
    "create_app",
    "main",
    "resolve_read_token",
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
    lock: StoreLock | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    membership: Membership | None = None  # with a store_url: one of several daemons
    ssl_context: ssl.SSLContext | None = None

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.engine.stop()
        with contextlib.suppress(Exception):
            await self.driver.close()
        self.store.close()
        if self.membership is not None:  # everything is written: hand the work over now
            self.membership.stop(resign=True)
        if self.lock is not None:
            self.lock.release()


def _mode(mode: int) -> str:
    return f"{stat.S_IMODE(mode):04o}"


def _read_checked(
    descriptor: int, path: Path, what: str, refusal: Callable[[os.stat_result], str | None]
) -> str:
    """The stripped text of an open secret file, once it is a regular file that
    `refusal` (owner and mode rules) has nothing against; closes the descriptor."""
    with os.fdopen(descriptor, "r", encoding="utf-8") as file:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise StartupError(f"{what} {path} is not a regular file; refusing to use it")
        refused = refusal(info)
        if refused is not None:
            raise StartupError(refused)
        try:
            return file.read().strip()
        except (OSError, UnicodeDecodeError) as error:
            raise StartupError(f"cannot read {what} {path}: {error}") from None


def _read_own_token(path: Path) -> str:
    """The token the daemon wrote on an earlier start, checked before it is trusted.

    Refused: a symbolic link at the path, anything but a regular file, a file not owned
    by the daemon's user, or one that group or others may read or write.
    Raises FileNotFoundError when there is nothing at the path."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise StartupError(
                f"token file {path} is a symbolic link; refusing to use it "
                "(remove the link, or set token_file to the file you mean)"
            ) from None
        raise StartupError(f"cannot read token file {path}: {error.strerror}") from None

    def refusal(info: os.stat_result) -> str | None:
        if info.st_uid != os.geteuid():
            return (
                f"token file {path} is owned by uid {info.st_uid}, not by the daemon's user "
                f"(uid {os.geteuid()}); refusing to use it"
            )
        if info.st_mode & 0o077:
            return (
                f"token file {path} is readable or writable by group or others "
                f"(mode {_mode(info.st_mode)}); refusing to use it "
                f"(chmod 600 {path}, or delete it to generate a new token)"
            )
        return None

    token = _read_checked(descriptor, path, "token file", refusal)
    if not token:
        raise StartupError(f"token file {path} is empty (delete it to generate a new token)")
    return token


def _read_configured_secret(path: Path, what: str) -> str:
    """A token from a file the operator named (token_file, read_token_file).

    The daemon never writes it. It may be reached through symbolic links (as mounted
    secrets are), but the file itself must be regular, owned by the daemon's user or
    root, not readable by others and not writable by group or others. Group read is
    allowed: that is how container platforms hand a secret to a non-root user."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise StartupError(f"cannot read {what} {path}: {error.strerror}") from None

    def refusal(info: os.stat_result) -> str | None:
        if info.st_uid not in (os.geteuid(), 0):
            return (
                f"{what} {path} is owned by uid {info.st_uid}, neither the daemon's user "
                f"(uid {os.geteuid()}) nor root; refusing to use it"
            )
        if info.st_mode & 0o026:
            return (
                f"{what} {path} is readable by others or writable by group or others "
                f"(mode {_mode(info.st_mode)}); refusing to use it (chmod 600 {path})"
            )
        return None

    token = _read_checked(descriptor, path, what, refusal)
    if not token:
        raise StartupError(f"{what} {path} is empty")
    return token


def _generated_token(path: Path) -> str:
    """The daemon's own token: kept from an earlier start, or created once (0600).

    The file is created with O_EXCL and O_NOFOLLOW, so nothing already at the path
    (a symbolic link included) is ever written through or changed."""
    try:
        token = _read_own_token(path)
    except FileNotFoundError:
        pass
    else:
        log.info("token-loaded", path=str(path), note="kept the token of an earlier start")
        return token
    token = secrets.token_urlsafe(32)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        descriptor = os.open(path, flags, 0o600)
    except FileExistsError:  # appeared since we looked: use it, with the same checks
        try:
            return _read_own_token(path)
        except FileNotFoundError:
            raise StartupError(f"token file {path} keeps changing; refusing to start") from None
    except OSError as error:
        raise StartupError(
            f"cannot write the generated token to {path}: {error.strerror}"
        ) from None
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), 0o600)  # whatever the umask; it is our own new file
            file.write(token + "\n")
            file.flush()
            os.fsync(file.fileno())
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise StartupError(
            f"cannot write the generated token to {path}: {error.strerror}"
        ) from None
    log.info("token-generated", path=str(path), note="no token configured; wrote a new one")
    return token


def resolve_token(settings: Settings) -> str:
    """The API token: configured, read from token_file, or the daemon's own token file
    next to the store (kept across restarts; generated and written 0600 the first time)."""
    if settings.token is not None:
        return settings.token.get_secret_value().strip()
    if settings.token_file is not None:
        return _read_configured_secret(settings.token_file, "token file")
    return _generated_token(settings.token_path())


def resolve_read_token(settings: Settings) -> str | None:
    """The token that allows reads only, if one is configured (never generated)."""
    if settings.read_token is not None:
        token = settings.read_token.get_secret_value().strip()
    elif settings.read_token_file is not None:
        token = _read_configured_secret(settings.read_token_file, "read token file")
    else:
        return None
    return token


def is_loopback(host: str) -> bool | None:
    """Whether `host` names loopback addresses only; None when it does not resolve
    (listening will then fail with its own message)."""
    if not host.strip():
        return False  # every interface
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return None
    addresses = {str(info[4][0]).split("%", 1)[0] for info in found}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def check_exposure(settings: Settings) -> None:
    """Refuse to serve plain HTTP beyond loopback unless allow_insecure says so."""
    if is_loopback(settings.listen_host) is not False:
        return
    where = settings.listen_host or "every interface"
    if settings.tls_cert is None:
        if not settings.allow_insecure:
            raise StartupError(
                f"refusing to listen on {where}: it is not a loopback address and no TLS is "
                "configured, so bearer tokens (and every answer) would cross the network in "
                "clear text. Set tls_cert and tls_key, or set allow_insecure: true if a "
                "TLS proxy or a private network protects the port"
            )
        log.warning(
            "insecure-listen",
            host=where,
            note="plain HTTP beyond loopback (allow_insecure); tokens travel in clear text",
        )
    if settings.read_token is None and settings.read_token_file is None:
        log.warning(
            "reads-open",
            host=where,
            note="anyone who can connect may read migrations and profiles; set read_token_file",
        )


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context when tls_cert and tls_key are set."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    files = f"{settings.tls_cert}, {settings.tls_key}"
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except ssl.SSLError as error:
        reason = error.reason or str(error)
        raise StartupError(f"invalid TLS certificate or key ({files}): {reason}") from None
    except OSError as error:
        raise StartupError(
            f"cannot read the TLS certificate or key ({files}): {error.strerror or error}"
        ) from None
    return context


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
    if settings.store_url is not None:
        # Kept beside the migrations, in the database (one daemon per database for now).
        from lmwatch.drivers.sim_world_pg import PostgresWorld

        try:
            return SimDriver(inventory, clock, world=PostgresWorld(settings.store_url))
        except Exception as error:  # psycopg's errors: the driver is an optional extra
            raise StartupError(
                f"cannot keep the simulated world in the store database: {error}"
            ) from None
    if str(settings.store_path) == ":memory:":
        return SimDriver(inventory, clock)
    # The simulated hosts keep their instances and jobs across restarts, as real
    # hosts do: the world is kept in the store file beside the migrations.
    from lmwatch.drivers.sim_world import SqliteWorld

    try:
        world = SqliteWorld(str(settings.store_path))
    except sqlite3.Error as error:
        raise StartupError(f"cannot keep the simulated world in the store: {error}") from None
    return SimDriver(inventory, clock, world=world)


def _open_profiles(settings: Settings, clock: Clock) -> ProfileRegistry:
    try:
        return ProfileRegistry(settings.profiles_path, clock=clock)
    except ProfileError as error:
        lines = "\n".join(f"  {problem}" for problem in error.problems)
        raise StartupError(f"invalid profiles file:\n{lines}") from None


def _lock_store(settings: Settings) -> StoreLock | None:
    """The store's lock, taken before anything touches the store, the token or a host.

    A second daemon on the same store stops here with nothing changed; an
    in-memory store belongs to its process alone and needs no lock. A database store
    takes its lock as it opens (lmwatch/pgstore.py), before it changes anything.
    """
    if str(settings.store_path) == ":memory:" or settings.store_url is not None:
        return None
    try:
        return StoreLock.acquire(settings.store_path)
    except StoreLocked as error:
        raise StartupError(str(error)) from None
    except StoreError as error:
        raise StartupError(f"cannot open the store: {error}") from None


def _open_store(settings: Settings) -> Store:
    try:
        return Store.open(settings.store_url or settings.store_path)
    except StoreLocked as error:
        raise StartupError(str(error)) from None
    except StoreError as error:
        raise StartupError(f"cannot open the store: {error}") from None


JOIN_WAIT = 5.0  # seconds a member waits for its first registration at start


async def _join(settings: Settings) -> Membership | None:
    """With a store_url, this daemon as a member of the daemons sharing the database:
    its lease kept from now on (docs/cluster.md). None with a SQLite store."""
    if settings.store_url is None:
        return None
    from lmwatch.cluster.membership import Membership
    from lmwatch.policies.leases import LeaseTerms

    membership = Membership(
        settings.store_url, settings.member, LeaseTerms.for_lease(settings.lease)
    )
    membership.start()
    deadline = time.monotonic() + JOIN_WAIT
    while membership.keeper.member is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    if membership.keeper.member is None:
        membership.stop()
        raise StartupError(
            f"cannot join the daemons of the store database as member {settings.member!r}: "
            "the database did not register it in time; retry later"
        )
    log.info("member-joined", member=settings.member, lease=settings.lease)
    return membership


async def build(settings: Settings, *, clock: Clock | None = None) -> Daemon:
    """Open everything and start the engine (not yet listening)."""
    clock = clock or WallClock()
    check_exposure(settings)  # configuration errors first: nothing is touched yet
    context = tls_context(settings)
    lock = _lock_store(settings)  # then the lock: a second daemon must change nothing
    store: Store | None = None
    driver: Driver | None = None
    engine: Engine | None = None
    membership: Membership | None = None
    try:
        store = _open_store(settings)
        membership = await _join(settings)
        registry = _open_profiles(settings, clock)
        token = resolve_token(settings)
        read_token = resolve_read_token(settings)
        if read_token is not None and hmac.compare_digest(read_token, token):
            raise StartupError("read_token is the same as token; give reads a token of their own")
        driver = _make_driver(settings, clock)
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
                command_wait=settings.command_wait,
            ),
            membership=membership,
        )
        try:
            await engine.start()
        except StoreError as error:
            raise StartupError(str(error)) from None
    except BaseException:
        if engine is not None:
            await engine.stop()
        if driver is not None:
            with contextlib.suppress(Exception):
                await driver.close()
        if store is not None:
            store.close()
        if membership is not None:
            membership.stop()
        if lock is not None:
            lock.release()
        raise
    app = create_app(
        engine,
        registry,
        metrics,
        token,
        read_token=read_token,
        body_timeout=settings.http_body_timeout,
    )
    daemon = Daemon(settings, store, registry, driver, engine, metrics, token, clock, app, lock)
    daemon.ssl_context = context
    daemon.membership = membership
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
    runner = server.runner(
        daemon.app,
        header_timeout=settings.http_header_timeout,
        keepalive_timeout=settings.http_keepalive_timeout,
        max_connections=settings.http_max_connections,
        access_log=None,
        handle_signals=False,
    )
    try:
        await runner.setup()
        site = web.TCPSite(
            runner,
            settings.listen_host,
            settings.port,
            ssl_context=daemon.ssl_context,
            backlog=settings.http_backlog,
        )
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
            scheme="https" if daemon.ssl_context is not None else "http",
            store=daemon.store.path,
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


# The young generation is collected after this many new container objects (700 by
# default). Measured at 2,000 running migrations (docs/scale.md): the collector then ran
# ~80 times a second and a full collection every 1-2 s, each full one 0.2-0.6 s with the
# event loop stopped, and finding nothing to free (the state is acyclic and long-lived).
GC_YOUNG_THRESHOLD = 20_000
GC_OLDER_THRESHOLD = 20  # collections of one generation before the next one is collected


def settle_collector() -> None:
    """Once started: what start-up built (modules, schemas, profiles, re-attached
    supervisions) lives as long as the process, so it is frozen out of the
    collector's scans; and the collector runs less often (see the thresholds)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, GC_OLDER_THRESHOLD, GC_OLDER_THRESHOLD)
    log.info("collector-settled", frozen=gc.get_freeze_count(), thresholds=gc.get_threshold())


def serve(settings: Settings) -> int:
    """Run the daemon in its own event loop; the process exit code."""
    configure(settings.log_level, settings.log_format)
    try:
        asyncio.run(run(settings, on_ready=lambda _addresses: settle_collector()))
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
