"""Causal linear attention as chunked prefix sums, with a hand-written backward.

Kernel attention replaces ``exp(q·k)`` by ``φ(q)·φ(k)``, so causal attention becomes a prefix
sum of outer products ("Transformers are RNNs", Katharopoulos et al. 2020, arXiv:2006.16236)::

    out_t = Σ_{s≤t} (φ(q_t)·φ(k_s)) v_s / Σ_{s≤t} φ(q_t)·φ(k_s)

The form here is *chunked* (as in FLASH, Hua et al. 2022, arXiv:2202.10447): inside a chunk of
``C`` tokens the (C, C) score block is formed and masked; across chunks each chunk's sum
``Σ φ(k_s) v_sᵀ`` (F, Dv) is formed by one batched matrix product and turned into a running sum
in place, which the next chunk's queries read. Time O(T·C·F + T·F·Dv), memory
O(T·(F + Dv + C) + (T/C)·F·Dv): per-chunk states, never a (T, F, Dv) cumulative tensor. The
backward pass is written by hand with the same two levels (the keys' share of later queries is
a reverse running sum), so nothing is recomputed and no autograd graph is kept inside.

Stabilisation (for exponential features such as FAVOR+): a feature may be given as
``φ(k_s) · exp(a_s)`` with a per-key log-scale ``a_s`` (``key_log_scale``). Every query uses
the running maximum ``M_t = max_{s≤t} a_s`` as its reference; chunk sums are kept relative to
the maximum at the end of their chunk and rescaled by ``exp(old - new) ≤ 1`` as the running
sum moves on, so every factor is ≤ 1, no reference ever depends on a later token (exact
causality), none mixes batch elements or heads, and all cancel exactly between numerator and
denominator. The log-scales are stabilisers: they must carry no gradient (pass them detached).

The entry point is :func:`causal_prefix`; :mod:`attnkit.kernels.prefix` and
:mod:`attnkit.kernels.recurrent` call it with the library's conventions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.kernels.buffers import empty_buffer
from attnkit.kernels.linear_features import (
    NEG,
    FeatureMap,
    chain_features_,
    features_by_rows,
    rowdot,
    safe_denominator,
)


@dataclass
class _Scales:
    """Factors of the stabilised core (key log-scales ``a_s``), every one in ``[0, 1]``.

    With ``M_t`` the running maximum of the log-scales, ``R_c`` its value before chunk ``c``
    and ``P_c = R_{c+1}`` after it:

    Attributes:
        key: ``(BH, n, C)`` ``exp(a_s - P_c)``: a key's weight in its chunk's sum.
        read: ``(BH, n, C)`` ``exp(R_c - M_t)``: a query's weight on the state before its chunk.
        decay: ``(BH, n)`` ``exp(R_c - P_c)``: carries the state across chunk ``c``.
        pair: ``(BH, n, C, C)`` ``exp(a_s - M_t)`` inside a chunk, zero above the diagonal.
        last: ``(BH,)`` the reference ``P_{n-1}`` of the final state.
    """

    key: Tensor
    read: Tensor
    decay: Tensor
    pair: Tensor
    last: Tensor


def _scales(a: Tensor, ref0: Tensor | None, n: int, chunk: int) -> _Scales:
    """The stabilisers for log-scales ``a (BH, n·C)`` and an initial reference ``ref0 (BH,)``."""
    bh = a.shape[0]
    running = a.cummax(dim=-1).values
    if ref0 is not None:
        running = torch.maximum(running, ref0[:, None])
    m = running.view(bh, n, chunk)
    after = m[..., -1]  # P_c
    start = ref0[:, None] if ref0 is not None else a.new_full((bh, 1), NEG)
    before = torch.cat([start, after[:, :-1]], dim=1)  # R_c
    ac = a.view(bh, n, chunk)
    # clamp: only pairs above the diagonal (a later key) can exceed 0, and tril_ zeroes them
    pair = (ac[:, :, None, :] - m[..., None]).clamp_(max=0.0).exp_().tril_()
    return _Scales(
        key=(ac - after[..., None]).exp_(),
        read=(before[..., None] - m).exp_(),
        decay=(before - after).exp_(),
        pair=pair,
        last=after[:, -1].contiguous(),
    )


def _scan_(x: Tensor, decay: Tensor | None, *, reverse: bool = False) -> None:
    """In place over chunks (dim 1): ``x_c += decay_c · x_{c∓1}``, an inclusive running sum.

    A Python loop of ``n`` in-place adds for ``(BH, n, F, E)`` blocks: ``torch.cumsum`` over a
    middle dimension is about 10x slower there, and the loop touches each ``(F, E)`` block once.
    Small ``(BH, n, F)`` sums without decay are the other way round (``n`` calls cost more than
    one cumsum).
    """
    n = x.shape[1]
    if decay is None and x.dim() == 3:
        x.copy_(x.flip(1).cumsum(1).flip(1) if reverse else x.cumsum(1))
        return
    for c in range(n - 2, -1, -1) if reverse else range(1, n):
        prev = x[:, c + 1] if reverse else x[:, c - 1]
        if decay is None:
            x[:, c].add_(prev)
        else:
            x[:, c].addcmul_(prev, decay[:, c].view(-1, *([1] * (x.dim() - 2))))


def _product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (batched, broadcast) written into an :func:`~attnkit.kernels.buffers.empty_buffer`."""
    shape = (*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
    return torch.matmul(a, b, out=empty_buffer(a, shape))


def _intra_scores(q: Tensor, k: Tensor, scales: _Scales | None) -> Tensor:
    """``(BH, n, C_q, C_k)`` scores inside each chunk, weighted, zero above the diagonal."""
    scores = _product(q, k.transpose(-1, -2))
    return scores.mul_(scales.pair) if scales is not None else scores.tril_()


def _reuse(buf: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``buf``'s storage as a ``shape`` tensor when it holds exactly that many elements, else a new one.

    A fresh (T, D)-sized tensor costs a round of page faults (glibc maps large blocks anew), more
    than the product written into it; exact size only, so no larger buffer outlives its use.
    """
    if buf.numel() == math.prod(shape) and buf.is_contiguous():
        return buf.view(shape)
    return empty_buffer(buf, shape)


def _causal_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scales: _Scales | None,
    s0: Tensor | None,
    z0: Tensor | None,
    normalize: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None]:
    """``o_t = Σ_{s≤t} (q_t·k_s) w_ts v_s`` (+ the state's share) for chunked inputs.

    Args:
        q: ``(BH, n, C, F)``; k: ``(BH, n, C, F)``; v: ``(BH, n, C, E)``.
        scales: the stabilisers (``w_ts = exp(a_s - M_t)``), or None for ``w = 1``.
        s0: ``(BH, F, E)`` initial state or None; z0: ``(BH, F)`` its normaliser (if normalising).
        normalize: also return ``den_t = Σ_{s≤t} (q_t·k_s) w_ts`` and divide by it.

    Returns:
        ``out (BH, n, C, E)`` (divided by the normaliser where it is positive), ``den (BH, n, C)``
        or None, the inclusive running sums ``(BH, n, F, E)`` and ``(BH, n, F)`` (None
        unless normalising) after each chunk, and the weighted scores ``(BH, n, C, C)`` when
        their buffer did not become the running sums (F or E != C), else None.
    """
    bh = q.shape[0]
    scores = _intra_scores(q, k, scales)
    out = _product(scores, v)
    den = scores.sum(dim=-1) if normalize else None

    # the state before chunk c is the running sum of the earlier chunks' k_sᵀ v_s (BH, n, F, E),
    # in the scores' buffer when it is the same size (C = F = E)
    values = torch.mul(v, scales.key[..., None], out=empty_buffer(v, v.shape)) if scales is not None else v
    sums = torch.matmul(k.transpose(-1, -2), values, out=_reuse(scores, (bh, q.shape[1], q.shape[-1], v.shape[-1])))
    # kept for the backward when free (the product is 1/13 of the core's work with 256 features)
    kept = scores if sums.data_ptr() != scores.data_ptr() else None
    del scores
    decay = scales.decay if scales is not None else None
    if s0 is not None:
        sums[:, 0].addcmul_(s0, decay[:, 0, None, None]) if decay is not None else sums[:, 0].add_(s0)
    _scan_(sums, decay)
    zsums = None
    if den is not None:
        zsums = (k.transpose(-1, -2) @ scales.key[..., None])[..., 0] if scales is not None else k.sum(dim=2)
        if z0 is not None:
            zsums[:, 0].addcmul_(z0, decay[:, :1]) if decay is not None else zsums[:, 0].add_(z0)
        _scan_(zsums, decay)
        # exclusive: the normaliser state each chunk reads (small: (BH, n, F))
        den_reads = (q @ _z_before(zsums, z0)[..., None])[..., 0]  # (BH, n, C)
        den.addcmul_(den_reads, scales.read) if scales is not None else den.add_(den_reads)

    # chunk c reads the running sum after chunk c - 1: shifted 3-d views, one (B·H) slice at a time
    if scales is None:
        for b in range(bh):
            out[b, 1:].baddbmm_(q[b, 1:], sums[b, :-1])
        if s0 is not None:
            out[:, 0].baddbmm_(q[:, 0], s0)
    else:
        reads = values  # its own buffer, no longer needed
        for b in range(bh):
            torch.bmm(q[b, 1:], sums[b, :-1], out=reads[b, 1:])
        if s0 is not None:
            torch.bmm(q[:, 0], s0, out=reads[:, 0])
        else:
            reads[:, 0].zero_()
        out.addcmul_(reads, scales.read[..., None])
        del reads
    if den is not None:
        out.div_(safe_denominator(den)[..., None])
    return out, den, sums, zsums, kept


def _z_before(zsums: Tensor, z0: Tensor | None) -> Tensor:
    """``(BH, n, F)`` normaliser state each chunk reads: the running sum after the chunk before."""
    first = z0[:, None] if z0 is not None else zsums.new_zeros(zsums.shape[0], 1, zsums.shape[-1])
    return torch.cat([first, zsums[:, :-1]], dim=1)


def _causal_backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scales: _Scales | None,
    s0: Tensor | None,
    z0: Tensor | None,
    saved: tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None],
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`_causal_forward`'s ``out`` with respect to ``q``, ``k`` and ``v`` (chunked shapes).

    The same two levels as the forward: inside a chunk the (C, C) blocks, across chunks running
    sums of ``q_tᵀ g_t`` over the *later* chunks (a reverse scan) for the keys and values.
    """
    out, den, sums, zsums, kept = saved
    bh = q.shape[0]
    grad_den = None
    owned = False  # whether ``grad`` is a buffer of ours, free to be overwritten
    if den is not None:
        # out = num / den: d num = g / den, d den = -(g·out) / den (zero where den was replaced by 1)
        # (g / den)·out: the row products go through dq's buffer, untouched until its products
        # (a fresh (T, E) temporary costs a round of page faults, as much as the pass itself)
        safe = safe_denominator(den)
        grad = torch.div(grad, safe[..., None], out=empty_buffer(out, out.shape))
        owned = True
        dq = empty_buffer(q, q.shape)
        grad_den = rowdot(grad, out, dq)[..., 0].neg_().masked_fill_(den <= 0, 0.0)

    # inside each chunk: the weighted scores (kept, or recomputed: one product, cheaper in memory
    # than keeping them when their buffer holds the running sums) give dv; a buffer of ours
    # (never the saved one) then holds d scores for dq and dk
    scores = kept if kept is not None else _intra_scores(q, k, scales)
    dv = _product(scores.transpose(-1, -2), grad)
    if kept is not None:
        scores = empty_buffer(kept, kept.shape)
    grad_scores = torch.matmul(grad, v.transpose(-1, -2), out=scores)  # (BH, n, C_q, C_k)
    if grad_den is not None:
        grad_scores.add_(grad_den[..., None])  # den = Σ_s scores_ts
    if scales is not None:
        grad_scores.mul_(scales.pair)
    else:
        grad_scores.tril_()
    dq = torch.matmul(grad_scores, k, out=dq) if den is not None else _product(grad_scores, k)
    dk = _product(grad_scores.transpose(-1, -2), q)
    del grad_scores

    # queries read the state before their chunk (the unscaled gradient is not needed again)
    if scales is None:
        grad_read = grad
    elif owned:
        grad_read = grad.mul_(scales.read[..., None])
    else:
        grad_read = torch.mul(grad, scales.read[..., None], out=empty_buffer(grad, grad.shape))
    for b in range(bh):
        dq[b, 1:].baddbmm_(grad_read[b, 1:], sums[b, :-1].transpose(-1, -2))
    if s0 is not None:
        dq[:, 0].baddbmm_(grad_read[:, 0], s0.transpose(-1, -2))
    den_read = None
    if grad_den is not None and zsums is not None:
        den_read = grad_den * scales.read if scales is not None else grad_den
        # a rank-one update per chunk: one broadcast pass (bmm with an inner size of 1 is slower)
        dq.addcmul_(den_read[..., None], _z_before(zsums, z0)[:, :, None, :])

    # keys and values are read by every query of the later chunks: a reverse running sum
    decay = scales.decay if scales is not None else None
    # (BH, n, F, E), then Σ over chunks c..n-1; in the scores' buffer when it is large enough
    # (C >= F, E): a fresh tensor of this size costs a round of page faults
    later = torch.matmul(
        q.transpose(-1, -2), grad_read, out=_reuse(scores, (bh, q.shape[1], q.shape[-1], grad.shape[-1]))
    )
    # with scales, grad_read is a (T, E) buffer of ours, free from here on: it holds the weighted
    # values, then the keys' reads of the later chunks
    spare = grad_read if scales is not None else None
    del scores, grad, grad_read  # (T, E) buffers no longer needed: lower the peak before dk, dv
    _scan_(later, decay, reverse=True)
    values = torch.mul(v, scales.key[..., None], out=spare) if scales is not None else v
    for b in range(bh):
        dk[b, :-1].baddbmm_(values[b, :-1], later[b, 1:].transpose(-1, -2))
    if scales is None:
        for b in range(bh):
            dv[b, :-1].baddbmm_(k[b, :-1], later[b, 1:])
    else:
        reads = values
        reads[:, -1].zero_()
        for b in range(bh):
            torch.bmm(k[b, :-1], later[b, 1:], out=reads[b, :-1])
        dv.addcmul_(reads, scales.key[..., None])
        del reads
    if den_read is not None:
        later_den = (q.transpose(-1, -2) @ den_read[..., None])[..., 0]  # (BH, n, F)
        _scan_(later_den, decay, reverse=True)
        if scales is not None:
            dk[:, :-1].addcmul_(scales.key[:, :-1, :, None], later_den[:, 1:, None, :])
        else:
            dk[:, :-1].add_(later_den[:, 1:, None, :])
    return dq, dk, dv


@dataclass(frozen=True)
class CausalSettings:
    """How :func:`causal_prefix` runs.

    Attributes:
        chunk_size: tokens per chunk ``C`` (clipped to ``[1, T]``).
        normalize: divide by ``Σ_{s≤t} φ(q_t)·φ(k_s)`` (rows whose normaliser is not positive give zeros).
        need_state: also return the running sums after the last position (for decoding).
        feature_map: ``φ``, applied inside the core a block of rows at a time; None when ``q`` and
            ``k`` are features already.
    """

    chunk_size: int = 64
    normalize: bool = False
    need_state: bool = False
    feature_map: FeatureMap | None = None


class CausalResult(NamedTuple):
    """What :func:`causal_prefix` returns; the three state tensors are None unless ``need_state``.

    Attributes:
        out: ``(B, H, T, E)`` outputs (see :func:`causal_prefix`).
        sums: ``(B, H, F, E)`` running ``Σ φ(k_s) exp(a_s - ref) v_sᵀ`` after the last position.
        normaliser: ``(B, H, F)`` running ``Σ φ(k_s) exp(a_s - ref)`` (only when normalising).
        ref: ``(B, H)`` running maximum of the key log-scales (only with log-scales).
    """

    out: Tensor
    sums: Tensor | None
    normaliser: Tensor | None
    ref: Tensor | None


def causal_prefix(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    settings: CausalSettings,
    key_log_scale: Tensor | None = None,
    initial_sums: Tensor | None = None,
    initial_normaliser: Tensor | None = None,
    initial_ref: Tensor | None = None,
) -> CausalResult:
    """``out_t = Σ_{s≤t} (φq_t·φk_s) e^{a_s - M_t} v_s`` (divided by its normaliser when normalising), chunked.

    Args:
        q: ``(B, H, T, F)`` query features (queries when ``settings.feature_map`` is given).
        k: ``(B, H, T, F)`` key features (keys likewise); zero rows for padded keys.
        v: ``(B, H, T, E)`` values.
        settings: chunk size, normalisation, state output and feature map.
        key_log_scale: ``(B, H, T)`` detached log-scales ``a_s`` of the key features, or None.
        initial_sums: ``(B, H, F, E)`` running sums of earlier positions (a constant for autograd).
        initial_normaliser: ``(B, H, F)`` their normaliser, when normalising.
        initial_ref: ``(B, H)`` the earlier positions' log-scale maximum (with log-scales).

    Returns:
        A :class:`CausalResult`; ``out`` is scaled by ``exp(-M_t)`` when not normalised, ``M_t``
        the running maximum of the key log-scales (0 without them). Time O(T·C·F + T·F·E).
    """
    out, sums, normaliser, ref = _CausalKernel.apply(
        q, k, v, key_log_scale, initial_sums, initial_normaliser, initial_ref, settings
    )
    return CausalResult(out, sums, normaliser, ref)


class _CausalKernel(torch.autograd.Function):
    """Autograd for the chunked causal core: saves the inputs, the output and the running chunk sums."""

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        a: Tensor | None,
        s0: Tensor | None,
        z0: Tensor | None,
        ref0: Tensor | None,
        settings: CausalSettings,
    ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        feature_map = settings.feature_map
        bsz, heads, t_len, feat = q.shape
        e_dim = v.shape[-1]
        bh = bsz * heads
        chunk = max(1, min(settings.chunk_size, t_len))
        n = math.ceil(t_len / chunk)
        pad = n * chunk - t_len

        def chunked(x: Tensor) -> Tensor:
            # (B, H, T, X) -> (B·H, n, C, X): a view when T is a multiple of C (zero rows pad the tail)
            x = x.reshape(bh, t_len, x.shape[-1])
            return (F.pad(x, (0, 0, 0, pad)) if pad else x).view(bh, n, chunk, x.shape[-1])

        if feature_map is not None:
            q, k = (features_by_rows(x.reshape(bh, t_len, feat), feature_map) for x in (q, k))
        qc, kc, vc = chunked(q), chunked(k), chunked(v)
        scales = None
        if a is not None:
            # padded keys get NEG log-scales: weight exp(NEG - anything finite) = 0
            a_flat = F.pad(a.reshape(bh, t_len), (0, pad), value=NEG) if pad else a.reshape(bh, t_len)
            scales = _scales(a_flat, ref0.reshape(bh) if ref0 is not None else None, n, chunk)
        s0_ = s0.reshape(bh, feat, e_dim) if s0 is not None else None
        z0_ = z0.reshape(bh, feat) if z0 is not None else None
        saved = _causal_forward(qc, kc, vc, scales, s0_, z0_, settings.normalize)
        out, den, sums, zsums, kept = saved
        ctx.save_for_backward(qc, kc, vc, s0_, z0_, out, den, sums, zsums, kept)
        ctx.scales = scales
        ctx.feature_map = feature_map
        ctx.shape = (bsz, heads, t_len, pad)
        result = out.view(bh, n * chunk, e_dim)[:, :t_len].reshape(bsz, heads, t_len, e_dim)
        if not settings.need_state:
            return result, None, None, None
        state = sums[:, -1].reshape(bsz, heads, feat, e_dim).clone()
        z_state = zsums[:, -1].reshape(bsz, heads, feat).clone() if zsums is not None else None
        ref = scales.last.reshape(bsz, heads) if scales is not None else None
        for t in (state, z_state, ref):
            if t is not None:
                ctx.mark_non_differentiable(t)
        return result, state, z_state, ref

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        # only the output is differentiable: the states are marked non-differentiable
        qc, kc, vc, s0, z0, out, den, sums, zsums, kept = ctx.saved_tensors
        bsz, heads, t_len, pad = ctx.shape
        bh, n, chunk, _ = qc.shape
        assert grads[0] is not None
        grad = grads[0].reshape(bh, t_len, out.shape[-1])
        if pad:
            grad = F.pad(grad, (0, 0, 0, pad))
        elif den is None:  # with a normaliser, the first pass (a division into a buffer of ours) reads it as it is
            grad = grad.contiguous()
        grad = grad.reshape(bh, n, chunk, -1)
        dq, dk, dv = _causal_backward(grad, qc, kc, vc, ctx.scales, s0, z0, (out, den, sums, zsums, kept))
        if ctx.feature_map is not None:  # through φ in place: the saved qc, kc are φ(q), φ(k)
            for d_phi, phi in ((dq, qc), (dk, kc)):
                chain_features_(d_phi.view(bh, n * chunk, -1), phi.view(bh, n * chunk, -1), ctx.feature_map)

        def unchunked(x: Tensor) -> Tensor:
            return x.view(bh, n * chunk, x.shape[-1])[:, :t_len].reshape(bsz, heads, t_len, x.shape[-1])

        return unchunked(dq), unchunked(dk), unchunked(dv), None, None, None, None, None
