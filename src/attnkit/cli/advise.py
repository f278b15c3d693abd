"""``attnkit advise``: which attention mechanism for this task, length and budget, on this machine?"""

from __future__ import annotations

import argparse
import json
from typing import Any

#: Rejection categories as the table prints them (see attnkit.arena.advisor.CATEGORIES).
CATEGORY_HELP = (
    "causal/decode: a capability the mechanism lacks; error: relative error over --max-error, or it could not run; "
    "speed: under --min-speedup; memory: over --memory-gb; quality: too far below exact attention on the task "
    "(--quality-tolerance), not beyond the no-context baseline (--baseline-margin), or no measured figure."
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "advise",
        help="recommend a mechanism for a task, sequence length and error/speed/memory budget, measured here",
        description=(
            "Recommend an attention mechanism that meets your constraints on this machine. Mechanisms are "
            "filtered by capability (causal, incremental decoding), then measured at --length (reusing cells cached "
            "by 'attnkit arena' in --cache, with that run's settings; lengths beyond the time or memory budget are "
            "projected from shorter ones) and checked against --max-error, --min-speedup and --memory-gb.\n\n"
            "With --task, each mechanism's quality on that task, as the quality suite measured it (--facts), "
            "must be within --quality-tolerance of exact attention's and beat the no-context baseline; the "
            "survivors are ranked by quality (scores within each other's spread tie) and then by speed. "
            "With --data FILE, the same small model is first trained with every mechanism on your own data "
            '(JSONL {"text", "label"} lines: classification; any other file: plain-text language modelling) '
            "and its held-out scores are the quality facts. Without either, the fastest survivor wins. "
            "A table says why each alternative lost."
        ),
        epilog=(
            "examples:\n"
            "  attnkit advise --task recall --length 4096 --causal\n"
            "  attnkit advise --task classification --length 8192 --memory-gb 4 --facts runs/quality/results.json\n"
            "  attnkit advise --data reviews.jsonl --mechanisms full,linear,sliding_window\n"
            "  attnkit advise --length 16384 --causal --max-error 0.05 --memory-gb 8\n"
            "  attnkit advise --length 65536 --inference --json\n\n"
            "tasks (--task): recall (= mqar), classification (= text_classification), retrieval (= "
            "document_matching), listops, pathfinder, passkey (= needle), lm (= char_lm, text)\n"
            f"rejection categories: {CATEGORY_HELP}"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--length", type=int, default=None, help="sequence length, e.g. 16384 (default with --data: --data-length)"
    )
    parser.add_argument(
        "--causal",
        action="store_true",
        help="causal (decoder) attention is required (implied by --decode, --task lm and plain-text --data)",
    )
    parser.add_argument(
        "--max-error", type=float, default=None, help="largest relative error vs exact attention, e.g. 0.05"
    )
    parser.add_argument("--memory-gb", type=float, default=None, help="largest peak memory of one step in GB")
    parser.add_argument(
        "--min-speedup",
        type=float,
        default=None,
        help="smallest speed-up over exact attention at --length, e.g. 2 (default: any)",
    )
    parser.add_argument("--decode", action="store_true", help="token-by-token decoding is required (implies --causal)")
    parser.add_argument(
        "--inference", action="store_true", help="rank by forward time (default: forward+backward, i.e. training)"
    )
    quality = parser.add_argument_group("task quality (--task or --data)")
    which = quality.add_mutually_exclusive_group()
    which.add_argument(
        "--task",
        default=None,
        help="weigh the quality the quality suite measured on this task: recall, classification, retrieval, "
        "listops, pathfinder, passkey or lm (synonyms: mqar, needle, char_lm, text, ...)",
    )
    which.add_argument(
        "--data",
        default=None,
        metavar="FILE",
        help="train a small model per mechanism on your data and weigh its held-out quality: a .jsonl file of "
        '{"text": ..., "label": ...} lines (classification) or a plain UTF-8 text file (bits per character); '
        "a few minutes for every mechanism on a 2-core CPU (--mechanisms narrows it)",
    )
    quality.add_argument(
        "--facts",
        default=None,
        metavar="FILE",
        help="the quality suite's results.json for --task (default: the facts shipped with attnkit)",
    )
    quality.add_argument(
        "--quality-tolerance",
        type=float,
        default=0.05,
        help="how far below exact attention a mechanism may score: accuracy points as a fraction (0.05 = 5 "
        "points) or, for bits per character, a relative excess (0.05 = 5%%); default 0.05",
    )
    quality.add_argument(
        "--baseline-margin",
        type=float,
        default=0.02,
        help="how far a score must beat the no-context baseline, same units; default 0.02",
    )
    quality.add_argument(
        "--data-steps", type=int, default=None, help="training steps per mechanism with --data (default 100)"
    )
    quality.add_argument(
        "--data-length", type=int, default=None, help="bytes per training sequence with --data (default 128)"
    )
    parser.add_argument("--mechanisms", default="", help="comma-separated candidates (default: every registered one)")
    parser.add_argument("--cache", default="arena-report", help="arena folder whose cached cells to reuse")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for new measurements (default: the --cache run's setting, else PyTorch's choice)",
    )
    parser.add_argument("--json", action="store_true", help="print the advice as JSON")
    parser.set_defaults(func=run)


