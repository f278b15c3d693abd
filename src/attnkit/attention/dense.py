"""Dense softmax attention as a plain function (a support module, not a mechanism).

``softmax(q kᵀ · scale + bias) v`` over every visible key, dispatched to PyTorch's fused
``scaled_dot_product_attention`` (flash kernel on CPU and GPU) whenever it can, with an
explicit matmul/softmax path for comparison. ``full`` is this function as a mechanism;
``topk`` calls it when it would keep every key. O(T·S) time; O(T) extra memory on the
fused path without a mask, O(T·S) for the materialized mask otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.attention.reference import dense_score_bias
from attnkit.core.types import MaskFunction, ScoreBias
from attnkit.masks.functions import materialize

BACKENDS = ("auto", "sdpa", "eager")


def dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    mask: MaskFunction | None = None,
    score_bias: ScoreBias | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """Exact softmax attention with the library's conventions.

    Args:
        q: ``(B, H, T, D)``.
        k: ``(B, H, S, D)``.
        v: ``(B, H, S, Dv)``.
        causal: query ``i`` sees key ``j`` iff ``j <= i + S - T`` (end-aligned).
        attention_mask: bool ``(B, S)``, True = real token.
        mask: an extra boolean mask function ``(b, h, q_idx, kv_idx)``.
        score_bias: additive bias ``(h, q_pos, kv_pos)``.
        scale: score scale; default ``1/sqrt(D)``.
        dropout_p: attention-probability dropout (the caller passes 0 outside training).
        backend: ``"sdpa"`` or ``"auto"`` (fused), ``"eager"`` (explicit matmul/softmax).

    Returns:
        ``(B, H, T, Dv)``; a query with no visible key outputs zeros.
    """
    b, h, t_len, _ = q.shape
    s_len = k.shape[2]
    simple = attention_mask is None and mask is None and score_bias is None and (not causal or t_len == s_len)
    if simple and backend != "eager":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p, scale=scale)

    allowed: Tensor | None = None
    if causal:
        offset = s_len - t_len
        allowed = torch.ones(t_len, s_len, dtype=torch.bool, device=q.device).tril(diagonal=offset)[None, None]
    if attention_mask is not None:
        real = attention_mask[:, None, None, :]
        allowed = real if allowed is None else allowed & real
    if mask is not None:
        dense = materialize(mask, b, h, t_len, s_len, device=q.device)
        allowed = dense if allowed is None else allowed & dense

    # A query with no visible key must output zeros: let it see everything, then zero it,
    # so neither the forward nor the backward ever forms 0/0.
    empty_rows: Tensor | None = None
    if allowed is not None:
        row_has_key = allowed.any(dim=-1, keepdim=True)
        if not bool(row_has_key.all()):
            empty_rows = ~row_has_key
            allowed = allowed | empty_rows

    attn_mask: Tensor | None = allowed
    if score_bias is not None:
        bias = dense_score_bias(score_bias, h, t_len, s_len, q.device).to(q.dtype)
        attn_mask = bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))

    if backend == "eager":
        out = _eager(q, k, v, attn_mask, causal and attn_mask is None, dropout_p, scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    return out


def _eager(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, causal: bool, dropout_p: float, scale: float | None
) -> Tensor:
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, S)
    if causal:
        t_len, s_len = scores.shape[-2:]
        keep = torch.ones(t_len, s_len, dtype=torch.bool, device=q.device).tril(diagonal=s_len - t_len)
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:  # an additive bias with -inf where masked
        scores = scores + attn_mask
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v
