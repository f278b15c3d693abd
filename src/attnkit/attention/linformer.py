"""Linformer: keys and values projected along the sequence to a fixed length (Wang et al. 2020).

Paper: S. Wang, B. Z. Li, M. Khabsa, H. Fang, H. Ma, "Linformer: Self-Attention with Linear
Complexity", 2020, arXiv:2006.04768.

Learned matrices ``E, F ∈ R^{k × n}`` (``k = proj_len``, ``n = max_len``) compress the ``S``
keys and values to ``k`` slots: ``softmax(q (E K)ᵀ / √D) (F V)``. O(N·k) time and memory.
A shorter sequence (``S < max_len``) uses the first ``S`` columns of ``E`` and ``F``. Padded
keys are zeroed before the projection, and a slot that receives no real key at all is
masked out of the softmax, so with ``proj_len = max_len`` and identity projections the
result is exactly (masked) softmax attention.

There is no causal form: every slot mixes keys from the whole sequence, so any query would
see future tokens. Supports key padding and cross-attention (keys up to ``max_len``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.attention.families import approximate_capabilities
from attnkit.core.base import AttentionMechanism
from attnkit.core.errors import check_bool, check_choice, check_positive_int
from attnkit.core.registry import register
from attnkit.core.types import MaskFunction, ScoreBias

NO_CAUSAL_REASON = (
    "causal=True is not supported: Linformer projects keys and values along the whole sequence, "
    "so every projected slot mixes in future tokens (use 'linear' or 'performer' for causal models)"
)


def _project(proj: Tensor, x: Tensor) -> Tensor:
    """``proj (k, S) @ x (B, H, S, D)`` as one GEMM over all heads: ``(B, S, H·D)`` is wider than ``(S, D)``."""
    b, h, s, d = x.shape
    stacked = x.transpose(1, 2).reshape(b, s, h * d)  # (B, S, H·D)
    return (proj @ stacked).view(b, -1, h, d).transpose(1, 2)  # (B, H, k, D)


@register(
    "linformer",
    approximate_capabilities(
        "low_rank",
        # untrained projections: measured max 0.79 (median 0.73) on the contract's structured inputs at
        # proj_len=16, max_len=64, pooling init; re-measured in test_kernel_family.py
        error_budget=0.85,
        summary="Linformer, learned low-rank projection of keys/values along the sequence (Wang et al. 2020)",
    ),
    small_options={"proj_len": 16, "max_len": 64, "init": "pooling"},
    # pooling init: untrained, a mean over runs of positions is a fair stand-in for learned projections
    # (the Gaussian JL init keeps norms but not means: relative error 17.4 vs 0.41 on the arena self-attention inputs, L=1024)
    benchmark_options={"proj_len": 256, "max_len": 16384, "init": "pooling"},
)
class LinformerAttention(AttentionMechanism):
    """Linformer attention.

    Args:
        proj_len: ``k``, the number of projected key/value slots.
        max_len: ``n``, the longest key sequence accepted.
        share_kv: one projection for keys and values (the paper's key-value sharing).
        init: ``"gaussian"`` (the paper's JL projection, entries ``N(0, 1/k)``) or ``"pooling"``
            (slot ``j`` starts as the mean of the ``j``-th run of ``ceil(n / k)`` positions).
    """

    no_causal_reason = NO_CAUSAL_REASON

    def __init__(
        self, *, proj_len: int = 256, max_len: int = 4096, share_kv: bool = False, init: str = "gaussian"
    ) -> None:
        super().__init__()
        self.proj_len = check_positive_int("proj_len", proj_len, example=256)
        self.max_len = check_positive_int("max_len", max_len, example=4096)
        check_bool("share_kv", share_kv)
        self.init = check_choice("init", init, ("gaussian", "pooling"))
        self.proj_k = nn.Parameter(self._initial_projection())
        self.proj_v = None if share_kv else nn.Parameter(self._initial_projection())

    def _initial_projection(self) -> Tensor:
        if self.init == "gaussian":
            return torch.randn(self.proj_len, self.max_len) / math.sqrt(self.proj_len)
        run = math.ceil(self.max_len / self.proj_len)
        slot = torch.arange(self.max_len) // run
        return (slot[None, :] == torch.arange(self.proj_len)[:, None]).float() / run

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool,
        attention_mask: Tensor | None,
        mask: MaskFunction | None,
        score_bias: ScoreBias | None,
        **call_kwargs: Any,
    ) -> Tensor:
        s_len = k.shape[2]
        if s_len > self.max_len:
            raise ValueError(
                f"key length S={s_len} exceeds max_len={self.max_len}; build linformer with max_len >= {s_len}"
            )
        proj_k = self.proj_k[:, :s_len].to(q.dtype)  # (k, S)
        proj_v = (self.proj_v if self.proj_v is not None else self.proj_k)[:, :s_len].to(q.dtype)
        if attention_mask is not None:
            real = attention_mask[:, None, :, None]
            k = k.masked_fill(~real, 0.0)
            v = v.masked_fill(~real, 0.0)
        keys, values = _project(proj_k, k), _project(proj_v, v)

        # A slot is empty when no real key has a nonzero weight in it (either projection).
        weight = proj_k.detach().abs() + proj_v.detach().abs()  # (k, S)
        real_keys = attention_mask.to(q.dtype) if attention_mask is not None else q.new_ones(1, s_len)  # (B or 1, S)
        slot_ok = (real_keys @ weight.T) > 0  # (B or 1, k)
        if bool(slot_ok.all()):
            return F.scaled_dot_product_attention(q, keys, values)
        no_slot = ~slot_ok.any(dim=-1)  # (B or 1,) rows with nothing to attend to
        allowed = (slot_ok | no_slot[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)
        return out.masked_fill(no_slot[:, None, None, None], 0.0)
