"""``python -m benchmarks``: list, run and render the benchmark suites.

Examples::

    python -m benchmarks list
    ATTNKIT_BENCH_LOCK=/tmp/attnkit-quiet.lock .venv-bench/bin/python -m benchmarks run kernel --rounds 3 --repeats 3
    python -m benchmarks run hashing --cases sinkhorn --merge      # re-measure some rows, keep the others
    python -m benchmarks run topk --cases sdpa "k=64" --lengths 256 --repeats 1 --warmup 0 --out /tmp/try
    python -m benchmarks render                                     # every results/*.md and *.png from the JSON
    python -m benchmarks floors                                     # every floor, met or not (exit 1 if not)
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks import floors, render, runner, schema
from benchmarks.suites import all_suites, get_suite


def _list(args: argparse.Namespace) -> int:
    suites = all_suites()
    counts: dict[str, int] = {}
    for f in floors.load_floors():
        counts[f.suite] = counts.get(f.suite, 0) + 1
    for suite in suites.values():
        print(f"{suite.name}: {suite.title} ({counts.get(suite.name, 0)} floors)")
        for part in suite.parts:
            if part.compute is not None:
                print(f"  part {part.name}: computed, not timed")
                continue
            print(
                f"  part {part.name}: lengths {', '.join(map(str, part.lengths))}; modes {', '.join(part.modes)}; "
                f"repeats {part.repeats}, warm-up {part.warmup}, rounds {part.rounds}, threads {part.threads}"
                + ("; interleaved" if part.interleaved else "")
            )
            if args.cases:
                for case in part.case_list():
                    where = f" [{case.python}]" if case.python else ""
                    print(f"    {case.role:9s} {case.label}{where}")
    if not args.cases:
        print("\n(--cases lists every case)")
    return 0


def _run(args: argparse.Namespace) -> int:
    try:
        suite = get_suite(args.suite)
        parts = runner.select(
            suite,
            parts=args.parts,
            cases=args.cases,
            overrides={
                "repeats": args.repeats,
                "warmup": args.warmup,
                "rounds": args.rounds,
                "lengths": tuple(args.lengths) if args.lengths else None,
                "modes": tuple(args.modes) if args.modes else None,
                "causal": {"both": None, "yes": (True,), "no": (False,)}[args.causal],
                "timeout": args.timeout,
            },
        )
    except (KeyError, runner.SelectionError) as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    command = "python -m benchmarks " + shlex.join(sys.argv[1:] if args.argv is None else args.argv)
    try:
        runner.run(suite, parts, out_dir=args.out, merge=args.merge, command=command, with_plot=not args.no_plot)
    except schema.ResultFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"interrupted: the cells measured so far are in {schema.result_path(suite.name, args.out)}", file=sys.stderr
        )
        return 130
    print(f"wrote {schema.result_path(suite.name, args.out)} and its .md")
    return 0


def _render(args: argparse.Namespace) -> int:
    suites = all_suites()
    names = args.suites or [name for name in suites if schema.result_path(name, args.out).exists()]
    status = 0
    for name in names:
        try:
            suite = get_suite(name)
            data = schema.load(schema.result_path(name, args.out))
        except (KeyError, schema.ResultFileError) as err:
            print(f"error: {err.args[0]}", file=sys.stderr)
            status = 2
            continue
        for path in render.render(data, suite, args.out, with_plot=not args.no_plot):
            print(f"wrote {path}")
    return status


def _floors(args: argparse.Namespace) -> int:
    suites = all_suites()
    names = args.suites or list(suites)
    missed = 0
    for name in names:
        path = schema.result_path(name, args.out)
        if name not in suites or not path.exists():
            continue
        verdicts = floors.judge_suite(suites[name], schema.load(path)["rows"])
        for v in verdicts:
            value = "-" if v.value is None else render.shown_value(v.value, v.floor)
            print(
                f"{v.status:12s} issue {v.floor.issue:3d} {name}: {v.floor.case} {v.floor.describe()} {value} {v.floor.required()}"
            )
            missed += v.status != "met"
    return 1 if missed else 0


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m benchmarks``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="attnkit's benchmark suites: every measurement in a fresh process, results as JSON "
        "(benchmarks/results/SUITE.json) rendered to markdown and plots, floors from benchmarks/floors.toml.",
        epilog="Comparison implementations run in .venv-bench (bash benchmarks/setup_env.sh); without it their "
        "rows are recorded as skipped. On a shared machine set ATTNKIT_BENCH_LOCK=FILE (see benchmarks/harness.py).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    out_help = "results directory (default benchmarks/results)"

    p = sub.add_parser("list", help="the suites, their parts and settings", description="List the suites.")
    p.add_argument("--cases", action="store_true", help="also list every case with its role")
    p.set_defaults(func=_list)

    p = sub.add_parser(
        "run",
        help="measure a suite and write its results",
        description="Measure a suite (or some of its parts and cases) and write SUITE.json, .md and .png.",
    )
    p.add_argument("suite", help="suite name (python -m benchmarks list)")
    p.add_argument("--parts", nargs="+", metavar="PART", help="measure only these parts")
    p.add_argument(
        "--cases", nargs="+", metavar="TEXT", help="measure only the cases whose label contains one of these"
    )
    p.add_argument("--lengths", nargs="+", type=int, metavar="N", help="sequence lengths (replace every part's)")
    p.add_argument(
        "--modes", nargs="+", choices=("fwd", "fwd+bwd"), help="measure only these modes (of those each part declares)"
    )
    p.add_argument(
        "--causal", choices=("both", "yes", "no"), default="both", help="causal cells only, bidirectional only, or both"
    )
    p.add_argument("--rounds", type=int, help="measure each cell's cases round-robin N times, median of rounds")
    p.add_argument("--repeats", type=int, help="timed steps per measurement (median)")
    p.add_argument("--warmup", type=int, help="untimed steps per measurement before the timed ones")
    p.add_argument("--timeout", type=float, help="seconds before a measurement counts as failed")
    p.add_argument(
        "--merge",
        action="store_true",
        help="replace only the rows measured now in the existing results file (keep the others and their runs)",
    )
    p.add_argument("--out", type=Path, default=schema.RESULTS, help=out_help)
    p.add_argument("--no-plot", action="store_true", help="write the JSON and markdown only")
    p.set_defaults(func=_run, argv=None)

    p = sub.add_parser("render", help="rewrite SUITE.md and SUITE.png from SUITE.json", description="Render results.")
    p.add_argument("suites", nargs="*", metavar="SUITE", help="default: every suite with a results file")
    p.add_argument("--out", type=Path, default=schema.RESULTS, help=out_help)
    p.add_argument("--no-plot", action="store_true", help="markdown only")
    p.set_defaults(func=_render)

    p = sub.add_parser(
        "floors", help="judge every floor on the results (exit 1 if any is not met)", description="Judge the floors."
    )
    p.add_argument("suites", nargs="*", metavar="SUITE", help="default: every suite with a results file")
    p.add_argument("--out", type=Path, default=schema.RESULTS, help=out_help)
    p.set_defaults(func=_floors)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is not None and args.command == "run":
        args.argv = list(argv)
    for field in ("repeats", "rounds", "timeout"):
        value = getattr(args, field, None)
        if value is not None and value <= 0:
            parser.error(f"--{field} must be positive, got {value}")
    if getattr(args, "warmup", None) is not None and args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    if getattr(args, "lengths", None) and min(args.lengths) <= 0:
        parser.error(f"--lengths must be positive, got {args.lengths}")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
