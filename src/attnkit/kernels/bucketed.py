"""Bucketed attention: sort tokens by a bucket id, cut each bucket into chunks, attend within chunks.

The shared core of the hashing and clustering family (Reformer LSH, Routing k-means,
Sinkhorn sorting). Each mechanism only decides *which bucket* every token goes to
(a hash, a nearest centroid, a block index) and, for Sinkhorn, which extra keys every
chunk sees; this module does the rest:

1. :func:`bucket_layout` places the tokens of every round in *bucket-aligned chunks*:
   the tokens of bucket ``b`` keep their original order and fill
   ``ceil(n_b / chunk_size)`` chunks of their own (the last one padded with empty slots).
   A token's slot is ``chunk_size * first_chunk_of(b) + rank`` where ``rank`` counts the
   *earlier* tokens of the same bucket, so a token's place inside its chunk depends on
   earlier tokens only. That is what makes the causal mode leak-free and bit-stable:
   changing later tokens moves later tokens, never the slots of earlier ones.
2. :func:`bucketed_attention` lets every chunk of queries attend to its own chunk of
   keys, plus the previous chunk *of the same bucket* (``look_back``), plus optional
   per-chunk extra keys, under exact masks evaluated on ORIGINAL positions: causal order,
   key padding, and an optional self-token rule (a token attends to itself only when no
   other key is visible). With several rounds (``R`` hash rounds), a key already visible
   to a query in an earlier round is masked in later rounds, so every distinct key counts
   once: this equals Reformer's ``-log(count)`` duplicate correction, and the rounds
   combined by their log-sum-exp give exactly softmax over the union of keys seen.
   Rows with no visible key output zeros.

Memory is ``O(R · T · chunk)`` for the scores (never ``T × S``); time ``O(R · T · chunk · D)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Score given to a token's own key under the self-token rule: finite, so a query whose
#: only visible key is itself puts all its weight there, and far enough below any real
#: score that ``exp(SELF_SCORE - lse)`` underflows to exactly 0 whenever another key exists.
SELF_SCORE = -1.0e4


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


def _gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """``x (B, H, T, D)`` gathered at ``index (B, H, R, L)`` -> ``(B, H, R, L, D)``."""
    b, h, r, length = index.shape
    src = x.unsqueeze(2).expand(b, h, r, x.shape[2], x.shape[3])
    return src.gather(3, index.unsqueeze(-1).expand(b, h, r, length, x.shape[3]))


def _with_look_back(x: Tensor, continues: Tensor, fill: bool | int | None = None) -> Tensor:
    """Prepend the previous chunk along the slot axis: ``(..., nc, c, *E)`` -> ``(..., nc, 2c, *E)``.

    Where ``continues`` is False (first chunk of a bucket) and ``fill`` is given, the
    previous chunk is replaced by ``fill`` (used to mask it).
    """
    prev = torch.roll(x, shifts=1, dims=continues.dim() - 1)
    if fill is not None:
        keep = continues.reshape(*continues.shape, *([1] * (x.dim() - continues.dim())))
        prev = torch.where(keep, prev, torch.as_tensor(fill, dtype=x.dtype, device=x.device))
    return torch.cat([prev, x], dim=continues.dim())


def _lookup(table: Tensor, tok: Tensor, rounds: slice) -> Tensor:
    """``table (B, H, 1, T)`` (one round's per-token values) read at the token ids ``tok[:, :, rounds]``."""
    part = tok[:, :, rounds]
    flat = part.reshape(part.shape[0], part.shape[1], 1, -1)
    return table.gather(3, flat).reshape(part.shape)


def _seen_in_earlier_rounds(layout: ChunkLayout, q_tok: Tensor, k_tok: Tensor, look_back: bool) -> Tensor:
    """True where key ``k_tok`` was already in query ``q_tok``'s window in an earlier round.

    ``q_tok (B, H, R, nc, c, 1)`` and ``k_tok (B, H, R, nc, 1, K)`` are token ids; returns a
    bool tensor broadcast to ``(B, H, R, nc, c, K)``.
    """
    c = layout.chunk_size
    rounds = layout.chunk_continues.shape[2]
    q_chunk = layout.queries.slot_of_token // c  # (B, H, R, T)
    k_chunk = layout.keys.slot_of_token // c
    seen = torch.zeros(q_tok.shape[:3] + torch.broadcast_shapes(q_tok.shape[3:], k_tok.shape[3:]), dtype=torch.bool)
    seen = seen.to(q_tok.device)
    for earlier in range(rounds - 1):
        later = slice(earlier + 1, rounds)

        q_then, k_then = q_chunk[:, :, earlier : earlier + 1], k_chunk[:, :, earlier : earlier + 1]
        gq, gk = _lookup(q_then, q_tok, later), _lookup(k_then, k_tok, later)
        hit = gk == gq
        if look_back:
            cont = layout.chunk_continues[:, :, earlier : earlier + 1].gather(3, q_then)  # per query token
            hit = hit | ((gk == gq - 1) & _lookup(cont, q_tok, later))
        seen[:, :, later] |= hit
    return seen


def _masked_softmax_attention(scores: Tensor, allowed: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax of ``scores`` over ``allowed`` keys applied to ``values``; empty rows give zeros.

    Args:
        scores: ``(..., c, K)``.
        allowed: bool, broadcastable to ``scores``.
        values: ``(..., K, Dv)``.

    Returns:
        ``out (..., c, Dv)`` and the log-sum-exp ``(..., c)`` (``-inf`` on empty rows).
    """
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.exp(scores - row_max)  # exactly 0 on masked keys
    denom = probs.sum(dim=-1, keepdim=True)
    has_key = denom > 0
    safe = torch.where(has_key, denom, torch.ones_like(denom))
    out = (probs @ values) / safe
    lse = torch.where(has_key, row_max + torch.log(safe), torch.full_like(denom, float("-inf")))
    return out, lse.squeeze(-1)


def bucketed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: ChunkLayout,
    *,
    causal: bool,
    key_padding_mask: Tensor | None,
    exclude_self: bool = False,
    look_back: bool = True,
    extra_keys: tuple[Tensor, Tensor, Tensor] | None = None,
    scale: float | None = None,
) -> Tensor:
    """Attention within bucket-aligned chunks, over ``R`` rounds, combined exactly.

    Args:
        q: ``(B, H, T, D)`` queries.
        k: ``(B, H, T, D)`` keys (self-attention: the same ``T`` tokens).
        v: ``(B, H, T, Dv)`` values.
        layout: from :func:`bucket_layout` with leading shape ``(B, H, R)``.
        causal: query ``i`` sees key ``j`` only when ``j <= i`` (original positions).
        key_padding_mask: bool ``(B, T)``, True = real key.
        exclude_self: the self-token rule: a query sees its own key only when no other
            key is visible to it (in any round).
        look_back: each chunk also sees the previous chunk of the same bucket.
        extra_keys: ``(keys (B, H, R, nc, E, D), values (B, H, R, nc, E, Dv), visible
            bool (B, H, R, nc, E))``: keys every chunk sees in addition (Sinkhorn's sorted
            block). They carry no position: the caller guarantees they respect causality.
        scale: score scale, default ``1/sqrt(D)``.

    Returns:
        ``(B, H, T, Dv)``: for every query, softmax attention over the union of the keys
        visible to it in any round; zeros where no key is visible.
    """
    b, h, t_len, d = q.shape
    rounds, c, nc = layout.chunk_continues.shape[2], layout.chunk_size, layout.num_chunks
    scale = d**-0.5 if scale is None else scale
    q_idx, k_idx = layout.queries.token_of_slot, layout.keys.token_of_slot  # (B, H, R, L)

    qs = _gather_tokens(q, q_idx).reshape(b, h, rounds, nc, c, d)
    ks = _gather_tokens(k, k_idx).reshape(b, h, rounds, nc, c, d)
    vs = _gather_tokens(v, k_idx).reshape(b, h, rounds, nc, c, v.shape[-1])
    query_tok = q_idx.reshape(b, h, rounds, nc, c)
    key_tok = k_idx.reshape(b, h, rounds, nc, c)
    key_ok = layout.keys.slot_filled.reshape(b, h, rounds, nc, c)
    if key_padding_mask is not None:
        real = key_padding_mask[:, None, None, :].expand(b, h, rounds, t_len)
        key_ok = key_ok & real.gather(3, k_idx).reshape(b, h, rounds, nc, c)
    if look_back:
        ks = _with_look_back(ks, layout.chunk_continues)
        vs = _with_look_back(vs, layout.chunk_continues)
        key_tok = _with_look_back(key_tok, layout.chunk_continues)
        key_ok = _with_look_back(key_ok, layout.chunk_continues, fill=False)

    scores = (qs @ ks.transpose(-1, -2)) * scale  # (B, H, R, nc, c, K)
    allowed = key_ok.unsqueeze(-2)  # (B, H, R, nc, 1, K)
    q_pos, k_pos = query_tok.unsqueeze(-1), key_tok.unsqueeze(-2)
    if causal:
        allowed = allowed & (k_pos <= q_pos)
    if rounds > 1:
        allowed = allowed & ~_seen_in_earlier_rounds(layout, q_pos, k_pos, look_back)
    if exclude_self:
        scores = torch.where(k_pos == q_pos, torch.full_like(scores, SELF_SCORE), scores)
    if extra_keys is not None:
        ek, ev, e_ok = extra_keys
        extra_scores = (qs @ ek.transpose(-1, -2)) * scale  # (B, H, R, nc, c, E)
        allowed = torch.cat([allowed.expand_as(scores), e_ok.unsqueeze(-2).expand_as(extra_scores)], dim=-1)
        scores = torch.cat([scores, extra_scores], dim=-1)
        vs = torch.cat([vs, ev], dim=-2)
    out, lse = _masked_softmax_attention(scores, allowed, vs)

    # Back to token order: (B, H, R, T, Dv) and (B, H, R, T).
    slots = layout.queries.slot_of_token
    out = out.reshape(b, h, rounds, nc * c, -1)
    out = out.gather(3, slots.unsqueeze(-1).expand(-1, -1, -1, -1, out.shape[-1]))
    if rounds == 1:
        return out[:, :, 0]
    lse = lse.reshape(b, h, rounds, nc * c).gather(3, slots)
    return combine_rounds(out, lse)


def combine_rounds(out: Tensor, lse: Tensor) -> Tensor:
    """Merge per-round softmax results over disjoint key sets into one softmax.

    Args:
        out: ``(B, H, R, T, Dv)`` per-round outputs (each normalised over its own keys).
        lse: ``(B, H, R, T)`` per-round log-sum-exp, ``-inf`` where a round saw no key.

    Returns:
        ``(B, H, T, Dv)``: each round weighted by its share of the total mass; zeros
        where no round saw a key.
    """
    top = lse.amax(dim=2, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weight = torch.exp(lse - top)  # 0 for empty rounds
    total = weight.sum(dim=2, keepdim=True)
    weight = weight / torch.where(total > 0, total, torch.ones_like(total))
    return (weight.unsqueeze(-1) * out).sum(dim=2)
