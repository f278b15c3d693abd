"""How fast could *any* fp32 Sinkhorn layer be on this machine? The matrix products alone.

Issue 4 asks attnkit's bidirectional ``sinkhorn`` (block 64, forward+backward) to take at
most 0.67× the time of ``sinkhorn-transformer``'s ``SinkhornAttention``. Both compute, per
head, a ``(nb × nb)`` block mix of the keys (``nb = T / 64``) and softmax attention of every
64-query block over 128 keys (its own block and its sorted block). This suite times only
the matrix products that arithmetic needs, with nothing else (no softmax, no Sinkhorn
iterations, no sort scores, no allocation inside the timed region; the ``exp`` of every
score, which any softmax needs once, is timed apart):

* ``attention``: for every block (``8 · nb`` of them), the six products of attention forward
  and backward over its 128 keys: ``Q Kᵀ``, ``P V``, ``Pᵀ dO``, ``dO Vᵀ``, ``dS K``, ``dSᵀ Q``;
  as one ``bmm`` each over ``(G, 64, 128)``, or with the own and the sorted keys as two
  64-key halves (the bound takes the faster);
* ``mix (attnkit)``: the six ``(nb × nb) @ (nb × 64·64)`` products per head that attnkit's
  function needs: sorted keys and sorted values forward; backward the mix gradient from
  each (``dKₛ Kᵀ``, ``dVₛ Vᵀ``) and the key and value gradients (``Pᵀ dKₛ``, ``Pᵀ dVₛ``);
* ``mix (anchor)``: the three the anchor's function needs: it reuses the sorted keys as
  its values (``b_v_r = b_k_r``), so only the key mix is computed and back-propagated.

Each sum is a lower bound on the step time of an implementation of that function in fp32
here. The anchor and attnkit's two bidirectional rows are measured in the same run; the best
ratio any implementation of attnkit's function could reach is its bound over the anchor's
time. B=1, H=8, D=64, 2 threads, each measurement in a fresh process under the harness's lock.

Every row is the median over ``--rounds`` round-robin rounds (default 3) of the median of
``--repeats`` runs after a warm-up.

Run (about 10 minutes)::

    ATTNKIT_BENCH_LOCK=/tmp/attnkit-quiet.lock .venv-bench/bin/python -m benchmarks.sinkhorn_bound
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.harness import RESULTS, Case, measure

HEADS, DIM, BLOCK = 8, 64, 64
BENCH_PY = ".venv-bench/bin/python"
FLOOR_RATIO = 1 / 1.5


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

    return run


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

    return run


def softmax_exponentials(length: int, causal: bool) -> Callable[[], torch.Tensor]:
    """The one ``exp`` per score that any softmax over the 128 keys of every query needs."""
    scores = torch.randn(HEADS * length // BLOCK, BLOCK, 2 * BLOCK)
    probs = torch.empty_like(scores)
    return lambda: torch.exp(scores, out=probs)


def _flops(length: int) -> dict[str, float]:
    groups, blocks = HEADS * length // BLOCK, length // BLOCK
    mix = 2 * HEADS * blocks * blocks * BLOCK * DIM
    return {"attention": 6 * 2 * groups * BLOCK * 2 * BLOCK * DIM, "mix (attnkit)": 6 * mix, "mix (anchor)": 3 * mix}


def _measure_rounds(
    products: dict[str, Case], full: dict[str, Case], length: int, *, repeats: int, rounds: int
) -> tuple[dict[str, float], dict[str, float], dict[str, list[float]]]:
    """Median over ``rounds`` of each case's median time (products, whole steps) and the
    per-round medians; the cases of a round run back to back (order reversed every other
    round), so a slow phase of the machine hits them alike."""
    cases = [(name, case, "fwd") for name, case in products.items()]
    cases += [(name, case, "fwd+bwd") for name, case in full.items()]
    medians: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for r in range(rounds):
        for name, case, mode in cases if r % 2 == 0 else cases[::-1]:
            row = measure(case, length, False, mode, repeats=repeats)
            medians[name].append(row["median_s"] if row["status"] == "ok" else float("nan"))
            print(f"{length:6d} round {r} {name:34s} {medians[name][-1] * 1e3:8.1f} ms ({mode})", flush=True)
    timed = {name: statistics.median(medians[name]) for name in products}
    steps = {name: statistics.median(medians[name]) for name in full}
    return timed, steps, medians


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="median of this many round-robin rounds")
    args = parser.parse_args(argv)
    here = "benchmarks.sinkhorn_bound"
    products = {
        "attention (one 128-key bmm)": Case("att", f"{here}:attention_products", {"halves": False}),
        "attention (two 64-key halves)": Case("att2", f"{here}:attention_products", {"halves": True}),
        "mix (attnkit)": Case("mix", f"{here}:mix_products", {"values": True}),
        "mix (anchor)": Case("mix1", f"{here}:mix_products", {"values": False}),
        "softmax exp": Case("exp", f"{here}:softmax_exponentials"),
    }
    full = {
        "sinkhorn-transformer (b64)": Case(
            "anchor", "benchmarks.hashing:sinkhorn_anchor", {"block_size": BLOCK}, role="anchor", python=BENCH_PY
        ),
        "attnkit sinkhorn (b64)": Case("ours", "benchmarks.hashing:ours", {"name": "sinkhorn", "block_size": BLOCK}),
        "attnkit sinkhorn (b64, 0 iters)": Case(
            "ours0", "benchmarks.hashing:ours", {"name": "sinkhorn", "block_size": BLOCK, "sinkhorn_iters": 0}
        ),
    }
    results: list[dict[str, Any]] = []
    lines = ["# Sinkhorn (bidirectional): a lower bound from the matrix products alone", ""]
    meta = {"torch": torch.__version__, "threads": 2, "repeats": args.repeats, "rounds": args.rounds}
    lines += [json.dumps(meta), ""]
    for length in args.lengths:
        flops = _flops(length)
        timed, steps, per_round = _measure_rounds(products, full, length, repeats=args.repeats, rounds=args.rounds)
        attention = min(timed["attention (one 128-key bmm)"], timed["attention (two 64-key halves)"])
        ours_bound = attention + timed["mix (attnkit)"]
        anchor_bound = attention + timed["mix (anchor)"]
        anchor_s = steps["sinkhorn-transformer (b64)"]
        lines += [f"## T = {length} ({length // BLOCK} blocks per head)", ""]
        lines += ["| products | GFLOP | ms | GFLOP/s |", "|---|---|---|---|"]
        for name, seconds in (("attention", attention), ("mix (attnkit)", timed["mix (attnkit)"])):
            lines.append(
                f"| {name} | {flops[name] / 1e9:.2f} | {seconds * 1e3:.1f} | {flops[name] / seconds / 1e9:.0f} |"
            )
        name = "mix (anchor)"
        lines.append(
            f"| {name} | {flops[name] / 1e9:.2f} | {timed[name] * 1e3:.1f} | {flops[name] / timed[name] / 1e9:.0f} |"
        )
        for name in ("attention (one 128-key bmm)", "attention (two 64-key halves)"):
            lines.append(f"| ({name}) | | {timed[name] * 1e3:.1f} | {flops['attention'] / timed[name] / 1e9:.0f} |")
        lines.append(f"| (softmax exp, once per score; not in the bound) | | {timed['softmax exp'] * 1e3:.1f} | |")
        lines += [
            "",
            f"- lower bound for attnkit's function (attention + its mix): **{ours_bound * 1e3:.0f} ms**",
            f"- lower bound for the anchor's function (attention + key mix only): {anchor_bound * 1e3:.0f} ms",
            f"- sinkhorn-transformer, fwd+bwd, same run: {anchor_s * 1e3:.0f} ms; "
            f"the floor needs ≤ {anchor_s * FLOOR_RATIO * 1e3:.0f} ms",
        ]
        anchor_rounds = per_round["sinkhorn-transformer (b64)"]
        for name in ("attnkit sinkhorn (b64)", "attnkit sinkhorn (b64, 0 iters)"):
            rounds = ", ".join(f"{ours / anchor:.2f}" for ours, anchor in zip(per_round[name], anchor_rounds))
            lines.append(
                f"- {name}, same run: {steps[name] * 1e3:.0f} ms (ratio {steps[name] / anchor_s:.2f}; per round {rounds})"
            )
        lines += [
            f"- best possible ratio for attnkit's function at this machine's product rates: "
            f"**{ours_bound / anchor_s:.2f}** (floor {FLOOR_RATIO:.2f}); with one exp per score: "
            f"{(ours_bound + timed['softmax exp']) / anchor_s:.2f}",
            "",
        ]
        results.append(
            {
                "length": length,
                "timed_s": timed,
                "flops": flops,
                "steps_s": steps,
                "round_medians_s": per_round,
                "bound_s": ours_bound,
                "anchor_function_bound_s": anchor_bound,
                "best_ratio": ours_bound / anchor_s,
            }
        )
    (RESULTS / "sinkhorn_bound.json").write_text(json.dumps(results, indent=1))
    (RESULTS / "sinkhorn_bound.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
