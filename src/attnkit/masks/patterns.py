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


def block_local_mask(q_len: int, kv_len: int, block_size: int, *, causal: bool) -> Mask:
    """Block-local (block-diagonal) pattern: positions fall into blocks of ``n`` and see only their own block.

    Key ``j`` is visible to the query at position ``p`` when ``p // n == j // n``; causal: and
    ``j <= p``. The last block may be partial.
    """
    offset = kv_len - q_len

    def fn(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        p = q + offset
        seen = torch.div(p, block_size, rounding_mode="floor") == torch.div(k, block_size, rounding_mode="floor")
        return seen & _causal(q, k, offset) if causal else seen

    return Mask(fn, f"block_local({block_size}, causal={causal})")


def axial_mask(q_len: int, kv_len: int, cols: int, *, causal: bool) -> Mask:
    """Axial pattern over a grid of rows of ``cols`` positions in raster order (Ho et al. 2019).

    Position ``p`` is cell ``(p // cols, p mod cols)``. Key ``j`` is visible to the query at ``p``
    when it lies in the query's row (``p // cols == j // cols``) or column
    (``(p - j) mod cols == 0``); causal: and ``j <= p`` (raster order).
    """
    offset = kv_len - q_len

    def fn(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        p = q + offset
        same_row = torch.div(p, cols, rounding_mode="floor") == torch.div(k, cols, rounding_mode="floor")
        seen = same_row | ((p - k).remainder(cols) == 0)
        return seen & _causal(q, k, offset) if causal else seen

    return Mask(fn, f"axial(cols={cols}, causal={causal})")


def fan_out_distances(window: int, base: int, kv_len: int, *, causal: bool) -> list[int]:
    """The log-sparse distances beyond the local window: ``base**m`` (``m >= 0``) below ``kv_len``.

    Only distances the window does not already hold are listed (causal windows hold ``0 ..
    window - 1``, bidirectional ones ``|dist| <= window // 2``), each once, ascending.
    """
    reach = window - 1 if causal else window // 2
    distances, step = [], 1
    while step < kv_len:
        if step > reach:
            distances.append(step)
        step *= base
    return distances


def fan_out_mask(q_len: int, kv_len: int, window: int, base: int, *, causal: bool) -> Mask:
    """Fan-out (log-sparse) pattern: a local window plus keys at exponentially growing distances.

    "Enhancing the Locality and Breaking the Memory Bottleneck of Transformer on Time Series
    Forecasting" (LogSparse Transformer, Li et al. 2019, arXiv:1907.00235). Key ``j`` is visible
    to the query at position ``p`` when it is in the query's sliding window (as
    :func:`~attnkit.masks.sliding_window_mask`) or ``|p - j| = base**m`` for some ``m >= 0``;
    causal: and ``j <= p``.
    """
    offset = kv_len - q_len
    local = sliding_window_mask(q_len, kv_len, window, causal=causal)
    # A short unrolled chain of comparisons (about log_base(S) of them): FlexAttention compiles it.
    distances = fan_out_distances(window, base, kv_len, causal=causal)

    def fn(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        dist = (q + offset) - k
        far = dist if causal else dist.abs()
        seen = local(b, h, q, k)
        for step in distances:
            seen = seen | (far == step)
        return seen

    return Mask(fn, f"fan_out({window}, base={base}, causal={causal})")
