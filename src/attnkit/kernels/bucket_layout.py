"""Bucket-aligned chunks: where every query and key of every round sits once tokens are sorted by bucket.

Each mechanism of the hashing and clustering family decides only *which bucket* every query and
every key goes to (a hash, a nearest centroid). :func:`bucket_layout` places the tokens of bucket
``b`` in chunks of their own, in their original order (as many chunks as the larger of its query
and key counts needs; the last one padded with empty slots), and query chunk ``m`` of a bucket
faces key chunk ``m`` of that bucket. A token's offset inside its bucket's chunks is its ``rank``,
the number of *earlier* tokens of the same bucket. That is what makes the causal mode leak-free
and bit-stable: changing later tokens can shift where a bucket starts, but never which earlier
tokens share a chunk nor their offsets inside it. Time ``O(N · T log T)`` for the sort.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Placement:
    """Where the queries (or the keys) of every round sit in the chunked layout.

    ``N`` is any flattened leading shape (batch, heads, rounds); ``L = num_chunks * chunk_size``.

    Attributes:
        slot_of_token: long ``(*N, T)``: the slot of every token.
        token_of_slot: long ``(*N, L)``: the token in every slot (0 for empty slots).
        slot_filled: bool ``(*N, L)``: False for empty slots.
    """

    slot_of_token: Tensor
    token_of_slot: Tensor
    slot_filled: Tensor


@dataclass(frozen=True)
class ChunkLayout:
    """Bucket-aligned chunks for queries and keys (see the module docstring).

    Queries and keys of bucket ``b`` get the same chunks (as many as the larger of the
    two needs), so query chunk ``m`` of a bucket meets key chunk ``m`` (and ``m - 1``).

    Attributes:
        queries: placement of the queries.
        keys: placement of the keys (the same object when queries and keys share buckets).
        chunk_continues: bool ``(*N, num_chunks)``: chunk ``m - 1`` belongs to the same bucket.
        chunk_size: tokens per chunk.
    """

    queries: Placement
    keys: Placement
    chunk_continues: Tensor
    chunk_size: int

    @property
    def num_chunks(self) -> int:
        """Chunks per round (the maximum over the leading dimensions)."""
        return self.chunk_continues.shape[-1]


def _bucket_counts(ids: Tensor, num_buckets: int) -> Tensor:
    counts = torch.zeros(ids.shape[0], num_buckets, dtype=torch.long, device=ids.device)
    return counts.scatter_add_(1, ids, torch.ones_like(ids))


def _place(ids: Tensor, counts: Tensor, first_chunk: Tensor, chunk_size: int, length: int) -> Placement:
    """Slots for tokens ``ids (n, T)``: bucket ``b``'s tokens fill its chunks in original order."""
    n, t_len = ids.shape
    positions = torch.arange(t_len, device=ids.device).expand(n, -1)
    first_token = counts.cumsum(1) - counts  # where each bucket starts in sorted order
    sorted_ids, order = torch.sort(ids, dim=1, stable=True)  # stable: original order within a bucket
    rank = positions - first_token.gather(1, sorted_ids)  # earlier tokens of the same bucket
    slot_sorted = chunk_size * first_chunk.gather(1, sorted_ids) + rank
    slot_of_token = torch.empty_like(slot_sorted).scatter_(1, order, slot_sorted)
    token_of_slot = torch.zeros(n, length, dtype=torch.long, device=ids.device).scatter_(1, slot_of_token, positions)
    filled = torch.zeros(n, length, dtype=torch.bool, device=ids.device)
    filled.scatter_(1, slot_of_token, torch.ones_like(ids, dtype=torch.bool))
    return Placement(slot_of_token, token_of_slot, filled)


def bucket_layout(
    query_buckets: Tensor, num_buckets: int, chunk_size: int, key_buckets: Tensor | None = None
) -> ChunkLayout:
    """Sort tokens into bucket-aligned chunks.

    Args:
        query_buckets: long ``(*N, T)`` in ``[0, num_buckets)``; no gradient.
        num_buckets: number of buckets.
        chunk_size: tokens per chunk.
        key_buckets: long ``(*N, T)`` when keys are bucketed apart from queries
            (default: the query buckets, one shared placement).

    Returns:
        The :class:`ChunkLayout`; every leading index gets the same number of chunks
        (the largest needed), padded with empty chunks at the end.
    """
    *lead, t_len = query_buckets.shape
    q_ids = query_buckets.reshape(-1, t_len)
    q_counts = _bucket_counts(q_ids, num_buckets)
    chunks = (q_counts + chunk_size - 1) // chunk_size
    if key_buckets is not None:
        k_ids = key_buckets.reshape(-1, t_len)
        k_counts = _bucket_counts(k_ids, num_buckets)
        chunks = torch.maximum(chunks, (k_counts + chunk_size - 1) // chunk_size)
    chunk_end = chunks.cumsum(1)
    first_chunk = chunk_end - chunks
    num_chunks = max(1, int(chunk_end[:, -1].max()))
    length = num_chunks * chunk_size

    queries = _place(q_ids, q_counts, first_chunk, chunk_size, length)
    keys = queries if key_buckets is None else _place(k_ids, k_counts, first_chunk, chunk_size, length)
    chunk_index = torch.arange(num_chunks, device=q_ids.device).expand(q_ids.shape[0], -1).contiguous()
    chunk_bucket = torch.searchsorted(chunk_end, chunk_index, right=True)  # num_buckets past the end
    continues = torch.zeros_like(chunk_index, dtype=torch.bool)
    continues[:, 1:] = (chunk_bucket[:, 1:] == chunk_bucket[:, :-1]) & (chunk_bucket[:, 1:] < num_buckets)

    def shaped(p: Placement) -> Placement:
        return Placement(
            p.slot_of_token.reshape(*lead, t_len),
            p.token_of_slot.reshape(*lead, length),
            p.slot_filled.reshape(*lead, length),
        )

    shaped_queries = shaped(queries)
    shaped_keys = shaped_queries if key_buckets is None else shaped(keys)
    return ChunkLayout(shaped_queries, shaped_keys, continues.reshape(*lead, num_chunks), chunk_size)
