"""Benchmark suite of the sparse family (issue 3): sliding_window, longformer, bigbird vs SDPA and the open implementations.

Anchors (``.venv-bench`` only, never package dependencies), at matched settings:

* ``local-attention`` ``LocalAttention(window_size=256, look_backward=1, look_forward=1 or 0)``
  (rotary off) against attnkit ``sliding_window``. The anchor's query sees its 256-block and
  the neighbouring ones: 768 keys on average, at least ±256 around itself (causal: at least
  257 keys, self included). attnkit rows: ``window=256`` (the issue's setting: ±128, or 256
  keys causal) and the *matched* window guaranteeing the anchor's minimum context
  (``window=513``: ±256; causal ``window=257``).
* HF transformers 4.57 ``LongformerSelfAttention`` (attention window 512 = ±256, one global
  token) against attnkit ``longformer(window=513, num_global_tokens=1)``. The HF layer runs its
  q/k/v projections (512 → 512) inside; the ``+ qkv proj`` attnkit row adds the same three
  ``nn.Linear`` so the two do the same work. HF has no causal mode.
* HF transformers 4.57 ``BigBirdBlockSparseAttention`` (block 64, 3 random blocks, first and
  last block global; training mode, where it uses random blocks) against attnkit
  ``bigbird(block_size=64, num_random_blocks=3, num_global_blocks=2)``, also with and without
  the projections. HF has no causal mode.

Each sub-suite writes its own ``benchmarks/results/sparse_<part>.{json,md,png}``; the combined
``sparse.{json,md,png}`` holds every row plus a summary of the issue's floors.

Run (about 25 minutes)::

    ATTNKIT_BENCH_LOCK=/tmp/attnkit-quiet.lock .venv-bench/bin/python -m benchmarks.sparse

``--parts window longformer`` measures some sub-suites only; ``--parts`` alone rebuilds the
combined files from the saved ones.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import qkv
from benchmarks.harness import RESULTS, Case, add_rounds_argument, markdown_table, plot, run_suite

BENCH_PY = ".venv-bench/bin/python"
HEADS, DIM = 8, 64


def ours(length: int, causal: bool, *, name: str, **options: Any) -> Callable[[], torch.Tensor]:
    """An attnkit sparse mechanism on the protocol inputs ``(1, 8, T, 64)``."""
    import attnkit

    module = attnkit.build_attention(name, **options)
    q, k, v = qkv(length)
    return lambda: module(q, k, v, causal=causal)


def ours_projected(length: int, causal: bool, *, name: str, **options: Any) -> Callable[[], torch.Tensor]:
    """An attnkit mechanism behind q/k/v projections 512 → 512 (the work the HF layers do)."""
    import attnkit

    module = attnkit.build_attention(name, **options)
    proj = torch.nn.ModuleList(torch.nn.Linear(HEADS * DIM, HEADS * DIM) for _ in range(3))
    x = torch.randn(1, length, HEADS * DIM, requires_grad=True)

    def run() -> torch.Tensor:
        q, k, v = (p(x).view(1, length, HEADS, DIM).transpose(1, 2) for p in proj)
        return module(q, k, v, causal=causal)

    return run


def local_attention_anchor(length: int, causal: bool, *, window_size: int = 256) -> Callable[[], torch.Tensor]:
    """``local_attention.LocalAttention`` on ``(1, 8, T, 64)``, one block back (and forward)."""
    from local_attention import LocalAttention

    attn = LocalAttention(
        window_size=window_size,
        causal=causal,
        look_backward=1,
        look_forward=0 if causal else 1,
        dim=DIM,
        use_rotary_pos_emb=False,
    )
    q, k, v = qkv(length)
    return lambda: attn(q, k, v)


def hf_longformer(length: int, causal: bool, *, window: int = 512, num_global: int = 1) -> Callable[[], torch.Tensor]:
    """HF ``LongformerSelfAttention`` (with its projections) on ``(1, T, 512)``, leading global tokens."""
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    config = LongformerConfig(
        hidden_size=HEADS * DIM, num_attention_heads=HEADS, attention_window=[window], attention_probs_dropout_prob=0.0
    )
    attn = LongformerSelfAttention(config, layer_id=0)
    x = torch.randn(1, length, HEADS * DIM, requires_grad=True)
    mask = torch.zeros(1, length)
    mask[:, :num_global] = 1.0  # > 0: global, 0: local, < 0: padding
    is_masked, is_global = mask < 0, mask > 0
    return lambda: attn(
        x, attention_mask=mask, is_index_masked=is_masked, is_index_global_attn=is_global, is_global_attn=True
    )[0]


def hf_bigbird(
    length: int, causal: bool, *, block_size: int = 64, num_random_blocks: int = 3
) -> Callable[[], torch.Tensor]:
    """HF ``BigBirdBlockSparseAttention`` (with its projections) on ``(1, T, 512)``, training mode."""
    from transformers import BigBirdConfig
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention, BigBirdModel

    config = BigBirdConfig(
        hidden_size=HEADS * DIM,
        num_attention_heads=HEADS,
        attention_type="block_sparse",
        block_size=block_size,
        num_random_blocks=num_random_blocks,
        max_position_embeddings=length,
        attention_probs_dropout_prob=0.0,
    )
    attn = BigBirdBlockSparseAttention(config, seed=0).train()
    x = torch.randn(1, length, HEADS * DIM, requires_grad=True)
    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(
        torch.ones(1, length), block_size
    )
    return lambda: attn(
        x, band_mask=band, from_mask=from_mask, to_mask=to_mask, from_blocked_mask=blocked, to_blocked_mask=blocked
    )[0]


def window_cases() -> list[Case]:
    anchor: dict[str, Any] = {"role": "anchor", "python": BENCH_PY}
    return [
        Case("sdpa", "benchmarks.common:sdpa", role="sdpa"),
        Case("attnkit sliding_window (w256)", "benchmarks.sparse:ours", {"name": "sliding_window", "window": 256}),
        Case(
            "attnkit sliding_window (matched: w513)",
            "benchmarks.sparse:ours",
            {"name": "sliding_window", "window": 513},
            bidirectional_only=True,
        ),
        Case(
            "attnkit sliding_window (matched: w257)",
            "benchmarks.sparse:ours",
            {"name": "sliding_window", "window": 257},
            causal_only=True,
        ),
        Case("local-attention (256-blocks)", "benchmarks.sparse:local_attention_anchor", **anchor),
    ]


def longformer_cases() -> list[Case]:
    opts = {"name": "longformer", "window": 513, "num_global_tokens": 1}
    return [
        Case("sdpa", "benchmarks.common:sdpa", role="sdpa"),
        Case("attnkit longformer (w513, 1 global)", "benchmarks.sparse:ours", opts),
        Case("attnkit longformer + qkv proj", "benchmarks.sparse:ours_projected", opts),
        Case(
            "HF LongformerSelfAttention (w512, 1 global)",
            "benchmarks.sparse:hf_longformer",
            role="anchor",
            python=BENCH_PY,
            bidirectional_only=True,
        ),
    ]


def bigbird_cases() -> list[Case]:
    opts = {"name": "bigbird", "block_size": 64, "num_random_blocks": 3, "num_global_blocks": 2}
    return [
        Case("sdpa", "benchmarks.common:sdpa", role="sdpa"),
        Case("attnkit bigbird (b64, r3, g2)", "benchmarks.sparse:ours", opts),
        Case("attnkit bigbird + qkv proj", "benchmarks.sparse:ours_projected", opts),
        Case(
            "HF BigBird block-sparse 4.57 (b64, r3)",
            "benchmarks.sparse:hf_bigbird",
            role="anchor",
            python=BENCH_PY,
            bidirectional_only=True,
        ),
    ]


def long_cases() -> list[Case]:
    """Lengths where SDPA takes minutes: attnkit and local-attention only (no SDPA ratio)."""
    return [c for c in window_cases() if c.role != "sdpa"]


def summary(rows: list[dict[str, Any]]) -> str:
    """The issue's floors, read off the rows (ratios > 1 = attnkit faster)."""

    def find(label: str, length: int, causal: bool, part: str | None = None) -> dict[str, Any] | None:
        for r in rows:
            key = (r["label"], r["length"], r["causal"], r["mode"], r["status"])
            if key == (label, length, causal, "fwd+bwd", "ok") and part in (None, r.get("part")):
                return r
        return None

    def pair(a: str, b: str, length: int, causal: bool) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        # the other row from the same sub-suite run as ours (SDPA is measured in several)
        ra = find(a, length, causal)
        return ra, find(b, length, causal, ra.get("part") if ra else None)

    def speedup(a: str, b: str, length: int, causal: bool) -> str:
        ra, rb = pair(a, b, length, causal)
        return f"{rb['median_s'] / ra['median_s']:.2f}×" if ra and rb else "n/a"

    def memory(a: str, b: str, length: int, causal: bool) -> str:
        ra, rb = pair(a, b, length, causal)
        return f"{ra['peak_mb']:.0f} vs {rb['peak_mb']:.0f} MB" if ra and rb else "n/a"

    lines = ["## Floors (fwd+bwd; speed-up = other time / attnkit time)", ""]
    lines += ["| check | setting | measured | floor |", "|---|---|---|---|"]
    for label in ("attnkit sliding_window (w256)", "attnkit sliding_window (matched: w513)"):
        lines.append(f"| {label} vs SDPA | 16K | {speedup(label, 'sdpa', 16384, False)} | ≥ 8× |")
        lines.append(
            f"| {label} vs local-attention | 16K | {speedup(label, 'local-attention (256-blocks)', 16384, False)} | ≥ 1.5× |"
        )
    for label in ("attnkit sliding_window (w256)", "attnkit sliding_window (matched: w257)"):
        lines.append(f"| {label} vs causal SDPA | 16K causal | {speedup(label, 'sdpa', 16384, True)} | ≥ 5× |")
        lines.append(
            f"| {label} vs local-attention | 16K causal | "
            f"{speedup(label, 'local-attention (256-blocks)', 16384, True)} | ≥ 1.5× |"
        )
    for causal in (False, True):
        a, b = (
            find("attnkit sliding_window (w256)", 16384, causal),
            find("attnkit sliding_window (w256)", 65536, causal),
        )
        ratio = f"{b['peak_mb'] / max(a['peak_mb'], 1.0):.2f}" if a and b else "n/a"
        lines.append(f"| sliding_window (w256) peak memory 64K / 16K | causal={causal} | {ratio} | ≤ 4.5 |")
    pairs = [
        ("attnkit longformer + qkv proj", "HF LongformerSelfAttention (w512, 1 global)"),
        ("attnkit bigbird + qkv proj", "HF BigBird block-sparse 4.57 (b64, r3)"),
    ]
    for ours_label, anchor_label in pairs:
        for length in (4096, 16384):
            lines.append(
                f"| {ours_label} vs {anchor_label} | {length // 1024}K | "
                f"{speedup(ours_label, anchor_label, length, False)}, memory {memory(ours_label, anchor_label, length, False)} "
                "| ≥ 3×, memory ≤ |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--long-lengths", type=int, nargs="*", default=[65536])
    parser.add_argument(
        "--parts",
        nargs="*",
        default=["window", "longformer", "bigbird", "long"],
        help="sub-suites to measure; none: just rebuild sparse.{json,md,png} from the saved parts",
    )
    parser.add_argument("--repeats", type=int, default=3)
    add_rounds_argument(parser)
    args = parser.parse_args(argv)
    suites = {
        "window": (window_cases, args.lengths),
        "long": (long_cases, args.long_lengths),
        "longformer": (longformer_cases, args.lengths),
        "bigbird": (bigbird_cases, args.lengths),
    }
    rows: list[dict[str, Any]] = []
    for part in args.parts:
        make, lengths = suites[part]
        if lengths:
            rows += [
                {**r, "part": part}
                for r in run_suite(
                    f"sparse_{part}",
                    make(),
                    lengths=lengths,
                    repeats=args.repeats,
                    rounds=args.rounds,
                    warmup=args.warmup,
                )
            ]
    for part in suites:  # keep rows of parts measured in earlier invocations
        path = RESULTS / f"sparse_{part}.json"
        if part not in args.parts and path.exists():
            rows += [{**r, "part": part} for r in json.loads(path.read_text())["rows"]]
    meta = {"suite": "sparse", "parts": list(suites), "protocol": "B=1, H=8, D=64, fp32, 2 threads"}
    (RESULTS / "sparse.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = f"# sparse benchmark\n\n{json.dumps(meta)}\n\n{summary(rows)}\n\n## All rows\n\n{markdown_table(rows)}\n"
    (RESULTS / "sparse.md").write_text(text)
    plot(rows, RESULTS / "sparse.png", "sparse")


if __name__ == "__main__":
    main()
