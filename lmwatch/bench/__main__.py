"""`lmwatch bench` (also `python -m lmwatch.bench`): the decision benchmark.

Runs a corpus of workloads (a file, or generated from a seed) under every
benchmark profile with lmwatch's policy, the re-implemented baselines and the
hindsight bound, judges every run, prints the table and writes
`results.json`, `report.png` and the corpus used into the output directory.

Only `argparse` is imported at the top: building the CLI's parser stays cheap.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmwatch.bench.controller import ControllerFactory
    from lmwatch.bench.corpus import Workload
    from lmwatch.bench.runner import Run
    from lmwatch.profiles.schema import Profile
    from lmwatch.render import Output

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULT_COUNT = 320
DEFAULT_OUT = "bench-results"
LMWATCH = "lmwatch"
BOUND_NAME = "bound"  # what --controllers calls the hindsight bound


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("corpus (default: generated with the report seed)")
    source.add_argument("--corpus", metavar="FILE", help="workloads from this corpus file")
    source.add_argument("--seed", type=int, default=None, help="generator seed (dev: 1, 2, 3)")
    source.add_argument(
        "--count", type=int, default=None, help=f"workloads to generate ({DEFAULT_COUNT})"
    )
    source.add_argument(
        "--jitter",
        type=float,
        default=None,
        metavar="SHARE",
        help="move each workload's working set by up to ± this share from pass to pass, "
        "as a real host's own writing does, and each transfer-rate reading by as much "
        "(e.g. 0.05; default: as the corpus says)",
    )
    source.add_argument(
        "--counting",
        choices=("union", "after-send"),
        default=None,
        help="which pages every workload's hypervisor counts at a pass's end besides the "
        "unsent rest: 'union', all written since the pass began (as the rig counts), or "
        "'after-send', only those written after they were sent (default: as the corpus "
        "says)",
    )
    source.add_argument(
        "--links",
        choices=("ordinary", "harsh"),
        default=None,
        help="draw every workload's link drops and breaks anew: 'harsh' twice as often, "
        "deeper and from the first seconds on (a check against fitting the generator's "
        "own faults); 'ordinary' as the generator draws them (default: as the corpus says)",
    )
    source.add_argument(
        "--workload",
        metavar="NAME[,NAME]",
        help="only these workloads of the corpus (to look at single runs: results.json "
        "lists each run's verdict and lmwatch's actions with their reasons)",
    )
    parser.add_argument(
        "--profiles", metavar="FILE", help="profiles file (default: the benchmark profiles)"
    )
    parser.add_argument(
        "--controllers",
        default="all",
        help="all, or a comma-separated list: lmwatch, baseline names, bound",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help="output directory")
    parser.add_argument(
        "--gate",
        action="store_true",
        help="exit 1 when lmwatch breaks a promise or is >3 points below the bound's clean %%",
    )
    parser.add_argument(
        "--processes", type=int, default=None, help="worker processes (default: CPU count)"
    )
    parser.add_argument(
        "--switchover",
        default="learned",
        metavar="DURATION",
        help="switchover cost the controllers are told: 'learned' (default: each host "
        "pair's own, as measured on earlier migrations) or a duration for all",
    )


def _optional(module: str) -> Any | None:
    """An optional benchmark module, or None when it does not exist (yet)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name == module:
            return None
        raise


def _call_with_supported(function: Callable[..., Any], *args: Any, **options: Any) -> Any:
    """Call `function`, passing only the keyword options its signature names."""
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return function(*args)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return function(*args, **options)
    return function(*args, **{k: v for k, v in options.items() if k in parameters})


