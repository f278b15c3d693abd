"""Bucketed attention: sort tokens by a bucket id, cut each bucket into chunks, attend within chunks.

The shared core of the hashing and clustering family (Reformer LSH, Routing k-means;
Sinkhorn uses only its chunk softmax, through :func:`mixed_chunk_attention`, whose extra
keys are a mix of every block's keys). Each mechanism only decides *which bucket* every
query and every key goes to (a hash, a nearest centroid); this module does the rest:

1. :func:`bucket_layout` places the queries and keys of every round in *bucket-aligned
   chunks*: the tokens of bucket ``b`` keep their original order and fill chunks of their
   own (as many as the larger of its query and key counts needs; the last one padded with
   empty slots), and query chunk ``m`` of a bucket faces key chunk ``m`` of that bucket.
   A token's offset inside its bucket's chunks is its ``rank``, the number of *earlier*
   tokens of the same bucket. That is what makes the causal mode leak-free and
   bit-stable: changing later tokens can shift where a bucket starts, but never which
   earlier tokens share a chunk nor their offsets inside it.
2. :func:`bucketed_attention` lets every chunk of queries attend to its key chunk, plus
   the previous key chunk *of the same bucket* (``look_back``), under exact masks evaluated on ORIGINAL positions: causal order, key
   padding, and an optional self-token rule (a token attends to itself only when no other
   key is visible). With several rounds (``R`` hash rounds), a key already visible to a
   query in an earlier round is masked in later rounds, so every distinct key counts
   once: this equals Reformer's ``-log(count)`` duplicate correction, and the rounds
   combined by their log-sum-exp give exactly softmax over the union of keys seen.
   Rows with no visible key output zeros.

The chunk attention has its own autograd: forward and backward loop over cache-sized
blocks of chunks, reading each block's queries, keys and values by row from the flat
inputs (no copy of ``q``, ``k``, ``v`` in chunk order, no scatter of their gradients
outside), writing outputs straight to token order, and the backward recomputes each
block's probabilities from the saved log-sum-exp. Chunks holding no query are skipped, and
a chunk that starts its bucket computes no look-back (it would be fully masked). Memory is
the inputs, the boolean masks and one block of scores: never ``T × S``, nor the
``R · T · 2·chunk`` probabilities. Time ``O(R · T · chunk · D)``.

Why one file of over 600 lines: it is still one module of the bucket layout, the shared chunk softmax and Sinkhorn's block mix; issue 21 splits it by purpose
(the split moves code without changing it, so it is done in one step with the benchmark re-run it asks for).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from attnkit.kernels.prefix import empty_buffer

#: Score given to a token's own key under the self-token rule: finite, so a query whose
#: only visible key is itself puts all its weight there, and far enough below any real
#: score that ``exp(SELF_SCORE - lse)`` underflows to exactly 0 whenever another key exists.
SELF_SCORE = -1.0e4

#: Score of a blocked key: finite (it is written by the product's ``beta``, where
#: ``-inf · 0`` would be NaN), and so low that every visible key, even a self pair, outranks it;
#: its weight is made exactly 0 by :func:`_exp_`.
BLOCKED_SCORE = -1.0e30

#: Inputs of ``exp`` are clamped here (see :func:`_exp_`).
EXP_FLOOR = -80.0
_EXP_ZERO = math.exp(EXP_FLOOR + 1.0)


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


def _rows(token_of_slot: Tensor, tokens_per_sequence: int) -> Tensor:
    """Flat row ids into ``x.reshape(B·H·T, D)`` for ``token_of_slot (B, H, R, L)``: ``(B·H·R·L,)``."""
    b, h = token_of_slot.shape[:2]
    base = torch.arange(b * h, device=token_of_slot.device).view(b, h, 1, 1) * tokens_per_sequence
    return (token_of_slot + base).reshape(-1)


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


def _block_seen_in_earlier_rounds(
    blocked: Tensor, layout: ChunkLayout, q_tok: Tensor, k_tok: Tensor, look_back: bool
) -> None:
    """Block (in place) every key already in the query's window in an earlier round.

    ``blocked (B, H, R, nc, c, K)``; ``q_tok (B, H, R, nc, c, 1)`` and ``k_tok (B, H, R, nc, 1, K)``
    are token ids. In round ``r'`` key ``j`` is in query ``i``'s window iff its chunk is the
    query's chunk, or the one before it when that chunk continues the same bucket.
    """
    c = layout.chunk_size
    rounds = layout.chunk_continues.shape[2]
    q_chunk = (layout.queries.slot_of_token // c).int()  # (B, H, R, T)
    k_chunk = (layout.keys.slot_of_token // c).int()
    for earlier in range(rounds - 1):
        later = slice(earlier + 1, rounds)
        q_then, k_then = q_chunk[:, :, earlier : earlier + 1], k_chunk[:, :, earlier : earlier + 1]
        gq, gk = _lookup(q_then, q_tok, later), _lookup(k_then, k_tok, later)  # (.., c, 1), (.., 1, K)
        lowest = gq
        if look_back:  # the chunk before the query's, when it continues the same bucket
            cont = layout.chunk_continues[:, :, earlier : earlier + 1].gather(3, q_then.long()).int()
            lowest = gq - _lookup(cont, q_tok, later)
        hit = (gk <= gq) & (gk >= lowest)  # compared on the broadcast: no (c x K) integer tensor
        blocked[:, :, later] |= hit


def _scores(
    q: Tensor, k: Tensor, blocked: Tensor | None, self_pair: Tensor | None, scale: float, out: Tensor | None = None
) -> Tensor:
    """Masked scores ``scale · q kᵀ`` ``(G, c, K)``: :data:`BLOCKED_SCORE` where blocked, :data:`SELF_SCORE` on self pairs."""
    # Batched products (bmm-like, not matmul: matmul of a 3-d tensor with a transposed
    # contiguous one takes a slower path on CPU, about 2x here), with the scale as alpha.
    keys = k.transpose(-1, -2)
    s = q.new_empty(q.shape[0], q.shape[1], k.shape[1]) if out is None else out
    if blocked is None:
        torch.baddbmm(s, q, keys, beta=0.0, alpha=scale, out=s)  # beta 0: s is not read
    else:
        # The mask enters the product's epilogue, s = BLOCKED_SCORE · blocked + scale · q kᵀ,
        # as fast as the plain product (a boolean masked_fill_ pass costs more than the product).
        s.copy_(blocked.view(torch.uint8).expand_as(s))
        s.baddbmm_(q, keys, beta=BLOCKED_SCORE, alpha=scale)
    if self_pair is not None:  # lerp: exactly SELF_SCORE where the weight is 1, unchanged where 0
        s.lerp_(s.new_tensor(SELF_SCORE), _weights(self_pair, s))
    return s


def _weights(mask: Tensor, like: Tensor) -> Tensor:
    """A boolean mask as 0/1 floats of ``like``'s dtype (through ``uint8``: the direct cast is slower)."""
    return mask.view(torch.uint8).to(like.dtype).expand_as(like)