SPEEDUP_LABEL = "speed-up vs full (>1 = faster)"


def _speedups(advice: Any) -> dict[str, float]:
    """Each candidate's speed-up over exact attention (time of ``full`` / its time), where both are known."""
    from attnkit.arena.runner import BASELINE

    full = next((v.candidate for v in advice.verdicts if v.candidate.name == BASELINE), None)
    if full is None or not full.time_ms:
        return {}
    return {v.candidate.name: full.time_ms / v.candidate.time_ms for v in advice.verdicts if v.candidate.time_ms}


def _quality_dict(advice: Any) -> dict[str, Any] | None:
    facts = advice.quality
    if facts is None:
        return None
    return {
        "task": facts.task,
        "metric": facts.metric,
        "higher_is_better": facts.higher_is_better,
        "exact": facts.reference.mean,
        "baseline": facts.baseline,
        "measured_at_length": facts.length,
        "extrapolated": facts.length != advice.constraints.length,
        "source": facts.source,
    }


def advice_as_dict(advice: Any) -> dict[str, Any]:
    """A JSON-ready view of an :class:`~attnkit.arena.Advice` (``speedup_vs_full``: > 1 = faster)."""
    speedups = _speedups(advice)
    figures = advice.quality.figures if advice.quality else {}

    def quality(name: str) -> dict[str, Any] | None:
        fig = figures.get(name)
        return None if fig is None else {"mean": fig.mean, "spread": fig.spread, "state_bytes": fig.state_bytes}

    return {
        "constraints": vars(advice.constraints),
        "recommended": advice.recommended,
        "quality": _quality_dict(advice),
        "closest": [{"mechanism": n, "change": t} for n, t in advice.closest],
        "candidates": [
            {
                "mechanism": v.candidate.name,
                "eligible": v.eligible,
                "reasons": v.reasons,
                "rejected_for": v.categories,
                "time_ms": v.candidate.time_ms,
                "speedup_vs_full": speedups.get(v.candidate.name),
                "peak_mb": v.candidate.peak_mb,
                "error": v.candidate.error,
                "quality": quality(v.candidate.name),
                "source": v.candidate.source,
            }
            for v in advice.verdicts
        ],
    }


def _asked(c: Any, quality: Any) -> str:
    asked = [f"length {c.length}", "causal" if c.causal else "bidirectional", "training" if c.training else "inference"]
    if c.decode:
        asked.append("incremental decoding")
    if c.max_error is not None:
        asked.append(f"error <= {c.max_error:g}")
    if c.min_speedup is not None:
        asked.append(f"speed-up >= {c.min_speedup:g}x")
    if c.memory_gb is not None:
        asked.append(f"memory <= {c.memory_gb:g} GB")
    if quality is not None:
        units = "points" if quality.higher_is_better else "%"
        asked.append(f"quality on {quality.task} within {100 * c.quality_tolerance:g} {units} of exact attention")
    return "constraints: " + ", ".join(asked)


def _quality_lines(advice: Any) -> list[str]:
    """Where the quality figures come from, and whether they are at the asked length."""
    facts, length = advice.quality, advice.constraints.length
    if facts is None:
        return []
    lines = [
        f"quality: {facts.task} ({'accuracy, higher' if facts.higher_is_better else 'bits per character, lower'} "
        f"is better) from {facts.source}: exact attention {facts.format(facts.reference.mean)}, no-context "
        f"baseline {_baseline_text(facts)}, measured at length {facts.length}."
    ]
    if facts.length != length:
        lines.append(
            f"  you asked about length {length}: quality there was not measured; the figures at length "
            f"{facts.length} are an extrapolation (long-range tasks usually get harder for approximate "
            "mechanisms as the length grows)."
        )
    return lines


