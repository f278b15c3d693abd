"""Exact softmax attention ("Attention Is All You Need", Vaswani et al. 2017, arXiv:1706.03762).

``softmax(q kᵀ / sqrt(D)) v`` dispatched to PyTorch's fused
``scaled_dot_product_attention`` (flash kernel on CPU and GPU) whenever it can, with a
plain eager path for comparison. O(N²) time; O(N) extra memory on the fused path.
Supports causal (end-aligned), key padding, cross-attention, custom masks, additive
score biases (ALiBi/T5) and a growing KV cache for decoding.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.attention.reference import dense_score_bias
from attnkit.core.base import AttentionMechanism
from attnkit.core.capabilities import Capabilities
from attnkit.core.errors import check_choice
from attnkit.core.registry import register
from attnkit.core.types import ScoreBias
from attnkit.masks.functions import Mask, materialize


def _check_dropout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {value!r}")
    return float(value)


@register(
    "full",
    Capabilities(
        exact=True,
        causal=True,
        key_padding=True,
        cross_attention=True,
        decoding="kv_cache",
        complexity="O(N^2)",
        family="exact",
        score_bias=True,
        custom_mask=True,
        summary="exact softmax attention (PyTorch SDPA)",
    ),
)
class FullAttention(AttentionMechanism):
    """Exact softmax attention.

    Args:
        dropout: attention-probability dropout applied in training mode only.
        scale: score scale; default ``1/sqrt(D)``.
        backend: ``"sdpa"`` (fused, default), ``"eager"`` (explicit matmul/softmax), or
            ``"auto"`` (= ``"sdpa"``).
    """

    def __init__(self, *, dropout: float = 0.0, scale: float | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.dropout = _check_dropout(dropout)
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0):
            raise ValueError(f"scale must be a positive number or None, got {scale!r}")
        self.scale = scale
        self.backend = check_choice("backend", backend, ("auto", "sdpa", "eager"))

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool,
        attention_mask: Tensor | None,
        mask: Mask | None,
        score_bias: ScoreBias | None,
        **call_kwargs: Any,
    ) -> Tensor:
        b, h, t_len, _ = q.shape
        s_len = k.shape[2]
        dropout_p = self.dropout if self.training else 0.0
        simple = attention_mask is None and mask is None and score_bias is None and (not causal or t_len == s_len)
        if simple and self.backend != "eager":
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p, scale=self.scale)

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

        if self.backend == "eager":
            out = self._eager(q, k, v, attn_mask, causal and attn_mask is None, dropout_p)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=self.scale)
        if empty_rows is not None:
            out = out.masked_fill(empty_rows, 0.0)
        return out

    def _eager(
        self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, causal: bool, dropout_p: float
    ) -> Tensor:
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        scores = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, S)
        if causal:
            t_len, s_len = scores.shape[-2:]
            keep = torch.ones(t_len, s_len, dtype=torch.bool, device=q.device).tril(diagonal=s_len - t_len)
            scores = scores.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask
        probs = torch.softmax(scores, dim=-1)
        if dropout_p > 0:
            probs = F.dropout(probs, p=dropout_p)
        return probs @ v
