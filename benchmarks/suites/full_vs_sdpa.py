"""Is the exact `full` path as fast as the SDPA call it wraps? (issue 3: "within 5% of SDPA at every length")

Three parts:

- `harness`: each implementation in its own fresh process, median of the repeats, peak memory.
  Comparable with every other suite, but the two rows of a cell run one after the other, so load
  from other processes on a shared machine shows up as a ratio away from 1.
- `paired`: one fresh process per cell alternates SDPA and `full` step by step on the same inputs
  (order swapped every pair) and records the median of the per-pair ratios full / SDPA: drift in
  background load hits both sides of every pair alike, which makes a 5% question answerable on a
  noisy machine.
- `overhead`: at length 64, forward without gradients, 3000 alternating calls of each: SDPA itself
  takes microseconds there, so the difference of the medians is what `full` adds to the SDPA call
  it makes (validation and dispatch).
"""

from __future__ import annotations

from typing import Any

from benchmarks.suite import Case, Part, Suite, by_label, derived_row

CASES = (
    Case("sdpa", "benchmarks.common:sdpa", role="sdpa"),
    Case("attnkit full", "benchmarks.common:attnkit_mechanism", {"name": "full"}),
)
LENGTHS = (1024, 2048, 4096, 8192, 16384)
OVERHEAD = "attnkit full − sdpa (validation and dispatch)"


def derive(cell: list[dict[str, Any]], earlier: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The overhead part's difference of medians."""
    if cell[0]["part"] != "overhead":
        return []
    t = by_label(cell)
    seconds = None if t["attnkit full"] is None or t["sdpa"] is None else t["attnkit full"] - t["sdpa"]
    return [derived_row(cell, OVERHEAD, seconds, "attnkit full − sdpa (medians)")]


SUITE = Suite(
    name="full_vs_sdpa",
    title="the exact `full` path vs the SDPA call it wraps (issue 3)",
    description=__doc__ or "",
    parts=(
        Part("harness", CASES, lengths=LENGTHS, repeats=5),
        Part(
            "paired",
            CASES,
            lengths=LENGTHS,
            interleaved=True,
            reference="sdpa",
            repeats=9,  # pairs
            warmup=1,
            time_budget=90.0,
            timeout=900.0,
        ),
        Part(
            "overhead",
            CASES,
            lengths=(64,),
            causal=(False,),
            modes=("fwd",),
            interleaved=True,
            reference="sdpa",
            repeats=3000,
            warmup=0,
            grad_scope="measurement",
        ),
    ),
    derive=derive,
)
