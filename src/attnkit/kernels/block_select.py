"""Block selection on the blocked core: attention of query blocks over key blocks chosen per call.

The dynamic-sparsity counterpart of :mod:`attnkit.kernels.blocked`'s fixed patterns (MoBA, Lu et
al. 2025, arXiv:2502.13189): keys are cut into blocks of ``block_size`` absolute positions
(block ``j`` holds keys ``j·b .. j·b + b - 1``), a gate scores every key block for every query
block, and each query block attends to its own block plus the ``topk`` best-scoring others. The
selection is *data* computed per call, an index tensor ``(B, H, G, n)``, turned into a
:class:`~attnkit.kernels.blocked.GatherPattern` whose groups are the query blocks and whose
gathered keys are whole key blocks (``key_block = b``): the core then gathers ``n + 1`` blocks per
group and runs two batched GEMMs, ``O(T·(n+1)·b·D)`` forward and backward. No ``T×S`` mask or
score matrix is ever built; the gate itself is ``(T/b)×(S/b)`` scores.

Conventions (as everywhere in attnkit): queries are end-aligned (query ``i`` of ``T`` sits at
absolute position ``i + S - T``) and belong to the block of their absolute position; ``True`` in
a padding mask means a real token.

This module knows nothing of how the gate scores are made (mean-pooled or learned): see
``attnkit.attention.dynamic_block``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.core.types import ScoreBias
from attnkit.kernels.blocked import GatherPattern, gathered_attention
from attnkit.masks.functions import causal_mask


def num_blocks(length: int, block_size: int) -> int:
    """Blocks of ``block_size`` covering ``length`` positions (the last one may be partial)."""
    return -(-length // block_size)


def query_blocks(q_len: int, kv_len: int, block_size: int) -> tuple[int, int]:
    """``(first, count)``: the absolute blocks that ``q_len`` end-aligned queries fall in."""
    first = (kv_len - q_len) // block_size
    return first, num_blocks(kv_len, block_size) - first


def key_block_means(k: Tensor, block_size: int, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Each key block's mean over its real keys, and which blocks have any.

    Args:
        k: ``(B, H, S, D)`` keys.
        block_size: ``b``.
        attention_mask: bool ``(B, S)``, True = real token, or None.

    Returns:
        ``means (B, H, N, D)`` with ``N = ceil(S / b)`` (zeros for a block without a real key:
        padded keys never reach the gate) and ``real (B, N)`` bool, True where the block has one.
    """
    b, h, s_len, dim = k.shape
    blocks = num_blocks(s_len, block_size)
    pad = blocks * block_size - s_len
    real = k.new_ones(b, s_len) if attention_mask is None else attention_mask.to(k.dtype)
    real = torch.nn.functional.pad(real, (0, pad)).view(b, 1, blocks, block_size, 1)  # padded tail: not real
    sums = (torch.nn.functional.pad(k, (0, 0, 0, pad)).view(b, h, blocks, block_size, dim) * real).sum(dim=3)
    counts = real.sum(dim=3)  # (B, 1, N, 1)
    return sums / counts.clamp(min=1), counts[:, 0, :, 0] > 0


@torch.no_grad()
def select_key_blocks(
    scores: Tensor, first_block: int, topk: int, *, causal: bool, selectable: Tensor | None = None
) -> Tensor:
    """Each query block's ``topk`` best-scoring candidate key blocks.

    A query block's candidates are the key blocks other than its own (its own is always
    attended, so it is not a candidate), only earlier ones under ``causal`` (a later block holds
    only future keys), and only blocks with a real key.

    Args:
        scores: ``(B, H, G, N)`` gate scores of query blocks ``first_block .. first_block + G - 1``
            against every key block.
        first_block: the absolute block of the first query block.
        topk: candidates kept per query block.
        causal: only earlier blocks are candidates.
        selectable: bool ``(B, N)``, False for a block that must never be chosen (no real key).

    Returns:
        int64 ``(B, H, G, min(topk, N - 1))`` absolute key blocks, ``-1`` in the slots of a query
        block with fewer candidates; the order within a row is unspecified. Ties are broken by
        :func:`torch.topk`.
    """
    groups, blocks = scores.shape[-2:]
    own = torch.arange(first_block, first_block + groups, device=scores.device).view(-1, 1)
    key = torch.arange(blocks, device=scores.device).view(1, -1)
    candidate = key < own if causal else key != own  # (G, N)
    if selectable is not None:
        candidate = candidate & selectable[:, None, None, :]
    masked = scores.masked_fill(~candidate, float("-inf"))
    keep = max(0, min(topk, blocks - 1))
    top_scores, top_blocks = masked.topk(keep, dim=-1, sorted=False)
    return torch.where(top_scores > float("-inf"), top_blocks, -1)


