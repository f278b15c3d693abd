"""Sparse Transformer, fixed pattern (summary columns).

"Generating Long Sequences with Sparse Transformers" (Child et al. 2019,
arXiv:1904.10509), the fixed pattern: positions fall into blocks of ``l``; the query at
``p`` sees every key of its own block (``p // l == j // l``) and the *summary columns*, the
last ``c`` positions of every block (``j mod l >= l - c``); causal: only ``j <= p``. As in
:mod:`attnkit.attention.strided`, one head sees the union of the paper's two heads.

Runs as two parts on the blocked core, joined exactly through their log-sum-exps: the
own-block part (each block of queries gathers its block, ``O(T·l)``) and the summary part
(every query against the ``c·S/l`` summary keys outside its block, ``O(T·S·c/l)``).
Supports causal, key padding, ALiBi/T5 score biases and decoding with a growing KV cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnkit.attention.pattern import (
    PatternAttention,
    PatternCall,
    block_diagonal_pattern,
    default_group_size,
    pattern_capabilities,
)
from attnkit.core.errors import check_positive_int
from attnkit.core.registry import register
from attnkit.kernels.blocked import GatherPattern, consecutive_groups, gathered_attention_with_lse, merge_attention
from attnkit.masks.functions import Mask
from attnkit.masks.patterns import fixed_mask


def summary_pattern(
    q_len: int, kv_len: int, block_size: int, summary_size: int, *, causal: bool, device: torch.device | None = None
) -> GatherPattern:
    """Every query against the summary columns outside its own block."""
    offset = kv_len - q_len
    positions = torch.arange(kv_len, device=device)
    summary = positions[positions.remainder(block_size) >= block_size - summary_size]
    size = default_group_size(4 * block_size)
    groups = consecutive_groups(q_len, size)
    keys = summary.view(1, 1, 1, -1).expand(1, 1, groups, -1)

    def other_block(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        p = q + offset
        seen = torch.div(p, block_size, rounding_mode="floor") != torch.div(k, block_size, rounding_mode="floor")
        return seen & (k <= p) if causal else seen

    return GatherPattern(size, keys, Mask(other_block, "other_block_summary"))


@register(
    "fixed",
    pattern_capabilities(
        complexity="O(N·(l + c·N/l))",
        summary="Sparse Transformer fixed pattern: own block of l plus c summary columns per block",
    ),
    small_options={"block_size": 8, "summary_size": 2},
    benchmark_options={"block_size": 128, "summary_size": 8},
)
class FixedAttention(PatternAttention):
    """Sparse Transformer fixed attention.

    Args:
        block_size: ``l``, positions per block.
        summary_size: ``c``, the summary columns at the end of each block (``1 <= c <= l``).
        backend: ``"auto"``, ``"blocked"`` or ``"flex"``.
        scale: score scale; default ``1/sqrt(D)``.
    """

    def __init__(
        self, *, block_size: int = 128, summary_size: int = 8, backend: str = "auto", scale: float | None = None
    ) -> None:
        super().__init__(backend=backend, scale=scale)
        self.block_size = check_positive_int("block_size", block_size, example=128)
        self.summary_size = check_positive_int("summary_size", summary_size, example=8)
        if summary_size > block_size:
            raise ValueError(
                f"summary_size must be at most block_size ({block_size}), got {summary_size} (set summary_size=8, say)"
            )

    def pattern(self, q_len: int, kv_len: int, *, causal: bool, **call_kwargs: Any) -> Mask:
        return fixed_mask(q_len, kv_len, self.block_size, self.summary_size, causal=causal)

    def _blocked(self, q: Tensor, k: Tensor, v: Tensor, call: PatternCall) -> Tensor:
        t_len, s_len = q.shape[2], k.shape[2]
        opts = call.softmax_options()
        own = block_diagonal_pattern(t_len, s_len, self.block_size, causal=call.causal, device=q.device)
        parts = [gathered_attention_with_lse(q, k, v, own, **opts)]
        if s_len > self.block_size:
            summary = summary_pattern(
                t_len, s_len, self.block_size, self.summary_size, causal=call.causal, device=q.device
            )
            parts.append(gathered_attention_with_lse(q, k, v, summary, **opts))
        return merge_attention(parts)
