"""``attnkit arena``: measure every mechanism on this machine and write a report.

Efficiency (time and peak memory vs length, causal and bidirectional), fidelity (error
vs exact float64 attention) and quality (small models trained on MQAR, ListOps and
character-level language modelling), then a leaderboard, ``report.md``,
``results.json`` and PNG plots under ``--out``. Cells are cached there: run the same
command again after an interruption and it resumes.

``--suite quality`` runs the quality suite instead (:mod:`attnkit.arena.suite`): every
mechanism on MQAR (swept over pairs and length), ListOps, byte-level text classification and
document matching, Pathfinder, passkey retrieval and character-level LM, two seeds each, and
writes the LRA-style leaderboard and the advisor's facts file (:mod:`attnkit.arena.leaderboard`).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "arena",
        help="measure every mechanism (speed, memory, fidelity, quality) and write a report",
        description=(
            "Measure every registered attention mechanism on this machine: forward and forward+backward time and "
            "peak memory across lengths (ratios to exact attention from the same run), error against exact float64 "
            "attention on structured inputs, and the quality of a small model trained on MQAR, ListOps and "
            "character-level language modelling. Prints a leaderboard and writes report.md, results.json and PNG "
            "plots to --out. Interrupted runs resume from the cells cached there."
        ),
        epilog=(
            "examples:\n"
            "  attnkit arena                     # default: 1K-8K, all mechanisms, <= 10 min on a 2-core CPU\n"
            "  attnkit arena --quick             # <= 3 min subset\n"
            "  attnkit arena --full --device cuda --out gpu-report\n"
            "  attnkit arena --mechanisms full,linear --skip-quality\n"
            "  attnkit arena --threads 1 --repeats 5 --no-resume   # re-measure on a busy machine\n"
            "  attnkit arena --suite quality     # the quality suite: every mechanism x 7 tasks x 2 seeds, ~50 min\n"
            "  attnkit arena --suite quality --full --out lra-report   # LRA lengths (hours)\n"
            "  attnkit arena --suite quality --mechanisms full,linear --tasks mqar,listops\n"
            "\n"
            "Speed-ups are time of exact attention / time of the mechanism (>1 = faster). Cells whose repeats\n"
            "disagree, or whose time falls (or jumps) as the length grows, are flagged with '?' and explained.\n"
            "The quality suite's table shows accuracy (%) or bits per character as mean +- half the range over\n"
            "the seeds, each task's no-context baseline, and each mechanism's decoding-state size."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a <= 3-minute subset (lengths 512-2K, short training)")
    size.add_argument(
        "--full",
        action="store_true",
        help="the thorough run: lengths up to 64K, longer training (with --suite quality: LRA lengths, hours)",
    )
    parser.add_argument(
        "--suite",
        default=None,
        metavar="NAME",
        help="run a suite instead of the arena's stages: 'quality' (every mechanism on MQAR, ListOps, text, "
        "retrieval, Pathfinder, passkey and char-LM, two seeds; 48 minutes measured on 2 quiet CPU cores)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="report folder, also the cell cache (default arena-report; quality-report with --suite quality)",
    )
    parser.add_argument("--mechanisms", default="", help="comma-separated names (default: every registered one)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--lengths", default="", help="comma-separated efficiency lengths, e.g. 1024,4096")
    parser.add_argument(
        "--tasks",
        default="",
        help="comma-separated quality tasks among mqar,listops,lm (with --suite quality: among mqar,listops,"
        "text_classification,document_matching,pathfinder,passkey,char_lm)",
    )
    parser.add_argument(
        "--seeds", default=None, help="with --suite: comma-separated seeds, each cell trained once per seed (0,1)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="with --suite: cells trained at once, in processes of one thread each (default 2, one per core "
        "of a 2-core machine; use 1 on a GPU)",
    )
    parser.add_argument(
        "--skip-quality", action="store_true", help="no quality training (efficiency and fidelity only)"
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps per quality cell")
    parser.add_argument(
        "--step-budget", type=float, default=None, help="seconds one step may take before a sweep stops"
    )
    parser.add_argument(
        "--memory-budget-gb", type=float, default=None, help="peak GB one step may use before a sweep stops"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed steps per efficiency cell, median reported (presets: quick 2, default 3, full 5); more "
        "repeats steady the median on a noisy machine",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help=(
            "CPU threads for the timed cells (torch.set_num_threads; default: PyTorch's choice). On a busy "
            "machine --threads 1 stalls far less (a 2-thread step was measured 45x slower than 1 thread under "
            "load). Recorded in results.json; quality training always uses 1 thread on CPU"
        ),
    )
    parser.add_argument("--no-resume", action="store_true", help="measure every cell again (still cached for later)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--json", action="store_true", help="print results.json's leaderboard as JSON, no table")
    parser.set_defaults(func=run)


def _split(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~attnkit.arena.ArenaConfig` the command line asks for."""
    from attnkit.arena import ArenaConfig

    preset = "quick" if args.quick else "full" if args.full else "default"
    overrides: dict[str, Any] = {"mechanisms": _split(args.mechanisms), "device": args.device}
    if args.lengths:
        try:
            overrides["lengths"] = tuple(int(x) for x in _split(args.lengths))
        except ValueError:
            raise ValueError(f"--lengths must be comma-separated integers, got {args.lengths!r}") from None
    if args.tasks:
        overrides["tasks"] = _split(args.tasks)
    if args.skip_quality:
        overrides["tasks"] = ()
    if args.steps is not None:
        overrides["train_steps"] = args.steps
    if args.step_budget is not None:
        overrides["step_budget_s"] = args.step_budget
    if args.memory_budget_gb is not None:
        overrides["memory_budget_gb"] = args.memory_budget_gb
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    if args.threads is not None:
        overrides["threads"] = args.threads
    return ArenaConfig.preset(preset, **overrides)


