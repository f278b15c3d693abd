"""How fast could *any* fp32 implementation of attnkit ``linear`` be here? Its products and passes alone.

Issue 5 asks attnkit ``linear`` (elu+1 features, normalised) to be 1.5× faster than
``linear-attention-transformer`` (``benchmarks/kernel.py:linear_anchor``) forward+backward at 4K
and 16K, bidirectional and causal. This suite times, with nothing else, the work any
implementation of our function must do, and the anchor and attnkit in the same run:

* ``products``: the matrix products of the maths, batched over heads as one ``bmm`` each (the
  fastest layout measured here), writing the function's outputs (``out``, ``dq``, ``dk``,
  ``dv``) into tensors allocated in the step, as any implementation must return fresh ones;
  every other operand is preallocated.

  - bidirectional: the six ``(T, 64) × (64, 64)``-sized products of ``φq (φkᵀ v)`` forward and
    backward (``φkᵀ v``, ``φq kv``; ``φqᵀ g``, ``g kvᵀ``, ``φk d_kv``, ``v d_kvᵀ``), the same six
    the anchor's two einsums cost;
  - causal (exact: every query sees every earlier key and itself), chunked at ``C``: inside the
    chunks the six ``(C, 64) × (64, C)``-sized products with the causal mask applied to the
    scores and their gradient; across chunks the six ``(64, C) × (C, 64)``-sized products with
    the chunk states (``kᵀ v``, ``q S``; ``g Sᵀ``, ``qᵀ g``, ``v Lᵀ``, ``k L``) and the two
    running sums over chunks (forward, and reversed in the backward). The bound takes the
    fastest ``C`` of 32, 64 and 128. (The anchor's causal mode is a cheaper function: it hides
    each query's own 64-token bucket, so it has no intra-chunk products at all.)

* ``elementwise``: the fewest whole-tensor passes that torch operations leave: one ``exp`` each
  for the features of q and k, the normaliser ``φq·z``, the division by it, the scaled gradient,
  its row-wise dot with the output (the normaliser's gradient), and the two chain-rule products
  by ``φ'``.
* ``harness``: what every measured step pays whoever implements it: filling the output gradient
  and accumulating the three input gradients into ``.grad``.

Their sum is a lower bound on a step of any implementation built from torch operations here
(fused kernels written in C++ could merge the passes, but so could the anchor's). The floor
needs attnkit's step to be at most the anchor's / 1.5. B=1, H=8, D=64, 2 threads.

Everything is timed in one process, interleaved: each round runs every case once (order
reversed every other round) under the harness's lock, and each case keeps the median of its
rounds. On this shared VM, timings swing 20-50% from one minute to the next and a fresh process
per measurement (as the suites do) left a 3-round bound at the mercy of one slow phase (one
attnkit step of 199 ms among 32-52); interleaving puts ours, the anchor and the bound's items
in the same phases.

Run (a minute at 4K on a quiet machine, more while others hold the lock; add ``--lengths 4096 16384``
for 16K)::

    ATTNKIT_BENCH_LOCK=/tmp/attnkit-quiet.lock .venv-bench/bin/python -m benchmarks.linear_bound
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.harness import PYTHONPATH, RESULTS, quiet_machine

HEADS, DIM = 8, 64
CHUNKS = (32, 64, 128)


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


def _closures(length: int, causal: bool) -> dict[str, tuple[Callable[[], torch.Tensor], bool]]:
    """Each case's closure and whether its step is forward+backward (ours and the anchor)."""
    from benchmarks.common import attnkit_mechanism
    from benchmarks.kernel import linear_anchor

    cases = {
        "elementwise": (elementwise_passes(length, causal), False),
        "harness": (harness_passes(length, causal), False),
        "attnkit": (attnkit_mechanism(length, causal, name="linear"), True),
        "anchor": (linear_anchor(length, causal), True),
    }
    if not causal:
        cases["products"] = (bidirectional_products(length, causal), False)
        return cases
    for chunk in CHUNKS:
        cases[f"intra C={chunk}"] = (intra_chunk_products(length, causal, chunk=chunk), False)
        cases[f"inter C={chunk}"] = (inter_chunk_products(length, causal, chunk=chunk), False)
    return cases


def _step(run: Callable[[], torch.Tensor], backward: bool) -> float:
    """One timed step, as the harness times it: forward (+ backward of a ones gradient)."""
    start = time.perf_counter()
    with torch.enable_grad() if backward else torch.no_grad():
        out = run()
        if backward:
            out.backward(torch.ones_like(out))
    return time.perf_counter() - start