def _exp_(x: Tensor) -> Tensor:
    """In-place ``exp`` of shifted scores (``<= 0``), exactly 0 for every masked score.

    ``exp`` runs 10 to 30 times slower on inputs below about -87 (its underflow and
    subnormal path) than on ordinary ones, and every masked score is far below. So the
    inputs are clamped at :data:`EXP_FLOOR` and results at or under ``exp(EXP_FLOOR + 1)``
    are set to 0: masked keys (and rows without keys, shifted by ``+inf``) get exactly 0,
    and an unmasked weight changes only where it is below ``e^-79`` of the row's largest
    (which is 1), far under float32 resolution.
    """
    x.clamp_(min=EXP_FLOOR).exp_()
    return torch.threshold_(x, _EXP_ZERO, 0.0)


#: Scores per block of groups (floats): the loops of :class:`_ChunkAttention` keep one
#: block's scores, probabilities and gradients in cache across their elementwise passes.
BLOCK_SCORES = 1 << 19

#: Floats of extra-key gradients per segment of :class:`_MixedChunkAttention`'s backward
#: (about 4 MB: whole sequences, at least one).
MIX_SEGMENT_FLOATS = 1 << 20


@dataclass(frozen=True)
class _Plan:
    """Where :class:`_ChunkAttention` reads its groups and writes their results (no gradient).

    Every ``*_rows`` is either None (the tensor is already laid out by group: ``(G, n, E)``)
    or long ``(G, n)``: the rows of a flat ``(N, E)`` tensor that group ``g`` reads (or, for
    ``out_rows``, writes). Reading by rows inside the loops gathers one block at a time in
    cache, instead of copying all of ``q``, ``k`` and ``v`` into group order (and scattering
    their gradients back) outside.

    Attributes:
        q_rows: queries ``(G, c)``.
        key_rows: own keys and values ``(G, K)``.
        extra_rows: extra keys and values ``(G_e, E)``, read from ``k``, ``v`` (no separate
            extra tensors) when given.
        out_rows: output and log-sum-exp ``(G, c)``; every row is written at most once,
            except a last dummy row that takes empty slots.
        out_len: rows of the output buffer (with ``out_rows``).
        blocked: bool ``(G, c or 1, K)`` or None; True hides the key.
        self_pair: bool ``(G, c, K)`` or None: scores set to :data:`SELF_SCORE` (constant).
        extra_blocked: as ``blocked``, ``(G_e, c or 1, E)``.
        extra_self: as ``self_pair``, ``(G_e, c, E)``.
        keep_probs: hold the probabilities from the forward to the backward (``G · c · K``
            more floats, one product and the exponentials fewer in the backward) instead
            of recomputing them from the log-sum-exp.
    """

    q_rows: Tensor | None = None
    key_rows: Tensor | None = None
    extra_rows: Tensor | None = None
    out_rows: Tensor | None = None
    out_len: int = 0
    blocked: Tensor | None = None
    self_pair: Tensor | None = None
    extra_blocked: Tensor | None = None
    extra_self: Tensor | None = None
    keep_probs: bool = False


def _take(src: Tensor, rows: Tensor | None, g0: int, g1: int) -> Tensor:
    """Groups ``g0:g1`` of ``src``: a view when ``src`` is by group, else gathered rows ``(g, n, E)``."""
    if rows is None:
        return src[g0:g1]
    part = rows[g0:g1]
    return src.index_select(0, part.reshape(-1)).view(part.shape[0], part.shape[1], src.shape[-1])


def _emit(dst: Tensor, rows: Tensor | None, g0: int, g1: int, a: Tensor, b: Tensor, alpha: float = 1.0) -> None:
    """Write ``alpha · a @ b`` (``(g, n, E)``) to groups ``g0:g1`` of ``dst``, or add ``a @ b`` to its rows.

    By group, each group's slice is written once (no zero fill); by rows, ``dst`` starts
    at zero and rows met several times (rounds, look-backs) accumulate.
    """
    if rows is None:  # (with extra keys read by rows, own keys are read by rows too)
        target = dst[g0:g1]
        torch.baddbmm(target, a, b, beta=0.0, alpha=alpha, out=target)  # beta 0: target is not read
    else:
        assert alpha == 1.0
        dst.index_add_(0, rows[g0:g1].reshape(-1), torch.bmm(a, b).view(-1, dst.shape[-1]))


@dataclass(frozen=True)
class _Part:
    """One set of keys of a block of groups: ``k (g, K, D)``, ``v (g, K, Dv)``, their masks and rows."""

    k: Tensor
    v: Tensor
    blocked: Tensor | None
    self_pair: Tensor | None
    rows: Tensor | None
    extra: bool


def _block_parts(plan: _Plan, keys: tuple[Tensor | None, ...], g0: int, g1: int) -> list[_Part]:
    """The key parts of groups ``g0:g1``: own keys, and the extra keys when these groups have them.

    ``keys`` is ``(k, v, k_extra, v_extra)`` (the extra pair may be None: then the extra
    part reads ``k`` and ``v`` at ``plan.extra_rows``).
    """
    k, v, k_extra, v_extra = keys
    assert k is not None and v is not None

    def part(k_src: Tensor, v_src: Tensor, rows: Tensor | None, masks: tuple[Tensor | None, ...], extra: bool) -> _Part:
        blocked, self_pair = (_rows_of(mask, g0, g1) for mask in masks)
        return _Part(_take(k_src, rows, g0, g1), _take(v_src, rows, g0, g1), blocked, self_pair, rows, extra)

    parts = [part(k, v, plan.key_rows, (plan.blocked, plan.self_pair), False)]
    if g0 < _extra_groups(plan, keys):
        separate = k_extra is not None and v_extra is not None
        k_src, v_src = (k_extra, v_extra) if separate else (k, v)
        assert k_src is not None and v_src is not None
        parts.append(part(k_src, v_src, plan.extra_rows, (plan.extra_blocked, plan.extra_self), separate))
    return parts


def _extra_groups(plan: _Plan, keys: tuple[Tensor | None, ...]) -> int:
    """How many leading groups have extra keys."""
    if plan.extra_rows is not None:
        return plan.extra_rows.shape[0]
    return 0 if keys[2] is None else keys[2].shape[0]


