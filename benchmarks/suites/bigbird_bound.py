"""How fast could *any* fp32 BigBird layer be on this machine? The matrix products alone.

Issue 3 asks for attnkit BigBird (with the q/k/v projections the HF layer runs inside) to be 3×
faster than HF transformers 4.57's block-sparse layer, forward+backward, at 4K and 16K. Both do the
same arithmetic: three 512 → 512 projections and softmax attention over the same block pattern.
This suite times only the matrix products that arithmetic needs, with nothing else (no softmax, no
gathers, no masks, no allocation inside the timed region):

- `projections`: the forward `x Wᵀ + b` and the two backward products (input and weight gradients)
  of the q/k/v projections, fused into one `512 → 1536` product or as three `512 → 512` ones (the
  bound takes the faster);
- `block products`: for every non-global query block (64 queries) and its key blocks (3 window, 2
  global, 3 random: 512 keys), the six products of attention forward and backward (`Q Kᵀ`, `P V`,
  `Pᵀ dO`, `dO Vᵀ`, `dS K`, `dSᵀ Q`), batched over blocks and heads as one `bmm` each, then scaled to
  the exact number of block pairs of the pattern;
- `global rows`: the same six products for the 128 global queries against all `T` keys.

Their sum is a lower bound on the step time of any implementation that does the maths in fp32
here; the lower bound's speed-up over HF is the best any implementation could reach. HF and attnkit
are measured in the same run, every case in alternating rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import DIM, HEADS
from benchmarks.suite import Case, Column, Part, Suite, anchor, by_label, derived_row, fastest, total

BLOCK = 64
HIDDEN = HEADS * DIM
GLOBAL_BLOCKS, RANDOM_BLOCKS = 2, 3
KEY_BLOCKS = 3 + GLOBAL_BLOCKS + RANDOM_BLOCKS  # window + global + random key blocks per query block
HERE = "benchmarks.suites.bigbird_bound"
HF = "HF BigBird block-sparse 4.57 (b64, r3)"
OURS = "attnkit bigbird + qkv proj"
BOUND = "lower bound: sum of the products"


def pattern(length: int) -> tuple[int, int]:
    """``(non-global query blocks, key-block pairs they attend)`` of attnkit's BigBird pattern."""
    from attnkit.attention.bigbird import bigbird_block_table

    table = bigbird_block_table(
        length // BLOCK, num_global_blocks=GLOBAL_BLOCKS, num_random_blocks=RANDOM_BLOCKS, causal=False, seed=0
    )
    rows = table[GLOBAL_BLOCKS:]
    return rows.shape[0], int(rows.sum())


def _with_flop(run: Callable[[], torch.Tensor], flop: float) -> Callable[[], torch.Tensor]:
    run.info = lambda: {"flop": flop}  # type: ignore[attr-defined]
    return run


def projection_products(length: int, causal: bool, *, fused: bool) -> Callable[[], torch.Tensor]:
    """Forward and backward products of the q/k/v projections, nothing else."""
    parts = 1 if fused else 3
    width = HIDDEN * (3 if fused else 1)
    x, grad_x = torch.randn(length, HIDDEN), torch.empty(length, HIDDEN)
    weights = [torch.randn(width, HIDDEN) for _ in range(parts)]
    bias = torch.randn(width)
    outs = [torch.empty(length, width) for _ in range(parts)]
    grads = [torch.randn(length, width) for _ in range(parts)]
    weight_grads = [torch.empty(width, HIDDEN) for _ in range(parts)]

    def run() -> torch.Tensor:
        for w, out, g, gw in zip(weights, outs, grads, weight_grads):
            torch.addmm(bias, x, w.t(), out=out)  # forward
            torch.mm(g.t(), x, out=gw)  # weight gradient
        torch.mm(grads[0], weights[0], out=grad_x)  # input gradient (summed over q, k, v)
        for g, w in zip(grads[1:], weights[1:]):
            grad_x.addmm_(g, w)
        return grad_x

    return _with_flop(run, 3 * 3 * 2 * length * HIDDEN * HIDDEN)


