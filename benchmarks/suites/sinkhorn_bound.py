"""How fast could *any* fp32 Sinkhorn layer be on this machine? The matrix products alone.

attnkit's bidirectional `sinkhorn` (block 64) and `sinkhorn-transformer`'s `SinkhornAttention` both
compute, per head, an `(nb × nb)` block mix of the keys (`nb = T / 64`) and softmax attention of
every 64-query block over 128 keys (its own block and its sorted block). This suite times only the
matrix products that arithmetic needs, with nothing else (no softmax, no Sinkhorn iterations, no
sort scores, no allocation inside the timed region; the `exp` of every score, which any softmax
needs once, is timed apart):

- `attention`: for every block (`8 · nb` of them), the six products of attention forward and
  backward over its 128 keys, as one `bmm` each over `(G, 64, 128)`, or with the own and the sorted
  keys as two 64-key halves (the bound takes the faster);
- `mix (attnkit)`: the six `(nb × nb) @ (nb × 64·64)` products per head attnkit's function needs:
  sorted keys and sorted values forward; backward the mix gradient from each and the key and value
  gradients;
- `mix (anchor)`: the three the anchor's function needs: it reuses the sorted keys as its values
  (`b_v_r = b_k_r`), so only the key mix is computed and back-propagated.

Each sum is a lower bound on the step time of an implementation of that function in fp32 here. The
anchor and attnkit's soft-sort rows are measured in the same run, every case in alternating rounds.
(Since the hashing suite's matched row became top-1, these soft-sort rows are shown, not judged.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import DIM, HEADS
from benchmarks.suite import Case, Column, Part, Suite, anchor, by_label, derived_row, fastest, total
from benchmarks.suites.hashing import SINKHORN_ANCHOR, SOFT_SORT

BLOCK = 64
HERE = "benchmarks.suites.sinkhorn_bound"
OURS = ("attnkit sinkhorn (b64)", "attnkit sinkhorn (b64, 0 iters)")
BOUND = "lower bound: attnkit's function (attention + its mix)"
ANCHOR_BOUND = "lower bound: the anchor's function (attention + key mix)"
WITH_EXP = "lower bound: attnkit's function + one exp per score"


def _with_flop(run: Callable[[], torch.Tensor], flop: float | None) -> Callable[[], torch.Tensor]:
    if flop is not None:
        run.info = lambda: {"flop": flop}  # type: ignore[attr-defined]
    return run


def attention_products(length: int, causal: bool, *, halves: bool) -> Callable[[], torch.Tensor]:
    """The six attention products of every block of 64 queries over its 128 keys."""
    groups, keys = HEADS * length // BLOCK, 2 * BLOCK
    q, d_out = torch.randn(groups, BLOCK, DIM), torch.randn(groups, BLOCK, DIM)
    k, v = torch.randn(groups, keys, DIM), torch.randn(groups, keys, DIM)
    probs, d_scores = torch.randn(groups, BLOCK, keys), torch.randn(groups, BLOCK, keys)
    scores, d_probs = torch.empty(groups, BLOCK, keys), torch.empty(groups, BLOCK, keys)
    out, d_q = torch.empty(groups, BLOCK, DIM), torch.empty(groups, BLOCK, DIM)
    d_k, d_v = torch.empty(groups, keys, DIM), torch.empty(groups, keys, DIM)
    split = [slice(0, BLOCK), slice(BLOCK, keys)] if halves else [slice(0, keys)]
    # Each half as its own contiguous tensors, as an implementation holding them apart would.
    parts = []
    for s in split:
        by_key = [x[:, s].contiguous() for x in (k, v, d_k, d_v)]  # (G, keys, D) halves
        by_score = [x[..., s].contiguous() for x in (probs, d_scores, scores, d_probs)]  # (G, 64, keys) halves
        parts.append((by_key[0], by_key[1], *by_score, by_key[2], by_key[3]))

    def run() -> torch.Tensor:
        for i, (k_, v_, p_, ds_, s_, dp_, dk_, dv_) in enumerate(parts):
            torch.bmm(q, k_.transpose(1, 2), out=s_)
            if i == 0:
                torch.bmm(p_, v_, out=out)
                torch.bmm(ds_, k_, out=d_q)
            else:
                out.baddbmm_(p_, v_)
                d_q.baddbmm_(ds_, k_)
            torch.bmm(p_.transpose(1, 2), d_out, out=dv_)
            torch.bmm(d_out, v_.transpose(1, 2), out=dp_)
            torch.bmm(ds_.transpose(1, 2), q, out=dk_)
        return d_q

    return _with_flop(run, 6 * 2 * groups * BLOCK * keys * DIM)


def mix_products(length: int, causal: bool, *, values: bool) -> Callable[[], torch.Tensor]:
    """The block-mix products: keys and values (attnkit, 6) or keys only (the anchor, 3)."""
    blocks = length // BLOCK
    mix, d_mix = torch.randn(HEADS, blocks, blocks), torch.empty(HEADS, blocks, blocks)
    sources = [torch.randn(HEADS, blocks, BLOCK * DIM) for _ in range(2 if values else 1)]
    mixed = [torch.empty_like(x) for x in sources]
    d_mixed = [torch.randn_like(x) for x in sources]
    d_sources = [torch.randn_like(x) for x in sources]

    def run() -> torch.Tensor:
        for x, m in zip(sources, mixed):
            torch.bmm(mix, x, out=m)  # forward
        torch.bmm(d_mixed[0], sources[0].transpose(1, 2), out=d_mix)
        for d_m, x in zip(d_mixed[1:], sources[1:]):
            d_mix.baddbmm_(d_m, x.transpose(1, 2))
        for d_x, d_m in zip(d_sources, d_mixed):
            d_x.baddbmm_(mix.transpose(1, 2), d_m)  # accumulated into the input's gradient
        return d_mix

    return _with_flop(run, (6 if values else 3) * 2 * HEADS * blocks * blocks * BLOCK * DIM)


def softmax_exponentials(length: int, causal: bool) -> Callable[[], torch.Tensor]:
    """The one ``exp`` per score that any softmax over the 128 keys of every query needs."""
    scores = torch.randn(HEADS * length // BLOCK, BLOCK, 2 * BLOCK)
    probs = torch.empty_like(scores)
    return lambda: torch.exp(scores, out=probs)


def derive(cell: list[dict[str, Any]], earlier: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The faster attention layout and the bounds of the two functions."""
    t = by_label(cell)
    attention = fastest(t["attention (one 128-key bmm)"], t["attention (two 64-key halves)"])
    length = cell[0]["length"]
    bound = total(attention, t["mix (attnkit)"])
    return [
        derived_row(
            cell,
            "attention (faster layout)",
            attention,
            "min of the two attention layouts",
            info={"flop": 6 * 2 * (HEADS * length // BLOCK) * BLOCK * 2 * BLOCK * DIM},
        ),
        derived_row(cell, BOUND, bound, "attention (faster layout) + mix (attnkit)", role="bound"),
        derived_row(
            cell,
            ANCHOR_BOUND,
            total(attention, t["mix (anchor)"]),
            "attention (faster layout) + mix (anchor)",
            role="bound",
        ),
        derived_row(cell, WITH_EXP, total(bound, t["softmax exp"]), f"{BOUND} + softmax exp", role="bound"),
    ]


def _component(label: str, target: str, **kwargs: Any) -> Case:
    return Case(label, f"{HERE}:{target}", kwargs, role="component", autograd=False)


SUITE = Suite(
    name="sinkhorn_bound",
    title="a lower bound on a bidirectional Sinkhorn step from its matrix products alone (issue 4)",
    description=__doc__ or "",
    parts=(
        Part(
            "main",
            (
                _component("attention (one 128-key bmm)", "attention_products", halves=False),
                _component("attention (two 64-key halves)", "attention_products", halves=True),
                _component("mix (attnkit)", "mix_products", values=True),
                _component("mix (anchor)", "mix_products", values=False),
                _component("softmax exp", "softmax_exponentials"),
                anchor(SINKHORN_ANCHOR, "benchmarks.suites.hashing:sinkhorn_anchor", {"block_size": BLOCK}),
                Case(OURS[0], "benchmarks.suites.hashing:ours", {"name": "sinkhorn", "block_size": BLOCK}),
                Case(
                    OURS[1],
                    "benchmarks.suites.hashing:ours",
                    {"name": "sinkhorn", "block_size": BLOCK, "sinkhorn_iters": 0},
                ),
            ),
            lengths=(4096, 16384),
            causal=(False,),
            modes=("fwd+bwd",),
            repeats=5,
            rounds=3,
            max_round_seconds=600.0,  # every case gets every round
            columns=(
                Column("GFLOP", lambda r: r["info"]["flop"] / 1e9, "{:.2f}"),
                Column("GFLOP/s", lambda r: r["info"]["flop"] / r["median_s"] / 1e9, "{:.0f}"),
            ),
        ),
    ),
    anchors={label: (SINKHORN_ANCHOR,) for label in (*OURS, BOUND, ANCHOR_BOUND, WITH_EXP)},
    unmatched={(OURS[0], False): SOFT_SORT, (OURS[1], False): SOFT_SORT},
    derive=derive,
    plot=False,
)