def available_controllers() -> tuple[dict[str, ControllerFactory], list[str], Any | None]:
    """(factories by name, what is missing, the bound module) as installed now."""
    factories: dict[str, ControllerFactory] = {}
    missing = []
    own = _optional("lmwatch.bench.lmwatch_controller")
    if own is not None and hasattr(own, "lmwatch_factory"):
        factories[LMWATCH] = own.lmwatch_factory
    else:
        missing.append("lmwatch (lmwatch.bench.lmwatch_controller.lmwatch_factory)")
    baselines = _optional("lmwatch.bench.baselines")
    if baselines is not None and hasattr(baselines, "BASELINES"):
        factories.update(baselines.BASELINES)
    else:
        missing.append("baselines (lmwatch.bench.baselines.BASELINES)")
    bound = _optional("lmwatch.bench.bound")
    if bound is None or not hasattr(bound, "bound_runs"):
        missing.append("hindsight bound (lmwatch.bench.bound.bound_runs)")
        bound = None
    return factories, missing, bound


def _workloads(args: argparse.Namespace) -> tuple[list[Workload], dict[str, Any]]:
    from lmwatch.bench.corpus import LINKS, MAX_JITTER, with_links

    workloads, origin = _corpus(args)
    if args.links is not None:
        workloads = with_links(workloads, LINKS[args.links])
        origin = {**origin, "links": args.links}
    jitter = args.jitter
    if jitter is not None:
        if not 0.0 <= jitter <= MAX_JITTER:
            raise ValueError(f"--jitter must be between 0 and {MAX_JITTER:g}")
        workloads = [replace(w, jitter=jitter) for w in workloads]
        origin = {**origin, "jitter": jitter}
    if args.counting is not None:
        workloads = [replace(w, counting=args.counting) for w in workloads]
        origin = {**origin, "counting": args.counting}
    names = [name.strip() for name in (args.workload or "").split(",") if name.strip()]
    if not names:
        return workloads, origin
    known = {w.name for w in workloads}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"no workload {', '.join(unknown)} in this corpus")
    chosen = [w for w in workloads if w.name in names]
    return chosen, {**origin, "workloads": [w.name for w in chosen]}


def _corpus(args: argparse.Namespace) -> tuple[list[Workload], dict[str, Any]]:
    from lmwatch.bench.corpus import REPORT_SEED, generate, load_corpus

    if args.corpus:
        if args.seed is not None or args.count is not None:
            raise ValueError("--corpus cannot be combined with --seed or --count")
        return load_corpus(args.corpus), {"corpus": str(args.corpus)}
    seed = REPORT_SEED if args.seed is None else args.seed
    count = DEFAULT_COUNT if args.count is None else args.count
    if count < 1:
        raise ValueError("--count must be at least 1")
    return generate(seed, count), {"seed": seed, "count": count}