def _measure_cell(length: int, causal: bool, *, rounds: int) -> dict[str, float]:
    """Median over ``rounds`` interleaved rounds of each case's step time (two warm-up rounds)."""
    cases = _closures(length, causal)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(rounds + 2):
        order = list(cases.items()) if r % 2 == 0 else list(cases.items())[::-1]
        with quiet_machine():
            for name, (run, backward) in order:
                elapsed = _step(run, backward)
                if r >= 2:
                    times[name].append(elapsed)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{length:6d} {'causal' if causal else 'bidir':6s} {name:14s} {value * 1e3:8.1f} ms", flush=True)
    return medians


def _report(
    length: int, causal: bool, timed: dict[str, float], tall_rate: float | None
) -> tuple[list[str], dict[str, Any]]:
    """The cell's table and summary; ``tall_rate`` is the bidirectional products' FLOP/s at this length."""
    if causal:
        products = {c: timed[f"intra C={c}"] + timed[f"inter C={c}"] for c in CHUNKS}
        best = min(products, key=lambda c: products[c])
        product_s = products[best]
        rows = [
            f"| products, chunk {c}: intra + inter | {(_flops(length, c) + _flops(length, None)) / 1e9:.2f} | "
            f"{timed[f'intra C={c}'] * 1e3:.1f} + {timed[f'inter C={c}'] * 1e3:.1f} = {products[c] * 1e3:.1f} | "
            f"{(_flops(length, c) + _flops(length, None)) / products[c] / 1e9:.0f} |"
            for c in CHUNKS
        ]
    else:
        best, product_s = None, timed["products"]
        rows = [
            f"| products | {_flops(length, None) / 1e9:.2f} | {product_s * 1e3:.1f} | "
            f"{_flops(length, None) / product_s / 1e9:.0f} |"
        ]
    bound = product_s + timed["elementwise"] + timed["harness"]
    anchor, ours = timed["anchor"], timed["attnkit"]
    lines = [f"## {'causal' if causal else 'bidirectional'}, T = {length}", ""]
    lines += ["| work | GFLOP | ms | GFLOP/s |", "|---|---|---|---|", *rows]
    lines += [
        f"| elementwise passes (8) | | {timed['elementwise'] * 1e3:.1f} | |",
        f"| harness passes (fill + 3 accumulations) | | {timed['harness'] * 1e3:.1f} | |",
        "",
        f"- lower bound (products{f' at chunk {best}' if best else ''} + passes): **{bound * 1e3:.1f} ms**",
        f"- linear-attention-transformer, fwd+bwd, same run: {anchor * 1e3:.1f} ms; "
        f"the 1.5× floor needs ≤ {anchor / 1.5 * 1e3:.1f} ms",
        f"- attnkit linear, same run: {ours * 1e3:.1f} ms ({anchor / ours:.2f}× the anchor's speed)",
        f"- best possible speed-up over the anchor at this machine's rates: **{anchor / bound:.2f}×** "
        f"(products alone: {anchor / product_s:.2f}×)",
    ]
    at_tall_rate = None
    if causal and tall_rate:
        # small batched products run slower than tall ones: what chunk 32 would allow at the tall rate
        at_tall_rate = (_flops(length, CHUNKS[0]) + _flops(length, None)) / tall_rate
        passes = timed["elementwise"] + timed["harness"]
        lines.append(
            f"- (if chunk {CHUNKS[0]}'s products ran at the tall bidirectional products' "
            f"{tall_rate / 1e9:.0f} GFLOP/s: {at_tall_rate * 1e3:.1f} ms, "
            f"{anchor / (at_tall_rate + passes):.2f}× with the passes; no product shape measured here reaches it)"
        )
    lines.append("")
    result = {
        "length": length,
        "causal": causal,
        "timed_s": timed,
        "best_chunk": best,
        "products_s": product_s,
        "bound_s": bound,
        "anchor_s": anchor,
        "attnkit_s": ours,
        "max_speedup": anchor / bound,
        "max_speedup_products_only": anchor / product_s,
        "products_at_tall_rate_s": at_tall_rate,
    }
    return lines, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096])
    parser.add_argument("--rounds", type=int, default=21, help="interleaved rounds (median of them)")
    args = parser.parse_args(argv)
    sys.path[:0] = PYTHONPATH.split(os.pathsep)  # this checkout's attnkit, as in the harness's workers
    torch.set_num_threads(2)
    meta = {"torch": torch.__version__, "threads": 2, "rounds": args.rounds, "process": "one, cases interleaved"}
    lines = ["# Linear attention: a lower bound from the products and passes alone", "", json.dumps(meta), ""]
    results = []
    for length in args.lengths:
        tall_rate = None
        for causal in (False, True):
            timed = _measure_cell(length, causal, rounds=args.rounds)
            cell_lines, result = _report(length, causal, timed, tall_rate)
            if not causal:
                tall_rate = _flops(length, None) / result["products_s"]
            lines += cell_lines
            results.append(result)
    (RESULTS / "linear_bound.json").write_text(json.dumps({**meta, "results": results}, indent=1))
    (RESULTS / "linear_bound.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
