"""Dynamic block sparsity (issue 23): `dynamic_block` (MoBA, block 64, top-8) and `nsa` vs causal SDPA.

- `dynamic_block`: each query block attends its own block and the 8 key blocks a parameter-free gate
  (mean query · mean key) scores highest: 9 blocks of 64 = 576 keys per query at any length, against
  the whole causal prefix for SDPA (8K keys on average at 16K). The gate itself is a `(T/64)×(T/64)`
  product.
- `nsa` (Native Sparse Attention): compressed blocks of 32 keys every 16 (`T/16` compressed keys per
  query), 16 selected blocks of 64 (1024 keys) chosen by each query block's first query
  (`selection="block"`: one matrix product per query block on the blocked core; the paper's per-query
  choice is a matrix-vector product per query, 8x slower on CPU at 4K) and a 512-key sliding window.
  These are the paper's sizes (Yuan et al. 2025, §4.1: l=32, d=16, l'=64, n=16, w=512), so the row
  measures the method as published: about 2.5K keys per query at 16K (1K compressed, 1K selected,
  512 in the window), against 8K on average for causal SDPA. The `(MoBA budget)` row gives NSA the
  key budget of the `dynamic_block` row: non-overlapping compressed blocks of 64 (256 compressed keys
  at 16K), 4 selected blocks of 64 (256 keys) and a 128-key window, about 640 keys per query; the
  issue's 5x floor is judged on it, so that the two methods are compared at the same budget.

Forward+backward is the training step these mechanisms exist for; forward alone is recorded too. The
`long` part measures causal forward+backward peak memory at 16K and 64K (SDPA is left out: minutes per
step at 64K); its floor is linear growth, 64K/16K <= 4.5.
"""

from __future__ import annotations

from typing import Any

from benchmarks.suite import Case, Part, Suite

OURS = "benchmarks.common:attnkit_mechanism"
DYNAMIC_BLOCK = Case(
    "attnkit dynamic_block (b64, top-8)", OURS, {"name": "dynamic_block", "block_size": 64, "topk_blocks": 8}
)
NSA_PAPER: dict[str, Any] = {
    "name": "nsa",
    "compress_block": 32,
    "compress_stride": 16,
    "select_block": 64,
    "select_blocks": 16,
    "window": 512,
    "selection": "block",
}
NSA_BUDGET: dict[str, Any] = {
    **NSA_PAPER,
    "compress_block": 64,
    "compress_stride": 64,
    "select_blocks": 4,
    "window": 128,
}
NSA = Case("attnkit nsa (c32/16, s64x16, w512)", OURS, NSA_PAPER)
NSA_BUDGET_CASE = Case("attnkit nsa (MoBA budget: c64/64, s64x4, w128)", OURS, NSA_BUDGET)

SUITE = Suite(
    name="dynamic",
    title="dynamic block-sparse attention (MoBA, NSA) vs SDPA (issue 23)",
    description=__doc__ or "",
    parts=(
        Part(
            "main",
            (Case("sdpa", "benchmarks.common:sdpa", role="sdpa"), DYNAMIC_BLOCK, NSA, NSA_BUDGET_CASE),
            lengths=(4096, 16384),
            repeats=3,
            # SDPA's causal forward+backward at 16K takes tens of seconds on a loaded CPU
            time_budget=400.0,
        ),
        Part(
            "long",
            (DYNAMIC_BLOCK, NSA, NSA_BUDGET_CASE),
            lengths=(16384, 65536),
            causal=(True,),
            modes=("fwd+bwd",),
            repeats=1,
            # peak memory is the measure here, and one step at 64K takes minutes: one warm-up step
            warmup=1,
            time_budget=600.0,
        ),
    ),
)
