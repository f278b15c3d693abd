"""Sparse Transformer, strided pattern.

"Generating Long Sequences with Sparse Transformers" (Child et al. 2019,
arXiv:1904.10509), the strided pattern with stride ``l``: the query at position ``p`` sees
the keys near it (``|p - j| < l``) and the keys on its stride grid (``(p - j) mod l == 0``);
causal: only ``j <= p``. The paper splits the two across heads or layers; here one head
sees their union, so information moves from any key to any query in one step.

Runs as two parts on the blocked core, joined exactly through their log-sum-exps: the
local band (a sliding window, ``O(T·l)``) and the grid, where queries are grouped by
residue ``p mod l`` so each group gathers one column of the ``(S/l) × l`` grid
(``O(T·S/l)``). With ``l ≈ √N`` that is ``O(N·√N)``. Supports causal, key padding,
ALiBi/T5 score biases and decoding with a growing KV cache.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from attnkit.attention.pattern import (
    PatternAttention,
    PatternCall,
    column_pattern,
    pattern_capabilities,
    sliding_window_attention,
)
from attnkit.core.errors import check_positive_int
from attnkit.core.registry import register
from attnkit.kernels.blocked import gathered_attention_with_lse, merge_attention
from attnkit.masks.functions import Mask
from attnkit.masks.patterns import strided_mask


@register(
    "strided",
    pattern_capabilities(
        complexity="O(N·(l + N/l))",
        summary="Sparse Transformer strided pattern: local band of l plus every l-th key",
    ),
    small_options={"stride": 5},
    benchmark_options={"stride": 128},
)
class StridedAttention(PatternAttention):
    """Sparse Transformer strided attention.

    Args:
        stride: ``l``: the local band's half-width and the grid spacing (``√N`` in the paper).
        backend: ``"auto"``, ``"blocked"`` or ``"flex"``.
        scale: score scale; default ``1/sqrt(D)``.
    """

    def __init__(self, *, stride: int = 128, backend: str = "auto", scale: float | None = None) -> None:
        super().__init__(backend=backend, scale=scale)
        self.stride = check_positive_int("stride", stride, example=128)

    def pattern(self, q_len: int, kv_len: int, *, causal: bool, **call_kwargs: Any) -> Mask:
        return strided_mask(q_len, kv_len, self.stride, causal=causal)

    def _blocked(self, q: Tensor, k: Tensor, v: Tensor, call: PatternCall) -> Tensor:
        opts = call.softmax_options()
        band = self.stride if call.causal else 2 * self.stride - 1  # |p - j| < l as a sliding window
        local = sliding_window_attention(q, k, v, band, causal=call.causal, **opts)
        grid = column_pattern(
            q.shape[2], k.shape[2], self.stride, causal=call.causal, min_distance=self.stride, device=q.device
        )
        return merge_attention([local, gathered_attention_with_lse(q, k, v, grid, **opts)])
