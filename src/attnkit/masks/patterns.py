"""Mask functions of the fixed sparse patterns (the dense oracle of each sparse mechanism).

Every function returns a :class:`~attnkit.masks.Mask` over local indices with queries
aligned to the end of the keys: query ``i`` of ``q_len`` sits at absolute position
``p = i + kv_len - q_len``; key ``j`` is at position ``j``. Causality is included when
``causal=True`` (key ``j`` visible only if ``j <= p``). The sliding window lives in
:func:`attnkit.masks.functions.sliding_window_mask`.

- :func:`strided_mask` / :func:`fixed_mask`: "Generating Long Sequences with Sparse
  Transformers" (Child et al. 2019, arXiv:1904.10509), the union of the two heads'
  patterns in one.
- :func:`longformer_mask`: "Longformer: The Long-Document Transformer" (Beltagy et al.
  2020, arXiv:2004.05150), sliding window plus symmetric global tokens.
- :func:`block_table_mask`: any block-level pattern given as a boolean table (BigBird,
  Zaheer et al. 2020, arXiv:2007.14062).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.masks.functions import Mask, sliding_window_mask


def _causal(q: Tensor, k: Tensor, offset: int) -> Tensor:
    return k <= q + offset


def strided_mask(q_len: int, kv_len: int, stride: int, *, causal: bool) -> Mask:
    """Sparse Transformer strided pattern with stride ``l``.

    Key ``j`` is visible to the query at position ``p`` when it is near (``|p - j| < l``) or on
    the query's stride grid (``(p - j) mod l == 0``); causal: and ``j <= p``.
    """
    offset = kv_len - q_len

    def fn(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        dist = (q + offset) - k
        seen = (dist.abs() < stride) | (dist.remainder(stride) == 0)
        return seen & (dist >= 0) if causal else seen

    return Mask(fn, f"strided({stride}, causal={causal})")


def fixed_mask(q_len: int, kv_len: int, block_size: int, summary_size: int, *, causal: bool) -> Mask:
    """Sparse Transformer fixed pattern: blocks of ``l`` positions with ``c`` summary columns.

    Key ``j`` is visible to the query at position ``p`` when both lie in the same block
    (``p // l == j // l``) or ``j`` is one of the last ``c`` positions of its block
    (``j mod l >= l - c``, the summary columns); causal: and ``j <= p``.
    """
    offset = kv_len - q_len

    def fn(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        p = q + offset
        same_block = torch.div(p, block_size, rounding_mode="floor") == torch.div(k, block_size, rounding_mode="floor")
        seen = same_block | (k.remainder(block_size) >= block_size - summary_size)
        return seen & _causal(q, k, offset) if causal else seen

    return Mask(fn, f"fixed({block_size}, summary={summary_size}, causal={causal})")


def longformer_mask(
    q_len: int, kv_len: int, window: int, *, causal: bool, dilation: int = 1, global_tokens: Tensor | None = None
) -> Mask:
    """Longformer: a (dilated) sliding window plus global tokens.

    Args:
        q_len: number of queries ``T``.
        kv_len: number of keys ``S``.
        window: the sliding window, as in :func:`~attnkit.masks.sliding_window_mask`.
        causal: include causality.
        dilation: window dilation.
        global_tokens: bool ``(B, S)`` or ``(1, S)`` (the same for every batch row) over
            absolute positions, True = global. A global
            query sees every key; a global key is seen by every query (causality still applies).
    """
    offset = kv_len - q_len
    local = sliding_window_mask(q_len, kv_len, window, causal=causal, dilation=dilation)
    if global_tokens is None:
        return local
    glob = global_tokens

    def fn(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        rows = b if glob.shape[0] > 1 else torch.zeros_like(b)
        seen = local(b, h, q, k) | glob[rows, q + offset] | glob[rows, k]
        return seen & _causal(q, k, offset) if causal else seen

    return Mask(fn, f"longformer({window}, dilation={dilation}, global, causal={causal})")


def block_table_mask(q_len: int, kv_len: int, block_size: int, table: Tensor, *, causal: bool) -> Mask:
    """A block-level pattern: key ``j`` visible to the query at ``p`` iff ``table[h, p // n, j // n]``.

    Args:
        q_len: number of queries ``T``.
        kv_len: number of keys ``S``.
        block_size: ``n``, positions per block (blocks of absolute positions).
        table: bool ``(Hk, ceil(S/n), ceil(S/n))`` with ``Hk`` 1 or the number of heads.
        causal: include causality.
    """
    offset = kv_len - q_len
    per_head = table.shape[0] > 1

    def fn(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        qb = torch.div(q + offset, block_size, rounding_mode="floor")
        kb = torch.div(k, block_size, rounding_mode="floor")
        seen = table[h if per_head else torch.zeros_like(h), qb, kb]
        return seen & _causal(q, k, offset) if causal else seen

    return Mask(fn, f"block_table({block_size}, causal={causal})")
