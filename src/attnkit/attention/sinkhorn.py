"""Sparse Sinkhorn attention ("Sparse Sinkhorn Attention", Tay, Bahri, Yang, Metzler & Juan,
ICML 2020, arXiv:2002.11296).

The sequence is cut into blocks of ``block_size`` tokens. A sort network scores every
(query block ``i``, key block ``j``) pair; Sinkhorn normalisation (``sinkhorn_iters``
alternating row/column normalisations in log space, at ``temperature``) turns the scores
into a soft permutation ``P``; the *sorted block* ``i`` is ``Σ_j P_ij · block_j`` (keys
and values). Every query block attends to its own block plus its sorted block: blocks are
plain reshapes of the sequence, and the ``2 · block_size`` keys of every block go through
one batched softmax (:func:`attnkit.kernels.bucketed.chunk_attention`, which keeps the
probabilities instead of any ``T × T`` tensor). O(T · block_size · D + (T / block_size)² ·
block_size · D) time.

Sort network (parameter-free, so it works at any length): the score of ``(i, j)`` is
``q̄_i · k̄_j / sqrt(D)`` between the mean query of block ``i`` and the mean real key of
block ``j``; the projections before the mechanism are what learns. A block is not its
own sorted block (the diagonal is excluded), so with one block the result is exactly
full attention.

Causal variant: block ``i``'s sort scores use the mean query of block ``i - 1`` (every
query of block ``i`` has already seen it) and only key blocks ``j < i``, so nothing from
the future enters; the normalisation is then a row softmax, because a Sinkhorn column
normalisation would mix later rows into earlier ones (``sinkhorn_iters`` applies to the
bidirectional mode only). Block 0 attends to itself only. The own block is masked by
original positions.

Key padding: padded keys and values are zeroed before blocks are mixed and left out of
the block means; a sorted-block slot holding no real key is masked.
Supports causal and key padding; no cross-attention, no incremental decoding.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from attnkit.core.base import AttentionMechanism
from attnkit.core.capabilities import Capabilities
from attnkit.core.errors import check_non_negative_int, check_positive_float, check_positive_int
from attnkit.core.registry import register
from attnkit.core.types import ScoreBias
from attnkit.kernels.bucketed import chunk_attention
from attnkit.masks.functions import Mask


def sinkhorn_normalize(log_scores: Tensor, iters: int) -> Tensor:
    """Sinkhorn-Knopp in log space: ``iters`` row then column normalisations.

    Args:
        log_scores: ``(..., n, n)``; ``-inf`` entries stay exactly 0 in the result. Every
            row and column needs at least one finite entry.
        iters: number of (row, column) rounds; 0 returns the row softmax.

    Returns:
        ``(..., n, n)`` nonnegative; rows sum to 1 (and columns approach 1 as ``iters`` grows).
    """
    x = log_scores
    for _ in range(iters):
        x = x - torch.logsumexp(x, dim=-1, keepdim=True)
        x = x - torch.logsumexp(x, dim=-2, keepdim=True)
    return torch.softmax(x, dim=-1)


def _block_means(x: Tensor, weight: Tensor) -> Tensor:
    """Weighted mean per block: ``x (..., nb, c, D)``, ``weight (..., nb, c)`` -> ``(..., nb, D)``."""
    total = weight.sum(dim=-1, keepdim=True)
    # A batched (1 x c) @ (c x D) product: no (..., nb, c, D) weighted copy, forward or backward.
    return (weight.unsqueeze(-2) @ x).squeeze(-2) / total.clamp(min=1.0)


@register(
    "sinkhorn",
    Capabilities(
        exact=False,
        causal=True,
        key_padding=True,
        cross_attention=False,
        decoding=None,
        complexity="O(N·b + (N/b)^2·b)",
        family="hashing",
        error_budget=0.85,
        summary="Sparse Sinkhorn attention: own block + a Sinkhorn-sorted block",
    ),
    small_options={"block_size": 8},
    benchmark_options={"block_size": 64},
)
class SinkhornAttention(AttentionMechanism):
    """Sparse Sinkhorn attention.

    Args:
        block_size: tokens per block (``b``); each query sees its block and one sorted block.
        sinkhorn_iters: Sinkhorn normalisation rounds (bidirectional mode).
        temperature: divides the sort scores; lower is closer to a hard permutation.
    """

    def __init__(self, *, block_size: int = 64, sinkhorn_iters: int = 8, temperature: float = 0.75) -> None:
        super().__init__()
        self.block_size = check_positive_int("block_size", block_size, example=64)
        self.sinkhorn_iters = check_non_negative_int("sinkhorn_iters", sinkhorn_iters)
        self.temperature = check_positive_float("temperature", temperature)

    def sort_matrix(self, q_blocks: Tensor, k_blocks: Tensor, key_weight: Tensor, *, causal: bool) -> Tensor:
        """The soft block permutation ``P (B, H, nb, nb)``; row ``i`` mixes the key blocks block ``i`` sees.

        Args:
            q_blocks: ``(B, H, nb, c, D)`` queries per block (empty slots zero).
            k_blocks: ``(B, H, nb, c, D)`` keys per block.
            key_weight: ``(B, H, nb, c)`` 1 for real keys, 0 for padded or empty slots.
            causal: use the causal sort (see the module docstring).
        """
        nb, c, d = q_blocks.shape[-3:]
        q_mean = q_blocks.sum(dim=-2) / c  # empty slots are zero; the scale is shared by every row
        k_mean = _block_means(k_blocks, key_weight)
        i = torch.arange(nb, device=q_blocks.device)
        if causal:
            context = torch.cat([torch.zeros_like(q_mean[..., :1, :]), q_mean[..., :-1, :]], dim=-2)
            allowed = i[None, :] < i[:, None]  # key block j strictly before query block i
        else:
            context = q_mean
            allowed = i[None, :] != i[:, None]
        scores = (context @ k_mean.transpose(-1, -2)) / (math.sqrt(d) * self.temperature)
        scores = scores.masked_fill(~allowed, float("-inf"))
        if causal:
            has_block = allowed.any(dim=-1, keepdim=True)
            safe = scores.masked_fill(~has_block, 0.0)
            return torch.softmax(safe, dim=-1) * has_block
        if self.sinkhorn_iters and torch.is_grad_enabled() and scores.requires_grad:
            # Recomputed in the backward (deterministic, O(iters · nb²)): autograd would
            # otherwise hold every iteration's (nb, nb) intermediates until then.
            return checkpoint(sinkhorn_normalize, scores, self.sinkhorn_iters, use_reentrant=False)
        return sinkhorn_normalize(scores, self.sinkhorn_iters)

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool,
        key_padding_mask: Tensor | None,
        mask: Mask | None,
        score_bias: ScoreBias | None,
        **call_kwargs: Any,
    ) -> Tensor:
        compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        q, k, v = q.to(compute), k.to(compute), v.to(compute)
        b, h, t_len, d = q.shape
        c = self.block_size
        nb = -(-t_len // c)
        pad = nb * c - t_len
        masked = key_padding_mask is not None or pad > 0

        def blocks(x: Tensor) -> Tensor:  # (B, H, T, E) -> (B, H, nb, c, E), empty slots zero
            return (torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x).reshape(b, h, nb, c, x.shape[-1])

        q_blocks, k_blocks, v_blocks = blocks(q), blocks(k), blocks(v)
        real = torch.ones(b, t_len, dtype=torch.bool, device=q.device)
        if key_padding_mask is not None:
            real = key_padding_mask
        real = torch.nn.functional.pad(real, (0, pad)).view(b, 1, nb, c)  # False on padded keys and empty slots
        # Own block: the block's keys, masked by padding and (causal) original position.
        own_blocked: Tensor | None = None
        if masked:
            own_blocked = ~real.unsqueeze(-2)  # (B, 1, nb, 1, c)
        if causal:
            later = torch.ones(c, c, dtype=torch.bool, device=q.device).triu_(1)  # key offset > query offset
            own_blocked = later if own_blocked is None else own_blocked | later
        groups = b * h * nb
        blocked = None if own_blocked is None else own_blocked.expand(b, h, nb, c, c).reshape(groups, c, c)
        extra = None
        if nb > 1:  # the sorted block, as extra keys every query of the block sees
            weight = real.to(compute)
            k_mixed, v_mixed = (
                (k_blocks, v_blocks) if not masked else (k_blocks * weight[..., None], v_blocks * weight[..., None])
            )
            perm = self.sort_matrix(q_blocks, k_mixed, weight, causal=causal)  # (B, H, nb, nb)
            # (nb, nb) @ (nb, c·D) per head: the sorted blocks, already in (B·H·nb, c, D) order.
            sorted_keys = (perm @ k_mixed.flatten(-2)).view(groups, c, d)
            sorted_values = (perm @ v_mixed.flatten(-2)).view(groups, c, v.shape[-1])
            sorted_blocked = None
            if masked or causal:  # else every row of P has mass and every mixed slot holds real keys
                with torch.no_grad():
                    sorted_blocked = (perm.detach() @ weight <= 0).view(groups, 1, c)
            extra = (sorted_keys, sorted_values, sorted_blocked)
        out, _ = chunk_attention(
            q_blocks.reshape(groups, c, d),
            k_blocks.reshape(groups, c, d),
            v_blocks.reshape(groups, c, v.shape[-1]),
            blocked,
            scale=d**-0.5,
            extra=extra,
        )
        return out.view(b, h, nb * c, -1)[:, :, :t_len]
