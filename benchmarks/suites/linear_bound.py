"""How fast could *any* fp32 implementation of attnkit `linear` be here? Its products and passes alone.

Issue 5 asks attnkit `linear` (elu+1 features, normalised) to be 1.5× faster than
`linear-attention-transformer` forward+backward. This suite times, with nothing else, the work any
implementation of our function must do, next to the anchor and attnkit:

- `products`: the matrix products of the maths, batched over heads as one `bmm` each, writing the
  function's outputs (`out`, `dq`, `dk`, `dv`) into tensors allocated in the step, as any
  implementation must return fresh ones; every other operand is preallocated. Bidirectional: the
  six `(T, 64) × (64, 64)`-sized products of `φq (φkᵀ v)` forward and backward, the same six the
  anchor's two einsums cost. Causal (exact: every query sees every earlier key and itself), chunked
  at `C`: inside the chunks the six `(C, 64) × (64, C)`-sized products with the causal mask applied
  to the scores and their gradient; across chunks the six products with the chunk states and the two
  running sums over chunks. The bound takes the fastest `C` of 32, 64 and 128. (The anchor's causal
  mode is a cheaper function: it hides each query's own 64-token bucket, so it has no intra-chunk
  products at all; its causal comparisons are shown, not judged.)
- `elementwise`: the fewest whole-tensor passes torch operations leave: one `exp` each for the
  features of q and k, the normaliser `φq·z`, the division by it, the scaled gradient, its row-wise
  dot with the output, and the two chain-rule products by `φ'`.
- `harness`: what every measured step pays whoever implements it: filling the output gradient and
  accumulating the three input gradients into `.grad`.

Their sum is a lower bound on a step of any implementation built from torch operations here. Every
case of a cell is timed in one process, interleaved (one step of each per round, order reversed
every other round, two warm-up rounds): on this shared VM timings swing 20–50% from one minute to
the next, and interleaving puts ours, the anchor and the bound's items in the same phases.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import DIM, HEADS
from benchmarks.suite import Case, Column, Part, Suite, anchor, by_label, derived_row, total
from benchmarks.suites.kernel import SUITE as KERNEL

CHUNKS = (32, 64, 128)
HERE = "benchmarks.suites.linear_bound"
ANCHOR = "linear-attention-transformer"
OURS = "attnkit linear"
BOUND = "lower bound: products + passes"
TALL = "products at chunk 32, at the bidirectional products' rate"
TALL_BOUND = "lower bound if chunk 32's products ran at the bidirectional rate"


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def bidirectional_products(length: int, causal: bool) -> Callable[[], torch.Tensor]:
    """The six products of ``φq (φkᵀ v)`` forward and backward, nothing else."""
    phi_q, phi_k, v, g = (_randn(HEADS, length, DIM) for _ in range(4))
    kv, d_kv = _randn(HEADS, DIM, DIM), torch.empty(HEADS, DIM, DIM)

    def run() -> torch.Tensor:
        # the function's outputs (out, dq, dk, dv) are fresh tensors in any implementation
        out, dq, dk, dv = (torch.empty(HEADS, length, DIM) for _ in range(4))
        torch.bmm(phi_k.transpose(1, 2), v, out=kv)
        torch.bmm(phi_q, kv, out=out)
        torch.bmm(phi_q.transpose(1, 2), g, out=d_kv)
        torch.bmm(g, kv.transpose(1, 2), out=dq)
        torch.bmm(phi_k, d_kv, out=dv)
        torch.bmm(v, d_kv.transpose(1, 2), out=dk)
        return dk

    return run


def intra_chunk_products(length: int, causal: bool, *, chunk: int) -> Callable[[], torch.Tensor]:
    """The six products inside each chunk of ``chunk`` tokens, scores and their gradient masked."""
    batch = HEADS * length // chunk
    q, k, v, g = (_randn(batch, chunk, DIM) for _ in range(4))
    scores, d_scores = torch.empty(batch, chunk, chunk), torch.empty(batch, chunk, chunk)

    def run() -> torch.Tensor:
        # fresh outputs, as in any implementation (the inter-chunk products add to them)
        out, dq, dk, dv = (torch.empty(batch, chunk, DIM) for _ in range(4))
        torch.bmm(q, k.transpose(1, 2), out=scores).tril_()
        torch.bmm(scores, v, out=out)
        torch.bmm(scores.transpose(1, 2), g, out=dv)
        torch.bmm(g, v.transpose(1, 2), out=d_scores).tril_()
        torch.bmm(d_scores, k, out=dq)
        torch.bmm(d_scores.transpose(1, 2), q, out=dk)
        return dk

    return run


def _running_sum_(states: torch.Tensor, *, reverse: bool) -> None:
    # in place over chunks (dim 1), one add per chunk: faster here than cumsum over a middle dim
    n = states.shape[1]
    for c in range(n - 2, -1, -1) if reverse else range(1, n):
        states[:, c].add_(states[:, c + 1] if reverse else states[:, c - 1])


def inter_chunk_products(length: int, causal: bool, *, chunk: int) -> Callable[[], torch.Tensor]:
    """The six products with the chunk states and the two running sums over chunks."""
    n = length // chunk
    q, k, v, g = (_randn(HEADS * n, chunk, DIM) for _ in range(4))
    sums, later = torch.empty(HEADS, n, DIM, DIM), torch.empty(HEADS, n, DIM, DIM)
    flat_sums, flat_later = sums.view(-1, DIM, DIM), later.view(-1, DIM, DIM)
    out, dq, dk, dv = (torch.empty(HEADS * n, chunk, DIM) for _ in range(4))

    def run() -> torch.Tensor:
        torch.bmm(k.transpose(1, 2), v, out=flat_sums)
        _running_sum_(sums, reverse=False)
        torch.bmm(q, flat_sums, out=out)  # (each chunk reads the state before it: same cost)
        torch.bmm(g, flat_sums.transpose(1, 2), out=dq)
        torch.bmm(q.transpose(1, 2), g, out=flat_later)
        _running_sum_(later, reverse=True)
        torch.bmm(v, flat_later.transpose(1, 2), out=dk)
        torch.bmm(k, flat_later, out=dv)
        return dv

    return run


def elementwise_passes(length: int, causal: bool) -> Callable[[], torch.Tensor]:
    """The eight whole-tensor passes: two ``exp``, the normaliser, two divisions, a row-wise dot, two chain products."""
    q, k, out, g = (_randn(HEADS, length, DIM) for _ in range(4))
    z = _randn(HEADS, 1, DIM)
    den = _randn(HEADS, length, 1).abs_().add_(1.0)
    phi_q, phi_k, scaled, dq = (torch.empty(HEADS, length, DIM) for _ in range(4))

    def run() -> torch.Tensor:
        torch.exp(q, out=phi_q)
        torch.exp(k, out=phi_k)
        torch.linalg.vecdot(phi_q, z)  # the normaliser φq·z, a pass over φq
        out.div_(den)
        torch.div(g, den, out=scaled)
        torch.linalg.vecdot(scaled, out)
        torch.mul(scaled, phi_q, out=dq)
        return torch.mul(dq, phi_k, out=dq)

    return run


def harness_passes(length: int, causal: bool) -> Callable[[], torch.Tensor]:
    """The output gradient's fill and the accumulation of the three input gradients."""
    grad_out, dq, dk, dv, acc_q, acc_k, acc_v = (_randn(1, HEADS, length, DIM) for _ in range(7))

    def run() -> torch.Tensor:
        grad_out.fill_(1.0)
        acc_q.add_(dq)
        acc_k.add_(dk)
        return acc_v.add_(dv)

    return run


