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

import torch
from torch import Tensor

from attnkit.attention.pattern import PatternAttention, PatternCall, pattern_capabilities, sliding_window_attention
from attnkit.core.errors import check_positive_int
from attnkit.core.registry import register
from attnkit.kernels.blocked import GatherPattern, gathered_attention_with_lse, merge_attention
from attnkit.masks.functions import Mask
from attnkit.masks.patterns import strided_mask

#: Queries of one residue class gathered together on the grid part.
_GRID_GROUP = 64


def grid_pattern(
    q_len: int, kv_len: int, stride: int, *, causal: bool, device: torch.device | None = None
) -> GatherPattern:
    """The stride-grid keys outside the local band, as residue-class groups.

    Group rows hold the local queries ``i`` whose absolute position ``p = i + S - T`` has one
    residue ``r = p mod l``; each gathers the keys ``r, r + l, r + 2l, ...``.
    """
    offset = kv_len - q_len
    per_residue = -(-q_len // stride)
    group = min(_GRID_GROUP, per_residue)
    groups_per_residue = -(-per_residue // group)
    residues = torch.arange(stride, device=device)[:, None]
    queries = (residues - offset).remainder(stride) + stride * torch.arange(groups_per_residue * group, device=device)
    queries = torch.where(queries < q_len, queries, -1).view(stride * groups_per_residue, group)
    keys = residues + stride * torch.arange(-(-kv_len // stride), device=device)
    keys = torch.where(keys < kv_len, keys, -1).repeat_interleave(groups_per_residue, dim=0)

    def far_grid(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        dist = q + offset - k
        seen = (dist.remainder(stride) == 0) & (dist.abs() >= stride)
        return seen & (dist >= 0) if causal else seen

    return GatherPattern(group, keys[None, None], Mask(far_grid, "far_grid"), q_index=queries[None, None])


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
        grid = grid_pattern(q.shape[2], k.shape[2], self.stride, causal=call.causal, device=q.device)
        return merge_attention([local, gathered_attention_with_lse(q, k, v, grid, **opts)])
