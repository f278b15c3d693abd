"""Bucketed attention: sort tokens by a bucket id, cut each bucket into chunks, attend within chunks.

The shared core of the hashing and clustering family (Reformer LSH, Routing k-means). Each
mechanism only decides *which bucket* every query and every key goes to (a hash, a nearest
centroid); :func:`~attnkit.kernels.bucket_layout.bucket_layout` places them in bucket-aligned
chunks, and :func:`bucketed_attention` here does the rest: every chunk of queries attends to its
key chunk, plus the previous key chunk *of the same bucket* (``look_back``), under exact masks
evaluated on ORIGINAL positions: causal order, key padding, and an optional self-token rule (a
token attends to itself only when no other key is visible). With several rounds (``R`` hash
rounds), a key already visible to a query in an earlier round is masked in later rounds, so
every distinct key counts once: this equals Reformer's ``-log(count)`` duplicate correction, and
the rounds combined by their log-sum-exp give exactly softmax over the union of keys seen. Rows
with no visible key output zeros.

The softmax runs in the shared chunk core (:mod:`attnkit.kernels.chunk_softmax`), which reads
each block's queries, keys and values by row from the flat inputs and writes outputs straight to
token order. Chunks holding no query are skipped, and a chunk that starts its bucket computes no
look-back (it would be fully masked). Memory is the inputs, the boolean masks, one block of
scores and the ``R · T · 2·chunk`` probabilities: never ``T × S``. Time ``O(R · T · chunk · D)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.kernels.bucket_layout import ChunkLayout
from attnkit.kernels.chunk_softmax import ChunkPlan, planned_chunk_attention
from attnkit.kernels.precision import upcast


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
        visible to it in any round; zeros where no key is visible. Half-precision inputs are
        computed and returned in float32.
    """
    q, k, v = upcast(q), upcast(k), upcast(v)
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
    plan = ChunkPlan(
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
    out, lse = planned_chunk_attention(q.reshape(-1, d), k.reshape(-1, d), v.reshape(-1, d_v), plan=plan, scale=scale)
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