def _six_products(batch: int, queries: int, keys: int) -> Callable[[], torch.Tensor]:
    """The six attention products for ``batch`` independent (queries × keys) blocks of width DIM."""
    q, k, v, d_out = (torch.randn(batch, n, DIM) for n in (queries, keys, keys, queries))
    probs, d_scores = torch.randn(batch, queries, keys), torch.randn(batch, queries, keys)
    scores, d_probs = torch.empty(batch, queries, keys), torch.empty(batch, queries, keys)
    out, d_q = torch.empty(batch, queries, DIM), torch.empty(batch, queries, DIM)
    d_k, d_v = torch.empty(batch, keys, DIM), torch.empty(batch, keys, DIM)

    def run() -> torch.Tensor:
        torch.bmm(q, k.transpose(1, 2), out=scores)
        torch.bmm(probs, v, out=out)
        torch.bmm(probs.transpose(1, 2), d_out, out=d_v)
        torch.bmm(d_out, v.transpose(1, 2), out=d_probs)
        torch.bmm(d_scores, k, out=d_q)
        torch.bmm(d_scores.transpose(1, 2), q, out=d_k)
        return d_k

    return _with_flop(run, 6 * 2 * batch * queries * keys * DIM)


def block_products(length: int, causal: bool) -> Callable[[], torch.Tensor]:
    """The six products of every non-global query block against its 8 key blocks (512 keys)."""
    rows, _ = pattern(length)
    return _six_products(HEADS * rows, BLOCK, BLOCK * KEY_BLOCKS)


def global_products(length: int, causal: bool) -> Callable[[], torch.Tensor]:
    """The six products of the global query rows against every key."""
    return _six_products(HEADS, GLOBAL_BLOCKS * BLOCK, length)


def derive(cell: list[dict[str, Any]], earlier: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The faster projections, the block products scaled to the pattern, and their sum."""
    t = by_label(cell)
    length = cell[0]["length"]
    rows, pairs = pattern(length)
    scale = pairs / (rows * KEY_BLOCKS)  # the six block products scale linearly with the block pairs
    blocks = t["block products (8 key blocks per query block)"]
    projections = fastest(t["projections (fused 512→1536)"], t["projections (3 × 512→512)"])
    scaled = None if blocks is None else blocks * pairs / (rows * KEY_BLOCKS)
    block_flop = 6 * 2 * HEADS * rows * BLOCK * BLOCK * KEY_BLOCKS * DIM * scale
    return [
        derived_row(
            cell,
            "projections (faster layout)",
            projections,
            "min of the two projection layouts",
            info={"flop": 3 * 3 * 2 * length * HIDDEN * HIDDEN},
        ),
        derived_row(
            cell,
            "block products (the pattern's block pairs)",
            scaled,
            f"block products × {pairs} pairs / ({rows} blocks × {KEY_BLOCKS})",
            info={"flop": block_flop, "query_blocks": rows, "block_pairs": pairs},
        ),
        derived_row(
            cell,
            BOUND,
            total(projections, scaled, t["global rows"]),
            "projections (faster layout) + block products (pattern) + global rows",
            role="bound",
        ),
    ]


GFLOP = Column("GFLOP", lambda r: r["info"]["flop"] / 1e9, "{:.1f}")
GFLOP_S = Column("GFLOP/s", lambda r: r["info"]["flop"] / r["median_s"] / 1e9, "{:.0f}")

SUITE = Suite(
    name="bigbird_bound",
    title="a lower bound on a BigBird layer's step from its matrix products alone (issue 3)",
    description=__doc__ or "",
    parts=(
        Part(
            "main",
            (
                Case(
                    "projections (fused 512→1536)",
                    f"{HERE}:projection_products",
                    {"fused": True},
                    role="component",
                    autograd=False,
                ),
                Case(
                    "projections (3 × 512→512)",
                    f"{HERE}:projection_products",
                    {"fused": False},
                    role="component",
                    autograd=False,
                ),
                Case(
                    "block products (8 key blocks per query block)",
                    f"{HERE}:block_products",
                    role="component",
                    autograd=False,
                ),
                Case("global rows", f"{HERE}:global_products", role="component", autograd=False),
                anchor(HF, "benchmarks.suites.sparse:hf_bigbird"),
                Case(
                    OURS,
                    "benchmarks.common:attnkit_projected",
                    {
                        "name": "bigbird",
                        "block_size": BLOCK,
                        "num_random_blocks": RANDOM_BLOCKS,
                        "num_global_blocks": GLOBAL_BLOCKS,
                    },
                ),
            ),
            lengths=(4096, 16384),
            causal=(False,),
            modes=("fwd+bwd",),
            repeats=7,
            rounds=3,
            max_round_seconds=600.0,  # every case gets every round
            columns=(GFLOP, GFLOP_S),
        ),
    ),
    anchors={BOUND: (HF,), OURS: (HF,)},
    derive=derive,
    plot=False,
)
