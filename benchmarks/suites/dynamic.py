"""Dynamic block sparsity (issue 23): `dynamic_block` (MoBA, block 64, top-8) vs causal SDPA.

Each query block attends its own block and the 8 key blocks a parameter-free gate (mean query ·
mean key) scores highest: 9 blocks of 64 = 576 keys per query at any length, against the whole
causal prefix for SDPA (8K keys on average at 16K). The gate itself is a `(T/64)×(T/64)` product.
Forward+backward is the training step this mechanism exists for; forward alone is recorded too.
"""

from __future__ import annotations

from benchmarks.suite import Case, Part, Suite

SUITE = Suite(
    name="dynamic",
    title="dynamic block-sparse attention (MoBA) vs SDPA (issue 23)",
    description=__doc__ or "",
    parts=(
        Part(
            "main",
            (
                Case("sdpa", "benchmarks.common:sdpa", role="sdpa"),
                Case(
                    "attnkit dynamic_block (b64, top-8)",
                    "benchmarks.common:attnkit_mechanism",
                    {"name": "dynamic_block", "block_size": 64, "topk_blocks": 8},
                ),
            ),
            lengths=(4096, 16384),
            repeats=3,
            # SDPA's causal forward+backward at 16K takes tens of seconds on a loaded CPU
            time_budget=400.0,
        ),
    ),
)
