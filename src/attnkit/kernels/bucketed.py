"""Bucketed attention: sort tokens by a bucket id, cut each bucket into chunks, attend within chunks.

The shared core of the hashing and clustering family (Reformer LSH, Routing k-means;
Sinkhorn uses only its chunk softmax, :func:`chunk_attention`). Each mechanism only
decides *which bucket* every query and every key goes to (a hash, a nearest centroid);
this module does the rest:

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

The chunk attention has its own autograd (the look-back read through overlapping views
instead of copies; forward and backward loop over cache-sized blocks of chunks, and the
backward recomputes each block's probabilities from the saved log-sum-exp), so memory is
the gathered ``q, k, v``, the boolean masks and one block of scores: never ``T × S``, nor
the ``R · T · 2·chunk`` probabilities. Time ``O(R · T · chunk · D)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def _rows(token_of_slot: Tensor, tokens_per_sequence: int) -> Tensor:
    """Flat row ids into ``x.reshape(B·H·T, D)`` for ``token_of_slot (B, H, R, L)``: ``(B·H·R·L,)``."""
    b, h = token_of_slot.shape[:2]
    base = torch.arange(b * h, device=token_of_slot.device).view(b, h, 1, 1) * tokens_per_sequence
    return (token_of_slot + base).reshape(-1)


def _windows(src: Tensor, chunk: int) -> Tensor:
    """Overlapping ``2 · chunk``-row windows of ``src ((G + 1) · chunk, D)``, one per chunk, as a view.

    Window ``g`` holds chunk ``g`` of the buffer (the previous chunk) then chunk ``g + 1`` (its own).
    """
    groups = src.shape[0] // chunk - 1
    return src.as_strided((groups, 2 * chunk, src.shape[1]), (chunk * src.shape[1], src.shape[1], 1))


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


def _scores(q: Tensor, k: Tensor, blocked: Tensor | None, self_pair: Tensor | None) -> Tensor:
    """Masked scores ``(G, c, K)`` of pre-scaled ``q``: ``-inf`` where blocked, :data:`SELF_SCORE` on self pairs."""
    # bmm, not matmul: matmul of a 3-d tensor with a transposed contiguous one takes a slower
    # path on CPU (about 2x here).
    s = torch.bmm(q, k.transpose(-1, -2))
    if blocked is not None:
        s.masked_fill_(blocked, float("-inf"))
    if self_pair is not None:
        s.masked_fill_(self_pair, SELF_SCORE)
    return s


#: Scores per block of groups (floats): the loops of :class:`_ChunkAttention` keep one
#: block's scores, probabilities and gradients in cache across their elementwise passes.
BLOCK_SCORES = 1 << 18


@dataclass(frozen=True)
class _Part:
    """One set of keys of a block of groups: ``k (g, K, D)``, ``v (g, K, Dv)`` and their masks."""

    k: Tensor
    v: Tensor
    blocked: Tensor | None
    self_pair: Tensor | None


def _block_parts(saved: tuple[Tensor | None, ...], chunk: int, g0: int, g1: int) -> list[_Part]:
    """The key parts of groups ``g0:g1`` from ``(k_src, v_src, blocked, self_pair, k_extra, v_extra, extra_blocked)``."""
    k_src, v_src, blocked, self_pair, k_extra, v_extra, extra_blocked = saved
    assert k_src is not None and v_src is not None
    if chunk:  # chunks g0 .. g1 of the buffer hold the windows of groups g0 .. g1 - 1
        k, v = (
            _windows(k_src[g0 * chunk : (g1 + 1) * chunk], chunk),
            _windows(v_src[g0 * chunk : (g1 + 1) * chunk], chunk),
        )
    else:
        k, v = k_src[g0:g1], v_src[g0:g1]
    parts = [_Part(k, v, _rows_of(blocked, g0, g1), _rows_of(self_pair, g0, g1))]
    if k_extra is not None and v_extra is not None:
        parts.append(_Part(k_extra[g0:g1], v_extra[g0:g1], _rows_of(extra_blocked, g0, g1), None))
    return parts


def _rows_of(mask: Tensor | None, g0: int, g1: int) -> Tensor | None:
    return None if mask is None else mask[g0:g1]


class _ChunkAttention(torch.autograd.Function):
    """Softmax attention per chunk over unblocked keys, returning the output and log-sum-exp.

    Keys and values come either as ``(G, K, D)`` or, with ``chunk > 0``, as a flat buffer of
    ``G + 1`` chunks read through overlapping windows (previous + own chunk) without a copy.
    An optional second part ``(G, E, D)`` of keys and values joins the same softmax (one
    score tensor per part), so callers never concatenate keys.

    Both passes loop over blocks of groups (about :data:`BLOCK_SCORES` scores each), so the
    elementwise passes over scores run in cache, and nothing of size ``G · c · K`` is saved:
    the backward recomputes each block's probabilities from the saved inputs, masks and
    log-sum-exp (one more ``q kᵀ`` product, instead of holding ``P`` from the forward to the
    backward; the peak is then the inputs plus one block).
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k_src: Tensor,
        v_src: Tensor,
        blocked: Tensor | None,
        self_pair: Tensor | None,
        scale: float,
        chunk: int,
        k_extra: Tensor | None = None,
        v_extra: Tensor | None = None,
        extra_blocked: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        saved = (k_src, v_src, blocked, self_pair, k_extra, v_extra, extra_blocked)
        groups, rows, _ = q.shape
        out = q.new_empty(groups, rows, v_src.shape[-1])
        lse = q.new_empty(groups, rows, 1)
        for g0, g1 in _blocks(q, saved, chunk):
            parts = _block_parts(saved, chunk, g0, g1)
            probs = [_scores(q[g0:g1] * scale, part.k, part.blocked, part.self_pair) for part in parts]
            row_max = probs[0].amax(dim=-1, keepdim=True)
            for extra in probs[1:]:
                row_max = torch.maximum(row_max, extra.amax(dim=-1, keepdim=True))
            row_max.masked_fill_(row_max == float("-inf"), 0.0)  # a row with every key blocked
            denom = torch.zeros_like(row_max)
            for p in probs:
                denom += p.sub_(row_max).exp_().sum(dim=-1, keepdim=True)  # exactly 0 on blocked keys
            has_key = denom > 0
            safe = torch.where(has_key, denom, torch.ones_like(denom))
            torch.bmm(probs[0], parts[0].v, out=out[g0:g1])
            for p, part in zip(probs[1:], parts[1:]):
                out[g0:g1].baddbmm_(p, part.v)
            out[g0:g1].div_(safe)  # rows without a key stay 0
            lse[g0:g1] = torch.where(has_key, row_max + torch.log(safe), float("-inf"))
        ctx.save_for_backward(q, *saved, lse)
        ctx.scale, ctx.chunk = scale, chunk
        return out, lse.squeeze(-1)

    @staticmethod
    def backward(ctx: Any, d_out: Tensor, d_lse: Tensor | None) -> tuple[Tensor | None, ...]:
        q, *stored, lse = ctx.saved_tensors
        saved = tuple(stored)
        k_src, v_src, _, self_pair, k_extra, v_extra, _ = saved
        scale, chunk = ctx.scale, ctx.chunk
        d_out = d_out.contiguous()
        d_q = torch.empty_like(q)
        # Windowed keys: each chunk of the buffer gets gradient from two windows, so accumulate.
        d_k = torch.zeros_like(k_src) if chunk else torch.empty_like(k_src)
        d_v = torch.zeros_like(v_src) if chunk else torch.empty_like(v_src)
        d_k_extra = None if k_extra is None else torch.empty_like(k_extra)
        d_v_extra = None if v_extra is None else torch.empty_like(v_extra)
        # exp(s - lse) recomputes P; +inf on rows without a key makes theirs exactly 0.
        lse = lse.masked_fill(lse == float("-inf"), float("inf"))
        for g0, g1 in _blocks(q, saved, chunk):
            parts = _block_parts(saved, chunk, g0, g1)
            q_block, d_o = q[g0:g1] * scale, d_out[g0:g1]
            probs = [_scores(q_block, part.k, part.blocked, part.self_pair).sub_(lse[g0:g1]).exp_() for part in parts]
            d_scores = [torch.bmm(d_o, part.v.transpose(-1, -2)) for part in parts]  # dP
            delta = _row_dot(probs[0], d_scores[0])  # = rowsum(dO ∘ out), without saving out
            for p, d_s in zip(probs[1:], d_scores[1:]):
                delta.add_(_row_dot(p, d_s))
            if d_lse is not None:
                delta.sub_(d_lse[g0:g1].unsqueeze(-1))
            for p, d_s in zip(probs, d_scores):
                d_s.sub_(delta).mul_(p)
            if self_pair is not None:
                d_scores[0].masked_fill_(self_pair[g0:g1], 0.0)  # the self score is a constant
            torch.bmm(d_scores[0], parts[0].k, out=d_q[g0:g1])
            _key_side_grad(probs[0], d_o, chunk, d_v, g0, g1)
            _key_side_grad(d_scores[0], q_block, chunk, d_k, g0, g1)
            if d_k_extra is not None and d_v_extra is not None:
                d_q[g0:g1].baddbmm_(d_scores[1], parts[1].k)
                torch.bmm(probs[1].transpose(-1, -2), d_o, out=d_v_extra[g0:g1])
                torch.bmm(d_scores[1].transpose(-1, -2), q_block, out=d_k_extra[g0:g1])
        d_q.mul_(scale)
        return d_q, d_k, d_v, None, None, None, None, d_k_extra, d_v_extra, None


