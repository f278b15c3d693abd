"""Benchmark suite of the hashing family (issue 4): lsh, routing, sinkhorn vs SDPA and the open implementations.

Anchors (``.venv-bench`` only, never package dependencies), at matched settings:

* ``reformer-pytorch`` ``LSHAttention`` and HF transformers ``LSHSelfAttention`` against
  attnkit ``lsh``: bucket 64, 4 hashes. The anchors hash into ``T / 64`` buckets and cut
  the sorted sequence into chunks that straddle buckets; attnkit keeps buckets apart
  (bucket-aligned chunks, needed for leak-free causal hashing) with its default
  ``T / 256`` buckets of about four chunks each. Both anchors share queries and keys, so
  attnkit's shared-QK row is the like-for-like one; the separate-QK row is shown too. HF's
  module also runs its query-key and value projections (512 → 512 each), which attnkit's
  mechanism leaves to :class:`~attnkit.MultiHeadAttention`.
* ``routing-transformer`` ``KmeansAttention`` against attnkit ``routing``: ``T / 256``
  clusters of window 256 (the anchor's own language-model setting, where its top-window
  membership covers every token on average), and the table's "4 clusters, window 256"
  (where the anchor attends only 4 × 256 of the T queries and outputs zeros elsewhere,
  while attnkit always attends every query). The anchor's query sees 256 keys; attnkit's
  sees its window and the previous one of its cluster, so ``window=128`` is the matched
  (≤ 256 keys per query) setting and ``window=256`` is shown too.
* ``sinkhorn-transformer`` ``SinkhornAttention`` / ``SinkhornCausalAttention`` against
  attnkit ``sinkhorn``: block 64, 128 keys per query on both sides (own block + one sorted
  block). The anchor's bidirectional module keeps its default ``non_permutative=True``, so
  the ``sinkhorn_iter=8`` passed here is never used: its sort matrix is a softmax over key
  blocks (temperature 1) with only the top-1 entry per row kept (no Sinkhorn iteration),
  applied as a dense ``(nb × nb) @ (nb × c·D)`` mix. The matched attnkit row is therefore
  ``sinkhorn_iters=0, sort_top1=True, temperature=1`` (the same function; attnkit gathers the
  one block instead of multiplying by the matrix); the soft sorts (the default 8 Sinkhorn
  iterations, and a plain row softmax with 0) mix every block and are shown, not judged, in
  the bidirectional floors. (The anchor also mixes the *keys* into its sorted values,
  ``b_v_r = b_k_r``, so it back-propagates one mix where attnkit does two.) The causal
  anchor keeps its top 2 blocks; every attnkit causal row is judged against it.

Run (about 20 minutes on a quiet machine) from a snapshot of the tree, taking the quiet-machine
lock around each measurement only (never wrap this command in ``flock -x``: the harness takes
the same lock itself)::

    git worktree add --detach /tmp/wt-hash HEAD && cd /tmp/wt-hash
    ln -s /work/main/.venv .venv && ln -s /work/main/.venv-bench .venv-bench
    ATTNKIT_BENCH_LOCK=/tmp/attnkit-quiet.lock .venv-bench/bin/python -m benchmarks.hashing

then copy ``benchmarks/results/hashing*`` back. ``--lengths`` and ``--repeats`` change the
cells and the repeats of every row alike (the committed results say which were used).

``--cases TEXT ...`` re-measures only the cases whose label contains one of the texts
(``--cases sinkhorn`` takes the attnkit Sinkhorn rows and their anchor; name the anchor too
when filtering more narrowly, so the ratios compare rows of one run) and merges their rows
into the committed ``hashing.json``: rows of other cases, and of cells not measured, are kept
from the file, and its ``meta.reruns`` records what was re-measured when.

``--error-only`` writes just the error-budget table ``benchmarks/results/hashing_error.md``.
``hashing.md`` starts with the issue-4 floors: at 4K and 16K forward+backward, every
attnkit row's time over the fastest anchor of its group (floor: ≤ 0.67, i.e. 1.5× faster)
and its peak memory next to that anchor's (floor: no higher).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import qkv
from benchmarks.harness import RESULTS, Case, add_rounds_argument, markdown_table, plot, run_suite

BENCH_PY = ".venv-bench/bin/python"
HEADS, DIM = 8, 64


def ours(length: int, causal: bool, *, name: str, **options: Any) -> Callable[[], torch.Tensor]:
    """An attnkit mechanism; ``num_clusters="per_256"`` means ``length // 256`` clusters."""
    import attnkit

    if options.get("num_clusters") == "per_256":
        options["num_clusters"] = max(1, length // 256)
    module = attnkit.build_attention(name, **options)
    q, k, v = qkv(length)
    keys = q if options.get("shared_qk") else k
    return lambda: module(q, keys, v, causal=causal)


def reformer_lsh(length: int, causal: bool, *, bucket_size: int = 64, n_hashes: int = 4) -> Callable[[], torch.Tensor]:
    """``reformer_pytorch.LSHAttention`` (shared-QK) on ``(B·H, T, D)``."""
    from reformer_pytorch import LSHAttention

    attn = LSHAttention(bucket_size=bucket_size, n_hashes=n_hashes, causal=causal)
    q, _, v = qkv(length)

    def run() -> torch.Tensor:
        return attn(q.reshape(HEADS, length, DIM), v.reshape(HEADS, length, DIM))[0]

    return run


def hf_reformer_lsh(
    length: int, causal: bool, *, bucket_size: int = 64, n_hashes: int = 4
) -> Callable[[], torch.Tensor]:
    """HF transformers ``LSHSelfAttention`` (with its q/k and v projections) on ``(1, T, H·D)``."""
    from transformers import ReformerConfig
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention

    config = ReformerConfig(
        hidden_size=HEADS * DIM,
        num_attention_heads=HEADS,
        attention_head_size=DIM,
        lsh_attn_chunk_length=bucket_size,
        num_hashes=n_hashes,
        num_buckets=max(2, length // bucket_size),
        lsh_num_chunks_before=1,
        lsh_num_chunks_after=0,
        is_decoder=causal,
        lsh_attention_probs_dropout_prob=0.0,
        max_position_embeddings=length,
        hash_seed=0,
    )
    attn = LSHSelfAttention(config)
    x = torch.randn(1, length, HEADS * DIM, requires_grad=True)
    return lambda: attn(x)[0]


def routing_kmeans(
    length: int, causal: bool, *, window: int = 256, num_clusters: int | None = None
) -> Callable[[], torch.Tensor]:
    """``routing_transformer.KmeansAttention``; ``num_clusters`` default ``length // window``."""
    from routing_transformer.routing_transformer import KmeansAttention

    clusters = num_clusters if num_clusters is not None else max(1, length // window)
    attn = KmeansAttention(clusters, window, HEADS, DIM, causal=causal)
    q, k, v = qkv(length)
    return lambda: attn(q, k, v)[0]


def sinkhorn_anchor(length: int, causal: bool, *, block_size: int = 64) -> Callable[[], torch.Tensor]:
    """``sinkhorn_transformer`` ``SinkhornAttention`` (``SinkhornCausalAttention`` when causal)."""
    from sinkhorn_transformer.sinkhorn_transformer import SinkhornAttention, SinkhornCausalAttention

    if causal:
        attn: torch.nn.Module = SinkhornCausalAttention(block_size, HEADS * DIM, DIM, HEADS, length)
    else:
        attn = SinkhornAttention(block_size, HEADS * DIM, DIM, HEADS, length, sinkhorn_iter=8)
    q, k, v = qkv(length)
    return lambda: attn(q, k, v)


def cases() -> list[Case]:
    """Every implementation of the suite."""
    lsh = {"bucket_size": 64, "n_hashes": 4}
    anchor = {"role": "anchor", "python": BENCH_PY}
    return [
        Case("sdpa", "benchmarks.common:sdpa", role="sdpa"),
        Case("attnkit lsh (b64, 4 hashes)", "benchmarks.hashing:ours", {"name": "lsh", **lsh}),
        Case(
            "attnkit lsh shared-QK (b64, 4 hashes)",
            "benchmarks.hashing:ours",
            {"name": "lsh", "shared_qk": True, **lsh},
        ),
        Case("reformer-pytorch LSHAttention", "benchmarks.hashing:reformer_lsh", lsh, **anchor),
        Case("HF ReformerLSHSelfAttention", "benchmarks.hashing:hf_reformer_lsh", lsh, **anchor),
        Case(
            "attnkit routing (w128, T/256 clusters)",
            "benchmarks.hashing:ours",
            {"name": "routing", "window": 128, "num_clusters": "per_256", "local": False},
        ),
        Case(
            "attnkit routing (w256, T/256 clusters)",
            "benchmarks.hashing:ours",
            {"name": "routing", "window": 256, "num_clusters": "per_256", "local": False},
        ),
        Case(
            "routing-transformer Kmeans (w256, T/256)", "benchmarks.hashing:routing_kmeans", {"window": 256}, **anchor
        ),
        Case(
            "attnkit routing (w128, 4 clusters)",
            "benchmarks.hashing:ours",
            {"name": "routing", "window": 128, "num_clusters": 4, "local": False},
        ),
        Case(
            "routing-transformer Kmeans (w256, 4)",
            "benchmarks.hashing:routing_kmeans",
            {"window": 256, "num_clusters": 4},
            **anchor,
        ),
        Case("attnkit sinkhorn (b64)", "benchmarks.hashing:ours", {"name": "sinkhorn", "block_size": 64}),
        Case(
            "attnkit sinkhorn (b64, 0 iters)",
            "benchmarks.hashing:ours",
            {"name": "sinkhorn", "block_size": 64, "sinkhorn_iters": 0},
        ),
        Case(
            "attnkit sinkhorn (b64, top-1)",
            "benchmarks.hashing:ours",
            {"name": "sinkhorn", "block_size": 64, "sinkhorn_iters": 0, "sort_top1": True, "temperature": 1.0},
        ),
        Case("sinkhorn-transformer (b64)", "benchmarks.hashing:sinkhorn_anchor", {"block_size": 64}, **anchor),
    ]


def error_table(seeds: tuple[int, ...] = (1, 3, 40, 41, 42)) -> str:
    """Relative Frobenius error vs the float64 reference on structured inputs, as markdown."""
    import attnkit
    from attnkit.attention.reference import reference_attention
    from attnkit.inputs import structured_qkv

    def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
        return float((out.double() - ref).norm() / ref.norm())

    settings: list[tuple[str, dict[str, Any], int]] = []
    for name in ("lsh", "routing", "sinkhorn"):
        settings.append((name, dict(attnkit.get_spec(name).small_options), 37))
    for hashes in (1, 2, 4, 8):
        settings.append(("lsh", {"bucket_size": 32, "n_hashes": hashes}, 512))
    settings += [
        ("routing", {"num_clusters": 4, "window": 32, "local": False}, 512),
        ("routing", {"num_clusters": 4, "window": 32, "local": True}, 512),
        ("sinkhorn", {"block_size": 32}, 512),
    ]
    lines = [
        "# hashing family: error vs the float64 reference",
        "",
        "Relative Frobenius error ‖out − ref‖ / ‖ref‖ on `attnkit.inputs.structured_qkv` (B=2, H=3, D=16),",
        f"max and mean over seeds {list(seeds)} and causal ∈ {{False, True}}. Budgets are the registered",
        "`error_budget`s, enforced by the contract suite at the small options (T=37).",
        "At T=512 a query's softmax mass sits on a handful of keys among 512 (score spread ≈ 2 units);",
        "a sparse mechanism that misses them outputs a different average, so errors exceed 1 there;",
        "more hash rounds (and local windows for routing) steadily lower it.",
        "",
        "| mechanism | options | T | max error | mean error | budget |",
        "|---|---|---|---|---|---|",
    ]
    for name, options, length in settings:
        module = attnkit.build_attention(name, **options).eval()
        errors = []
        for seed in seeds:
            q, k, v = structured_qkv(2, 3, length, length, 16, seed=seed)
            for causal in (False, True):
                errors.append(rel(module(q, k, v, causal=causal), reference_attention(q, k, v, causal=causal)))
        budget = attnkit.attention_capabilities(name).error_budget
        shown = ", ".join(f"{k}={v}" for k, v in options.items())
        lines.append(
            f"| {name} | {shown} | {length} | {max(errors):.3f} | {sum(errors) / len(errors):.3f} | {budget} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    add_rounds_argument(parser)
    parser.add_argument("--error-only", action="store_true", help="write only hashing_error.md")
    parser.add_argument(
        "--cases",
        nargs="+",
        metavar="TEXT",
        help="measure only the cases whose label contains one of these (e.g. --cases sinkhorn sdpa) and "
        "merge their rows into the existing hashing.json; the other rows are kept from the file",
    )
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hashing_error.md").write_text(error_table())
    if args.error_only:
        return
    selected = cases()
    kept: list[dict[str, Any]] = []
    meta: dict[str, Any] | None = None
    if args.cases:
        selected = [case for case in selected if any(text in case.label for text in args.cases)]
        if not selected:
            known = ", ".join(repr(case.label) for case in cases())
            parser.error(f"--cases {' '.join(args.cases)} matches no case label (labels: {known})")
        previous = json.loads((RESULTS / "hashing.json").read_text())
        meta, kept = previous["meta"], previous["rows"]
        meta.setdefault("reruns", []).append(
            {
                "cases": [case.label for case in selected],
                "lengths": args.lengths,
                "repeats": args.repeats,
                "rounds": args.rounds,
                "warmup": args.warmup,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            }
        )
    # Forward+backward first (the floors): its files are complete on their own; the forward-only
    # cells are then merged in, so a run cut short still leaves the important table.
    run = partial(
        run_suite,
        lengths=args.lengths,
        repeats=args.repeats,
        rounds=args.rounds,
        warmup=args.warmup,
        max_seconds_per_step=40.0,
    )
    rows = run("hashing", selected, modes=("fwd+bwd",))
    write_results(merge_rows(kept, rows), meta)
    with tempfile.TemporaryDirectory() as tmp:
        rows += run("hashing_fwd", selected, modes=("fwd",), out_dir=Path(tmp))
    write_results(merge_rows(kept, rows), meta)


def merge_rows(kept: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``kept`` with every row of a cell measured in ``new`` replaced by its new row (others kept in place)."""

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return r["label"], r["length"], r["causal"], r["mode"]

    fresh = {key(r): r for r in new}
    merged = [fresh.pop(key(r), r) for r in kept]
    return merged + [r for r in new if key(r) in fresh]


def group_of(label: str) -> str:
    """Which anchors a row is compared with: the same mechanism at the same cluster setting."""
    lowered = label.lower()
    if "routing" in lowered:
        return "routing 4" if "4 clusters" in lowered or "(w256, 4)" in lowered else "routing T/256"
    return "sinkhorn" if "sinkhorn" in lowered else "lsh"


#: Issue 4's floor: at most this fraction of the fastest anchor's time (1.5x faster).
FLOOR_RATIO = 1 / 1.5

#: Groups whose anchor does not run at a matched setting: shown, but no floor is judged.
NOT_MATCHED = {
    "routing 4": "n/a: not matched (the anchor attends only 4 × 256 of the T queries, zeros elsewhere)",
}

#: Rows shown next to a matched row of their group, at a setting the anchor does not match:
#: ``(label, causal or None for both)`` -> why.
_SOFT_SORT = "n/a: not matched (a soft sort mixes every block; the anchor keeps one: the matched row is top-1)"
NOT_MATCHED_ROWS = {
    ("attnkit routing (w256, T/256 clusters)", None): "n/a: not matched (a query sees up to 512 keys, the "
    "anchor's 256: the matched row is w128)",
    ("attnkit sinkhorn (b64)", False): _SOFT_SORT,
    ("attnkit sinkhorn (b64, 0 iters)", False): _SOFT_SORT,
}


def not_matched(label: str, causal: bool) -> str | None:
    """Why a row has no floor judged (its group's anchor, or the row itself, is not matched), or None."""
    return (
        NOT_MATCHED_ROWS.get((label, causal)) or NOT_MATCHED_ROWS.get((label, None)) or NOT_MATCHED.get(group_of(label))
    )


def floor_table(rows: list[dict[str, Any]], lengths: tuple[int, ...] = (4096, 16384)) -> str:
    """The floors as markdown: each attnkit row at ``lengths``, fwd+bwd, vs the fastest anchor of its group."""
    lines = [
        "## Floors (issue 4): fwd+bwd, time ≤ 0.67 × fastest anchor and peak memory no higher",
        "",
        "| attnkit | causal | length | ms | fastest anchor | anchor ms | time ratio | MB | anchor MB | time | memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ok = [r for r in rows if r["status"] == "ok" and r["mode"] == "fwd+bwd" and r["length"] in lengths]
    for r in sorted(ok, key=lambda r: (group_of(r["label"]), r["causal"], r["length"], r["label"])):
        if r["role"] != "attnkit":
            continue
        peers = [a for a in ok if a["role"] == "anchor" and (a["length"], a["causal"]) == (r["length"], r["causal"])]
        peers = [a for a in peers if group_of(a["label"]) == group_of(r["label"])]
        if not peers:
            continue
        anchor = min(peers, key=lambda a: a["median_s"])
        ratio = r["median_s"] / anchor["median_s"]
        reason = not_matched(r["label"], r["causal"])
        time_ok = reason or ("met" if ratio <= FLOOR_RATIO else "not met")
        memory_ok = reason or ("met" if r["peak_mb"] <= anchor["peak_mb"] else "not met")
        lines.append(
            f"| {r['label']} | {'yes' if r['causal'] else 'no'} | {r['length']} | {r['median_s'] * 1e3:.0f} "
            f"| {anchor['label']} | {anchor['median_s'] * 1e3:.0f} | {ratio:.2f} | {r['peak_mb']:.0f} "
            f"| {anchor['peak_mb']:.0f} | {time_ok} | {memory_ok} |"
        )
    lines += [
        "",
        "Routing with 4 clusters is informational: the anchor's `KmeansAttention` keeps the top 256 "
        "tokens of each of its 4 clusters (1024 of T queries; the other queries output zeros), so it "
        "does T/1024 of attnkit's work, where every query is routed and attended. Routing with window 256 "
        "is informational too: its queries see their window and the previous one of their cluster (up to "
        "512 keys) where the anchor's see 256, so window 128 is the matched setting. Bidirectional Sinkhorn "
        "with a soft sort is informational: the anchor keeps only the top block of each row (its default "
        "non-permutative sort), which is attnkit's top-1 row.",
    ]
    return "\n".join(lines)


def write_results(rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> None:
    """Rewrite ``hashing.{json,md,png}`` with ``vs_anchor`` against the fastest anchor of the row's own group.

    (The harness's own ratio takes the fastest anchor of the whole cell, which here would
    compare LSH with the Sinkhorn anchor.) ``meta``: the file's header (default: the one the
    harness just wrote).
    """
    cells: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["length"], r["causal"], r["mode"], group_of(r["label"])), []).append(r)
    for cell in cells.values():
        anchors = [r["median_s"] for r in cell if r["status"] == "ok" and r["role"] == "anchor"]
        for r in cell:
            r.pop("vs_anchor", None)
            if anchors and r["status"] == "ok" and r["role"] == "attnkit":
                r["vs_anchor"] = r["median_s"] / min(anchors)
    sdpa = {
        (r["length"], r["causal"], r["mode"]): r["median_s"]
        for r in rows
        if r["status"] == "ok" and r["role"] == "sdpa"
    }
    for r in rows:  # again over the whole cell: with --cases its rows come from two runs
        r.pop("vs_sdpa", None)
        base = sdpa.get((r["length"], r["causal"], r["mode"]))
        if base and r["status"] == "ok":
            r["vs_sdpa"] = r["median_s"] / base
    if meta is None:
        meta = json.loads((RESULTS / "hashing.json").read_text())["meta"]
    meta["vs_anchor"] = "time / fastest anchor of the same mechanism and cluster setting (see benchmarks/hashing.py)"
    (RESULTS / "hashing.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / "hashing.md").write_text(
        f"# hashing benchmark\n\n{json.dumps(meta)}\n\n{floor_table(rows)}\n\n## All rows\n\n{markdown_table(rows)}\n"
    )
    plot(rows, RESULTS / "hashing.png", "hashing")


if __name__ == "__main__":
    main()