def _baseline_text(facts: Any) -> str:
    if facts.baseline is None:
        return "not measured by the suite (so no mechanism was checked against it)"
    return str(facts.format(facts.baseline))


def render(advice: Any) -> str:
    """The recommendation, the table of verdicts, and the closest options when nothing fits."""
    from attnkit.arena.report import format_table

    lines = [_asked(advice.constraints, advice.quality), *_quality_lines(advice), ""]
    if advice.recommended:
        lines.append(f"recommended: {advice.recommended}")
    else:
        lines.append("no mechanism satisfies every constraint.")
        if advice.closest:
            lines.append("closest options:")
            lines += [f"  {name}: {change}" for name, change in advice.closest]
        else:
            lines.append(
                "nothing comes close: drop --causal/--decode, loosen the quality limits or try a shorter --length."
            )
    lines.append("")

    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    speedups = _speedups(advice)
    facts = advice.quality
    show_state = facts is not None and any(f.state_bytes is not None for f in facts.figures.values())
    rows = []
    for v in advice.verdicts:
        name = v.candidate.name
        row = [
            ("* " if name == advice.recommended else "  ") + name,
            num(v.candidate.time_ms, ".1f"),
            num(speedups.get(name), ".2f") + ("x" if name in speedups else ""),
            num(v.candidate.peak_mb, ".0f"),
            num(v.candidate.error, ".3g"),
        ]
        if facts is not None:
            row.append(_figure_text(facts, name))
        if show_state:
            fig = facts.figures.get(name)
            row.append(num(None if fig is None or fig.state_bytes is None else fig.state_bytes / 1024, ".1f"))
        reasons = v.reasons if v.eligible else [f"{cat}: {why}" for cat, why in zip(v.categories, v.reasons)]
        row += [v.candidate.source if v.candidate.time_ms is not None else "-", "; ".join(reasons)]
        rows.append(row)
    c = advice.constraints
    mode = "fwd+bwd" if c.training else "fwd"
    header = ["mechanism", f"{mode} ms", SPEEDUP_LABEL, "peak MB", "error"]
    header += ["quality"] * (facts is not None) + ["state KB"] * show_state + ["how", "verdict"]
    lines.append(format_table(header, rows, align="lrrrr" + "r" * (facts is not None) + "r" * show_state + "ll"))
    lines.append(
        f"\n{SPEEDUP_LABEL}: {mode} time of exact attention / time of the mechanism, at this length ('-' where "
        "full was not measured). error: relative error vs exact attention, self-attention over smooth hidden "
        "states (the arena's fidelity inputs and length)."
    )
    if facts is not None:
        lines.append(
            "quality: mean ± spread on the task ('-': no figure); state KB: decoding state at the task's length. "
            f"rejected for: {CATEGORY_HELP}"
        )
    if any("flagged" in v.candidate.source for v in advice.verdicts):
        lines.append(
            "flagged: a cell behind the number is noisy (its repeats disagree) or contradicts its length curve; "
            "measure again with 'attnkit arena --threads 1 --repeats 5 --no-resume' (same --out as --cache)."
        )
    return "\n".join(lines)


def _figure_text(facts: Any, name: str) -> str:
    fig = facts.figures.get(name)
    if fig is None:
        return "-"
    if facts.higher_is_better:
        return f"{100 * fig.mean:.1f} ± {100 * fig.spread:.1f}%"
    return f"{fig.mean:.3f} ± {fig.spread:.3f}"


def _arena_config(cache: str, device: str, threads: int | None) -> Any:
    """The settings of the arena run in ``cache`` (so its cells match), else the default preset.

    ``threads`` overrides the run's thread count (cells measured on another count are not reused).
    """
    from pathlib import Path

    from attnkit.arena import load_results
    from attnkit.arena.config import ArenaConfig

    if (Path(cache) / "results.json").exists():
        stored = load_results(cache)["meta"]["config"]
        config = ArenaConfig.from_dict(stored).with_(device=device, mechanisms=())
    else:
        config = ArenaConfig.preset("default", device=device)
    return config if threads is None else config.with_(threads=threads)