def suite_config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~attnkit.arena.suite.SuiteConfig` the command line asks for (``--suite``).

    Raises:
        ValueError: an unknown suite, a flag the suite does not use, or a bad value (named).
    """
    from attnkit.arena.suite import SUITES, SuiteConfig

    if args.suite not in SUITES:
        raise ValueError(f"--suite must be one of {', '.join(SUITES)}, got {args.suite!r} (try --suite quality)")
    ignored = [flag for flag, value in _arena_only_flags(args).items() if value]
    if ignored:
        raise ValueError(
            f"--suite {args.suite} does not use {', '.join(ignored)} (flags of the arena's speed, memory and "
            f"quality stages); remove {'it' if len(ignored) == 1 else 'them'}"
        )
    try:
        seeds = tuple(int(x) for x in _split(args.seeds or "0,1"))
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r} (e.g. --seeds 0,1)") from None
    overrides: dict[str, Any] = {"mechanisms": _split(args.mechanisms), "device": args.device, "seeds": seeds}
    if args.tasks:
        overrides["tasks"] = _split(args.tasks)
    return SuiteConfig(full=args.full, workers=2 if args.workers is None else args.workers, **overrides)


def _arena_only_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "--quick": args.quick,
        "--lengths": args.lengths,
        "--skip-quality": args.skip_quality,
        "--steps": args.steps is not None,
        "--step-budget": args.step_budget is not None,
        "--memory-budget-gb": args.memory_budget_gb is not None,
        "--repeats": args.repeats is not None,
        "--threads": args.threads is not None,
    }


def run_suite_command(args: argparse.Namespace) -> int:
    """``attnkit arena --suite quality``: train, then write the leaderboard to ``--out``."""
    from attnkit.arena.leaderboard import aggregate, render_markdown, write_leaderboard
    from attnkit.arena.suite import run_suite

    config = suite_config_from_args(args)
    out = args.out or "quality-report"
    try:
        run = run_suite(config, out, resume=not args.no_resume, progress=True)
    except KeyboardInterrupt:
        print(
            f"\nattnkit arena --suite {args.suite}: interrupted; every finished cell is cached in {out}/cells. "
            "Run the same command again to resume where it stopped.",
            file=sys.stderr,
        )
        return 130
    doc = aggregate(run)
    paths = write_leaderboard(doc, out, plots=not args.no_plots)
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    print(
        f"\nattnkit quality suite: {run.cells_trained} cells trained, {run.cells_reused} reused from {out}, "
        f"{run.wall_s / 60:.1f} min on {config.workers} one-thread worker{'' if config.workers == 1 else 's'}\n"
    )
    print(render_markdown(doc))
    print("written: " + "  ".join(str(p) for p in paths))
    return 0


def run(args: argparse.Namespace) -> int:
    from attnkit.arena import run_arena_report
    from attnkit.arena.report import terminal_summary

    if args.suite is not None:
        return run_suite_command(args)
    suite_only = [flag for flag, value in (("--seeds", args.seeds), ("--workers", args.workers)) if value is not None]
    if suite_only:
        raise ValueError(
            f"{', '.join(suite_only)} {'applies' if len(suite_only) == 1 else 'apply'} only to --suite quality; "
            "remove it or add --suite quality"
        )
    args.out = args.out or "arena-report"
    config = config_from_args(args)
    try:
        doc = run_arena_report(config, args.out, resume=not args.no_resume, progress=True, plots=not args.no_plots)
    except KeyboardInterrupt:
        print(
            f"\nattnkit arena: interrupted; every finished cell is cached in {args.out}/cells. "
            "Run the same command again to resume where it stopped.",
            file=sys.stderr,
        )
        return 130
    if args.json:
        print(json.dumps(doc["leaderboard"], indent=2))
        return 0
    meta = doc["meta"]
    print(
        f"\nattnkit arena ({config.preset_name}): {len(doc['mechanisms'])} mechanisms on {meta['device']} in "
        f"{meta['seconds']:.0f} s on {meta['threads']} thread{'' if meta['threads'] == 1 else 's'} "
        f"({meta['cells_measured']} cells measured, "
        f"{meta['cells_reused']} reused from {args.out})\n"
    )
    print(terminal_summary(doc))
    print(f"\nreport: {args.out}/report.md   results: {args.out}/results.json   plots: {args.out}/*.png")
    return 0
