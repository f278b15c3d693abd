"""Kernel and low-rank family (issue 5): linear, performer, linformer, nystrom vs SDPA and the open implementations.

Protocol (shared harness): B=1, H=8, D=64, fp32, 2 threads, every measurement in a fresh
process, forward and forward+backward, median time and peak memory, ratios from one run.
Settings are matched to the anchors: 256 random features, proj_len 256, 64 landmarks
(6 pseudo-inverse iterations), elu+1 linear attention.

Anchors (installed in ``.venv-bench`` only):

- ``performer-pytorch`` ``FastAttention(64, nb_features=256, causal=...)`` on ``(B, H, L, D)``
  tensors, exactly like ours. Its causal mode has no CPU kernel and falls back to its own
  chunked cumulative-sum code.
- ``linear-attention-transformer`` ``linear_attn`` / ``causal_linear_attn`` (bucket 64) on
  ``(B, H, L, D)`` tensors (its feature maps are softmax-based, the cost is the same kind).
  Its causal mode is *not* exact causal linear attention: a query sees only the keys of
  earlier buckets, never those of its own bucket (itself included), and the first bucket
  outputs zeros (checked: perturbing key 100 changes outputs from position 128 on, not 100).
  It therefore skips the whole intra-chunk part that attnkit's exact chunked form computes
  (about half the products): a cheaper function, so its causal rows are shown next to ours
  but the causal floors are judged against the anchors below, which compute the same one.
- the same package with ``bucket_size=1`` (causal only): its exact causal mode, a running
  ``(L, D, D)`` sum of key-value products.
- ``pytorch-fast-transformers`` ``LinearAttention`` / ``CausalLinearAttention`` (elu+1, exact,
  normalised; causal through its C++ ``causal_product`` CPU kernel) on ``(N, L, H, E)``
  tensors, the layout it takes. Its setup adds CUDA extensions whenever an ``nvcc`` is on
  ``PATH``; ``setup_env.sh`` hides an ``nvcc`` that cannot run, so the CPU extensions build.
  (``performer-pytorch`` uses only its CUDA kernel, so its causal rows are unchanged.)
- ``linformer`` ``LinformerSelfAttention(k=256)`` and ``nystrom-attention``
  ``NystromAttention(num_landmarks=64, residual=False)``: whole layers with input/output
  projections, so their ``to_q/to_k/to_v/to_qkv/to_out`` linears are replaced by identities
  and the layer gets the head-concatenated ``(B, L, H·D)`` tensor; what is timed is then the
  attention itself, as for ours.

Run (about 25 minutes; the floors of issue 5 are measured at 4K and 16K forward+backward), each
measurement under the quiet-machine lock the harness takes itself (never inside ``flock -x``)::

    ATTNKIT_BENCH_LOCK=/tmp/attnkit-quiet.lock .venv-bench/bin/python -m benchmarks.kernel

Five timed repeats per measurement (median), the same for ours and the anchors: on this shared
2-core machine a 4K step varies by 20% from one run to the next, and three repeats left the
4K ratios at the mercy of one slow step.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks.common import qkv
from benchmarks.harness import RESULTS, Case, add_rounds_argument, run_suite

BENCH_PY = ".venv-bench/bin/python"


def performer_anchor(length: int, causal: bool) -> Callable[[], torch.Tensor]:
    """``performer_pytorch.FastAttention`` with 256 orthogonal features."""
    from performer_pytorch import FastAttention

    module = FastAttention(64, nb_features=256, causal=causal)
    q, k, v = qkv(length)
    return lambda: module(q, k, v)


def linear_anchor(length: int, causal: bool) -> Callable[[], torch.Tensor]:
    """``linear_attention_transformer`` (non-causal ``linear_attn``, causal ``causal_linear_attn``)."""
    from linear_attention_transformer.linear_attention_transformer import causal_linear_attn, linear_attn

    q, k, v = qkv(length)
    if causal:
        return lambda: causal_linear_attn(q, k, v, bucket_size=64)
    return lambda: linear_attn(q, k, v)


def _heads_last(length: int, width: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, length, width, generator=g).requires_grad_(True)


def fast_linear_anchor(length: int, causal: bool) -> Callable[[], torch.Tensor]:
    """``fast_transformers`` ``LinearAttention`` / ``CausalLinearAttention`` (elu+1, like ours).

    Its causal mode is exact causal linear attention (every query sees its own key and all
    earlier ones), with the normaliser, through the package's C++ ``causal_product`` kernel on
    ``(N, L, H, E)`` tensors, the layout the module takes.
    """
    from fast_transformers.attention import CausalLinearAttention, LinearAttention
    from fast_transformers.masking import FullMask, LengthMask, TriangularCausalMask

    q, k, v = (_heads_last(length, 512).view(1, length, 8, 64) for _ in range(3))
    lengths = LengthMask(torch.full((1,), length, dtype=torch.long), max_len=length)
    if causal:
        module: nn.Module = CausalLinearAttention(64)
        mask = TriangularCausalMask(length)
    else:
        module, mask = LinearAttention(64), FullMask(length)
    return lambda: module(q, k, v, mask, lengths, lengths)


def linear_exact_anchor(length: int, causal: bool) -> Callable[[], torch.Tensor]:
    """``linear-attention-transformer`` ``causal_linear_attn`` with ``bucket_size=1``: its exact causal mode.

    With one token per bucket a query sees every earlier key and its own, as in attnkit; the
    package then keeps a running ``(L, D, D)`` sum of key-value products.
    """
    from linear_attention_transformer.linear_attention_transformer import causal_linear_attn

    q, k, v = qkv(length)
    return lambda: causal_linear_attn(q, k, v, bucket_size=1)


def linformer_anchor(length: int, causal: bool) -> Callable[[], torch.Tensor]:
    """``linformer.LinformerSelfAttention(k=256)``, projections replaced by identities."""
    from linformer import LinformerSelfAttention

    module = LinformerSelfAttention(dim=512, seq_len=length, k=256, heads=8)
    module.to_q = module.to_k = module.to_v = module.to_out = nn.Identity()
    x = _heads_last(length, 512)
    return lambda: module(x)


def nystrom_anchor(length: int, causal: bool) -> Callable[[], torch.Tensor]:
    """``nystrom_attention.NystromAttention(num_landmarks=64, pinv_iterations=6, residual=False)``."""
    from nystrom_attention import NystromAttention

    module = NystromAttention(dim=512, dim_head=64, heads=8, num_landmarks=64, pinv_iterations=6, residual=False)
    module.to_qkv = nn.Identity()  # the input already holds q, k and v side by side
    module.to_out = nn.Identity()
    x = _heads_last(length, 3 * 512)
    return lambda: module(x)


def linformer_ours(length: int, causal: bool) -> Callable[[], torch.Tensor]:
    """attnkit ``linformer`` with ``proj_len=256`` and ``max_len=length``, like the anchor's ``seq_len=length``.

    (Projections built for a longer ``max_len`` are sliced, and their gradient still covers every
    column: a fair match gives both the same parameter shapes.)
    """
    from benchmarks.common import attnkit_mechanism

    return attnkit_mechanism(length, causal, name="linformer", proj_len=256, max_len=length)


def cases(lengths: list[int]) -> list[Case]:
    """The suite: SDPA, our four mechanisms, the anchors."""
    ours = "benchmarks.common:attnkit_mechanism"
    return [
        Case("sdpa", "benchmarks.common:sdpa", role="sdpa"),
        Case("attnkit linear", ours, {"name": "linear"}),
        Case("attnkit performer", ours, {"name": "performer", "nb_features": 256}),
        Case("attnkit linformer", "benchmarks.kernel:linformer_ours", bidirectional_only=True),
        Case("attnkit nystrom", ours, {"name": "nystrom", "num_landmarks": 64}, bidirectional_only=True),
        Case("performer-pytorch", "benchmarks.kernel:performer_anchor", role="anchor", python=BENCH_PY),
        Case("linear-attention-transformer", "benchmarks.kernel:linear_anchor", role="anchor", python=BENCH_PY),
        Case(
            "linear-attention-transformer (bucket 1: exact)",
            "benchmarks.kernel:linear_exact_anchor",
            role="anchor",
            python=BENCH_PY,
            causal_only=True,
        ),
        Case("fast-transformers", "benchmarks.kernel:fast_linear_anchor", role="anchor", python=BENCH_PY),
        Case(
            "linformer", "benchmarks.kernel:linformer_anchor", role="anchor", python=BENCH_PY, bidirectional_only=True
        ),
        Case(
            "nystrom-attention",
            "benchmarks.kernel:nystrom_anchor",
            role="anchor",
            python=BENCH_PY,
            bidirectional_only=True,
        ),
    ]


#: each of ours and the anchors of the same mechanism (the harness's "fastest anchor" mixes mechanisms)
MATCHED: dict[str, tuple[str, ...]] = {
    "attnkit linear": (
        "linear-attention-transformer",
        "linear-attention-transformer (bucket 1: exact)",
        "fast-transformers",
    ),
    "attnkit performer": ("performer-pytorch",),
    "attnkit linformer": ("linformer",),
    "attnkit nystrom": ("nystrom-attention",),
}

#: (anchor, causal) rows that compute a different, cheaper function than the mechanism: shown next
#: to ours, never the anchor a floor is judged against
OTHER_FUNCTION = {
    ("linear-attention-transformer", True): "hides each query's own 64-token bucket (first bucket: zeros), "
    "so it skips the intra-chunk products of exact causal linear attention",
}


def _anchors(
    cell: dict[tuple[str, int, bool, str], dict[str, Any]], label: str, length: int, causal: bool, mode: str
) -> list[tuple[dict[str, Any], bool]]:
    """The finished rows of ``label``'s anchors in one cell, each with whether it computes the same function."""
    rows = [cell.get((anchor, length, causal, mode)) for anchor in MATCHED[label]]
    return [(r, (r["label"], causal) not in OTHER_FUNCTION) for r in rows if r is not None and r["status"] == "ok"]


