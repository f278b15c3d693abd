"""Decoding the hashing family: keys and values kept with the bucket and chunk they were placed in.

LSH and Routing place tokens with :func:`~attnkit.kernels.bucket_layout.bucket_layout`: in every
round, a query sees key ``j`` exactly when both are in the same bucket and the key's chunk inside
that bucket is the query's chunk or the one before it, where a token's chunk is its *rank* (the
number of earlier tokens of its kind, queries or keys, in its bucket) divided by the chunk size;
keys are then masked by causal order and padding, and a key met in several rounds counts once
(:func:`~attnkit.kernels.bucketed.bucketed_attention`). Ranks count earlier tokens only, so
appending tokens never moves a token already placed, and what a new query sees follows from

- each key's bucket and chunk in every round, fixed when the key arrives, and
- per round and bucket, how many queries and keys have arrived so far.

:class:`BucketCache` keeps exactly that next to the keys and values: ``R`` integers per key and
head (``R`` rounds) plus ``2 · R · buckets`` counters per head, so it grows ``O(S)``. A step
(:func:`bucketed_step`) places the new tokens, then every new query scans the ``R · S`` integer
codes for the keys it sees and attends, in one softmax, over just those (at most
``2 · chunk · R``): ``O(R · S)`` integer work and ``O(R · chunk · D)`` arithmetic per token,
where recomputing the prefix costs ``O(R · S · chunk · D)`` plus a sort. The first step (the
prompt) runs the bucketed core itself, as the recompute would.

The result is the recompute's, to rounding: the same keys, the same scores, one softmax (the
recompute merges per-round softmaxes by their log-sum-exp). :func:`softmax_over_seen` is the
masked softmax both this module and Sinkhorn's decoding end in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.core.base import KVState, repeat_kv_heads
from attnkit.kernels.bucket_layout import bucket_layout
from attnkit.kernels.bucketed import bucketed_attention
from attnkit.kernels.chunk_softmax import SELF_SCORE
from attnkit.kernels.precision import upcast

#: A token's place in one round as one integer, ``bucket << 32 | chunk``: query chunk ``m`` of
#: bucket ``b`` sees key chunks ``m - 1`` and ``m`` of ``b`` exactly when ``0 <= q_code - k_code <= 1``
#: (chunks stay far below ``2**32``, so a bucket's chunk 0 never reaches into the bucket before).
_BUCKET_SHIFT = 32

#: Booleans of the ``(B, H, R, rows, S)`` scan per block of new queries (about 16 MB).
_SCAN_ELEMENTS = 1 << 24


@dataclass
class BucketCache(KVState):
    """Keys and values with their place in every round (see the module docstring).

    Attributes:
        key_code: long ``(B, H, R, S)``: ``bucket << 32 | chunk`` of every key in every round.
        query_count: long ``(B, H, R, N)``: queries placed so far per round and bucket.
        key_count: long ``(B, H, R, N)``: keys placed so far per round and bucket.
        num_buckets: ``N``, buckets per round (padded keys' bucket included); 0 before any place.
    """

    key_code: Tensor | None = None
    query_count: Tensor | None = None
    key_count: Tensor | None = None
    num_buckets: int = 0

    @property
    def placed(self) -> int:
        """Keys placed so far (equals :attr:`length` between steps)."""
        return 0 if self.key_code is None else self.key_code.shape[-1]

    def clear_places(self) -> None:
        """Forget every place (the keys and values stay): to place every token again under new buckets."""
        self.key_code = self.query_count = self.key_count = None
        self.num_buckets = 0

    def place(self, query_buckets: Tensor, key_buckets: Tensor, num_buckets: int, chunk_size: int) -> Tensor:
        """Place ``t`` new queries and keys after those already placed.

        Args:
            query_buckets: long ``(B, H, R, t)`` in ``[0, num_buckets)``.
            key_buckets: long ``(B, H, R, t)`` in ``[0, num_buckets)``.
            num_buckets: ``N``; the same at every step until :meth:`clear_places`.
            chunk_size: tokens per chunk.

        Returns:
            long ``(B, H, R, t)``: ``bucket << 32 | chunk`` of every new query.
        """
        if self.query_count is None or self.key_count is None:
            self.query_count = query_buckets.new_zeros(*query_buckets.shape[:-1], num_buckets)
            self.key_count = torch.zeros_like(self.query_count)
            self.num_buckets = num_buckets
        elif num_buckets != self.num_buckets:
            raise ValueError(
                f"the cache places tokens in {self.num_buckets} buckets per round, got {num_buckets}; "
                "clear_places() and place every token again to change it"
            )
        query_code = _codes(query_buckets, _ranks(query_buckets, self.query_count), chunk_size)
        key_code = _codes(key_buckets, _ranks(key_buckets, self.key_count), chunk_size)
        self.key_code = key_code if self.key_code is None else torch.cat([self.key_code, key_code], dim=-1)
        return query_code


def _ranks(buckets: Tensor, counts: Tensor) -> Tensor:
    """Rank of each new token in its bucket (earlier tokens there, placed or new); ``counts`` updated in place.

    ``buckets`` long ``(*N, t)``, ``counts`` long ``(*N, buckets)``. A stable sort, as
    :func:`~attnkit.kernels.bucket_layout.bucket_layout` ranks: ``O(t log t)``, no ``t × buckets`` table.
    """
    t_len = buckets.shape[-1]
    new = torch.zeros_like(counts).scatter_add_(-1, buckets, torch.ones_like(buckets))
    first = new.cumsum(-1) - new  # where each bucket starts among the sorted new tokens
    sorted_buckets, order = torch.sort(buckets, dim=-1, stable=True)
    rank_sorted = torch.arange(t_len, device=buckets.device) - first.gather(-1, sorted_buckets)
    rank = torch.empty_like(rank_sorted).scatter_(-1, order, rank_sorted)
    rank += counts.gather(-1, buckets)
    counts += new
    return rank


def _codes(buckets: Tensor, ranks: Tensor, chunk_size: int) -> Tensor:
    return (buckets << _BUCKET_SHIFT) | torch.div(ranks, chunk_size, rounding_mode="floor")


def softmax_over_seen(scores: Tensor, seen: Tensor) -> Tensor:
    """Softmax of ``scores`` over the entries where ``seen`` is True, along the last dimension.

    Args:
        scores: ``(..., K)``.
        seen: bool, broadcastable to ``scores``.

    Returns:
        ``(..., K)`` weights: 0 where not seen, and all 0 in a row that sees nothing (the
        library's convention: a query with no visible key outputs zeros).
    """
    masked = scores.masked_fill(~seen, float("-inf"))
    any_seen = seen.expand_as(scores).any(dim=-1, keepdim=True)
    weights = torch.softmax(masked.masked_fill(~any_seen, 0.0), dim=-1)
    return weights.masked_fill(~seen, 0.0)


def bucketed_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: BucketCache,
    query_buckets: Tensor,
    key_buckets: Tensor,
    *,
    num_buckets: int,
    chunk_size: int,
    attention_mask: Tensor | None,
    exclude_self: bool = False,
) -> Tensor:
    """Append ``t`` tokens to ``state`` and attend their queries causally (one decoding step).

    Args:
        q: ``(B, H, t, D)`` new queries.
        k: ``(B, H_kv, t, D)`` new keys (grouped heads are kept grouped in the cache).
        v: ``(B, H_kv, t, Dv)`` new values.
        state: the cache, holding every earlier token (placed).
        query_buckets: long ``(B, H, R, t)``: the new queries' bucket in every round.
        key_buckets: long ``(B, H, R, t)``: the new keys' (padded keys in a bucket of their own).
        num_buckets: ``N`` (see :meth:`BucketCache.place`).
        chunk_size: tokens per chunk.
        attention_mask: bool ``(B, t)``, True = real token, or None.
        exclude_self: the self-token rule of :func:`~attnkit.kernels.bucketed.bucketed_attention`.

    Returns:
        ``(B, H, t, Dv)``, the last ``t`` rows of the causal bucketed attention over every
        token so far (float32 for half-precision inputs).

    Raises:
        ValueError: ``state`` holds keys that were never placed (filled as a plain key/value cache).
    """
    if state.placed != state.length:
        raise ValueError(
            f"the cache holds {state.length} keys but placed {state.placed} of them in buckets: it was filled "
            "as a plain key/value cache, which lacks the queries' buckets; start from the mechanism's "
            "new_state() and decode every position through it"
        )
    prompt = state.length == 0
    state.append(k, v, attention_mask)
    query_code = state.place(query_buckets, key_buckets, num_buckets, chunk_size)
    if prompt:  # nothing cached yet: the step is a whole causal forward, run on the bucketed core
        heads = q.shape[1]
        layout = bucket_layout(query_buckets, num_buckets, chunk_size, key_buckets)
        return bucketed_attention(
            q,
            repeat_kv_heads(k, heads),
            repeat_kv_heads(v, heads),
            layout,
            causal=True,
            attention_mask=attention_mask,
            exclude_self=exclude_self,
        )
    return attend_placed(q, state, query_code, exclude_self=exclude_self)


def attend_placed(q: Tensor, state: BucketCache, query_code: Tensor, *, exclude_self: bool = False) -> Tensor:
    """The last ``t`` queries of the sequence, each over the cached keys it sees in any round.

    Args:
        q: ``(B, H, t, D)`` queries at positions ``S - t, ..., S - 1`` (``S`` = ``state.length``).
        state: the cache, every key placed.
        query_code: long ``(B, H, R, t)`` from :meth:`BucketCache.place`.
        exclude_self: a query's own key scores :data:`~attnkit.kernels.chunk_softmax.SELF_SCORE`
            (it weighs only when nothing else is seen).

    Returns:
        ``(B, H, t, Dv)``; zeros for a query that sees no key.
    """
    assert state.keys is not None and state.values is not None and state.key_code is not None
    q = upcast(q)
    b, h, t_len, _ = q.shape
    s_len = state.length
    rows = max(1, _SCAN_ELEMENTS // max(1, b * h * state.key_code.shape[2] * s_len))
    outs = [
        _attend_rows(q, state, query_code, start, min(t_len, start + rows), exclude_self)
        for start in range(0, t_len, rows)
    ]
    return torch.cat(outs, dim=2)


def _attend_rows(q: Tensor, state: BucketCache, query_code: Tensor, r0: int, r1: int, exclude_self: bool) -> Tensor:
    """:func:`attend_placed` for new queries ``r0 .. r1 - 1``."""
    assert state.keys is not None and state.values is not None and state.key_code is not None
    s_len, t_len = state.length, q.shape[2]
    positions = torch.arange(s_len, device=q.device)
    query_positions = positions[s_len - t_len + r0 : s_len - t_len + r1]  # queries end-aligned with the keys
    # (B, H, R, m, S): key chunk is the query's chunk or the one before, in the same bucket
    gap = query_code[..., r0:r1, None] - state.key_code[..., None, :]
    seen = ((gap >= 0) & (gap <= 1)).any(dim=2)  # (B, H, m, S): seen in some round, counted once
    seen &= positions <= query_positions[:, None]
    if state.key_padding is not None:
        seen &= state.key_padding[:, None, None, :]
    most = int(seen.sum(dim=-1).max())
    if most == 0:
        return q.new_zeros(*q.shape[:2], r1 - r0, state.values.shape[-1])
    # The positions of the seen keys (latest first), -1 filling rows that see fewer: (B, H, m, K).
    picked = torch.where(seen, positions, -1).topk(most, dim=-1).values
    valid = picked >= 0
    index = picked.clamp(min=0)
    keys, values = (upcast(_gather_positions(x, index)) for x in (state.keys, state.values))
    scores = torch.einsum("bhmd,bhmkd->bhmk", q[:, :, r0:r1], keys) * q.shape[-1] ** -0.5
    if exclude_self:
        scores = scores.masked_fill(valid & (picked == query_positions[:, None]), SELF_SCORE)
    weights = softmax_over_seen(scores, valid)
    return torch.einsum("bhmk,bhmkd->bhmd", weights, values)


def _gather_positions(x: Tensor, index: Tensor) -> Tensor:
    """``x (B, H_kv, S, E)`` at ``index`` long ``(B, H, m, K)`` of every query head: ``(B, H, m, K, E)``.

    Query head ``h`` reads key/value head ``h // (H / H_kv)`` (grouped heads, as
    :func:`~attnkit.core.base.repeat_kv_heads`), without repeating the cache.
    """
    b, h = index.shape[:2]
    batch = torch.arange(b, device=index.device).view(b, 1, 1, 1)
    head = (torch.arange(h, device=index.device) // (h // x.shape[1])).view(1, h, 1, 1)
    return x[batch, head, index]
