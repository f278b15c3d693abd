"""Dynamic top-k attention (`topk`) against SDPA: time and peak memory, forward and forward+backward.

`topk` must look at every score to find each query's largest ones, so its selection costs one
`T×S` GEMM plus `torch.topk`; what it saves is the softmax, the value product and the backward,
which touch only `k` keys per query.
"""

from __future__ import annotations

from benchmarks.suite import Case, Part, Suite

MECHANISM = "benchmarks.common:attnkit_mechanism"

SUITE = Suite(
    name="topk",
    title="dynamic top-k attention vs SDPA",
    description=__doc__ or "",
    parts=(
        Part(
            "main",
            (
                Case("sdpa", "benchmarks.common:sdpa", role="sdpa"),
                Case("attnkit topk k=64", MECHANISM, {"name": "topk", "topk": 64}),
                Case("attnkit topk k=256", MECHANISM, {"name": "topk", "topk": 256}),
            ),
            lengths=(1024, 2048, 4096, 8192, 16384),
            repeats=5,
            # a long cell's warm-up step alone can take over 24 s on a loaded machine; the default
            # budget (120 s) would then cut the measurement before any timed step
            time_budget=400.0,
        ),
    ),
)