def judged_anchor(
    cell: dict[tuple[str, int, bool, str], dict[str, Any]], label: str, length: int, causal: bool, mode: str
) -> dict[str, Any] | None:
    """The fastest anchor of ``label``'s mechanism computing the same function, in one cell."""
    same = [r for r, matched in _anchors(cell, label, length, causal, mode) if matched]
    return min(same, key=lambda r: r["median_s"]) if same else None


def matched_table(rows: list[dict[str, Any]]) -> str:
    """Ours vs each anchor of the same mechanism, per cell: speed-up (anchor time / ours) and memory ratio.

    ``judged`` marks the anchor the floors use: the fastest of those computing the same function.
    """
    cell = {(r["label"], r["length"], r["causal"], r["mode"]): r for r in rows if r["status"] == "ok"}
    lines = [
        "| mechanism | causal | mode | length | ours ms | anchor | anchor ms | speed-up vs anchor | judged | "
        "ours vs SDPA | peak MB ours / anchor |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["label"], r["mode"], r["causal"], r["length"])):
        if r["label"] not in MATCHED or r["status"] != "ok":
            continue
        key = (r["label"], r["length"], r["causal"], r["mode"])
        judged = judged_anchor(cell, *key)
        r["speedup_vs_same_anchor"] = judged["median_s"] / r["median_s"] if judged else None
        anchors = _anchors(cell, *key)
        if not anchors:
            lines.append(
                f"| {r['label']} | {'yes' if r['causal'] else 'no'} | {r['mode']} | {r['length']} | "
                f"{r['median_s'] * 1e3:.1f} | - | - | anchor failed | - | {r.get('vs_sdpa', float('nan')):.3f} | - |"
            )
        for anchor, matched in anchors:
            mark = "yes" if anchor is judged else ("no" if matched else "no: other function")
            lines.append(
                f"| {r['label']} | {'yes' if r['causal'] else 'no'} | {r['mode']} | {r['length']} | "
                f"{r['median_s'] * 1e3:.1f} | {anchor['label']} | {anchor['median_s'] * 1e3:.1f} | "
                f"{anchor['median_s'] / r['median_s']:.2f}x | {mark} | {r.get('vs_sdpa', float('nan')):.3f} | "
                f"{r['peak_mb']:.0f} / {anchor['peak_mb']:.0f} |"
            )
    return "\n".join(lines)


#: the issue's floors: speed-up over the fastest anchor of the same mechanism at 4K and 16K
#: forward+backward (causal rows included) with peak memory no higher, and causal speed-ups over
#: causal SDPA at 16K
ANCHOR_FLOOR = 1.5
FLOOR_LENGTHS = (4096, 16384)
SDPA_FLOORS = {"attnkit linear": 20.0, "attnkit performer": 5.0}


def floors_table(rows: list[dict[str, Any]]) -> str:
    """One line per floor of issue 5: measured value, required value, met or not.

    Anchors that compute a cheaper function (:data:`OTHER_FUNCTION`) get a line of their own,
    marked as not judged.
    """
    cell = {(r["label"], r["length"], r["causal"], r["mode"]): r for r in rows}
    lines = ["| floor | measured | required | met |", "|---|---|---|---|"]

    def ok(label: str, length: int, causal: bool) -> dict[str, Any] | None:
        row = cell.get((label, length, causal, "fwd+bwd"))
        return row if row is not None and row["status"] == "ok" else None

    def speedup_row(check: str, ours: dict[str, Any], other: dict[str, Any] | None, required: float) -> str:
        if other is None:  # no ratio without the other side: not counted as met
            return f"| {check} | other side did not finish | ≥ {required:g}x | n/a |"
        speed = other["median_s"] / ours["median_s"]
        return f"| {check} | {speed:.2f}x | ≥ {required:g}x | {'yes' if speed >= required else 'no'} |"

    for label in MATCHED:
        for causal in (False, True):
            for length in FLOOR_LENGTHS:
                ours = ok(label, length, causal)
                if ours is None:
                    continue
                name = f"{label} {'causal' if causal else 'bidirectional'} {length // 1024}K fwd+bwd"
                anchor = judged_anchor(cell, label, length, causal, "fwd+bwd")
                against = anchor["label"] if anchor else "the fastest anchor"
                lines.append(speedup_row(f"{name}: speed-up vs {against}", ours, anchor, ANCHOR_FLOOR))
                if anchor is not None:
                    lines.append(
                        f"| {name}: peak MB ours / anchor | {ours['peak_mb']:.0f} / {anchor['peak_mb']:.0f} | ≤ 1.00 | "
                        f"{'yes' if ours['peak_mb'] <= anchor['peak_mb'] else 'no'} |"
                    )
                for other, matched in _anchors(cell, label, length, causal, "fwd+bwd"):
                    if not matched:
                        lines.append(
                            f"| ({name}: vs {other['label']}, a cheaper function) | "
                            f"{other['median_s'] / ours['median_s']:.2f}x | not judged | - |"
                        )
    for label, required in SDPA_FLOORS.items():
        ours = ok(label, 16384, True)
        check = f"{label} causal 16K fwd+bwd: speed-up vs causal SDPA"
        if ours is None:
            lines.append(f"| {check} | not measured | ≥ {required:g}x | no |")
            continue
        lines.append(speedup_row(check, ours, ok("sdpa", 16384, True), required))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    add_rounds_argument(parser)
    parser.add_argument("--modes", nargs="+", default=["fwd+bwd"])
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds per measurement before it counts as failed"
    )
    args = parser.parse_args()
    rows = run_suite(
        "kernel",
        cases(args.lengths),
        lengths=args.lengths,
        repeats=args.repeats,
        rounds=args.rounds,
        warmup=args.warmup,
        modes=args.modes,
        timeout=args.timeout,
    )
    table = matched_table(rows)
    floors = floors_table(rows)
    md = RESULTS / "kernel.md"
    body = md.read_text()
    title, _, rest = body.partition("\n\n")
    md.write_text(
        f"{title}\n\n## Floors of issue 5 (forward+backward)\n\n{floors}\n\n"
        "Decoding (per-token time at 64K context vs 1K): see decode_recurrent.md.\n\n"
        "Each floor is judged against the fastest anchor of the mechanism that computes the same "
        "function. The causal linear-attention-transformer rows (bucket 64) compute a cheaper one: "
        f"its causal mode {OTHER_FUNCTION[('linear-attention-transformer', True)]}. They are shown, "
        "not judged; the same package with one token per bucket is exact (see benchmarks/kernel.py).\n\n"
        f"## All measurements\n\n{rest}\n## Each mechanism vs its own anchor\n\n{table}\n"
    )
    data = json.loads((RESULTS / "kernel.json").read_text())
    data["rows"] = rows
    (RESULTS / "kernel.json").write_text(json.dumps(data, indent=1))
    print(floors)
    print(table)


if __name__ == "__main__":
    main()
