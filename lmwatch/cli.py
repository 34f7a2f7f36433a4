"""The `lmwatch` command: run the daemon, drive migrations, check profiles, ask what-if.

Commands that talk to a running daemon use its HTTP API (`--url`, `$LMWATCH_URL`);
`profiles check` and `simulate` work offline. Exit status: 0 success, 1 when the
daemon refused or the migration did not complete, 2 for bad usage or input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import IO, TYPE_CHECKING, Any

from lmwatch.clock import Clock, WallClock
from lmwatch.render import (
    DRAIN_HEADERS,
    MIGRATION_HEADERS,
    PLACEMENT_HEADERS,
    PROFILE_HEADERS,
    LiveDrain,
    LiveProgress,
    Output,
    decision_lines,
    drain_detail,
    drain_row,
    drain_total_line,
    explain_lines,
    migration_detail,
    migration_row,
    outcome_line,
    placement_lines,
    placement_rows,
    profile_rows,
    timeline_entry,
    timeline_lines,
    timeline_origin,
)
from lmwatch.units import format_duration, format_size, parse_duration, parse_rate, parse_size

if TYPE_CHECKING:  # the HTTP client loads only for commands that talk to the daemon
    import aiohttp

    from lmwatch.client import Client

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
FINISHED = ("completed", "cancelled", "failed")
FOLLOW_INTERVAL = 1.0  # seconds between polls of `migrate --follow`
FOLLOW_RETRIES = 5  # consecutive unreachable polls tolerated while following


class UsageError(Exception):
    """Bad input caught after argument parsing (exit status 2)."""


# -- argument types --------------------------------------------------------------------


def _typed(parse: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{what}: {error}") from error

    convert.__name__ = what
    return convert


def parse_labels(text: str) -> dict[str, str]:
    """`k=v` or `k=v,k2=v2`."""
    labels: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{part!r} is not a label (write key=value)")
        labels[key.strip()] = value.strip()
    return labels


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{text} is not between 0 and 1")
    return value


def _rate_text(text: str) -> float:
    """A rate such as `200MiB/s` or `10Gbit/s`; a bare number is bytes/s (`0` = idle)."""
    try:
        value = float(text)
    except ValueError:
        value = parse_rate(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{text!r} is not a rate (write e.g. 100MiB/s or 10Gbit/s)")
    return value


_size = _typed(parse_size, "size")
_rate = _typed(_rate_text, "rate")
_duration = _typed(parse_duration, "duration")
_labels = _typed(parse_labels, "label")
_duty = _typed(_fraction, "duty")


def _hosts(text: str) -> list[str]:
    hosts = [part.strip() for part in text.split(",") if part.strip()]
    if not hosts:
        raise argparse.ArgumentTypeError(f"{text!r} names no host (a,b)")
    return hosts


def _merge(groups: Sequence[dict[str, str]] | None) -> dict[str, str]:
    merged: dict[str, str] = {}
    for group in groups or ():
        merged.update(group)
    return merged


# -- parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmwatch",
        allow_abbrev=False,
        description="Supervise live migrations and finish them within availability profiles.",
    )
    api = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    api.add_argument("--url", default=argparse.SUPPRESS, help="daemon URL ($LMWATCH_URL)")
    api.add_argument("--token", default=argparse.SUPPRESS, help="bearer token ($LMWATCH_TOKEN)")
    api.add_argument("--token-file", default=argparse.SUPPRESS, help="file holding the token")
    parser.add_argument("--url", default=None, help="daemon URL ($LMWATCH_URL)")
    parser.add_argument("--token", default=None, help="bearer token ($LMWATCH_TOKEN)")
    parser.add_argument("--token-file", default=None, help="file holding the token")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", help="configuration file")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8787)")
    serve.add_argument("--profiles", help="profiles file")
    serve.add_argument("--store", help="store file")
    serve.add_argument(
        "--store-url",
        help="PostgreSQL store, postgresql://... instead of the file (a password in it is "
        "seen by other users: prefer $LMWATCH_STORE_URL or the config file)",
    )
    serve.add_argument(
        "--member",
        help="this daemon's name among the daemons sharing a store_url (default: the host "
        "name; two daemons must not share one)",
    )
    serve.add_argument("--inventory", help="simulator inventory file")
    # Also accepted before the command (`lmwatch --token X serve`); prefer a file or
    # $LMWATCH_TOKEN on shared machines: other users can see command lines.
    serve.add_argument(
        "--token", default=argparse.SUPPRESS, help="the daemon's bearer token for changes"
    )
    serve.add_argument(
        "--token-file", default=argparse.SUPPRESS, help="file holding the daemon's token"
    )

    migrate = commands.add_parser("migrate", parents=[api], help="start a migration")
    migrate.add_argument("instance")
    migrate.add_argument("--from", dest="source", required=True, metavar="HOST")
    migrate.add_argument(
        "--to", dest="destination", metavar="HOST", help="destination (left out: lmwatch chooses)"
    )
    migrate.add_argument(
        "--force",
        action="store_true",
        help="with --to: skip the capacity checks (never those protecting the instance)",
    )
    migrate.add_argument("--label", "--labels", dest="labels", type=_labels, action="append")
    migrate.add_argument("--profile", help="use this profile instead of selecting one")
    migrate.add_argument("--follow", action="store_true", help="show progress until it ends")

    place = commands.add_parser(
        "place", parents=[api], help="where an instance would be moved now, and why"
    )
    place.add_argument("instance")
    place.add_argument("--destinations", type=_hosts, metavar="HOST,...", help="only these hosts")
    place.add_argument("--profile", help="use this profile instead of selecting one")

    status = commands.add_parser("status", parents=[api], help="list migrations or show one")
    status.add_argument("id", nargs="?", help="migration id (or its first characters)")
    status.add_argument("--state", help="only migrations in this state")

    force = commands.add_parser("force-complete", parents=[api], help="finish a migration now")
    force.add_argument("id")
    force.add_argument(
        "--accept-pause",
        action="store_true",
        help="accept a pause beyond the profile when it allows no other way",
    )

    cancel = commands.add_parser("cancel", parents=[api], help="stop a migration")
    cancel.add_argument("id")

    drain = commands.add_parser(
        "drain",
        parents=[api],
        help="move every instance off a host (or: --status [ID], --cancel ID)",
    )
    drain.add_argument("host", nargs="?", help="host to empty")
    drain.add_argument(
        "--destinations",
        "--to",
        dest="destinations",
        nargs="+",
        metavar="HOST",
        help="only these hosts may receive its instances (default: lmwatch chooses)",
    )
    drain.add_argument("--profile", help="use this profile for every migration of the drain")
    drain.add_argument(
        "--follow", action="store_true", help="one live line per instance and a total, until done"
    )
    drain.add_argument(
        "--status",
        nargs="?",
        const="",
        metavar="ID",
        help="list drains, or show one (id or its first characters)",
    )
    drain.add_argument("--cancel", metavar="ID", help="start nothing more for this drain")

    profiles = commands.add_parser("profiles", help="availability profiles")
    profile_commands = profiles.add_subparsers(dest="profiles_command", required=True)
    check = profile_commands.add_parser("check", help="validate a profiles file")
    check.add_argument("file")
    explain = profile_commands.add_parser(
        "explain", parents=[api], help="which profile applies to an instance, and why"
    )
    explain.add_argument("instance")
    explain.add_argument("--label", "--labels", dest="labels", type=_labels, action="append")
    explain.add_argument("--uuid")
    profile_commands.add_parser("list", parents=[api], help="the profiles the daemon uses")

    sim = commands.add_parser(
        "simulate", help="what-if: one migration in virtual time through the real engine"
    )
    sim.add_argument("--memory", type=_size, help="instance memory, e.g. 16GiB")
    sim.add_argument("--change-rate", type=_rate, help="memory rewritten per second (base)")
    sim.add_argument("--bandwidth", type=_rate, help="link bandwidth, e.g. 1GiB/s or 10Gbit/s")
    sim.add_argument("--working-set", type=_size, help="memory the instance keeps rewriting")
    sim.add_argument("--disk", type=_size, default=0, help="local disk moved with it, e.g. 40GiB")
    sim.add_argument("--disk-writes", type=_rate, default=0.0, help="disk written per second")
    sim.add_argument("--pattern", choices=("constant", "bursty", "growing"), default="constant")
    sim.add_argument("--peak", type=_rate, help="bursty: change rate during a burst")
    sim.add_argument("--period", type=_duration, help="bursty: time between bursts (30s)")
    sim.add_argument("--duty", type=_duty, help="bursty: fraction of the period bursting (0.2)")
    sim.add_argument("--per-minute", type=_rate, help="growing: increase every minute")
    sim.add_argument("--max-rate", type=_rate, help="growing: highest change rate")
    sim.add_argument("--profile", help="use this profile instead of selecting one")
    sim.add_argument("--profiles", help="profiles file (default: the shipped profiles)")
    sim.add_argument("--label", "--labels", dest="labels", type=_labels, action="append")
    sim.add_argument("--inventory", help="take the instance from this inventory file")
    sim.add_argument(
        "--instance",
        help="instance name; alone, an instance of the built-in inventory (e.g. db-1)",
    )
    sim.add_argument("--to", dest="destination", help="destination host (with --inventory)")
    sim.add_argument("--limit", type=_duration, default=None, help="give up after (virtual)")
    sim.add_argument("--json", action="store_true", help="print the report as JSON")
    sim.add_argument(
        "--verbose", action="store_true", help="show every timeline entry (no folding)"
    )

    from lmwatch.bench.__main__ import add_arguments as add_bench_arguments

    bench = commands.add_parser(
        "bench",
        help="decision benchmark in virtual time: lmwatch against other systems' policies",
    )
    add_bench_arguments(bench)
    return parser


# -- entry points ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    try:
        return asyncio.run(dispatch(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `lmwatch simulate ... | head`: the reader has gone
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


async def run(
    argv: Sequence[str],
    *,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    clock: Clock | None = None,
    session: aiohttp.ClientSession | None = None,
) -> int:
    """Run one command inside a running event loop (tests, embedding).

    Usage errors return 2 instead of exiting.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.command == "serve":
        Output(stdout, err=stderr).error("serve cannot run inside another program's loop")
        return EXIT_USAGE
    return await dispatch(args, stdout=stdout, stderr=stderr, clock=clock, session=session)