def bench_command(out: Output, args: argparse.Namespace) -> int:
    from lmwatch.bench.corpus import CorpusError, dump_corpus
    from lmwatch.bench.report import BOUND, HEADERS, gate, summarize, table_rows, write_report
    from lmwatch.bench.runner import bench_profiles, run_many
    from lmwatch.profiles.loader import ProfileError
    from lmwatch.units import parse_duration

    try:
        workloads, origin = _workloads(args)
        profiles: list[Profile] = bench_profiles(args.profiles)
        switchover = None if args.switchover == "learned" else parse_duration(args.switchover)
    except (CorpusError, ValueError) as error:
        out.error(str(error))
        return EXIT_USAGE
    except ProfileError as error:
        out.lines(str(problem) for problem in error.problems)
        out.error(f"{args.profiles}: cannot use these profiles")
        return EXIT_USAGE
    processes = args.processes or os.cpu_count() or 1

    factories, missing, bound = available_controllers()
    wanted = [name.strip() for name in args.controllers.split(",") if name.strip()]
    if wanted == ["all"]:
        chosen = list(factories)
        with_bound = bound is not None
    else:
        known = [*factories, BOUND_NAME]
        unknown = [name for name in wanted if name not in known]
        if unknown:
            out.error(
                f"unknown controller {', '.join(unknown)} (available: all, {', '.join(known)})"
            )
            return EXIT_USAGE
        chosen = [name for name in wanted if name != BOUND_NAME]
        with_bound = BOUND_NAME in wanted
        if with_bound and bound is None:
            out.error("the hindsight bound is not available (lmwatch.bench.bound is missing)")
            return EXIT_USAGE
    for what in missing:
        out.line(f"not available: {what}")
    if args.gate and LMWATCH not in chosen:
        out.error("--gate needs the lmwatch controller")
        return EXIT_USAGE

    described = origin.get("corpus") or f"seed {origin['seed']}, {origin['count']} workloads"
    if "jitter" in origin:
        described += (
            f", working sets moving ±{origin['jitter']:.0%} a pass and rate readings as much"
        )
    if "links" in origin:
        described += f", link events drawn anew ({origin['links']})"
    if "counting" in origin:
        described += f", counting {origin['counting']}"
    if "workloads" in origin:
        described += f", only {', '.join(origin['workloads'])}"
    out.line(
        f"corpus: {described}; profiles: {', '.join(p.name for p in profiles)}; "
        f"controllers: {', '.join(chosen) or '-'}{' + hindsight bound' if with_bound else ''}; "
        f"{processes} processes"
    )
    timings: dict[str, float] = {}
    began = time.perf_counter()
    runs: list[Run] = run_many(
        workloads,
        profiles,
        {name: factories[name] for name in chosen},
        processes,
        switchover=switchover,
    )
    timings["controllers_seconds"] = round(time.perf_counter() - began, 2)
    if with_bound:
        assert bound is not None
        began = time.perf_counter()
        bound_list = _call_with_supported(
            bound.bound_runs,
            workloads,
            profiles,
            processes=processes,
            switchover=switchover,
        )
        timings["bound_seconds"] = round(time.perf_counter() - began, 2)
        runs += [r if r.controller == BOUND else _renamed(r, BOUND) for r in bound_list]

    summary = summarize(runs, workloads, profiles)
    out.table(HEADERS, table_rows(summary))
    meta: dict[str, Any] = {
        **origin,
        "profiles": [p.name for p in profiles],
        "controllers": chosen + ([BOUND] if with_bound else []),
        "missing": missing,
        "switchover": "learned" if switchover is None else switchover,
        "processes": processes,
        "runs": len(runs),
        "timings": timings,
        "argv": sys.argv[1:],
        "title": f"lmwatch bench: {described}",
    }
    directory = Path(args.out)
    try:
        results, figure = write_report(directory, summary, meta)
        dump_corpus(
            workloads,
            directory / "corpus.yaml",
            seed=origin.get("seed"),
            description=f"the corpus of this benchmark run ({described})",
        )
    except OSError as error:
        out.error(f"cannot write the results into {directory}: {error.strerror or error}")
        return EXIT_FAILED
    total = sum(timings.values())
    out.line(
        f"{len(runs)} runs in {total:.1f}s "
        + ", ".join(f"{k.removesuffix('_seconds')} {v:.1f}s" for k, v in timings.items())
    )
    out.line(f"wrote {results}, {figure} and {directory / 'corpus.yaml'}")
    if args.gate:
        reasons = gate(summary, LMWATCH)
        if not with_bound:
            out.line("gate: no hindsight bound in this run; only violations are checked")
        if reasons:
            out.line("gate: FAILED")
            out.lines(f"  {reason}" for reason in reasons)
            return EXIT_FAILED
        out.line("gate: passed")
    return EXIT_OK


def _renamed(run: Run, controller: str) -> Run:
    return replace(run, controller=controller)


def main(argv: Sequence[str] | None = None) -> int:
    from lmwatch.render import Output

    parser = argparse.ArgumentParser(
        prog="python -m lmwatch.bench", description=__doc__.splitlines()[0] if __doc__ else None
    )
    add_arguments(parser)
    return bench_command(Output(), parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
