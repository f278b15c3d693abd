"""``attnkit demo``: a one-minute tour of every registered mechanism.

For each mechanism it measures two things:

- **error**: the relative Frobenius error of its output against exact float64 softmax
  attention on locally correlated inputs at length 256 (the oracle is quadratic in float64).
  Exact sparse mechanisms are compared with softmax over their own pattern, so theirs is
  rounding error; approximate ones show how far they are from full attention.
- **speed**: its forward time at ``--length`` (2048 by default) as a *speed-up over PyTorch's
  scaled_dot_product_attention* (SDPA) on the same inputs: SDPA time / mechanism time, so
  ``> 1`` means faster. The two are timed alternately in one process (after one untimed
  warm-up each) and the medians compared, so a slow phase of a shared machine hits both.
  ``--backward`` adds forward+backward (a training step): the run takes 3-4 times as long.

With its defaults it takes about a minute on a quiet 2-core CPU; ``attnkit arena`` is the
thorough version (length sweeps, memory, model quality, fresh processes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

#: How the demo's speed-ups are defined; printed under the table and stored in ``--json``.
SPEEDUP_DEFINITION = (
    "speed-up vs SDPA = time of torch.nn.functional.scaled_dot_product_attention / time of the mechanism, "
    "same inputs, same process (>1 = the mechanism is faster)"
)
SPEEDUP_LABEL = "speed-up vs SDPA (>1 = faster)"
ERROR_LENGTH = 256


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="one-minute tour: every mechanism's error vs exact attention and its speed-up over PyTorch SDPA",
        description=(
            f"For every registered mechanism: its relative error against exact float64 softmax attention on locally "
            f"correlated inputs (L={ERROR_LENGTH}), and its forward time at --length as a speed-up over PyTorch's "
            "scaled_dot_product_attention on the same inputs (SDPA time / mechanism time: >1 = faster), the two "
            "timed alternately in this process. About a minute on a quiet 2-core CPU with the defaults. 'attnkit arena' "
            "is the thorough version (length sweeps, memory, model quality)."
        ),
    )
    parser.add_argument("--length", type=int, default=2048, help="sequence length for timing (default 2048)")
    parser.add_argument("--heads", type=int, default=8, help="heads (default 8)")
    parser.add_argument("--head-dim", type=int, default=64, help="head dimension (default 64)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed repeats per measurement after one warm-up; median (default 3)"
    )
    parser.add_argument(
        "--backward",
        action="store_true",
        help="also time forward+backward (a training step; the run takes 3-4x as long)",
    )
    parser.add_argument(
        "--causal", action="store_true", help="measure causal attention (mechanisms without it are skipped, and said)"
    )
    parser.add_argument("--mechanisms", default="", help="comma-separated subset (default: all registered)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (settings and rows), no table")
    parser.set_defaults(func=run)


def paired_medians(fn: Callable[[], Any], baseline: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn`` and of ``baseline``, timed alternately after one untimed call of each."""
    fn()
    baseline()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn_times, call in zip(times, (fn, baseline)):
            start = time.perf_counter()
            call()
            fn_times.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def relative_error(module: Any, *, heads: int, head_dim: int, causal: bool) -> tuple[float, str]:
    """Relative Frobenius error vs the float64 oracle at length 256, and what it was compared with."""
    import torch

    from attnkit.attention.reference import reference_attention
    from attnkit.inputs import structured_qkv

    q, k, v = structured_qkv(1, heads, ERROR_LENGTH, ERROR_LENGTH, head_dim, seed=0)
    with torch.no_grad():
        out = module(q, k, v, causal=causal)
    pattern = module.pattern(ERROR_LENGTH, ERROR_LENGTH, causal=causal)
    ref = reference_attention(q, k, v, causal=causal, mask=pattern)
    error = float((out.double() - ref).norm() / ref.norm())
    return error, ("its own sparsity pattern" if pattern is not None else "full softmax")