def attended_blocks(selected: Tensor, first_block: int) -> Tensor:
    """The key blocks each query block attends: its own block, then ``selected``.

    Args:
        selected: int64 ``(B, H, G, n)`` from :func:`select_key_blocks`.
        first_block: the absolute block of the first query block.

    Returns:
        int64 ``(B, H, G, n + 1)``, slot 0 the query block's own block, ``-1`` for empty slots.
    """
    b, h, groups, _ = selected.shape
    own = torch.arange(first_block, first_block + groups, device=selected.device)
    return torch.cat([own.view(1, 1, -1, 1).expand(b, h, -1, 1), selected], dim=-1)


def _query_groups(q_len: int, kv_len: int, block_size: int, device: torch.device) -> tuple[int, Tensor | None]:
    """``(group_size, q_index)`` grouping end-aligned queries by their absolute block.

    When the first query starts a block, the groups are consecutive runs of ``block_size``
    (``q_index`` None: the core views the queries in place). Otherwise each group lists the
    local indices of its block's queries (``-1`` padded), at most ``min(b, T)`` of them, so a
    decoding step of one query costs one row, not a block.
    """
    offset = kv_len - q_len
    if offset % block_size == 0:
        return block_size, None
    first, groups = query_blocks(q_len, kv_len, block_size)
    size = min(block_size, q_len)
    start = (torch.arange(first, first + groups, device=device) * block_size - offset).clamp(min=0)
    stop = (torch.arange(first + 1, first + groups + 1, device=device) * block_size - offset).clamp(max=q_len)
    local = start[:, None] + torch.arange(size, device=device)
    q_index = torch.where(local < stop[:, None], local, -1)
    return size, q_index.view(1, 1, groups, size)


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    blocks: Tensor,
    *,
    block_size: int,
    causal: bool,
    attention_mask: Tensor | None = None,
    score_bias: ScoreBias | None = None,
    block_bias: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Exact softmax attention of each query block over the key blocks listed for it.

    Args:
        q: ``(B, H, T, D)`` queries, end-aligned, ``T <= S``.
        k: ``(B, H, S, D)`` keys.
        v: ``(B, H, S, Dv)`` values.
        blocks: int64 ``(B, H, G, n)`` absolute key blocks per query block (``-1`` = empty slot;
            no block twice in a row), ``G`` the query blocks of :func:`query_blocks`.
        block_size: ``b``.
        causal: query at absolute position ``p`` sees key ``j`` only when ``j <= p`` (needed for
            the query's own block; later blocks must not be listed).
        attention_mask: bool ``(B, S)``, True = real token.
        score_bias: additive bias ``(h, q_pos, kv_pos)`` on the attended scores.
        block_bias: float ``(B, H, G, n)`` added to the score of every key of the block in that
            slot (learned gates: a straight-through term has value 0 and carries the gradient),
            or None.
        scale: score scale, default ``1/sqrt(D)``.

    Returns:
        ``(B, H, T, Dv)``; zeros for a query that sees no key.
    """
    t_len, s_len = q.shape[2], k.shape[2]
    kv_index = _key_positions(blocks, block_size, s_len)  # (B, H, G, n·b)
    # the gathered keys are laid out slot by slot: slot s covers columns s·b .. s·b + b - 1
    per_key = None if block_bias is None else block_bias.repeat_interleave(block_size, dim=-1)[..., None, :]
    if t_len == s_len:
        return _folded(q, k, v, kv_index, block_size, causal, attention_mask, score_bias, per_key, scale)
    group_size, q_index = _query_groups(t_len, s_len, block_size, q.device)
    pattern = GatherPattern(
        group_size,
        kv_index,
        element_mask=causal_mask(t_len, s_len) if causal else None,
        q_index=q_index,
        key_block=block_size,
    )
    bias = score_bias
    if per_key is not None:

        def bias(heads: Tensor, q_pos: Tensor, kv_pos: Tensor) -> Tensor:
            return per_key if score_bias is None else per_key + score_bias(heads, q_pos, kv_pos)

    return gathered_attention(q, k, v, pattern, attention_mask=attention_mask, score_bias=bias, scale=scale)


def _key_positions(blocks: Tensor, block_size: int, kv_len: int) -> Tensor:
    """The key positions of ``blocks (B, H, G, n)``: ``(B, H, G, n·b)``, ``-1`` past the keys and for empty slots."""
    positions = (blocks[..., None] * block_size + torch.arange(block_size, device=blocks.device)).flatten(-2)
    listed = blocks.repeat_interleave(block_size, dim=-1) >= 0
    return torch.where(listed & (positions < kv_len), positions, -1)


def _folded(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_index: Tensor,
    block_size: int,
    causal: bool,
    attention_mask: Tensor | None,
    score_bias: ScoreBias | None,
    per_key: Tensor | None,
    scale: float | None,
) -> Tensor:
    """Self-attention (``T = S``) with the batch and heads folded into one long sequence.

    Each ``(b, h)`` sequence, padded to whole blocks (``L`` positions), becomes the segment
    ``[(b·H + h)·L, (b·H + h + 1)·L)`` of one sequence of ``B·H·L``, and its query blocks become
    groups that list positions of their own segment only. The core then sees one index list shared
    by "the" batch and head, for which it scatters key gradients a block-slot at a time: measured
    12x faster than the per-(batch, head) scatter it uses otherwise (4K, 8 heads, block 64, top-8).
    Causality is unchanged (``j <= i`` inside a segment is ``j' <= i'`` after folding) and the score
    bias is evaluated at the unfolded ``(head, query, key)`` positions.
    """
    b, h, length, _ = q.shape
    padded = num_blocks(length, block_size) * block_size
    pad = padded - length

    def fold(x: Tensor) -> Tensor:  # (B, H, T, E) -> (1, 1, B·H·L, E)
        return torch.nn.functional.pad(x, (0, 0, 0, pad)).reshape(1, 1, b * h * padded, x.shape[-1])

    segment = torch.arange(b * h, device=q.device).view(b, h, 1, 1) * padded
    kv_index = torch.where(kv_index >= 0, kv_index + segment, -1).reshape(1, 1, -1, kv_index.shape[-1])
    real = None
    if attention_mask is not None:
        real = torch.nn.functional.pad(attention_mask, (0, pad), value=False)[:, None].expand(b, h, padded)
        real = real.reshape(1, -1)
    folded_key_bias = None if per_key is None else per_key.reshape(1, 1, -1, 1, per_key.shape[-1])

    def bias(heads: Tensor, q_pos: Tensor, kv_pos: Tensor) -> Tensor:
        total = torch.zeros((), dtype=q.dtype, device=q.device) if folded_key_bias is None else folded_key_bias
        if score_bias is not None:
            total = total + score_bias((q_pos // padded) % h, q_pos % padded, kv_pos % padded)
        return total

    pattern = GatherPattern(
        block_size,
        kv_index,
        element_mask=causal_mask(b * h * padded, b * h * padded) if causal else None,
        key_block=block_size,
    )
    needs_bias = score_bias is not None or folded_key_bias is not None
    out = gathered_attention(
        fold(q), fold(k), fold(v), pattern, attention_mask=real, score_bias=bias if needs_bias else None, scale=scale
    )
    return out.view(b, h, padded, -1)[:, :, :length]
