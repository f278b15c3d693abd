"""Sinkhorn's sorted blocks: block attention over each block's own keys plus a mix of every block's keys.

Sparse Sinkhorn attention (Tay et al. 2020, "Sparse Sinkhorn Attention", arXiv:2002.11296) lets
the queries of block ``i`` attend to their own block's keys and to a sorted block: a mix, by a
(soft or hard) sort matrix ``M``, of every block's keys. :func:`mixed_chunk_attention` forms the
mix from the blocks' sums, then runs the shared chunk softmax (:mod:`attnkit.kernels.chunk_softmax`)
over both key sets, with a backward written by hand that sends the mix's gradient back through the
sort. Time ``O(L · c · D + nb² · c · D)`` per sequence for ``nb`` blocks of ``c`` tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from attnkit.kernels.buffers import empty_buffer
from attnkit.kernels.chunk_softmax import (
    ChunkPlan,
    chunk_backward,
    chunk_forward,
    group_ranges,
    row_dot,
    rows_of,
)

#: Floats of extra-key gradients per segment of :class:`_MixedChunkAttention`'s backward
#: (about 4 MB: whole sequences, at least one).
MIX_SEGMENT_FLOATS = 1 << 20


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


@dataclass(frozen=True)
class _MixSettings:
    """The non-tensor inputs of :class:`_MixedChunkAttention` (see :func:`mixed_chunk_attention`)."""

    plan: ChunkPlan
    scale: float
    sort: Callable[[Tensor, Tensor], Tensor]
    blocks: int
    hide_empty_slots: bool
    one_per_row: bool


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
        settings: _MixSettings,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        key_weight: Tensor | None,
    ) -> Tensor:
        plan, scale, sort, blocks = settings.plan, settings.scale, settings.sort, settings.blocks
        hide_empty_slots, one_per_row = settings.hide_empty_slots, settings.one_per_row
        k_src, v_src = (_weighted(x, blocks, key_weight) for x in (k, v))  # (*N, nb, c, E)
        # The sort's own (small) graph, from the block sums as leaves, is kept for the backward.
        sums = (_weighted(q, blocks, None).sum(dim=-2), k_src.sum(dim=-2))
        with torch.set_grad_enabled(plan.keep_probs):  # (kept only when a backward will come)
            sorted_by = sort(*(x.requires_grad_(plan.keep_probs) for x in sums))  # (*N, nb, nb)
        mix = sorted_by.detach()
        mix_flat = mix.reshape(-1, blocks, blocks)
        groups, rows = mix_flat.shape[0] * blocks, k_src.shape[-2]
        # (N, nb, nb) @ (N, nb, c·E): the extra keys and values, already in (G, c, E) order. Large
        # per-step buffers here and below are empty_buffer's: reused pages, no fresh page faults.
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
            out, lse, kept = chunk_forward(plan, scale, keys, _by_group(q, groups))
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
                chunk_backward(
                    replace(
                        ctx.plan,
                        blocked=rows_of(ctx.plan.blocked, g0, g1),
                        extra_blocked=rows_of(ctx.plan.extra_blocked, g0, g1),
                    ),
                    ctx.scale,
                    (k_g[g0:g1], v_g[g0:g1], k_extra[g0:g1], v_extra[g0:g1]),
                    q_g[g0:g1],
                    lse[g0:g1],
                    tuple(rows_of(x, g0, g1) for x in kept),
                    d_out_g[g0:g1],
                    None,
                    into=(d_q_g[g0:g1], d_k_g[g0:g1], d_v_g[g0:g1], *d_extras),
                )
            if chosen is not None and chosen_weight is not None and d_chosen_weight is not None:
                # Through the gather: extra_i = a_i · src_j (j = chosen_i, a_i its weight), so
                # da_i = <dExtra_i, src_j> and d_src_j += a_i · dExtra_i (times the key weight).
                chosen_rows = _flat_rows(chosen[n0:n1], blocks)
                for src, grad, d_extra, picked in zip(sources, grads, d_extras, scratch[2:]):
                    d_flat = d_extra.view(n1 - n0, blocks, -1)
                    src_flat = src[n0:n1].reshape(-1, d_flat.shape[-1])
                    torch.index_select(src_flat, 0, chosen_rows, out=picked[: g1 - g0].view(src_flat.shape))
                    d_chosen_weight[n0:n1] += row_dot(d_flat, picked[: g1 - g0].view(d_flat.shape)).squeeze(-1)
                    spread = d_flat.mul_(chosen_weight[n0:n1, :, None])  # the scratch is spent: scaled in place
                    if weight is not None:
                        key_weight_of = weight[n0:n1].reshape(-1, weight.shape[-2])[chosen_rows]  # (n·nb, c)
                        spread.view(-1, key_weight_of.shape[-1], grad.shape[-1]).mul_(key_weight_of[..., None])
                    grad[n0:n1].view(chosen_rows.shape[0], -1).index_add_(
                        0, chosen_rows, spread.view(chosen_rows.shape[0], -1)
                    )
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
        return None, d_q, d_k, d_v, None


def _side_by_side(own: Tensor, extra: Tensor, out: Tensor) -> Tensor:
    """``(g, c, E)`` own and extra keys (or values) copied into ``out (g, 2c, E)``, own first.

    Every product then takes whole contiguous operands: halves of a score tensor as
    operands sent ``bmm`` down a per-matrix path with a copy of every matrix (measured).
    """
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
    blocks = group_ranges(0, groups, rows * width)
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
    blocks = group_ranges(0, groups, rows * width)
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
    settings = _MixSettings(
        plan=ChunkPlan(blocked=blocked, keep_probs=backward),
        scale=scale,
        sort=sort,
        blocks=blocks,
        hide_empty_slots=hide_empty_slots,
        one_per_row=one_per_row,
    )
    out: Tensor = _MixedChunkAttention.apply(settings, q, k, v, key_weight)
    return out