def measure(
    name: str, *, length: int, heads: int, head_dim: int, repeats: int, causal: bool, backward: bool
) -> dict[str, Any]:
    """One row: the error vs the float64 oracle, and times and speed-ups over SDPA at ``length``.

    Args:
        name: registered mechanism, built with its ``benchmark_options``.
        length: sequence length of the timed inputs (queries and keys), shape ``(1, heads, length, head_dim)``.
        heads, head_dim: of the inputs.
        repeats: timed calls per measurement (median).
        causal: causal attention (SDPA with ``is_causal``).
        backward: also time forward+backward.

    Returns:
        ``name``, ``exact``, ``error_vs_exact``, ``error_against``, ``fwd_ms``, ``sdpa_fwd_ms``,
        ``fwd_speedup_vs_sdpa`` (and the ``fwd_bwd_*`` three with ``backward``).
    """
    import torch
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    import attnkit
    from attnkit.inputs import structured_qkv

    spec = attnkit.get_spec(name)
    module = attnkit.build_attention(name, **spec.benchmark_options).eval()
    error, against = relative_error(module, heads=heads, head_dim=head_dim, causal=causal)
    row: dict[str, Any] = {
        "name": name,
        "exact": spec.capabilities.exact,
        "error_vs_exact": error,
        "error_against": against,
    }
    q, k, v = (t.requires_grad_(backward) for t in structured_qkv(1, heads, length, length, head_dim, seed=1))

    def forward() -> None:
        with torch.no_grad():
            module(q, k, v, causal=causal)

    def sdpa_forward() -> None:
        with torch.no_grad():
            sdpa(q, k, v, is_causal=causal)

    cases = [("fwd", forward, sdpa_forward)]
    if backward:
        cases.append(
            (
                "fwd_bwd",
                lambda: module(q, k, v, causal=causal).sum().backward(),
                lambda: sdpa(q, k, v, is_causal=causal).sum().backward(),
            )
        )
    for case, fn, baseline in cases:
        seconds, sdpa_seconds = paired_medians(fn, baseline, repeats)
        row[f"{case}_ms"] = seconds * 1e3
        row[f"sdpa_{case}_ms"] = sdpa_seconds * 1e3
        row[f"{case}_speedup_vs_sdpa"] = sdpa_seconds / seconds
    return row


def _table(rows: list[dict[str, Any]], backward: bool) -> list[str]:
    """The rows as a text table: error, then per timed case its ms, SDPA's ms and the labelled speed-up."""
    cases = [("fwd", "fwd ms")] + ([("fwd_bwd", "fwd+bwd ms")] if backward else [])
    width = len(SPEEDUP_LABEL)
    header = f"{'mechanism':<16}{'rel. error':>11}" + "".join(
        f"  {label:>10}{'SDPA ms':>9}  {SPEEDUP_LABEL}" for _, label in cases
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        error = f"{r['error_vs_exact']:.1e}" + ("*" if r["error_against"] == "its own sparsity pattern" else " ")
        lines.append(
            f"{r['name']:<16}{error:>11}"
            + "".join(
                f"  {r[f'{case}_ms']:>10.1f}{r[f'sdpa_{case}_ms']:>9.1f}  "
                f"{format(r[f'{case}_speedup_vs_sdpa'], '.2f') + 'x':>{width}}"
                for case, _ in cases
            )
        )
    return lines


def run(args: argparse.Namespace) -> int:
    from attnkit.core.errors import check_positive_int

    for flag, value, example in (
        ("--length", args.length, 2048),
        ("--heads", args.heads, 8),
        ("--head-dim", args.head_dim, 64),
        ("--repeats", args.repeats, 3),
    ):
        check_positive_int(flag, value, example=example)

    import torch
    from tqdm import tqdm

    import attnkit

    names = [n.strip() for n in args.mechanisms.split(",") if n.strip()] or attnkit.list_attention()
    for n in names:
        attnkit.get_spec(n)  # unknown names fail before any work, with a did-you-mean
    skipped = [n for n in names if args.causal and not attnkit.attention_capabilities(n).causal]
    names = [n for n in names if n not in skipped]
    if skipped and not args.json:
        print(f"skipping mechanisms without a causal mode: {', '.join(skipped)}")

    start = time.perf_counter()
    rows = []
    with tqdm(names, desc="demo", unit="mechanism", dynamic_ncols=True) as bar:
        for name in bar:
            bar.set_postfix_str(name)
            rows.append(
                measure(
                    name,
                    length=args.length,
                    heads=args.heads,
                    head_dim=args.head_dim,
                    repeats=args.repeats,
                    causal=args.causal,
                    backward=args.backward,
                )
            )
    seconds = time.perf_counter() - start
    settings = {
        "batch": 1,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "length": args.length,
        "error_length": ERROR_LENGTH,
        "causal": args.causal,
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
    }
    if args.json:
        result = {
            "settings": settings,
            "speedup_vs_sdpa": SPEEDUP_DEFINITION,
            "skipped_without_causal_mode": skipped,
            "seconds": seconds,
            "rows": rows,
        }
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"\nattnkit demo: B=1, H={args.heads}, D={args.head_dim}, L={args.length}, causal={args.causal}, fp32, "
        f"{settings['threads']} threads; times are medians of {args.repeats} after a warm-up\n"
    )
    print("\n".join(_table(rows, args.backward)))
    print(
        f"\nrel. error: relative Frobenius error vs float64 softmax attention on locally correlated inputs "
        f"(L={ERROR_LENGTH});\n  * = exact mechanism, compared with softmax over its own sparsity pattern "
        "(rounding only).\nspeed-up vs SDPA: time of PyTorch's scaled_dot_product_attention / time of the mechanism, "
        "same inputs,\n  timed alternately in this process; >1 = the mechanism is faster. On a CPU the efficient "
        "mechanisms\n  tend to overtake SDPA only at several thousand tokens: try --length 8192, or 'attnkit arena' "
        f"for\n  length sweeps, memory and model quality.\nmeasured in {seconds:.0f} s"
    )
    return 0
