"""``attnkit advise``: which attention mechanism for this length and budget, on this machine?"""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "advise",
        help="recommend a mechanism for a sequence length and error/memory budget, measured here",
        description=(
            "Recommend the fastest attention mechanism that meets your constraints on this machine. Mechanisms are "
            "filtered by capability (causal, incremental decoding), then measured at --length (reusing cells cached "
            "by 'attnkit arena' in --cache, with that run's settings; lengths beyond the time or memory budget are projected from shorter "
            "ones) and checked against --max-error and --memory-gb. A table says why each alternative lost."
        ),
        epilog=(
            "examples:\n"
            "  attnkit advise --length 16384 --causal --max-error 0.05 --memory-gb 8\n"
            "  attnkit advise --length 2048 --decode\n"
            "  attnkit advise --length 65536 --inference --json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--length", type=int, required=True, help="sequence length, e.g. 16384")
    parser.add_argument("--causal", action="store_true", help="causal (decoder) attention is required")
    parser.add_argument(
        "--max-error", type=float, default=None, help="largest relative error vs exact attention, e.g. 0.05"
    )
    parser.add_argument("--memory-gb", type=float, default=None, help="largest peak memory of one step in GB")
    parser.add_argument("--decode", action="store_true", help="token-by-token decoding is required (implies --causal)")
    parser.add_argument(
        "--inference", action="store_true", help="rank by forward time (default: forward+backward, i.e. training)"
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


def advice_as_dict(advice: Any) -> dict[str, Any]:
    """A JSON-ready view of an :class:`~attnkit.arena.Advice` (``speedup_vs_full``: > 1 = faster)."""
    speedups = _speedups(advice)
    return {
        "constraints": vars(advice.constraints),
        "recommended": advice.recommended,
        "closest": [{"mechanism": n, "change": t} for n, t in advice.closest],
        "candidates": [
            {
                "mechanism": v.candidate.name,
                "eligible": v.eligible,
                "reasons": v.reasons,
                "time_ms": v.candidate.time_ms,
                "speedup_vs_full": speedups.get(v.candidate.name),
                "peak_mb": v.candidate.peak_mb,
                "error": v.candidate.error,
                "source": v.candidate.source,
            }
            for v in advice.verdicts
        ],
    }


def render(advice: Any) -> str:
    """The recommendation, the table of verdicts, and the closest options when nothing fits."""
    from attnkit.arena.report import format_table

    c = advice.constraints
    asked = [f"length {c.length}", "causal" if c.causal else "bidirectional", "training" if c.training else "inference"]
    if c.decode:
        asked.append("incremental decoding")
    if c.max_error is not None:
        asked.append(f"error <= {c.max_error:g}")
    if c.memory_gb is not None:
        asked.append(f"memory <= {c.memory_gb:g} GB")
    lines = [f"constraints: {', '.join(asked)}", ""]
    if advice.recommended:
        lines.append(f"recommended: {advice.recommended}")
    else:
        lines.append("no mechanism satisfies every constraint.")
        if advice.closest:
            lines.append("closest options:")
            lines += [f"  {name}: {change}" for name, change in advice.closest]
        else:
            lines.append("nothing comes close: drop --causal/--decode or try a shorter --length.")
    lines.append("")

    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    speedups = _speedups(advice)
    rows = [
        [
            ("* " if v.candidate.name == advice.recommended else "  ") + v.candidate.name,
            num(v.candidate.time_ms, ".1f"),
            num(speedups.get(v.candidate.name), ".2f") + ("x" if v.candidate.name in speedups else ""),
            num(v.candidate.peak_mb, ".0f"),
            num(v.candidate.error, ".3g"),
            v.candidate.source if v.candidate.time_ms is not None else "-",
            "; ".join(v.reasons),
        ]
        for v in advice.verdicts
    ]
    mode = "fwd+bwd" if c.training else "fwd"
    header = ["mechanism", f"{mode} ms", SPEEDUP_LABEL, "peak MB", "error", "how", "verdict"]
    lines.append(format_table(header, rows, align="lrrrrll"))
    lines.append(
        f"\n{SPEEDUP_LABEL}: {mode} time of exact attention / time of the mechanism, at this length ('-' where "
        "full was not measured). error: relative error vs exact attention, self-attention over smooth hidden "
        "states (the arena's fidelity inputs and length)."
    )
    if any("flagged" in v.candidate.source for v in advice.verdicts):
        lines.append(
            "flagged: a cell behind the number is noisy (its repeats disagree) or contradicts its length curve; "
            "measure again with 'attnkit arena --threads 1 --repeats 5 --no-resume' (same --out as --cache)."
        )
    return "\n".join(lines)


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


def run(args: argparse.Namespace) -> int:
    from attnkit.arena import Constraints, decide, measure_candidates
    from attnkit.arena.runner import check_device, resolve_mechanisms

    constraints = Constraints(
        length=args.length,
        causal=args.causal or args.decode,
        max_error=args.max_error,
        memory_gb=args.memory_gb,
        decode=args.decode,
        training=not args.inference,
    )
    check_device(args.device)
    names = [n.strip() for n in args.mechanisms.split(",") if n.strip()]
    mechanisms = resolve_mechanisms(names) if names else None
    candidates = measure_candidates(
        constraints,
        cache_dir=args.cache,
        config=_arena_config(args.cache, args.device, args.threads),
        mechanisms=mechanisms,
        progress=not args.json,
    )
    advice = decide(constraints, candidates)
    if args.json:
        print(json.dumps(advice_as_dict(advice), indent=2))
    else:
        print(render(advice))
    return 0 if advice.recommended else 1