def _rows_of(x: Tensor | None, g0: int, g1: int) -> Tensor | None:
    return None if x is None else x[g0:g1]


def _chunk_forward(
    plan: _Plan, scale: float, keys: tuple[Tensor | None, ...], q: Tensor
) -> tuple[Tensor, Tensor, tuple[Tensor | None, ...]]:
    """The forward loop of :class:`_ChunkAttention`: ``out``, ``lse`` (both with a trailing
    row axis as laid out by the plan) and the kept probabilities (Nones unless ``plan.keep_probs``).

    ``keys`` is ``(k, v, k_extra, v_extra)`` (see :func:`_block_parts`).
    """
    groups, rows = _group_shape(plan, q)
    assert keys[1] is not None
    d_v = keys[1].shape[-1]
    by_rows = plan.out_rows is not None
    # Every row of a by-rows output is written: each token's slot is in a computed chunk,
    # and the dummy row is read only where an empty slot wrote it.
    out = q.new_empty(plan.out_len, d_v) if by_rows else empty_buffer(q, (groups, rows, d_v))
    lse = q.new_empty(plan.out_len, 1) if by_rows else q.new_empty(groups, rows, 1)
    kept = _kept_probs(plan, keys, groups, rows) if plan.keep_probs else (None, None)
    for g0, g1 in _blocks(plan, keys, groups, rows):
        parts = _block_parts(plan, keys, g0, g1)
        q_block = _take(q, plan.q_rows, g0, g1)
        probs = [
            _scores(q_block, part.k, part.blocked, part.self_pair, scale, _rows_of(buffer, g0, g1))
            for part, buffer in zip(parts, kept)
        ]
        row_max = probs[0].amax(dim=-1, keepdim=True)
        for extra in probs[1:]:
            row_max = torch.maximum(row_max, extra.amax(dim=-1, keepdim=True))
        row_max.masked_fill_(row_max <= BLOCKED_SCORE / 2, 0.0)  # a row with every key blocked
        denom = torch.zeros_like(row_max)
        for p in probs:
            denom += _exp_(p.sub_(row_max)).sum(dim=-1, keepdim=True)  # exactly 0 on blocked keys
        has_key = denom > 0
        safe = torch.where(has_key, denom, torch.ones_like(denom))
        # Normalised before the product whether or not they are kept, so that the output is
        # bitwise the same with and without a backward to come (rows without a key stay 0).
        for p in probs:
            p.div_(safe)
        block_out = torch.bmm(probs[0], parts[0].v, out=None if by_rows else out[g0:g1])
        for p, part in zip(probs[1:], parts[1:]):
            block_out.baddbmm_(p, part.v)
        block_lse = torch.where(has_key, row_max + torch.log(safe), float("-inf"))
        if by_rows:
            assert plan.out_rows is not None
            where = plan.out_rows[g0:g1].reshape(-1)
            out.index_copy_(0, where, block_out.view(-1, d_v))
            lse.index_copy_(0, where, block_lse.view(-1, 1))
        else:
            lse[g0:g1] = block_lse  # (the output was written in place)
    return out, lse, kept


def _chunk_backward(
    plan: _Plan,
    scale: float,
    keys: tuple[Tensor | None, ...],
    q: Tensor,
    lse: Tensor,
    kept: tuple[Tensor | None, ...],
    d_out: Tensor,
    d_lse: Tensor | None,
    into: tuple[Tensor, ...] | None = None,
) -> tuple[Tensor | None, ...]:
    """The backward loop of :class:`_ChunkAttention`: gradients of ``(q, k, v, k_extra, v_extra)``.

    ``into``: buffers laid out by group to write them to (plans without rows only; by
    default new tensors).
    """
    groups, rows = _group_shape(plan, q)
    d_out = d_out.contiguous()
    # Gradients by group are written once per group; those by rows accumulate (see _emit).
    k_by_rows = plan.key_rows is not None or plan.extra_rows is not None
    key_grads: list[Tensor | None]
    if into is not None:
        d_q_all, key_grads = into[0], list(into[1:])
    else:
        d_q_all = torch.empty_like(q) if plan.q_rows is None else torch.zeros_like(q)
        key_grads = [
            None if x is None else torch.zeros_like(x) if by_rows else torch.empty_like(x)
            for x, by_rows in zip(keys, (k_by_rows, k_by_rows, False, False))
        ]
    grads = dict(zip(("k", "v", "k_extra", "v_extra"), key_grads))
    alpha = 1.0 if plan.q_rows is not None or k_by_rows else scale
    # exp(s - lse) recomputes P; +inf on rows without a key makes theirs exactly 0.
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))
    if d_lse is not None:
        d_lse = d_lse.unsqueeze(-1)
    for g0, g1 in _blocks(plan, keys, groups, rows):
        parts = _block_parts(plan, keys, g0, g1)
        q_block = _take(q, plan.q_rows, g0, g1)
        d_o = _take(d_out, plan.out_rows, g0, g1)
        block_lse = _take(lse, plan.out_rows, g0, g1)
        if plan.keep_probs:
            probs = [buffer[g0:g1] for buffer, _ in zip(kept, parts) if buffer is not None]
        else:
            probs = [
                _exp_(_scores(q_block, part.k, part.blocked, part.self_pair, scale).sub_(block_lse)) for part in parts
            ]
        d_scores = [torch.bmm(d_o, part.v.transpose(-1, -2)) for part in parts]  # dP
        delta = _row_dot(probs[0], d_scores[0])  # = rowsum(dO ∘ out), without saving out
        for p, d_s in zip(probs[1:], d_scores[1:]):
            delta.add_(_row_dot(p, d_s))
        if d_lse is not None:
            delta.sub_(_take(d_lse, plan.out_rows, g0, g1))
        # d(scale · q kᵀ): by group, the scale enters the products writing the gradients (their
        # alpha); by rows, one pass at the end (index_add_ with an alpha is slower here).
        d_q = None
        for p, d_s, part in zip(probs, d_scores, parts):
            d_s.sub_(delta).mul_(p)
            if part.self_pair is not None:  # the self score is a constant: no gradient
                d_s.lerp_(d_s.new_tensor(0.0), _weights(part.self_pair, d_s))
            if d_q is not None:
                d_q.baddbmm_(d_s, part.k, alpha=alpha)
            elif plan.q_rows is None:
                d_q = torch.baddbmm(d_q_all[g0:g1], d_s, part.k, beta=0.0, alpha=alpha, out=d_q_all[g0:g1])
            else:
                d_q = torch.bmm(d_s, part.k)
            k_grad, v_grad = (grads["k_extra"], grads["v_extra"]) if part.extra else (grads["k"], grads["v"])
            assert k_grad is not None and v_grad is not None
            _emit(k_grad, part.rows, g0, g1, d_s.transpose(-1, -2), q_block, alpha=alpha)
            _emit(v_grad, part.rows, g0, g1, p.transpose(-1, -2), d_o)
        if plan.q_rows is not None:
            assert d_q is not None
            d_q_all.index_add_(0, plan.q_rows[g0:g1].reshape(-1), d_q.view(-1, q.shape[-1]))
    if alpha == 1.0:
        for grad in (d_q_all, grads["k"], grads["k_extra"]):
            if grad is not None:
                grad.mul_(scale)
    return d_q_all, grads["k"], grads["v"], grads["k_extra"], grads["v_extra"]