async def dispatch(
    args: argparse.Namespace,
    *,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
    clock: Clock | None = None,
    session: aiohttp.ClientSession | None = None,
) -> int:
    out = Output(stdout, err=stderr)
    if args.command == "profiles" and args.profiles_command == "check":
        return profiles_check(out, args.file)
    if args.command == "simulate":
        return await simulate_command(out, args)
    if args.command == "bench":
        from lmwatch.bench.__main__ import bench_command

        return bench_command(out, args)
    from lmwatch.client import ApiError, Client, resolve_token, resolve_url

    handler = _API_COMMANDS[
        args.command if args.command != "profiles" else f"profiles {args.profiles_command}"
    ]
    try:
        token = resolve_token(args.token, args.token_file)
        async with Client(resolve_url(args.url), token, session=session) as client:
            return await handler(out, client, args, clock or WallClock())
    except ApiError as error:
        out.error(error.message)
        return EXIT_FAILED


def _serve(args: argparse.Namespace) -> int:
    """Run the daemon until it is stopped (the daemon owns its event loop)."""
    from lmwatch import daemon

    settings = {
        key: value
        for key, value in {
            "config": args.config,
            "host": args.host,
            "port": args.port,
            "profiles": args.profiles,
            "store": args.store,
            "store_url": args.store_url,
            "member": args.member,
            "inventory": args.inventory,
            "token": args.token,
            "token_file": args.token_file,
        }.items()
        if value is not None
    }
    result = daemon.main(settings)
    return int(result or 0)