def _flops(length: int, chunk: int | None) -> float:
    inner = DIM if chunk is None else chunk  # the (T, 64) × (64, inner) product family
    return 6 * 2 * HEADS * length * DIM * inner


def _with_flop(run: Callable[[], torch.Tensor], flop: float) -> Callable[[], torch.Tensor]:
    run.info = lambda: {"flop": flop}  # type: ignore[attr-defined]
    return run


def products(length: int, causal: bool) -> Callable[[], torch.Tensor]:
    """The bidirectional products (see :func:`bidirectional_products`), with their FLOPs."""
    return _with_flop(bidirectional_products(length, causal), _flops(length, None))


def intra(length: int, causal: bool, *, chunk: int) -> Callable[[], torch.Tensor]:
    """The intra-chunk products (see :func:`intra_chunk_products`), with their FLOPs."""
    return _with_flop(intra_chunk_products(length, causal, chunk=chunk), _flops(length, chunk))


def inter(length: int, causal: bool, *, chunk: int) -> Callable[[], torch.Tensor]:
    """The inter-chunk products (see :func:`inter_chunk_products`), with their FLOPs."""
    return _with_flop(inter_chunk_products(length, causal, chunk=chunk), _flops(length, None))


def derive(cell: list[dict[str, Any]], earlier: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Products (fastest chunk when causal), the bound, and, causal, chunk 32 at the bidirectional rate."""
    t = by_label(cell)
    length, causal = cell[0]["length"], cell[0]["causal"]
    elementwise, harness = t["elementwise passes (8)"], t["harness passes (fill + 3 accumulations)"]
    passes = total(elementwise, harness)
    if not causal:
        return [derived_row(cell, BOUND, total(t["products"], elementwise, harness), "products + passes", role="bound")]
    rows = []
    sums = {c: total(t[f"products intra-chunk C={c}"], t[f"products inter-chunk C={c}"]) for c in CHUNKS}
    for c in CHUNKS:
        flop = _flops(length, c) + _flops(length, None)
        rows.append(
            derived_row(cell, f"products, chunk {c} (intra + inter)", sums[c], "intra + inter", info={"flop": flop})
        )
    done = {c: s for c, s in sums.items() if s is not None}
    best = min(done, key=lambda c: done[c]) if len(done) == len(CHUNKS) else None
    products_s = None if best is None else done[best]
    info = {"best_chunk": best} if best else None
    rows.append(derived_row(cell, "products (fastest chunk)", products_s, "min over chunks 32, 64, 128", info=info))
    rows.append(
        derived_row(
            cell, BOUND, total(products_s, elementwise, harness), "products (fastest chunk) + passes", role="bound"
        )
    )
    # small batched products run slower than tall ones: what chunk 32 would allow at the tall rate
    tall = [
        r
        for r in earlier
        if r["label"] == "products" and r["status"] == "ok" and r["causal"] is False
        and (r["part"], r["length"], r["mode"]) == (cell[0]["part"], length, cell[0]["mode"])
    ]  # fmt: skip
    if tall:
        rate = _flops(length, None) / tall[0]["median_s"]
        at_tall = (_flops(length, CHUNKS[0]) + _flops(length, None)) / rate
        rows.append(
            derived_row(
                cell,
                TALL,
                at_tall,
                "chunk-32 FLOPs / the bidirectional products' FLOP/s",
                info={"rate_gflop_s": rate / 1e9},
            )
        )
        rows.append(derived_row(cell, TALL_BOUND, total(at_tall, passes), f"{TALL} + passes", role="bound"))
    return rows


def _component(label: str, target: str, **options: Any) -> Case:
    kwargs = {k: v for k, v in options.items() if k == "chunk"}
    flags = {k: v for k, v in options.items() if k != "chunk"}
    return Case(label, f"{HERE}:{target}", kwargs, role="component", autograd=False, **flags)


CASES = (
    _component("elementwise passes (8)", "elementwise_passes"),
    _component("harness passes (fill + 3 accumulations)", "harness_passes"),
    Case(OURS, "benchmarks.common:attnkit_mechanism", {"name": "linear"}),
    anchor(ANCHOR, "benchmarks.suites.kernel:linear_anchor"),
    _component("products", "products", bidirectional_only=True),
    *(
        case
        for c in CHUNKS
        for case in (
            _component(f"products intra-chunk C={c}", "intra", chunk=c, causal_only=True),
            _component(f"products inter-chunk C={c}", "inter", chunk=c, causal_only=True),
        )
    ),
)

SUITE = Suite(
    name="linear_bound",
    title="a lower bound on attnkit linear's step from its products and passes alone (issue 5)",
    description=__doc__ or "",
    parts=(
        Part(
            "main",
            CASES,
            lengths=(4096,),
            modes=("fwd+bwd",),
            interleaved=True,
            repeats=21,  # interleaved rounds
            warmup=2,
            time_budget=600.0,
            timeout=900.0,
            columns=(
                Column("GFLOP", lambda r: r["info"]["flop"] / 1e9, "{:.2f}"),
                Column("GFLOP/s", lambda r: r["info"]["flop"] / r["median_s"] / 1e9, "{:.0f}"),
                Column("best chunk", lambda r: r["info"]["best_chunk"], "{}"),
            ),
        ),
    ),
    anchors={label: (ANCHOR,) for label in (OURS, BOUND, TALL_BOUND, "products", "products (fastest chunk)")},
    unmatched={(ANCHOR, True): KERNEL.unmatched[(ANCHOR, True)]},
    derive=derive,
    plot=False,
)