class _ChunkAttention(torch.autograd.Function):
    """Softmax attention per group of ``c`` queries over its unblocked keys; returns the output and log-sum-exp.

    Each group has ``K`` own keys and, for the first ``G_e`` groups, ``E`` extra keys in the
    same softmax (one score tensor per part: callers never concatenate keys, and groups
    without extra keys compute none). Queries, keys and outputs are read and written by
    group, or by rows of flat tensors (see :class:`_Plan`).

    Both passes loop over blocks of groups (about :data:`BLOCK_SCORES` scores each), so the
    elementwise passes over scores run in cache, and nothing of size ``G · c · K`` is saved:
    the backward recomputes each block's probabilities from the saved inputs, masks and
    log-sum-exp (one more ``q kᵀ`` product, instead of holding ``P`` from the forward to the
    backward; the peak is then the inputs plus one block).
    """

    @staticmethod
    def forward(
        ctx: Any,
        plan: _Plan,
        scale: float,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        k_extra: Tensor | None = None,
        v_extra: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        out, lse, kept = _chunk_forward(plan, scale, (k, v, k_extra, v_extra), q)
        ctx.save_for_backward(q, k, v, k_extra, v_extra, lse, *kept)
        ctx.plan, ctx.scale = plan, scale
        return out, lse.squeeze(-1)

    @staticmethod
    def backward(ctx: Any, d_out: Tensor, d_lse: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, k_extra, v_extra, lse, *kept = ctx.saved_tensors
        grads = _chunk_backward(ctx.plan, ctx.scale, (k, v, k_extra, v_extra), q, lse, tuple(kept), d_out, d_lse)
        return None, None, *grads


def _weighted(x: Tensor, blocks: int, weight: Tensor | None) -> Tensor:
    """``x (*N, L, E)`` as blocks ``(*N, blocks, c, E)``, times ``weight (*N, blocks, c)`` when given."""
    by_block = x.reshape(*x.shape[:-2], blocks, -1, x.shape[-1])
    return by_block if weight is None else by_block * weight.unsqueeze(-1)


def _by_group(x: Tensor, groups: int) -> Tensor:
    """``(*N, L, E)`` -> ``(G, L·N / G, E)`` (a view of contiguous tensors)."""
    return x.reshape(groups, -1, x.shape[-1])


def _add_per_block(grad: Tensor, per_block: Tensor, weight: Tensor | None) -> None:
    """``grad (*N, L, E)`` += ``per_block (*N, nb, E)`` on every token of its block (times ``weight``)."""
    by_block = grad.view(*per_block.shape[:-1], -1, grad.shape[-1])
    if weight is None:
        by_block.add_(per_block.unsqueeze(-2))
    else:
        by_block.addcmul_(per_block.unsqueeze(-2), weight.unsqueeze(-1))


class _MixedChunkAttention(torch.autograd.Function):
    """The autograd of :func:`mixed_chunk_attention`.

    The backward writes each gradient of ``q``, ``k`` and ``v`` into one buffer of the
    input's shape: the chunk loop writes the own-key part; the mix's part and the block
    sums' part are added in place (no second ``(*N, L, D)`` gradient for autograd to add,
    and no reshape between the buffer and the input, which would make autograd copy it).
    The mix's own graph (from the block sums, ``(*N, nb, D)``, as leaves) is built in the
    forward and kept to the backward: ``sort`` should save little (``O(nb²)``).
    """

    @staticmethod
    def forward(
        ctx: Any,
        plan: _Plan,
        scale: float,
        sort: Callable[[Tensor, Tensor], Tensor],
        blocks: int,
        hide_empty_slots: bool,
        one_per_row: bool,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_weight: Tensor | None,
    ) -> Tensor:
        k_src, v_src = (_weighted(x, blocks, key_weight) for x in (k, v))  # (*N, nb, c, E)
        # The sort's own (small) graph, from the block sums as leaves, is kept for the backward.
        sums = (_weighted(q, blocks, None).sum(dim=-2), k_src.sum(dim=-2))
        with torch.set_grad_enabled(plan.keep_probs):  # (kept only when a backward will come)
            sorted_by = sort(*(x.requires_grad_(plan.keep_probs) for x in sums))  # (*N, nb, nb)
        mix = sorted_by.detach()
        mix_flat = mix.reshape(-1, blocks, blocks)
        groups, rows = mix_flat.shape[0] * blocks, k_src.shape[-2]
        # (N, nb, nb) @ (N, nb, c·E): the extra keys and values, already in (G, c, E) order. Large
        # per-step buffers here and below are empty_buffer's: fresh pages fault far less often
        # (side by side, 4K fwd+bwd CPU time 178 -> 165 ms, 16K 1358 -> 1287 ms).
        if one_per_row:  # one weighted block per row: a gather, no product
            chosen_weight, chosen = _one_per_row(mix_flat)
            k_extra, v_extra = (
                _gather_blocks(x.reshape(-1, blocks, rows * x.shape[-1]), chosen, chosen_weight).view(
                    groups, rows, x.shape[-1]
                )
                for x in (k_src, v_src)
            )
        else:
            k_extra, v_extra = (
                torch.bmm(
                    mix_flat,
                    x.reshape(mix_flat.shape[0], blocks, -1),
                    out=empty_buffer(x, (mix_flat.shape[0], blocks, rows * x.shape[-1])),
                ).view(groups, rows, x.shape[-1])
                for x in (k_src, v_src)
            )
        if hide_empty_slots:  # a slot whose mix holds no real key
            mass = mix.sum(dim=-1, keepdim=True) if key_weight is None else mix @ key_weight
            plan = replace(plan, extra_blocked=(mass <= 0).reshape(groups, 1, -1).expand(groups, rows, rows))
        keys = (_by_group(k, groups), _by_group(v, groups), k_extra, v_extra)
        unmasked = all(x is None for x in (plan.blocked, plan.extra_blocked, plan.self_pair, plan.extra_self))
        kept: tuple[Tensor | None, ...]
        lse: Tensor | None
        if unmasked:  # one fused softmax over both key sets per group, probabilities kept
            out, probs = _unmasked_forward(scale, _by_group(q, groups), keys, keep=plan.keep_probs)
            lse, kept = None, (probs, None)
        else:
            out, lse, kept = _chunk_forward(plan, scale, keys, _by_group(q, groups))
        ctx.save_for_backward(q, k, v, key_weight, mix, k_extra, v_extra, lse, *kept)
        ctx.plan, ctx.scale, ctx.sort_graph, ctx.one_per_row = plan, scale, (sorted_by, sums), one_per_row
        ctx.unmasked = unmasked
        return out.view(*q.shape[:-1], v.shape[-1])

    @staticmethod
    def backward(ctx: Any, d_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, key_weight, mix, k_extra, v_extra, lse, *kept = ctx.saved_tensors
        blocks = mix.shape[-1]
        mix_flat = mix.reshape(-1, blocks, blocks)
        sequences = mix_flat.shape[0]
        groups = sequences * blocks
        d_q, d_k, d_v = (empty_buffer(x, x.shape) for x in (q, k, v))
        d_out = d_out.contiguous()  # (a loss like out.sum() sends a stride-0 gradient: bmm would copy per matrix)
        q_g, k_g, v_g, d_out_g, d_q_g, d_k_g, d_v_g = (_by_group(x, groups) for x in (q, k, v, d_out, d_q, d_k, d_v))
        # Mix sources and gradients by sequence and block: (N, nb, c, E).
        weight = None
        if key_weight is not None:
            weight = key_weight.expand(*k.shape[:-2], blocks, -1).reshape(sequences, blocks, -1, 1)
        sources = [x.reshape(sequences, blocks, -1, x.shape[-1]) for x in (k, v)]
        if weight is not None:
            sources = [x * weight for x in sources]
        grads = [x.view(sequences, blocks, -1, x.shape[-1]) for x in (d_k, d_v)]
        d_mix = torch.zeros_like(mix_flat)
        chosen_weight, chosen = _one_per_row(mix_flat) if ctx.one_per_row else (None, None)
        d_chosen_weight = torch.zeros_like(chosen_weight) if chosen_weight is not None else None
        # A few sequences at a time: their extra keys' gradients go back through the mix while
        # they are in cache, and no (*N, L, E) buffer of them is ever allocated.
        step = max(1, MIX_SEGMENT_FLOATS // k_extra[:blocks].numel())
        scratch = [x.new_empty(min(sequences, step) * blocks, *x.shape[1:]) for x in (k_extra, v_extra)]
        if chosen is not None:  # the chosen source blocks, gathered again per segment
            scratch = [*scratch, *(torch.empty_like(x) for x in scratch)]
        for n0 in range(0, sequences, step):
            n1 = min(sequences, n0 + step)
            g0, g1 = n0 * blocks, n1 * blocks
            d_extras = [x[: g1 - g0] for x in scratch[:2]]
            if ctx.unmasked:
                assert kept[0] is not None
                _unmasked_backward(
                    ctx.scale,
                    q_g[g0:g1],
                    (k_g[g0:g1], v_g[g0:g1], k_extra[g0:g1], v_extra[g0:g1]),
                    kept[0][g0:g1],
                    d_out_g[g0:g1],
                    (d_q_g[g0:g1], d_k_g[g0:g1], d_v_g[g0:g1], *d_extras),
                )
            else:
                assert lse is not None
                _chunk_backward(
                    replace(
                        ctx.plan,
                        blocked=_rows_of(ctx.plan.blocked, g0, g1),
                        extra_blocked=_rows_of(ctx.plan.extra_blocked, g0, g1),
                    ),
                    ctx.scale,
                    (k_g[g0:g1], v_g[g0:g1], k_extra[g0:g1], v_extra[g0:g1]),
                    q_g[g0:g1],
                    lse[g0:g1],
                    tuple(_rows_of(x, g0, g1) for x in kept),
                    d_out_g[g0:g1],
                    None,
                    into=(d_q_g[g0:g1], d_k_g[g0:g1], d_v_g[g0:g1], *d_extras),
                )
            if chosen is not None and chosen_weight is not None and d_chosen_weight is not None:
                # Through the gather: extra_i = a_i · src_j (j = chosen_i, a_i its weight), so
                # da_i = <dExtra_i, src_j> and d_src_j += a_i · dExtra_i (times the key weight).
                rows_of = _flat_rows(chosen[n0:n1], blocks)
                for src, grad, d_extra, picked in zip(sources, grads, d_extras, scratch[2:]):
                    d_flat = d_extra.view(n1 - n0, blocks, -1)
                    src_flat = src[n0:n1].reshape(-1, d_flat.shape[-1])
                    torch.index_select(src_flat, 0, rows_of, out=picked[: g1 - g0].view(src_flat.shape))
                    d_chosen_weight[n0:n1] += _row_dot(d_flat, picked[: g1 - g0].view(d_flat.shape)).squeeze(-1)
                    spread = d_flat.mul_(chosen_weight[n0:n1, :, None])  # the scratch is spent: scaled in place
                    if weight is not None:
                        key_weight_of = weight[n0:n1].reshape(-1, weight.shape[-2])[rows_of]  # (n·nb, c)
                        spread.view(-1, key_weight_of.shape[-1], grad.shape[-1]).mul_(key_weight_of[..., None])
                    grad[n0:n1].view(rows_of.shape[0], -1).index_add_(0, rows_of, spread.view(rows_of.shape[0], -1))
                continue
            # Through the mix: d_mix += dExtra · Srcᵀ and d_src += mixᵀ · dExtra, per (n, nb, c·E).
            mix_t = mix_flat[n0:n1].transpose(1, 2)
            for src, grad, d_extra in zip(sources, grads, d_extras):
                d_flat = d_extra.view(n1 - n0, blocks, -1)
                d_mix[n0:n1].baddbmm_(d_flat, src[n0:n1].reshape(d_flat.shape).transpose(1, 2))
                if weight is None:
                    grad[n0:n1].view(d_flat.shape).baddbmm_(mix_t, d_flat)
                else:
                    grad[n0:n1].addcmul_(torch.bmm(mix_t, d_flat).view(grad[n0:n1].shape), weight[n0:n1])
        del scratch, d_extras
        if chosen is not None and d_chosen_weight is not None:
            d_mix.scatter_(-1, chosen[..., None], d_chosen_weight[..., None])
        # Through the sort (its graph kept for a second backward, as autograd keeps ours on retain_graph).
        sorted_by, sums = ctx.sort_graph
        d_sums = torch.autograd.grad(sorted_by, sums, d_mix.view(mix.shape), retain_graph=True, allow_unused=True)
        if d_sums[0] is not None:
            _add_per_block(d_q, d_sums[0], None)
        if d_sums[1] is not None:
            _add_per_block(d_k, d_sums[1], key_weight)
        return None, None, None, None, None, None, d_q, d_k, d_v, None


def _side_by_side(own: Tensor, extra: Tensor, out: Tensor) -> Tensor:
    """``(g, c, E)`` own and extra keys (or values) copied into ``out (g, 2c, E)``, own first.

    Every product then takes whole contiguous operands: halves of a score tensor as
    operands sent ``bmm`` down a per-matrix path with a copy each (measured: 4,600 clones
    per step at 4K)."""
    rows = own.shape[1]
    out[:, :rows].copy_(own)
    out[:, rows:].copy_(extra)
    return out


def _unmasked_forward(
    scale: float, q: Tensor, keys: tuple[Tensor, Tensor, Tensor, Tensor], *, keep: bool
) -> tuple[Tensor, Tensor | None]:
    """Softmax attention of every group over its own and its extra keys, nothing masked.

    ``q (G, c, D)``; ``keys = (k, v, k_extra, v_extra)``, each ``(G, c, ·)``. Per block of
    groups both key sets (and both value sets) are copied side by side into a scratch
    ``(g, 2c, ·)`` (in cache), so the scores and the output are one product each and the
    softmax one fused pass over rows of ``2c`` (instead of a shared maximum, exponentials
    and sums over two score tensors). Returns ``out (G, c, Dv)`` and, with ``keep``, the
    probabilities ``(G, c, 2c)`` (own keys first).
    """
    k, v, k_extra, v_extra = keys
    groups, rows, _ = q.shape
    width = 2 * k.shape[1]
    out = empty_buffer(q, (groups, rows, v.shape[-1]))
    blocks = _group_ranges(0, groups, rows * width)
    step = blocks[0][1] - blocks[0][0]
    probs = empty_buffer(q, (groups, rows, width)) if keep else None
    scratch = None if keep else q.new_empty(step, rows, width)
    kc_all, vc_all = q.new_empty(step, width, k.shape[-1]), q.new_empty(step, width, v.shape[-1])
    for g0, g1 in blocks:
        n = g1 - g0
        kc = _side_by_side(k[g0:g1], k_extra[g0:g1], kc_all[:n])
        if probs is not None:
            p = probs[g0:g1]
        else:
            assert scratch is not None
            p = scratch[:n]
        torch.baddbmm(p, q[g0:g1], kc.transpose(1, 2), beta=0.0, alpha=scale, out=p)
        torch.softmax(p, dim=-1, out=p)
        torch.bmm(p, _side_by_side(v[g0:g1], v_extra[g0:g1], vc_all[:n]), out=out[g0:g1])
    return out, probs


def _unmasked_backward(
    scale: float,
    q: Tensor,
    keys: tuple[Tensor, Tensor, Tensor, Tensor],
    probs: Tensor,
    d_out: Tensor,
    into: tuple[Tensor, ...],
) -> None:
    """The backward of :func:`_unmasked_forward`: gradients of ``(q, k, v, k_extra, v_extra)`` written into ``into``.

    ``dP = dO [v; v_extra]ᵀ``, the fused softmax backward in place, ``dQ = dS [k; k_extra]``,
    and the key (value) gradients as one ``(g, 2c, ·)`` product each, split into their buffers.
    """
    k, v, k_extra, v_extra = keys
    d_q, d_k, d_v, d_k_extra, d_v_extra = into
    groups, rows, _ = q.shape
    own, width = k.shape[1], 2 * k.shape[1]
    blocks = _group_ranges(0, groups, rows * width)
    step = blocks[0][1] - blocks[0][0]
    d_scores = q.new_empty(step, rows, width)
    kc_all, vc_all = q.new_empty(step, width, k.shape[-1]), q.new_empty(step, width, v.shape[-1])
    for g0, g1 in blocks:
        n = g1 - g0
        p, d_o = probs[g0:g1], d_out[g0:g1]
        vc = _side_by_side(v[g0:g1], v_extra[g0:g1], vc_all[:n])
        d_s = torch.bmm(d_o, vc.transpose(1, 2), out=d_scores[:n])
        torch.ops.aten._softmax_backward_data.out(d_s, p, -1, p.dtype, grad_input=d_s)
        kc = _side_by_side(k[g0:g1], k_extra[g0:g1], kc_all[:n])
        torch.baddbmm(d_q[g0:g1], d_s, kc, beta=0.0, alpha=scale, out=d_q[g0:g1])
        # the same scratches again, now for the gradients of both key (value) sets
        torch.baddbmm(kc, d_s.transpose(1, 2), q[g0:g1], beta=0.0, alpha=scale, out=kc)
        d_k[g0:g1].copy_(kc[:, :own])
        d_k_extra[g0:g1].copy_(kc[:, own:])
        torch.bmm(p.transpose(1, 2), d_o, out=vc)
        d_v[g0:g1].copy_(vc[:, :own])
        d_v_extra[g0:g1].copy_(vc[:, own:])


def _one_per_row(mix: Tensor) -> tuple[Tensor, Tensor]:
    """``(weight, index)``, each ``(N, nb)``: the one nonzero entry of each row of ``mix (N, nb, nb)`` and its column.

    A row of zeros gives weight 0 (at some column): its gathered block is then zeros, as the
    dense mix would give. A row with two nonzero entries is a caller's error (the gather
    would drop one), raised rather than computed wrongly.
    """
    if bool(((mix != 0).sum(dim=-1) > 1).any()):
        raise ValueError("one_per_row=True needs a sort matrix with at most one nonzero entry per row")
    weight, index = mix.max(dim=-1)
    return weight, index


def _flat_rows(index: Tensor, blocks: int) -> Tensor:
    """``(N·nb,)`` rows of a ``(N·nb, X)`` view for the column ``index (N, nb)`` of each sequence's row."""
    return (index + blocks * torch.arange(index.shape[0], device=index.device)[:, None]).view(-1)


def _gather_blocks(src: Tensor, index: Tensor, weight: Tensor | None) -> Tensor:
    """Row ``index[n, i]`` of ``src (N, nb, X)`` for every ``(n, i)``, times ``weight (N, nb)``: ``(N, nb, X)``."""
    n, blocks, width = src.shape
    out = empty_buffer(src, (n * blocks, width))
    torch.index_select(src.reshape(n * blocks, width), 0, _flat_rows(index, blocks), out=out)
    if weight is not None:
        out.mul_(weight.reshape(-1, 1))
    return out.view(n, blocks, width)


def _widths(plan: _Plan, keys: tuple[Tensor | None, ...]) -> tuple[int, int]:
    """Keys per group: own ``K`` and extra ``E`` (0 without extra keys)."""
    k, _, k_extra, _ = keys
    assert k is not None
    own = k.shape[1] if plan.key_rows is None else plan.key_rows.shape[1]
    extra = plan.extra_rows.shape[1] if plan.extra_rows is not None else 0 if k_extra is None else k_extra.shape[1]
    return own, extra


def _kept_probs(plan: _Plan, keys: tuple[Tensor | None, ...], groups: int, rows: int) -> tuple[Tensor | None, ...]:
    """Buffers for the probabilities of the own keys ``(G, c, K)`` and the extra keys ``(G_e, c, E)``."""
    own, extra = _widths(plan, keys)
    with_extra = _extra_groups(plan, keys)
    q_like = keys[0]
    assert q_like is not None
    return (
        empty_buffer(q_like, (groups, rows, own)),
        empty_buffer(q_like, (with_extra, rows, extra)) if with_extra else None,
    )


def _group_shape(plan: _Plan, q: Tensor) -> tuple[int, int]:
    """``(G, c)``: groups and queries per group."""
    return (q.shape[0], q.shape[1]) if plan.q_rows is None else (plan.q_rows.shape[0], plan.q_rows.shape[1])


def _blocks(plan: _Plan, keys: tuple[Tensor | None, ...], groups: int, rows: int) -> list[tuple[int, int]]:
    """Ranges ``(g0, g1)`` of groups holding about :data:`BLOCK_SCORES` scores each.

    No range straddles the end of the groups that have extra keys, so every group of a
    block has the same parts.
    """
    own, extra = _widths(plan, keys)
    with_extra = _extra_groups(plan, keys)
    spans = [(0, groups, own)]
    if with_extra:
        spans = [(0, with_extra, own + extra), (with_extra, groups, own)]
    ranges = []
    for start, stop, width in spans:
        ranges += _group_ranges(start, stop, rows * width)
    return ranges


def _group_ranges(start: int, stop: int, scores_per_group: int) -> list[tuple[int, int]]:
    """Ranges of groups ``start:stop`` holding about :data:`BLOCK_SCORES` scores each."""
    step = max(1, BLOCK_SCORES // scores_per_group)
    return [(g0, min(stop, g0 + step)) for g0 in range(start, stop, step)]


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a ∘ b).sum(-1, keepdim=True)`` for contiguous ``(G, c, K)`` tensors.

    As one batch of ``1 × K`` by ``K × 1`` products: no ``(G, c, K)`` temporary next to
    ``P`` and ``dP`` (and, measured, faster than the elementwise product and sum).
    """
    groups, rows, keys = a.shape
    return torch.bmm(a.view(-1, 1, keys), b.view(-1, keys, 1)).view(groups, rows, 1)


def chunk_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    blocked: Tensor | None,
    *,
    scale: float,
    extra: tuple[Tensor, Tensor, Tensor | None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Softmax attention of every group of queries over its own keys (memory-lean autograd).

    Args:
        q: ``(G, c, D)`` queries.
        k: ``(G, K, D)`` keys.
        v: ``(G, K, Dv)`` values.
        blocked: bool, broadcastable to ``(G, c, K)``: True hides the key from the query;
            ``None`` when every key is visible.
        scale: score scale.
        extra: optional more keys ``(G_e, E, D)``, values ``(G_e, E, Dv)`` and their ``blocked``
            (broadcastable to ``(G_e, c, E)`` or ``None``) for the first ``G_e <= G`` groups,
            in the same softmax: the same result as concatenating them after ``k`` and ``v``,
            without the copy.

    Returns:
        ``out (G, c, Dv)`` (zeros for a query with no visible key) and ``lse (G, c)``
        (``-inf`` there).
    """
    if blocked is not None:
        blocked = blocked.expand(q.shape[0], q.shape[1], k.shape[1])
    if extra is None:
        out, lse = _ChunkAttention.apply(_Plan(blocked=blocked), scale, q, k, v)
        return out, lse
    k_extra, v_extra, extra_blocked = extra
    if extra_blocked is not None:
        extra_blocked = extra_blocked.expand(k_extra.shape[0], q.shape[1], k_extra.shape[1])
    plan = _Plan(blocked=blocked, extra_blocked=extra_blocked)
    out, lse = _ChunkAttention.apply(plan, scale, q, k, v, k_extra, v_extra)
    return out, lse


def mixed_chunk_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sort: Callable[[Tensor, Tensor], Tensor],
    blocked: Tensor | None,
    *,
    blocks: int,
    scale: float,
    key_weight: Tensor | None = None,
    hide_empty_slots: bool = False,
    one_per_row: bool = False,
) -> Tensor:
    """Block attention over each block's own keys plus a mix of every block's keys (Sinkhorn's sorted block).

    The sequence axis is cut into ``blocks`` (``nb``) blocks of ``c = L / nb`` tokens. The
    mix ``M = sort(q_sum, k_sum) (*N, nb, nb)`` is computed from the block sums of the
    queries and of the (weighted) keys, ``(*N, nb, D)`` each. The queries of block ``i``
    attend, in one softmax, to the ``c`` keys of block ``i`` and to ``c`` extra keys: slot
    ``s`` holds ``Σ_j M[..., i, j] · w_js · k_js`` (values likewise), ``w = key_weight``.
    The same result as :func:`chunk_attention` with those extra keys and values, with its
    own autograd (see :class:`_MixedChunkAttention`).

    Args:
        q: ``(*N, L, D)`` queries.
        k: ``(*N, L, D)`` keys.
        v: ``(*N, L, Dv)`` values.
        sort: ``(q_sum, k_sum) -> M``, differentiable, holding no tensor that needs a
            gradient of its own (only the sums get one).
        blocked: bool, broadcastable to ``(G, c, c)`` with ``G = N · nb`` groups in
            ``(*N, nb)`` order: True hides own key ``t`` from query ``s``; None: all visible.
        blocks: ``nb``; ``L`` must be a multiple.
        scale: score scale.
        key_weight: ``(*N, nb, c)`` (broadcastable) factor of every key and value in the
            mix and in ``k_sum``, without gradient (0 on padded keys); None: 1.
        hide_empty_slots: hide an extra slot whose mix weights no real key (a zero row of
            ``M``, or only padded keys).
        one_per_row: ``sort`` returns at most one nonzero entry per row of ``M`` (a hard
            sort): the extra keys are then a gather of one block, scaled by that entry,
            instead of the ``(nb × nb) @ (nb × c·E)`` products (same result, and the
            gradient reaches the entry).

    Returns:
        ``(*N, L, Dv)``; zeros for a query with no visible key.
    """
    c = q.shape[-2] // blocks
    groups = q.numel() // q.shape[-1] // c
    if blocked is not None:
        blocked = blocked.expand(groups, c, c)
    # With a backward to come, the probabilities are kept (the backward skips a product and exp).
    backward = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    out: Tensor = _MixedChunkAttention.apply(
        _Plan(blocked=blocked, keep_probs=backward),
        scale,
        sort,
        blocks,
        hide_empty_slots,
        one_per_row,
        q,
        k,
        v,
        key_weight,
    )
    return out


def _chunk_order(layout: ChunkLayout, look_back: bool) -> tuple[Tensor, int]:
    """The chunks worth computing, those that see the previous chunk first.

    Returns ``order``, flat chunk ids (over ``B·H·R·nc``) of every chunk holding a query
    (the others produce nothing), the ``n`` chunks that continue a bucket first; and ``n``.
    Chunks that start a bucket see no previous chunk, so they compute half the scores.
    """
    c = layout.chunk_size
    has_query = layout.queries.slot_filled.reshape(-1, c).any(dim=1)
    order = has_query.nonzero().squeeze(1)
    if not look_back:
        return order, 0
    continues = layout.chunk_continues.reshape(-1)[order]
    order = order[torch.argsort((~continues).to(torch.int8), stable=True)]
    return order, int(continues.sum())


def _pick(x: Tensor | None, groups: Tensor, keys: slice) -> Tensor | None:
    """``x (chunks, rows, K)`` at the chunks ``groups`` and the key columns ``keys`` (a copy), or None."""
    return None if x is None else x[groups, :, keys]


def bucketed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: ChunkLayout,
    *,
    causal: bool,
    attention_mask: Tensor | None,
    exclude_self: bool = False,
    look_back: bool = True,
    scale: float | None = None,
) -> Tensor:
    """Attention within bucket-aligned chunks, over ``R`` rounds, combined exactly.

    Args:
        q: ``(B, H, T, D)`` queries.
        k: ``(B, H, T, D)`` keys (self-attention: the same ``T`` tokens).
        v: ``(B, H, T, Dv)`` values.
        layout: from :func:`bucket_layout` with leading shape ``(B, H, R)``.
        causal: query ``i`` sees key ``j`` only when ``j <= i`` (original positions).
        attention_mask: bool ``(B, T)``, True = real key.
        exclude_self: the self-token rule: a query sees its own key only when no other
            key is visible to it (in any round).
        look_back: each chunk also sees the previous chunk of the same bucket.
        scale: score scale, default ``1/sqrt(D)``.

    Returns:
        ``(B, H, T, Dv)``: for every query, softmax attention over the union of the keys
        visible to it in any round; zeros where no key is visible.
    """
    b, h, t_len, d = q.shape
    d_v = v.shape[-1]
    rounds, c, nc = layout.chunk_continues.shape[2], layout.chunk_size, layout.num_chunks
    scale = d**-0.5 if scale is None else scale

    query_tok = layout.queries.token_of_slot.reshape(b, h, rounds, nc, c)
    key_tok = layout.keys.token_of_slot.reshape(b, h, rounds, nc, c)
    key_ok = layout.keys.slot_filled.reshape(b, h, rounds, nc, c)
    if attention_mask is not None:
        real = attention_mask[:, None, None, :].expand(b, h, rounds, t_len)
        key_ok = key_ok & real.gather(3, layout.keys.token_of_slot).reshape(key_ok.shape)
    if look_back:  # keys (previous chunk, own chunk): (B, H, R, nc, 2c)
        key_tok = _with_look_back(key_tok, layout.chunk_continues)
        key_ok = _with_look_back(key_ok, layout.chunk_continues, fill=False)

    q_pos, k_pos = query_tok.unsqueeze(-1), key_tok.unsqueeze(-2)
    shape = (b, h, rounds, nc, c, key_tok.shape[-1])
    blocked = (~key_ok).unsqueeze(-2).expand(shape)
    if causal:
        blocked = blocked | (k_pos > q_pos)
    elif rounds > 1:  # filled in place below; otherwise the broadcast view is enough
        blocked = blocked.contiguous()
    if rounds > 1:
        _block_seen_in_earlier_rounds(blocked, layout, q_pos, k_pos, look_back)
    self_pair = ((k_pos == q_pos) & ~blocked) if exclude_self else None
    # Without causal order or rounds, the mask depends on the key only: keep it (chunks, 1, K).
    chunks = b * h * rounds * nc
    flat_blocked = (blocked[..., :1, :] if not causal and rounds == 1 else blocked).reshape(chunks, -1, shape[-1])
    flat_self = None if self_pair is None else self_pair.reshape(chunks, c, -1)

    # The chunks computed (see _chunk_order) and the rows their queries, keys and outputs use.
    order, n_back = _chunk_order(layout, look_back)
    q_rows = _rows(layout.queries.token_of_slot, t_len).view(chunks, c)
    key_rows = _rows(layout.keys.token_of_slot, t_len).view(chunks, c)
    sequences = b * h * rounds  # outputs: (B·H·R·T) rows, plus a dummy row for empty slots
    out_rows = layout.queries.token_of_slot.reshape(sequences, -1) + t_len * torch.arange(
        sequences, device=q.device
    ).unsqueeze(1)
    out_rows = out_rows.masked_fill_(~layout.queries.slot_filled.reshape(sequences, -1), sequences * t_len)
    back, own, previous = order[:n_back], slice(shape[-1] - c, None), slice(0, c)
    plan = _Plan(
        q_rows=q_rows[order],
        key_rows=key_rows[order],
        extra_rows=key_rows[back - 1] if n_back else None,
        out_rows=out_rows.view(chunks, c)[order],
        out_len=sequences * t_len + 1,
        blocked=_pick(flat_blocked, order, own),
        self_pair=_pick(flat_self, order, own),
        extra_blocked=_pick(flat_blocked, back, previous) if n_back else None,
        extra_self=_pick(flat_self, back, previous) if n_back else None,
        keep_probs=True,  # R·T·2c floats, affordable here: the backward skips a product and exp
    )
    out, lse = _ChunkAttention.apply(plan, scale, q.reshape(-1, d), k.reshape(-1, d), v.reshape(-1, d_v))
    out = out[:-1].view(b, h, rounds, t_len, d_v)
    if rounds == 1:
        return out[:, :, 0]
    return combine_rounds(out, lse[:-1].view(b, h, rounds, t_len))


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
