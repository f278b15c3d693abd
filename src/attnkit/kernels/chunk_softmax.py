"""Softmax attention within groups of queries, each over its own keys: the shared chunk-softmax core.

The hashing and clustering family (Reformer LSH, Routing k-means, through
:mod:`attnkit.kernels.bucketed`) and Sinkhorn's sorted blocks (:mod:`attnkit.kernels.block_mix`)
all end in the same computation: ``G`` groups of ``c`` queries, each attending, in one softmax,
to ``K`` keys of its own (and, for some groups, ``E`` extra keys), under exact boolean masks.
This module computes it with its own autograd: forward and backward loop over cache-sized blocks
of groups, reading each block's queries, keys and values by row from the flat inputs when a
:class:`ChunkPlan` says where (no copy of ``q``, ``k``, ``v`` in group order, no scatter of their
gradients outside), and the backward recomputes each block's probabilities from the saved
log-sum-exp unless the plan keeps them. Memory is the inputs, the masks and one block of scores
(plus ``G · c · K`` probabilities when kept); time ``O(G · c · K · D)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnkit.kernels.buffers import empty_buffer

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


@dataclass(frozen=True)
class ChunkPlan:
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


def _block_parts(plan: ChunkPlan, keys: tuple[Tensor | None, ...], g0: int, g1: int) -> list[_Part]:
    """The key parts of groups ``g0:g1``: own keys, and the extra keys when these groups have them.

    ``keys`` is ``(k, v, k_extra, v_extra)`` (the extra pair may be None: then the extra
    part reads ``k`` and ``v`` at ``plan.extra_rows``).
    """
    k, v, k_extra, v_extra = keys
    assert k is not None and v is not None

    def part(k_src: Tensor, v_src: Tensor, rows: Tensor | None, masks: tuple[Tensor | None, ...], extra: bool) -> _Part:
        blocked, self_pair = (rows_of(mask, g0, g1) for mask in masks)
        return _Part(_take(k_src, rows, g0, g1), _take(v_src, rows, g0, g1), blocked, self_pair, rows, extra)

    parts = [part(k, v, plan.key_rows, (plan.blocked, plan.self_pair), False)]
    if g0 < _extra_groups(plan, keys):
        separate = k_extra is not None and v_extra is not None
        k_src, v_src = (k_extra, v_extra) if separate else (k, v)
        assert k_src is not None and v_src is not None
        parts.append(part(k_src, v_src, plan.extra_rows, (plan.extra_blocked, plan.extra_self), separate))
    return parts


def _extra_groups(plan: ChunkPlan, keys: tuple[Tensor | None, ...]) -> int:
    """How many leading groups have extra keys."""
    if plan.extra_rows is not None:
        return plan.extra_rows.shape[0]
    return 0 if keys[2] is None else keys[2].shape[0]


def rows_of(x: Tensor | None, g0: int, g1: int) -> Tensor | None:
    return None if x is None else x[g0:g1]


def chunk_forward(
    plan: ChunkPlan, scale: float, keys: tuple[Tensor | None, ...], q: Tensor
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
            _scores(q_block, part.k, part.blocked, part.self_pair, scale, rows_of(buffer, g0, g1))
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


def chunk_backward(
    plan: ChunkPlan,
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
        delta = row_dot(probs[0], d_scores[0])  # = rowsum(dO ∘ out), without saving out
        for p, d_s in zip(probs[1:], d_scores[1:]):
            delta.add_(row_dot(p, d_s))
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
    group, or by rows of flat tensors (see :class:`ChunkPlan`).

    Both passes loop over blocks of groups (about :data:`BLOCK_SCORES` scores each), so the
    elementwise passes over scores run in cache, and nothing of size ``G · c · K`` is saved:
    the backward recomputes each block's probabilities from the saved inputs, masks and
    log-sum-exp (one more ``q kᵀ`` product, instead of holding ``P`` from the forward to the
    backward; the peak is then the inputs plus one block).
    """

    @staticmethod
    def forward(
        ctx: Any,
        plan: ChunkPlan,
        scale: float,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        k_extra: Tensor | None = None,
        v_extra: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        out, lse, kept = chunk_forward(plan, scale, (k, v, k_extra, v_extra), q)
        ctx.save_for_backward(q, k, v, k_extra, v_extra, lse, *kept)
        ctx.plan, ctx.scale = plan, scale
        return out, lse.squeeze(-1)

    @staticmethod
    def backward(ctx: Any, d_out: Tensor, d_lse: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, k_extra, v_extra, lse, *kept = ctx.saved_tensors
        grads = chunk_backward(ctx.plan, ctx.scale, (k, v, k_extra, v_extra), q, lse, tuple(kept), d_out, d_lse)
        return None, None, *grads


def planned_chunk_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    plan: ChunkPlan,
    scale: float,
    k_extra: Tensor | None = None,
    v_extra: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Softmax attention of every group of queries over its own (and extra) keys, laid out by ``plan``.

    Args:
        q: queries, ``(G, c, D)`` by group, or flat ``(N, D)`` read at ``plan.q_rows``.
        k: own keys, ``(G, K, D)`` by group, or flat ``(N, D)`` read at ``plan.key_rows``
            (and at ``plan.extra_rows`` for the extra keys, when those rows are given).
        v: values laid out as ``k``.
        plan: where groups read and write, their masks, and whether probabilities are kept.
        scale: score scale.
        k_extra: ``(G_e, E, D)`` extra keys of the first ``G_e`` groups, or None.
        v_extra: ``(G_e, E, Dv)`` their values, or None.

    Returns:
        ``out`` and ``lse``: ``(G, c, Dv)`` and ``(G, c)`` by group, or ``(plan.out_len, Dv)`` and
        ``(plan.out_len,)`` by rows; zeros and ``-inf`` for a query with no visible key.
    """
    out, lse = _ChunkAttention.apply(plan, scale, q, k, v, k_extra, v_extra)
    return out, lse


def _widths(plan: ChunkPlan, keys: tuple[Tensor | None, ...]) -> tuple[int, int]:
    """Keys per group: own ``K`` and extra ``E`` (0 without extra keys)."""
    k, _, k_extra, _ = keys
    assert k is not None
    own = k.shape[1] if plan.key_rows is None else plan.key_rows.shape[1]
    extra = plan.extra_rows.shape[1] if plan.extra_rows is not None else 0 if k_extra is None else k_extra.shape[1]
    return own, extra


def _kept_probs(plan: ChunkPlan, keys: tuple[Tensor | None, ...], groups: int, rows: int) -> tuple[Tensor | None, ...]:
    """Buffers for the probabilities of the own keys ``(G, c, K)`` and the extra keys ``(G_e, c, E)``."""
    own, extra = _widths(plan, keys)
    with_extra = _extra_groups(plan, keys)
    q_like = keys[0]
    assert q_like is not None
    return (
        empty_buffer(q_like, (groups, rows, own)),
        empty_buffer(q_like, (with_extra, rows, extra)) if with_extra else None,
    )


def _group_shape(plan: ChunkPlan, q: Tensor) -> tuple[int, int]:
    """``(G, c)``: groups and queries per group."""
    return (q.shape[0], q.shape[1]) if plan.q_rows is None else (plan.q_rows.shape[0], plan.q_rows.shape[1])


def _blocks(plan: ChunkPlan, keys: tuple[Tensor | None, ...], groups: int, rows: int) -> list[tuple[int, int]]:
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
        ranges += group_ranges(start, stop, rows * width)
    return ranges


def group_ranges(start: int, stop: int, scores_per_group: int) -> list[tuple[int, int]]:
    """Ranges of groups ``start:stop`` holding about :data:`BLOCK_SCORES` scores each."""
    step = max(1, BLOCK_SCORES // scores_per_group)
    return [(g0, min(stop, g0 + step)) for g0 in range(start, stop, step)]


def row_dot(a: Tensor, b: Tensor) -> Tensor:
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
        return planned_chunk_attention(q, k, v, plan=ChunkPlan(blocked=blocked), scale=scale)
    k_extra, v_extra, extra_blocked = extra
    if extra_blocked is not None:
        extra_blocked = extra_blocked.expand(k_extra.shape[0], q.shape[1], k_extra.shape[1])
    plan = ChunkPlan(blocked=blocked, extra_blocked=extra_blocked)
    return planned_chunk_attention(q, k, v, plan=plan, scale=scale, k_extra=k_extra, v_extra=v_extra)