def _quality_facts(args: argparse.Namespace, mechanisms: list[str], data: Any) -> tuple[Any, Any]:
    """The task's quality facts (from --facts, or trained on --data) and the --data run (else None)."""
    if args.facts and not args.task:
        raise ValueError("--facts is only read with --task (say which task to weigh, e.g. --task recall)")
    if args.data is None and (args.data_steps is not None or args.data_length is not None):
        raise ValueError("--data-steps and --data-length only apply with --data FILE")
    if args.task:
        from attnkit.arena.task_facts import load_task_facts, resolve_task

        return load_task_facts(args.facts, resolve_task(args.task), length=args.length), None
    if data is None:
        return None, None
    from attnkit.arena.user_data import DEFAULT_LENGTH, DEFAULT_STEPS, run_data_arena

    if not args.json:
        print(f"data: {data.describe()}")
    run = run_data_arena(
        data,
        mechanisms,
        steps=DEFAULT_STEPS if args.data_steps is None else args.data_steps,
        length=DEFAULT_LENGTH if args.data_length is None else args.data_length,
        device=args.device,
        progress=not args.json,
    )
    return run.facts, run


def _length(args: argparse.Namespace) -> int:
    """--length, or with --data the training length (the question is then "for sequences like my data")."""
    if args.length is not None:
        return int(args.length)
    if args.data is None:
        raise ValueError("--length is required: the sequence length you will run at (e.g. --length 4096)")
    from attnkit.arena.user_data import DEFAULT_LENGTH

    return DEFAULT_LENGTH if args.data_length is None else int(args.data_length)


def _data_lines(run: Any) -> list[str]:
    """How long the --data training took, and the caveats on its figures."""
    seconds = run.seconds
    slowest = max(seconds, key=seconds.get)
    lines = [
        f"--data: trained {len(seconds)} mechanisms x {len(run.splits.train)} steps in {sum(seconds.values()):.0f} s "
        f"(slowest: {slowest}, {seconds[slowest]:.0f} s); scored on {sum(b.size for b in run.splits.held_out)} "
        "held-out rows (± is the standard error of that score)"
    ]
    notes = [f"  {name}: {note}" for name, note in run.notes.items()]
    return lines + (["notes on the --data figures:", *notes] if notes else [])


def _is_language_modelling(args: argparse.Namespace, data: Any) -> bool:
    """Whether the task is language modelling (``--task lm`` or plain text), which needs causal attention."""
    if data is not None:
        return bool(data.kind == "lm")
    if args.task:
        from attnkit.arena.task_facts import resolve_task

        return resolve_task(args.task) == "char_lm"
    return False


def run(args: argparse.Namespace) -> int:
    from attnkit.arena import Constraints, decide, measure_candidates
    from attnkit.arena.runner import check_device, resolve_mechanisms

    check_device(args.device)
    names = [n.strip() for n in args.mechanisms.split(",") if n.strip()]
    # full is always a candidate (resolve_mechanisms adds it): the reference of every speed-up and quality tolerance
    mechanisms = resolve_mechanisms(names)
    data = None
    if args.data is not None:
        from attnkit.arena.user_data import read_user_data

        data = read_user_data(args.data)
    # built before any training on --data, so a bad limit is reported at once
    constraints = Constraints(
        length=_length(args),
        causal=args.causal or args.decode or _is_language_modelling(args, data),
        max_error=args.max_error,
        memory_gb=args.memory_gb,
        decode=args.decode,
        training=not args.inference,
        min_speedup=args.min_speedup,
        quality_tolerance=args.quality_tolerance,
        baseline_margin=args.baseline_margin,
    )
    quality, data_run = _quality_facts(args, mechanisms, data)
    candidates = measure_candidates(
        constraints,
        cache_dir=args.cache,
        config=_arena_config(args.cache, args.device, args.threads),
        mechanisms=mechanisms,
        progress=not args.json,
        # a mechanism the task facts have no figure for is rejected whatever its speed: not measured
        skip=frozenset(m for m in mechanisms if quality is not None and m not in quality.figures),
    )
    advice = decide(constraints, candidates, quality)
    if args.json:
        doc = advice_as_dict(advice)
        if data_run is not None:
            from attnkit.arena.user_data import data_summary

            doc["data"] = data_summary(data_run)
        print(json.dumps(doc, indent=2))
    else:
        print("\n".join([render(advice), *(_data_lines(data_run) if data_run else [])]))
    return 0 if advice.recommended else 1