# -- API commands --------------------------------------------------------------------------

Handler = Callable[[Output, "Client", argparse.Namespace, Clock], Coroutine[Any, Any, int]]


async def migrate_command(
    out: Output, client: Client, args: argparse.Namespace, clock: Clock
) -> int:
    migration = await client.submit(
        args.instance,
        args.source,
        args.destination,
        labels=_merge(args.labels) or None,
        profile=args.profile,
        force=args.force,
    )
    out.line(str(migration.get("id")))
    placement = migration.get("placement") or {}
    if args.destination is None and placement:
        out.line(f"to {migration.get('destination')}: {placement.get('reason', '')}")
    if not args.follow:
        return EXIT_OK
    profile = migration.get("profile") or {}
    out.line(f"profile {profile.get('name', '-')}: {profile.get('reason', '')}")
    return await follow(out, client, str(migration["id"]), clock)


async def follow(
    out: Output,
    client: Client,
    migration_id: str,
    clock: Clock,
    interval: float = FOLLOW_INTERVAL,
) -> int:
    """Poll a migration until it ends, showing progress and each new timeline entry."""
    from lmwatch.client import ApiError

    printed = 0
    unreachable = 0
    with LiveProgress(out) as live:
        while True:
            try:
                migration = await client.migration(migration_id)
            except ApiError as error:
                if error.status != 0 or unreachable >= FOLLOW_RETRIES:
                    raise
                unreachable += 1
                live.say(f"daemon not answering ({error.message}); retrying")
                await clock.sleep(interval)
                continue
            unreachable = 0
            timeline = migration.get("timeline") or []
            origin = timeline_origin(migration)
            for entry in timeline[printed:]:
                live.say(timeline_entry(entry, origin))
            printed = max(printed, len(timeline))
            live.update(migration)
            if migration.get("state") in FINISHED:
                break
            await clock.sleep(interval)
    out.line(outcome_line(migration))
    return EXIT_OK if migration.get("state") == "completed" else EXIT_FAILED


