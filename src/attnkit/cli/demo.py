"""``attnkit demo``: build every registered mechanism, check it against the exact oracle, time it.

A one-minute tour: for each mechanism, the relative error against float64 softmax
attention on locally correlated inputs, and forward / forward+backward time as a ratio
to PyTorch's ``scaled_dot_product_attention`` measured in the same process. The arena
(``attnkit arena``) is the thorough version.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="quick tour: every mechanism's error vs exact attention and its speed vs PyTorch SDPA",
        description=(
            "Build every registered mechanism, measure its relative error against exact float64 attention on "
            "locally correlated inputs, and time forward and forward+backward against PyTorch's "
            "scaled_dot_product_attention in the same process."
        ),
    )
    parser.add_argument("--length", type=int, default=2048, help="sequence length for timing (default 2048)")
    parser.add_argument("--heads", type=int, default=8, help="heads (default 8)")
    parser.add_argument("--head-dim", type=int, default=64, help="head dimension (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per cell, median reported (default 3)")
    parser.add_argument(
        "--causal", action="store_true", help="measure causal attention (mechanisms without it are skipped)"
    )
    parser.add_argument("--mechanisms", default="", help="comma-separated subset (default: all registered)")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    parser.set_defaults(func=run)


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, *, length: int, heads: int, head_dim: int, repeats: int, causal: bool) -> dict[str, Any]:
    """Error vs the float64 oracle (length 256) and fwd / fwd+bwd times at ``length`` for one mechanism."""
    import torch

    import attnkit
    from attnkit.attention.reference import reference_attention
    from attnkit.inputs import structured_qkv

    spec = attnkit.get_spec(name)
    module = attnkit.build_attention(name, **spec.benchmark_options).eval()
    # Fidelity on a short structured input (the oracle is quadratic in float64).
    q, k, v = structured_qkv(1, heads, 256, 256, head_dim, seed=0)
    with torch.no_grad():
        out = module(q, k, v, causal=causal)
    pattern = module.pattern(256, 256, causal=causal)
    ref = reference_attention(q, k, v, causal=causal, mask=pattern)
    error = float((out.double() - ref).norm() / ref.norm())

    q, k, v = (t.requires_grad_(True) for t in structured_qkv(1, heads, length, length, head_dim, seed=1))

    def forward() -> None:
        with torch.no_grad():
            module(q, k, v, causal=causal)

    def forward_backward() -> None:
        module(q, k, v, causal=causal).sum().backward()

    def sdpa_forward() -> None:
        with torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def sdpa_forward_backward() -> None:
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()

    fwd = _median_time(forward, repeats)
    fwd_sdpa = _median_time(sdpa_forward, repeats)
    bwd = _median_time(forward_backward, repeats)
    bwd_sdpa = _median_time(sdpa_forward_backward, repeats)
    return {
        "name": name,
        "exact": spec.capabilities.exact,
        "error_vs_exact": error,
        "error_against": "its own pattern" if pattern is not None else "full softmax",
        "fwd_ms": fwd * 1e3,
        "fwd_vs_sdpa": fwd / fwd_sdpa,
        "fwd_bwd_ms": bwd * 1e3,
        "fwd_bwd_vs_sdpa": bwd / bwd_sdpa,
    }


def run(args: argparse.Namespace) -> int:
    import attnkit
    from attnkit.core.errors import check_positive_int

    check_positive_int("--length", args.length, example=2048)
    check_positive_int("--repeats", args.repeats, example=3)
    names = [n.strip() for n in args.mechanisms.split(",") if n.strip()] or attnkit.list_attention()
    for n in names:
        attnkit.get_spec(n)  # unknown names fail before any work, with a did-you-mean
    if args.causal:
        skipped = [n for n in names if not attnkit.attention_capabilities(n).causal]
        names = [n for n in names if n not in skipped]
        if skipped:
            print(f"skipping mechanisms without a causal mode: {', '.join(skipped)}")

    from tqdm import tqdm

    rows = []
    for name in tqdm(names, desc="demo", unit="mechanism", disable=args.json):
        rows.append(
            measure(
                name,
                length=args.length,
                heads=args.heads,
                head_dim=args.head_dim,
                repeats=args.repeats,
                causal=args.causal,
            )
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"\nattnkit demo: B=1, H={args.heads}, D={args.head_dim}, L={args.length}, causal={args.causal}, "
        "fp32; times are medians, ratios < 1 are faster than PyTorch SDPA\n"
    )
    header = f"{'mechanism':<16}{'rel. error':>12}  {'fwd ms':>9}{'vs SDPA':>9}  {'fwd+bwd ms':>11}{'vs SDPA':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        err = f"{r['error_vs_exact']:.1e}" + ("*" if r["error_against"] == "its own pattern" else " ")
        print(
            f"{r['name']:<16}{err:>12}  {r['fwd_ms']:>9.1f}{r['fwd_vs_sdpa']:>9.2f}  "
            f"{r['fwd_bwd_ms']:>11.1f}{r['fwd_bwd_vs_sdpa']:>9.2f}"
        )
    print(
        "\nrel. error: relative Frobenius error vs float64 softmax attention on locally correlated inputs (L=256);"
        "\n* = exact mechanism, compared with softmax over its own sparsity pattern."
    )
    return 0
