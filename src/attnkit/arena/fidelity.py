"""Fidelity cells: how far a mechanism's output is from exact softmax attention.

The error is the relative Frobenius error ``‖out - exact‖ / ‖exact‖`` against dense
softmax attention computed in float64 (:func:`attnkit.reference_attention`), with the
mechanism at the same ``benchmark_options`` the efficiency sweep times (matched budgets).
Exact sparse mechanisms are measured against *dense* attention too: what they drop is
the price of their speed. Three inputs:

- ``self``: self-attention over one smooth hidden sequence
  (:func:`attnkit.inputs.self_attention_qkv`): queries and keys are projections of the
  same states, so most of the attention mass lies near the diagonal, the regime efficient
  attention is built for. The leaderboard's and the advisor's error.
- ``local``: queries and keys are independent locally correlated sequences
  (:func:`attnkit.inputs.structured_qkv`): smooth, but the mass lands anywhere.
- ``iid``: i.i.d. Gaussian queries and keys at the same scale, the contrast where
  attention is diffuse and every sparse pattern drops most of the mass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnkit.arena.config import ArenaConfig
from attnkit.attention.reference import reference_attention
from attnkit.core.base import AttentionMechanism
from attnkit.inputs import self_attention_qkv, structured_qkv


def fidelity_params(cfg: ArenaConfig, input_kind: str, causal: bool) -> dict[str, Any]:
    """The parameters that identify a fidelity cell (part of its cache key)."""
    return {
        "input": input_kind,
        "causal": causal,
        "length": cfg.fidelity_length,
        "heads": cfg.fidelity_heads,
        "head_dim": cfg.head_dim,
        "seed": cfg.seed,
    }


def fidelity_inputs(input_kind: str, heads: int, length: int, dim: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """float32 ``q, k, v (1, heads, length, dim)`` of the given kind (``"self"``, ``"local"`` or ``"iid"``).

    Raises:
        ValueError: unknown ``input_kind``.
    """
    if input_kind == "self":
        return self_attention_qkv(1, heads, length, dim, seed=seed)
    if input_kind == "local":
        return structured_qkv(1, heads, length, length, dim, seed=seed)
    if input_kind == "iid":
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, heads, length, dim, generator=g) for _ in range(3))
        return q * 1.5, k * 1.5, v  # the same score spread as the structured inputs
    raise ValueError(f"input_kind must be 'self', 'local' or 'iid', got {input_kind!r}")


def relative_error(out: Tensor, ref: Tensor) -> float:
    """``‖out - ref‖_F / ‖ref‖_F`` in float64."""
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm().clamp(min=1e-30))


def measure_fidelity(module: AttentionMechanism, cfg: ArenaConfig, input_kind: str, causal: bool) -> dict[str, Any]:
    """Relative error of ``module`` against exact float64 attention on one input kind.

    Returns:
        ``{"status": "ok", "relative_error": e}`` or ``{"status": "error", "error": message}``.
    """
    q, k, v = fidelity_inputs(input_kind, cfg.fidelity_heads, cfg.fidelity_length, cfg.head_dim, cfg.seed)
    try:
        torch.manual_seed(cfg.seed)  # mechanisms that draw features/hashes at call time
        with torch.no_grad():
            out = module.eval()(q, k, v, causal=causal)
    except (RuntimeError, ValueError, TypeError) as err:
        return {"status": "error", "error": f"{type(err).__name__}: {str(err).strip()[:300]}"}
    ref = reference_attention(q, k, v, causal=causal)
    if not bool(torch.isfinite(out).all()):
        return {"status": "error", "error": "non-finite output"}
    return {"status": "ok", "relative_error": relative_error(out, ref)}