async def _find(client: Client, migration_id: str) -> dict[str, Any]:
    """A migration by full id, or by an unambiguous prefix of it."""
    from lmwatch.client import ApiError

    try:
        return await client.migration(migration_id)
    except ApiError as error:
        if error.status != 404:
            raise
        matches = [
            m for m in await client.migrations() if str(m.get("id", "")).startswith(migration_id)
        ]
        if len(matches) == 1:
            return await client.migration(str(matches[0]["id"]))
        if len(matches) > 1:
            raise ApiError(
                404, f"{migration_id!r} is ambiguous", f"it starts {len(matches)} migration ids"
            ) from error
        raise


async def status_command(
    out: Output, client: Client, args: argparse.Namespace, clock: Clock
) -> int:
    if args.id:
        out.lines(migration_detail(await _find(client, args.id)))
        return EXIT_OK
    migrations = await client.migrations(args.state)
    if not migrations:
        out.line("no migrations" + (f" in state {args.state}" if args.state else ""))
        return EXIT_OK
    out.table(MIGRATION_HEADERS, [migration_row(m) for m in migrations])
    return EXIT_OK


async def force_complete_command(
    out: Output, client: Client, args: argparse.Namespace, clock: Clock
) -> int:
    migration = await _find(client, args.id)
    result = await client.force_complete(str(migration["id"]), accept_pause=args.accept_pause)
    out.lines(decision_lines(result))
    return EXIT_OK


async def cancel_command(
    out: Output, client: Client, args: argparse.Namespace, clock: Clock
) -> int:
    migration = await _find(client, args.id)
    result = await client.cancel(str(migration["id"]))
    answer = result.get("migration", result) if isinstance(result, dict) else migration
    timeline = answer.get("timeline") or []
    reason = timeline[-1].get("reason", "") if timeline else ""
    state = answer.get("state")
    if state in FINISHED:
        line = f"migration {answer.get('id')} {state}"
    else:
        line = f"cancel requested for migration {answer.get('id')} (now {state})"
    out.line(f"{line}: {reason}" if reason else line)
    return EXIT_OK


async def explain_command(
    out: Output, client: Client, args: argparse.Namespace, clock: Clock
) -> int:
    answer = await client.explain(args.instance, _merge(args.labels), args.uuid)
    out.lines(explain_lines(answer))
    return EXIT_OK


async def place_command(out: Output, client: Client, args: argparse.Namespace, clock: Clock) -> int:
    answer = await client.placement(args.instance, args.destinations, args.profile)
    out.lines(placement_lines(answer))
    out.table(PLACEMENT_HEADERS, placement_rows(answer))
    return EXIT_OK if answer.get("destination") else EXIT_FAILED


async def list_command(out: Output, client: Client, args: argparse.Namespace, clock: Clock) -> int:
    answer = await client.profiles()
    profiles = answer.get("profiles", []) if isinstance(answer, dict) else list(answer or [])
    if isinstance(answer, dict) and answer.get("source"):
        out.line(f"from {answer['source']} (generation {answer.get('generation', '?')})")
    out.table(PROFILE_HEADERS, profile_rows(profiles))
    return EXIT_OK


