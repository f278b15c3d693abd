"""The kernels of Native Sparse Attention: block compression, compressed attention with block selection,
and attention over each query's own selected blocks.

"Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention" (Yuan et al.
2025, arXiv:2502.11089). Notation: compressed blocks of ``l = compress_block`` keys every
``d = compress_stride`` positions (block ``m`` holds keys ``m·d .. m·d + l - 1``), selection blocks of
``l' = select_block`` keys (block ``j`` holds ``j·l' .. j·l' + l' - 1``), ``n = select_blocks``.

- :func:`compress_blocks`: each compressed key/value is a learned per-position weighted sum of its
  block's real keys/values (padded keys count as zeros).
- :func:`compressed_attention`: softmax attention of every query over the compressed keys it may see,
  and, from the same probabilities, each query's ``n`` selection blocks. Queries run in chunks and the
  backward recomputes each chunk's probabilities from the saved log-sum-exp (as FlashAttention does),
  so memory is ``O(T·(D + n))`` plus one chunk, never ``T × T/d``: time ``O(T·(T/d)·D)``.
- :func:`selected_attention`: exact softmax of each query over the keys of its own selected blocks on
  the blocked gather core (:mod:`attnkit.kernels.blocked`), ``O(T·n·l'·D)`` forward and backward.

Conventions as everywhere in attnkit: queries are end-aligned (query ``i`` of ``T`` sits at absolute
position ``i + S - T``), ``True`` in a padding mask is a real token, a row that sees nothing is zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnkit.kernels.blocked import GatherPattern, gathered_attention
from attnkit.masks.functions import causal_mask

#: Scores per chunk of :func:`compressed_attention`, ``(B, H, rows, M)``: 16 MiB of float32 whatever
#: the length, so the compressed branch's memory stays linear in ``T``.
_CHUNK_SCORES = 1 << 22


def num_compressed_blocks(length: int, block: int, stride: int, *, causal: bool) -> int:
    """Compressed blocks over ``length`` keys: causal, only complete ones (a partial block would
    change as keys arrive); otherwise every block starting before ``length`` (its tail counts as padding)."""
    if causal:
        return 0 if length < block else (length - block) // stride + 1
    return -(-length // stride)


def compress_blocks(
    x: Tensor,
    weights: Tensor,
    *,
    block: int,
    stride: int,
    count: int,
    attention_mask: Tensor | None,
    position: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Compress ``count`` blocks of ``x`` starting at position 0: ``c_m = Σ_u w_u (x_{m·d+u} + e_u)``.

    Args:
        x: ``(B, H, S, E)`` keys or values.
        weights: ``(l,)`` the learned per-position pooling weights ``w``.
        block: ``l``, positions per block.
        stride: ``d``, positions between block starts.
        count: ``M``, blocks to compress; positions past ``S`` count as padding.
        attention_mask: bool ``(B, S)``, True = real token; padded positions contribute nothing,
            not even their position term.
        position: ``(l, E)`` learned intra-block position term ``e``, or None.

    Returns:
        ``compressed (B, H, M, E)`` and ``real (B, M)`` bool, True where the block has a real key.
    """
    b, h, s_len, dim = x.shape
    if count == 0:  # no block yet (causal, fewer than ``l`` keys)
        return x.new_zeros(b, h, 0, dim), x.new_zeros(b, 0, dtype=torch.bool)
    span = max(s_len, (count - 1) * stride + block)
    real = x.new_ones(b, s_len, dtype=torch.bool) if attention_mask is None else attention_mask
    real = torch.nn.functional.pad(real, (0, span - s_len), value=False)
    real_blocks = real.unfold(1, block, stride)[:, :count]  # (B, M, l)
    weights = weights.to(x.dtype)
    if attention_mask is not None:
        # where, not a product: a padded key's value (even inf) must not reach the result
        x = torch.where(attention_mask[:, None, :, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    if block % stride:
        padded = torch.nn.functional.pad(x, (0, 0, 0, span - s_len))
        pooled = padded.unfold(2, block, stride)[:, :, :count] @ weights  # (B, H, M, E, l) @ (l,)
    else:
        pooled = _strided_pool(x, weights, stride=stride, count=count)
    if position is not None:
        # Σ_u w_u e_u over the block's real positions only (a padded one adds no position term)
        pooled = pooled + ((real_blocks.to(x.dtype) * weights) @ position.to(x.dtype))[:, None]
    return pooled, real_blocks.any(dim=-1)


def _strided_pool(x: Tensor, weights: Tensor, *, stride: int, count: int) -> Tensor:
    """``Σ_u w_u x_{m·d+u}`` for ``m < count`` when ``d`` divides ``l``, without copying ``x`` per block.

    ``x`` is viewed as rows of ``d`` positions; block ``m`` is rows ``m .. m + l/d - 1``, so the sum is
    ``l/d`` products of a ``(B, H, M, E, d)`` view with a slice of ``w`` (one for non-overlapping blocks).
    """
    b, h, s_len, dim = x.shape
    per_block = weights.shape[0] // stride
    rows = count + per_block - 1
    if rows * stride != s_len:  # zeros past the end (they count as padding), or keys no block reaches
        x = torch.nn.functional.pad(x, (0, 0, 0, rows * stride - s_len))
    grid = x.view(b, h, rows, stride, dim).transpose(-1, -2)  # (B, H, rows, E, d): a view
    pooled = grid[:, :, :count] @ weights[:stride]
    for c in range(1, per_block):
        pooled = pooled + grid[:, :, c : c + count] @ weights[c * stride : (c + 1) * stride]
    return pooled


@dataclass(frozen=True)
class Selection:
    """What :func:`compressed_attention` needs to pick each query's selection blocks.

    Attributes:
        compress_block: ``l``; a compressed block is causally visible once complete.
        compress_stride: ``d``; divides ``l`` and ``select_block``.
        select_block: ``l'``.
        select_blocks: ``n >= 2``, blocks attended per query: its own block, the first block (when
            it holds a real key) and the best-ranked others, ``n`` in all (or fewer when there are not
            enough candidates).
        causal: only compressed blocks ending at or before the query are visible, and only
            selection blocks before the query's own are candidates.
    """

    compress_block: int
    compress_stride: int
    select_block: int
    select_blocks: int
    causal: bool


def compressed_attention(
    q: Tensor,
    compressed_keys: Tensor,
    compressed_values: Tensor,
    compressed_real: Tensor,
    selection: Selection,
    *,
    kv_len: int,
    attention_mask: Tensor | None,
    scale: float | None = None,
    select_rows: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention over compressed keys, and each query's selection blocks ranked by it.

    The importance of selection block ``j`` for a query is the total probability its compressed
    attention gives to the compressed blocks overlapping ``j`` (NSA's eq. 9 for ``d | l, l'``). The
    query's own block is always attended, and block 0 whenever it holds a real key; the rest of the
    ``n`` go by importance among the candidates (other blocks with a real key, only earlier ones
    under ``causal``). Exact ties (blocks covered by the same visible compressed blocks, e.g. none)
    go to the later block, so the choice never depends on how the row was computed.

    Args:
        q: ``(B, H, T, D)`` end-aligned queries.
        compressed_keys: ``(B, H, M, D)`` from :func:`compress_blocks`.
        compressed_values: ``(B, H, M, Dv)``.
        compressed_real: bool ``(B, M)``, False for a block with no real key (never visible).
        selection: block sizes and causality.
        kv_len: ``S``, the number of raw keys.
        attention_mask: bool ``(B, S)`` for the raw keys (a selection block with no real key is
            never a candidate).
        scale: score scale, default ``1/sqrt(D)``.
        select_rows: bool ``(T,)``, the queries whose blocks to select (others only attend); None: all.

    Returns:
        ``out (B, H, T, Dv)`` (zeros for a query that sees no compressed block) and the selected
        blocks of the ``R`` selecting queries, int64 ``(B, H, R, 1 + min(n - 1, N))`` with ``N = ceil(S / l')``: slot 0 the own
        block, then the others in no particular order, ``-1`` in unused slots. The selection is
        discrete: no gradient flows through it.
    """
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    real = q.new_ones(q.shape[0], kv_len, dtype=torch.bool) if attention_mask is None else attention_mask
    blocks = -(-kv_len // selection.select_block)
    pad = blocks * selection.select_block - kv_len
    selectable = torch.nn.functional.pad(real, (0, pad), value=False).view(q.shape[0], blocks, -1).any(dim=-1)
    if select_rows is None:
        select_rows = torch.ones(q.shape[2], dtype=torch.bool, device=q.device)
    out, chosen = _CompressedAttention.apply(
        q, compressed_keys, compressed_values, compressed_real, selectable, selection, kv_len, scale, select_rows
    )
    return out, chosen


def _visible(compressed_real: Tensor, positions: Tensor, selection: Selection) -> Tensor:
    """bool ``(B, 1, c, M)``: compressed block ``m`` is visible to the query at absolute ``positions (c,)``."""
    visible = compressed_real[:, None, None, :]
    if selection.causal:
        ends = torch.arange(compressed_real.shape[1], device=positions.device) * selection.compress_stride
        ends = ends + (selection.compress_block - 1)
        visible = visible & (ends[None, :] <= positions[:, None])
    return visible


def _probabilities(q: Tensor, keys: Tensor, visible: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Masked softmax ``(B, H, c, M)`` of ``q (B, H, c, D)`` over ``keys (B, H, M, D)``, and its
    log-sum-exp ``(B, H, c, 1)`` (``+inf`` for a row that sees nothing, whose probabilities are 0)."""
    scores = (q @ keys.transpose(-1, -2)).mul_(scale).masked_fill_(~visible, float("-inf"))
    lse = scores.logsumexp(dim=-1, keepdim=True)
    lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
    return scores.sub_(lse).exp_(), lse


def _probabilities_from_lse(q: Tensor, keys: Tensor, visible: Tensor, lse: Tensor, scale: float) -> Tensor:
    scores = (q @ keys.transpose(-1, -2)).mul_(scale).masked_fill_(~visible, float("-inf"))
    return scores.sub_(lse).exp_()


@torch.no_grad()
def _select(probs: Tensor, positions: Tensor, selectable: Tensor, selection: Selection) -> Tensor:
    """Selection blocks ``(B, H, c, 1 + min(n - 1, N))`` of the queries at ``positions (c,)`` from their
    compressed probabilities ``probs (B, H, c, M)``; see :func:`compressed_attention`."""
    ratio = selection.select_block // selection.compress_stride  # compressed starts per selection block
    reach = selection.compress_block // selection.compress_stride  # selection blocks a compressed one spans
    blocks = selectable.shape[1]
    # compressed block m overlaps selection block j iff j·ratio - reach < m < (j + 1)·ratio: a window of
    # ratio + reach - 1 consecutive m, starting at j·ratio once padded on the left by reach - 1
    padded = torch.nn.functional.pad(probs, (reach - 1, blocks * ratio - probs.shape[-1]))
    importance = padded.unfold(-1, ratio + reach - 1, ratio).sum(dim=-1)  # (B, H, c, N)
    index = torch.arange(blocks, device=probs.device)
    own = (positions // selection.select_block)[:, None]  # (c, 1)
    candidate = index != own
    if selection.causal:
        candidate = candidate & (index < own)
    candidate = candidate & selectable[:, None, None, :]
    # block 0 ranks first whenever it is a candidate (always attended, as in the paper)
    rank = importance.clone()
    rank[..., 0] = float("inf")
    rank = rank.masked_fill_(~candidate, float("-inf"))
    # exact ties are common (blocks covered by the same visible compressed blocks have equal sums):
    # a stable sort of the reversed row breaks them toward the later block, whatever the row length
    best, order = rank.flip(-1).sort(dim=-1, descending=True, stable=True)
    keep = min(selection.select_blocks - 1, blocks)
    best, top = best[..., :keep], blocks - 1 - order[..., :keep]
    top = torch.where(best > float("-inf"), top, -1)
    return torch.cat([own.expand((*probs.shape[:-1], 1)), top], dim=-1)


class _CompressedAttention(torch.autograd.Function):
    """Chunked softmax attention over compressed keys (plus the selection); the backward recomputes
    each chunk's probabilities from the saved log-sum-exp instead of keeping ``T × M`` of them."""

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        keys: Tensor,
        values: Tensor,
        compressed_real: Tensor,
        selectable: Tensor,
        selection: Selection,
        kv_len: int,
        scale: float,
        select_rows: Tensor,
    ) -> tuple[Tensor, Tensor]:
        b, h, t_len, _ = q.shape
        blocks = selectable.shape[1]
        offset = kv_len - t_len
        out = q.new_zeros(b, h, t_len, values.shape[-1])
        lse = q.new_full((b, h, t_len, 1), float("inf"))
        chosen = [torch.empty(b, h, 0, 1 + min(selection.select_blocks - 1, blocks), dtype=torch.long, device=q.device)]
        rows = _chunk_rows(b, h, keys.shape[2])
        for r0 in range(0, t_len, rows):
            r1 = min(r0 + rows, t_len)
            positions = torch.arange(r0 + offset, r1 + offset, device=q.device)
            seen = _seen(selection, r1 - 1 + offset, keys.shape[2])
            visible = _visible(compressed_real[:, :seen], positions, selection)
            probs, lse[:, :, r0:r1] = _probabilities(q[:, :, r0:r1], keys[:, :, :seen], visible, scale)
            out[:, :, r0:r1] = probs @ values[:, :, :seen]
            picked = select_rows[r0:r1]
            if bool(picked.any()):
                chosen.append(_select(probs[:, :, picked], positions[picked], selectable, selection))
        ctx.save_for_backward(q, keys, values, compressed_real, out, lse)
        ctx.selection, ctx.offset, ctx.scale = selection, offset, scale
        selected = torch.cat(chosen, dim=2)
        ctx.mark_non_differentiable(selected)
        return out, selected

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, _grad_chosen: Tensor | None) -> tuple[Tensor | None, ...]:
        q, keys, values, compressed_real, out, lse = ctx.saved_tensors
        b, h, t_len, _ = q.shape
        dq = torch.zeros_like(q)
        dk = torch.zeros_like(keys)
        dv = torch.zeros_like(values)
        # dL/ds = p ∘ (dL/dp - Σ_j p_j dL/dp_j), and Σ_j p_j dL/dp_j = rowsum(dO ∘ O)
        delta = torch.linalg.vecdot(grad_out, out)[..., None]
        rows = _chunk_rows(b, h, keys.shape[2])
        for r0 in range(0, t_len, rows):
            r1 = min(r0 + rows, t_len)
            positions = torch.arange(r0 + ctx.offset, r1 + ctx.offset, device=q.device)
            seen = _seen(ctx.selection, r1 - 1 + ctx.offset, keys.shape[2])
            if seen == 0:
                continue  # these queries see no compressed block: no gradient either way
            visible = _visible(compressed_real[:, :seen], positions, ctx.selection)
            qc, do = q[:, :, r0:r1], grad_out[:, :, r0:r1]
            keys_seen, values_seen = keys[:, :, :seen], values[:, :, :seen]
            probs = _probabilities_from_lse(qc, keys_seen, visible, lse[:, :, r0:r1], ctx.scale)
            dv[:, :, :seen] += probs.transpose(-1, -2) @ do
            dscores = (do @ values_seen.transpose(-1, -2)).sub_(delta[:, :, r0:r1]).mul_(probs).mul_(ctx.scale)
            dq[:, :, r0:r1] = dscores @ keys_seen
            dk[:, :, :seen] += dscores.transpose(-1, -2) @ qc
        return dq, dk, dv, None, None, None, None, None, None


def _seen(selection: Selection, last_position: int, blocks: int) -> int:
    """How many leading compressed blocks a chunk of queries ending at absolute ``last_position`` can see:
    causal, those complete by then (later ones are masked for every query in the chunk, so they are left
    out of the products instead of computed and masked); otherwise all ``blocks``."""
    if not selection.causal:
        return blocks
    complete = (last_position - selection.compress_block + 1) // selection.compress_stride + 1
    return max(0, min(blocks, complete))


def _chunk_rows(b: int, h: int, blocks: int) -> int:
    return max(1, _CHUNK_SCORES // max(1, b * h * blocks))


def selected_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    blocks: Tensor,
    *,
    select_block: int,
    causal: bool,
    attention_mask: Tensor | None,
    scale: float | None = None,
) -> Tensor:
    """Exact softmax of each query over the keys of its own selection blocks.

    Args:
        q: ``(B, H, T, D)`` end-aligned queries.
        k: ``(B, H, S, D)``.
        v: ``(B, H, S, Dv)``.
        blocks: int64 ``(B, H, T, n)`` selection blocks per query (``-1`` = empty slot, no block twice).
        select_block: ``l'``.
        causal: a query at absolute ``p`` sees key ``j`` only when ``j <= p``.
        attention_mask: bool ``(B, S)``, True = real token.
        scale: score scale, default ``1/sqrt(D)``.

    Returns:
        ``(B, H, T, Dv)``, zeros for a query that sees no key.
    """
    t_len, s_len = q.shape[2], k.shape[2]
    offsets = torch.arange(select_block, device=blocks.device)
    positions = (blocks[..., None] * select_block + offsets).flatten(-2)  # (B, H, T, n·l')
    listed = blocks.repeat_interleave(select_block, dim=-1) >= 0
    kv_index = torch.where(listed & (positions < s_len), positions, -1)
    # one query per group: each query has its own blocks; keys still move a whole block at a time
    pattern = GatherPattern(
        1, kv_index, element_mask=causal_mask(t_len, s_len) if causal else None, key_block=select_block
    )
    return gathered_attention(q, k, v, pattern, attention_mask=attention_mask, scale=scale)
