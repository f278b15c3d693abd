"""``attnkit arena``: measure every mechanism on this machine and write a report.

Efficiency (time and peak memory vs length, causal and bidirectional), fidelity (error
vs exact float64 attention) and quality (small models trained on MQAR, ListOps and
character-level language modelling), then a leaderboard, ``report.md``,
``results.json`` and PNG plots under ``--out``. Cells are cached there: run the same
command again after an interruption and it resumes.
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
            "\n"
            "Speed-ups are time of exact attention / time of the mechanism (>1 = faster). Cells whose repeats\n"
            "disagree, or whose time falls (or jumps) as the length grows, are flagged with '?' and explained."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a <= 3-minute subset (lengths 512-2K, short training)")
    size.add_argument("--full", action="store_true", help="the thorough run: lengths up to 64K, longer training")
    parser.add_argument(
        "--out", default="arena-report", help="report folder, also the cell cache (default arena-report)"
    )
    parser.add_argument("--mechanisms", default="", help="comma-separated names (default: every registered one)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--lengths", default="", help="comma-separated efficiency lengths, e.g. 1024,4096")
    parser.add_argument("--tasks", default="", help="comma-separated quality tasks among mqar,listops,lm")
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


def run(args: argparse.Namespace) -> int:
    from attnkit.arena import run_arena_report
    from attnkit.arena.report import terminal_summary

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
