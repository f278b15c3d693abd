"""Exact softmax attention ("Attention Is All You Need", Vaswani et al. 2017, arXiv:1706.03762).

``softmax(q kᵀ / sqrt(D)) v`` as a mechanism: :func:`attnkit.attention.dense.dense_attention`,
dispatched to PyTorch's fused ``scaled_dot_product_attention`` (flash kernel on CPU and GPU)
whenever it can, with a plain eager path for comparison. O(N²) time; O(N) extra memory on
the fused path. Supports causal (end-aligned), key padding, cross-attention, custom masks,
additive score biases (ALiBi/T5) and a growing KV cache for decoding.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from attnkit.attention.dense import BACKENDS, dense_attention
from attnkit.attention.families import dense_capabilities
from attnkit.core.base import AttentionMechanism
from attnkit.core.errors import check_choice, check_fraction, check_scale
from attnkit.core.registry import register
from attnkit.core.types import MaskFunction, ScoreBias


@register(
    "full",
    dense_capabilities(
        exact=True, complexity="O(N^2)", family="exact", summary="exact softmax attention (PyTorch SDPA)"
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
        self.dropout = check_fraction("dropout", dropout)
        self.scale = check_scale(scale)
        self.backend = check_choice("backend", backend, BACKENDS)

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
        return dense_attention(
            q,
            k,
            v,
            causal=causal,
            attention_mask=attention_mask,
            mask=mask,
            score_bias=score_bias,
            scale=self.scale,
            dropout_p=self.dropout if self.training else 0.0,
            backend=self.backend,
        )
