"""The naive float64 oracle every test compares against.

It computes ``softmax(q kᵀ · scale + bias)`` over a dense boolean mask in float64, with
the library's conventions: ``True`` = may attend, queries aligned to the end of the keys
under ``causal``, and a query with no visible key outputs zeros. It is deliberately the
simplest possible code: O(T·S) memory, no tricks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnkit.core.types import ScoreBias
from attnkit.masks.functions import Mask, causal_mask, materialize


def dense_score_bias(
    score_bias: ScoreBias, heads: int, q_len: int, kv_len: int, device: torch.device | None = None
) -> Tensor:
    """Materialize a :data:`ScoreBias` as a float tensor broadcastable to ``(B, heads, q_len, kv_len)``."""
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    q_pos = (torch.arange(q_len, device=device) + (kv_len - q_len)).view(1, 1, -1, 1)
    kv_pos = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
    return torch.as_tensor(score_bias(h, q_pos, kv_pos)).expand(1, heads, q_len, kv_len)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    mask: Mask | Tensor | None = None,
    score_bias: ScoreBias | Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Dense softmax attention in float64.

    Args:
        q: ``(B, H, T, D)``.
        k: ``(B, H, S, D)``.
        v: ``(B, H, S, Dv)``.
        causal: end-aligned causal mask.
        attention_mask: bool ``(B, S)``, True = real token.
        mask: a :class:`Mask` or a bool tensor broadcastable to ``(B, H, T, S)``.
        score_bias: a :data:`ScoreBias` or a float tensor broadcastable to ``(B, H, T, S)``.
        scale: score scale, default ``1/sqrt(D)``.

    Returns:
        float64 ``(B, H, T, Dv)``; rows with no visible key are zeros.
    """
    b, h, t_len, d = q.shape
    s_len = k.shape[2]
    q64, k64, v64 = q.double(), k.double(), v.double()
    scores = q64 @ k64.transpose(-1, -2) * (scale if scale is not None else 1.0 / math.sqrt(d))
    if score_bias is not None:
        bias = score_bias if isinstance(score_bias, Tensor) else dense_score_bias(score_bias, h, t_len, s_len, q.device)
        scores = scores + bias.double()
    allowed = torch.ones(b, h, t_len, s_len, dtype=torch.bool, device=q.device)
    if causal:
        allowed &= materialize(causal_mask(t_len, s_len), 1, 1, t_len, s_len, device=q.device)
    if attention_mask is not None:
        allowed &= attention_mask[:, None, None, :]
    if mask is not None:
        dense = mask if isinstance(mask, Tensor) else materialize(mask, b, h, t_len, s_len, device=q.device)
        allowed &= dense.to(torch.bool)
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_has_key = allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~row_has_key, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(~row_has_key, 0.0)
    return probs @ v64