async def _find_drain(client: Client, drain_id: str) -> dict[str, Any]:
    """A drain by full id, or by an unambiguous prefix of it."""
    from lmwatch.client import ApiError

    try:
        return await client.get_drain(drain_id)
    except ApiError as error:
        if error.status != 404:
            raise
        matches = [d for d in await client.drains() if str(d.get("id", "")).startswith(drain_id)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ApiError(
                404, f"{drain_id!r} is ambiguous", f"it starts {len(matches)} drain ids"
            ) from error
        raise


def _split_hosts(values: Sequence[str] | None) -> list[str] | None:
    """`--destinations b c` or `--destinations b,c`."""
    if not values:
        return None
    return [host for value in values for host in value.split(",") if host.strip()]


async def drain_command(out: Output, client: Client, args: argparse.Namespace, clock: Clock) -> int:
    chosen = [
        name
        for name, given in (
            ("HOST", args.host),
            ("--status", args.status is not None),
            ("--cancel", args.cancel),
        )
        if given
    ]
    if len(chosen) != 1:
        out.error("give exactly one of HOST, --status [ID] or --cancel ID")
        return EXIT_USAGE
    if args.cancel:
        found = await _find_drain(client, args.cancel)
        drain = await client.cancel_drain(str(found["id"]))
        out.line(f"drain {drain.get('id')} {drain.get('state')}: {drain.get('reason', '')}")
        return EXIT_OK
    if args.status is not None:
        if not args.status:
            drains = await client.drains()
            if not drains:
                out.line("no drains")
                return EXIT_OK
            out.table(DRAIN_HEADERS, [drain_row(d) for d in drains])
            return EXIT_OK
        drain = await _find_drain(client, args.status)
        if args.follow:
            return await follow_drain(out, client, str(drain["id"]), clock)
        out.lines(drain_detail(drain))
        return EXIT_OK
    drain = await client.drain(args.host, _split_hosts(args.destinations), args.profile)
    out.line(str(drain.get("id")))
    for entry in drain.get("instances") or []:
        if entry.get("state") == "blocked":
            out.line(f"blocked: {entry.get('instance')}: {entry.get('reason', '')}")
        elif entry.get("warning"):
            out.line(f"at risk: {entry.get('instance')}: {entry['warning']}")
    if not args.follow:
        if drain.get("state") in _DRAIN_FINISHED:
            out.line(drain_total_line(drain) + f" ({drain.get('reason', '')})")
        return EXIT_OK if drain.get("state") != "failed" else EXIT_FAILED
    return await follow_drain(out, client, str(drain["id"]), clock)


_DRAIN_FINISHED = ("completed", "failed", "cancelled")


async def follow_drain(
    out: Output,
    client: Client,
    drain_id: str,
    clock: Clock,
    interval: float = FOLLOW_INTERVAL,
) -> int:
    """Poll a drain until it ends: a live line per instance and a total."""
    from lmwatch.client import ApiError

    unreachable = 0
    with LiveDrain(out) as live:
        while True:
            try:
                drain = await client.get_drain(drain_id)
            except ApiError as error:
                if error.status != 0 or unreachable >= FOLLOW_RETRIES:
                    raise
                unreachable += 1
                await clock.sleep(interval)
                continue
            unreachable = 0
            live.update(drain)
            if drain.get("state") in _DRAIN_FINISHED:
                break
            await clock.sleep(interval)
    out.line(f"drain {drain.get('state')}: {drain.get('reason', '')}")
    return EXIT_OK if drain.get("state") == "completed" else EXIT_FAILED


_API_COMMANDS: dict[str, Handler] = {
    "drain": drain_command,
    "migrate": migrate_command,
    "place": place_command,
    "status": status_command,
    "force-complete": force_complete_command,
    "cancel": cancel_command,
    "profiles explain": explain_command,
    "profiles list": list_command,
}


# -- offline commands ----------------------------------------------------------------------


def profiles_check(out: Output, path: str) -> int:
    from lmwatch.profiles.loader import ProfileError, load_profiles

    try:
        loaded = load_profiles(path)
    except ProfileError as error:
        out.lines(str(problem) for problem in error.problems)
        count = len(error.problems)
        out.error(f"{path}: {count} problem{'s' if count != 1 else ''}")
        return EXIT_FAILED
    names = [profile.name for profile in loaded.profiles]
    noun = "profile" if len(names) == 1 else "profiles"
    out.line(f"{len(names)} {noun} OK: {', '.join(names)}")
    return EXIT_OK


def _change_rate(args: argparse.Namespace) -> float | dict[str, Any]:
    base = args.change_rate if args.change_rate is not None else 0.0
    if args.pattern == "bursty":
        if args.peak is None or args.period is None:
            raise UsageError("--pattern bursty needs --peak and --period")
        pattern: dict[str, Any] = {
            "pattern": "bursty",
            "base": base,
            "peak": args.peak,
            "period": args.period,
        }
        if args.duty is not None:
            pattern["duty"] = args.duty
        return pattern
    if args.pattern == "growing":
        if args.per_minute is None:
            raise UsageError("--pattern growing needs --per-minute")
        pattern = {"pattern": "growing", "start": base, "per_minute": args.per_minute}
        if args.max_rate is not None:
            pattern["max"] = args.max_rate
        return pattern
    if args.change_rate is None:
        raise UsageError("--change-rate is required (or give --inventory and --instance)")
    return float(args.change_rate)


async def simulate_command(out: Output, args: argparse.Namespace) -> int:
    from lmwatch.drivers.base import Refused
    from lmwatch.drivers.inventory import InventoryError, default_inventory, load_inventory
    from lmwatch.errors import EngineError
    from lmwatch.profiles.loader import ProfileError
    from lmwatch.simulate import DEFAULT_INSTANCE, DEFAULT_LIMIT, scenario, simulate

    labels = _merge(args.labels)
    try:
        if args.inventory:
            if not args.instance:
                raise UsageError("--inventory needs --instance NAME")
            inventory = load_inventory(args.inventory)
            instance = args.instance
        elif args.instance and args.memory is None:
            inventory = default_inventory()  # the daemon's embedded simulator inventory
            instance = args.instance
        else:
            if args.memory is None or args.bandwidth is None:
                raise UsageError("--memory and --bandwidth are required (or give --inventory)")
            instance = args.instance or DEFAULT_INSTANCE
            inventory = scenario(
                memory=args.memory,
                change_rate=_change_rate(args),
                bandwidth=args.bandwidth,
                working_set=args.working_set,
                labels=labels,
                name=instance,
                disk=args.disk,
                disk_writes=args.disk_writes,
            )
        began = time.perf_counter()
        report = await simulate(
            inventory,
            instance,
            destination=args.destination,
            labels=labels,
            profile=args.profile,
            profiles_path=args.profiles,
            limit=args.limit or DEFAULT_LIMIT,
        )
        wall = time.perf_counter() - began
    except UsageError as error:
        out.error(str(error))
        return EXIT_USAGE
    except (InventoryError, ProfileError, EngineError, Refused) as error:
        out.error(str(error))
        return EXIT_USAGE
    if args.json:
        out.line(json.dumps(report.as_json(), indent=2, sort_keys=True))
    else:
        entry = inventory.instance(instance)
        assert entry is not None
        disk = f", local disk {format_size(entry.disk)}" if entry.disk else ""
        out.line(
            f"{instance}: memory {format_size(entry.memory)}{disk}, "
            f"{report.source} -> {report.destination} at "
            f"{format_size(inventory.bandwidth(report.source, report.destination))}/s"
        )
        out.line(f"profile {report.profile}: {report.profile_reason}")
        outcome = report.as_json()["outcome"]
        out.line(_report_outcome(report.state, outcome, report.finished, report.duration))
        out.line("timeline")
        lines = timeline_lines(report.timeline, 0.0, collapse=not args.verbose)
        out.lines(f"  {line}" for line in lines)
        out.line(f"simulated {format_duration(report.duration)} of migration in {wall:.2f}s")
    return EXIT_OK if report.finished else EXIT_FAILED


def _report_outcome(state: str, outcome: Any, finished: bool, duration: float) -> str:
    if not finished:
        return f"not finished after {format_duration(duration)} (state {state})"
    return "outcome  " + outcome_line({"state": state, "outcome": outcome})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
