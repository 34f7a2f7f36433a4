"""Pre-flight pieces every driver shares: CPU/node sets and the refusals' wording.

A set of host CPUs or memory (NUMA) nodes is written the usual way, "0-3,^2,8"
(ranges, single numbers, `^` to leave some out). The reasons are worded here once,
so that every driver refuses the same situation with the same sentence.
"""

from __future__ import annotations

from collections.abc import Iterable


def parse_cpuset(text: str) -> frozenset[int]:
    """ "0-3,^2,8" -> {0, 1, 3, 8}.

    Exclusions (`^N`, `^N-M`) apply to the whole list whatever their position;
    entries that are not numbers or ranges are ignored (use `parse_cpuset_strict`
    where a person wrote the text)."""
    include: set[int] = set()
    exclude: set[int] = set()
    for raw in text.replace(" ", "").split(","):
        target = exclude if raw.startswith("^") else include
        low, _, high = raw.removeprefix("^").partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            continue
        target.update(range(int(low), int(high or low) + 1))
    return frozenset(include - exclude)


def parse_cpuset_strict(text: str) -> frozenset[int]:
    """Like `parse_cpuset`, but a malformed entry or an empty result is a ValueError."""
    for raw in text.replace(" ", "").split(","):
        low, _, high = raw.removeprefix("^").partition("-")
        if not low.isdigit() or (high and not high.isdigit()) or (high and int(high) < int(low)):
            raise ValueError(f"{text!r} is not a set like '0-3,^2,8' ({raw!r})")
    ids = parse_cpuset(text)
    if not ids:
        raise ValueError(f"{text!r} names no CPU or node")
    return ids


def format_cpuset(ids: Iterable[int]) -> str:
    """The compact form: {0, 1, 2, 3, 8} -> "0-3,8"."""
    runs: list[str] = []
    ordered = sorted(set(ids))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        runs.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(runs)


def pinning_refusal(
    instance: str,
    host: str,
    *,
    pinned_cpus: frozenset[int],
    pinned_nodes: frozenset[int],
    host_cpus: frozenset[int] | None,
    host_nodes: frozenset[int] | None,
) -> str | None:
    """Why `instance` cannot run on `host` because of the host CPUs or memory nodes it
    is pinned to; None when it can (or when the host's are unknown)."""
    problems = []
    if host_cpus is not None and (cpus := pinned_cpus - host_cpus):
        problems.append(
            f"is pinned to host CPUs {format_cpuset(cpus)}, host {host} has CPUs "
            f"{format_cpuset(host_cpus)}"
        )
    if host_nodes is not None and (nodes := pinned_nodes - host_nodes):
        problems.append(
            f"is pinned to host memory nodes {format_cpuset(nodes)}, host {host} has "
            f"nodes {format_cpuset(host_nodes)}"
        )
    if not problems:
        return None
    return f"instance {instance!r} " + "; it ".join(problems)


def identity_refusal(
    host: str, name: str, uuid: str, defined: Iterable[tuple[str, str]]
) -> str | None:
    """Why `host` cannot take instance `name` (`uuid`), given the (name, uuid) pairs
    it defines: another instance under this name, or this uuid under another name.
    None when nothing clashes (the same name and uuid is the same instance)."""
    for other_name, other_uuid in defined:
        same_uuid = other_uuid.lower() == uuid.lower()
        if other_name == name and not same_uuid:
            return (
                f"host {host} already defines an instance named {name!r} with another "
                f"identity (uuid {other_uuid}); remove or rename it there first"
            )
        if other_name != name and same_uuid:
            return (
                f"host {host} already defines the identity of instance {name!r} "
                f"(uuid {uuid}) under another name, {other_name!r}; remove or rename it "
                f"there first"
            )
    return None
