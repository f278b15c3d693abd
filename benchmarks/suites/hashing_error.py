"""Hashing family: error vs the float64 reference (computed, not timed).

Relative Frobenius error ‖out − ref‖ / ‖ref‖ on `attnkit.inputs.structured_qkv` (B=2, H=3, D=16), max
and mean over seeds 1, 3, 40, 41, 42 and causal ∈ {False, True}. Budgets are the registered
`error_budget`s, enforced by the contract suite at the small options (T=37). At T=512 a query's
softmax mass sits on a handful of keys among 512 (score spread ≈ 2 units); a sparse mechanism that
misses them outputs a different average, so errors exceed 1 there; more hash rounds (and local
windows for routing) steadily lower it.
"""

from __future__ import annotations

from typing import Any

from benchmarks.suite import Column, Part, Suite

SEEDS = (1, 3, 40, 41, 42)


def settings() -> list[tuple[str, dict[str, Any], int]]:
    """``(mechanism, options, length)`` of every table row."""
    import attnkit

    rows: list[tuple[str, dict[str, Any], int]] = [
        (name, dict(attnkit.get_spec(name).small_options), 37) for name in ("lsh", "routing", "sinkhorn")
    ]
    rows += [("lsh", {"bucket_size": 32, "n_hashes": hashes}, 512) for hashes in (1, 2, 4, 8)]
    rows += [
        ("routing", {"num_clusters": 4, "window": 32, "local": False}, 512),
        ("routing", {"num_clusters": 4, "window": 32, "local": True}, 512),
        ("sinkhorn", {"block_size": 32}, 512),
    ]
    return rows


def label(name: str, options: dict[str, Any]) -> str:
    """A row's label: the mechanism and its options."""
    return f"{name}: {', '.join(f'{k}={v}' for k, v in options.items())}"


def error_rows() -> list[dict[str, Any]]:
    """One row per setting: max and mean relative error over seeds and both causal values."""
    import torch

    import attnkit
    from attnkit.attention.reference import reference_attention
    from attnkit.inputs import structured_qkv

    rows = []
    for name, options, length in settings():
        module = attnkit.build_attention(name, **options).eval()
        errors = []
        with torch.no_grad():
            for seed in SEEDS:
                q, k, v = structured_qkv(2, 3, length, length, 16, seed=seed)
                for causal in (False, True):
                    out = module(q, k, v, causal=causal).double()
                    ref = reference_attention(q, k, v, causal=causal)
                    errors.append(float((out - ref).norm() / ref.norm()))
        rows.append(
            {
                "label": label(name, options),
                "role": "attnkit",
                "length": length,
                "causal": None,  # max and mean over both
                "mode": "fwd",
                "status": "ok",
                "params": {"name": name, **options},
                "info": {
                    "max_error": max(errors),
                    "mean_error": sum(errors) / len(errors),
                    "budget": attnkit.attention_capabilities(name).error_budget,
                },
            }
        )
    return rows


SUITE = Suite(
    name="hashing_error",
    title="error of LSH, routing and Sinkhorn attention vs the float64 reference",
    description=__doc__ or "",
    parts=(
        Part(
            "main",
            (),
            lengths=(),
            compute=error_rows,
            columns=(
                Column("max error", lambda r: r["info"]["max_error"], "{:.3f}"),
                Column("mean error", lambda r: r["info"]["mean_error"], "{:.3f}"),
                Column("budget", lambda r: r["info"]["budget"], "{}"),
            ),
        ),
    ),
    plot=False,
)