def _blocks(q: Tensor, saved: tuple[Tensor | None, ...], chunk: int) -> list[tuple[int, int]]:
    """Ranges ``(g0, g1)`` of groups holding about :data:`BLOCK_SCORES` scores each."""
    groups, rows, _ = q.shape
    k_src, k_extra = saved[0], saved[4]
    keys = 2 * chunk if chunk or k_src is None else k_src.shape[1]
    keys += 0 if k_extra is None else k_extra.shape[1]
    step = max(1, BLOCK_SCORES // (rows * keys))
    return [(g0, min(groups, g0 + step)) for g0 in range(0, groups, step)]


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``(a ∘ b).sum(-1, keepdim=True)`` for contiguous ``(G, c, K)`` tensors.

    As one batch of ``1 × K`` by ``K × 1`` products: no ``(G, c, K)`` temporary next to
    ``P`` and ``dP`` (and, measured, faster than the elementwise product and sum).
    """
    groups, rows, keys = a.shape
    return torch.bmm(a.view(-1, 1, keys), b.view(-1, keys, 1)).view(groups, rows, 1)


def _key_side_grad(weights: Tensor, x: Tensor, chunk: int, out: Tensor, g0: int, g1: int) -> None:
    """Write ``weightsᵀ @ x`` (``(g, c, K)``, ``(g, c, E)``) for the keys/values of groups ``g0:g1``.

    ``out`` is ``(G, K, E)``, or with ``chunk`` the zero-initialised ``((G + 1) · chunk, E)``
    buffer the windows were read from: each window adds its previous chunk's share to chunk
    ``g`` and its own chunk's to chunk ``g + 1`` (the adjoint of :func:`_windows`).
    """
    if not chunk:
        torch.bmm(weights.transpose(-1, -2), x, out=out[g0:g1])
        return
    buffer = out.view(-1, chunk, out.shape[-1])
    buffer[g0:g1].baddbmm_(weights[..., :chunk].transpose(-1, -2), x)  # each window's previous chunk
    buffer[g0 + 1 : g1 + 1].baddbmm_(weights[..., chunk:].transpose(-1, -2), x)  # each window's own chunk


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
        extra: optional more keys ``(G, E, D)``, values ``(G, E, Dv)`` and their ``blocked``
            (broadcastable to ``(G, c, E)`` or ``None``), in the same softmax: the same
            result as concatenating them after ``k`` and ``v``, without the copy.

    Returns:
        ``out (G, c, Dv)`` (zeros for a query with no visible key) and ``lse (G, c)``
        (``-inf`` there).
    """
    if blocked is not None:
        blocked = blocked.expand(q.shape[0], q.shape[1], k.shape[1])
    if extra is None:
        out, lse = _ChunkAttention.apply(q, k, v, blocked, None, scale, 0)
        return out, lse
    k_extra, v_extra, extra_blocked = extra
    if extra_blocked is not None:
        extra_blocked = extra_blocked.expand(q.shape[0], q.shape[1], k_extra.shape[1])
    out, lse = _ChunkAttention.apply(q, k, v, blocked, None, scale, 0, k_extra, v_extra, extra_blocked)
    return out, lse


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
        scale: score scale, default ``1/sqrt(D)``.

    Returns:
        ``(B, H, T, Dv)``: for every query, softmax attention over the union of the keys
        visible to it in any round; zeros where no key is visible.
    """
    b, h, t_len, d = q.shape
    d_v = v.shape[-1]
    rounds, c, nc = layout.chunk_continues.shape[2], layout.chunk_size, layout.num_chunks
    groups = b * h * rounds * nc
    scale = d**-0.5 if scale is None else scale

    q_rows = _rows(layout.queries.token_of_slot, t_len)
    k_rows = _rows(layout.keys.token_of_slot, t_len)
    if look_back:  # one leading dummy chunk: the (masked) look-back of the very first chunk
        k_rows = torch.cat([k_rows[:c], k_rows])
    qs = q.reshape(-1, d).index_select(0, q_rows).view(groups, c, d)
    ks = k.reshape(-1, d).index_select(0, k_rows)
    vs = v.reshape(-1, d_v).index_select(0, k_rows)

    query_tok = layout.queries.token_of_slot.reshape(b, h, rounds, nc, c)
    key_tok = layout.keys.token_of_slot.reshape(b, h, rounds, nc, c)
    key_ok = layout.keys.slot_filled.reshape(b, h, rounds, nc, c)
    if key_padding_mask is not None:
        real = key_padding_mask[:, None, None, :].expand(b, h, rounds, t_len)
        key_ok = key_ok & real.gather(3, layout.keys.token_of_slot).reshape(key_ok.shape)
    if look_back:
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
    if not look_back:
        ks, vs = ks.view(groups, c, d), vs.view(groups, c, d_v)
    flat_self = None if self_pair is None else self_pair.reshape(groups, c, -1)
    # Without causal order or rounds, the mask depends on the key only: keep it (G, 1, K).
    flat_blocked = blocked[..., :1, :] if not causal and rounds == 1 else blocked
    out, lse = _ChunkAttention.apply(
        qs, ks, vs, flat_blocked.reshape(groups, flat_blocked.shape[-2], -1), flat_self, scale, c if look_back else 0
    )

    # Back to token order: (B, H, R, T, Dv) and (B, H, R, T).
    length = nc * c
    sequence = torch.arange(b * h * rounds, device=q.device).view(b, h, rounds, 1)  # (B, H, R) -> B·H·R·L rows
    slot_rows = (layout.queries.slot_of_token + sequence * length).reshape(-1)
    out = out.reshape(-1, d_v).index_select(0, slot_rows).view(b, h, rounds, t_len, d_v)
    if rounds == 1:
        return out[:, :, 0]
    lse = lse.reshape(-1).index_select(0, slot_rows).view(b, h, rounds, t_len)
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
