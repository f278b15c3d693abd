"""Linear attention over feature maps: one chunked causal core, its recurrent step, and the wrapper.

Kernel attention replaces ``exp(q·k)`` by ``φ(q)·φ(k)`` so that causal attention becomes a
prefix sum of outer products ("Transformers are RNNs", Katharopoulos et al. 2020,
arXiv:2006.16236)::

    out_t = Σ_{s≤t} (φ(q_t)·φ(k_s)) v_s / Σ_{s≤t} φ(q_t)·φ(k_s)

The causal form here is *chunked* (as in FLASH, Hua et al. 2022, arXiv:2202.10447): inside a
chunk of ``C`` tokens the (C, C) score block is formed and masked; across chunks a running
state ``Σ φ(k_s) v_sᵀ`` of shape (F, Dv) is carried. Time O(T·C·F + T·F·Dv), memory
O(T·(F + Dv + C) + F·Dv): never a (T, F, Dv) cumulative tensor. The backward pass is three
more calls of the same core (one causal, two anti-causal), so autograd stores only the inputs.

Stabilisation (for exponential features such as FAVOR+): a feature may be given as
``φ(k_s) · exp(a_s)`` with a per-key log-scale ``a_s`` (``key_log_scale``). Every query then
uses the running maximum ``M_t = max_{s≤t} a_s`` as its reference, so all factors
``exp(a_s - M_t)`` are ≤ 1, the reference never depends on a later token (exact causality),
never mixes batch elements or heads, and cancels exactly between numerator and denominator.
The log-scales are stabilisers: they must carry no gradient (pass them detached).

The normaliser is computed by appending a column of ones to the values. Queries with no
visible key (or an all-zero normaliser) output zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

#: Log-scale given to padded keys: exp(NEG - anything finite) underflows to exactly 0.
NEG = -1e30
#: Chunks per group of the inter-chunk pass: the group's (GROUP, F, Dv) partial sums are the only
#: state-sized temporaries, so memory stays O(F·Dv) per head whatever the length.
GROUP = 16


@dataclass
class PrefixState:
    """The recurrent state of causal linear attention (``decoding="recurrent"``).

    Attributes:
        kv: ``(B, H, F, Dv + 1)`` running ``Σ_s φ(k_s) exp(a_s - ref) [v_s, 1]ᵀ``, or None
            before the first token. The last column is the normaliser.
        ref: ``(B, H)`` running maximum of the key log-scales, or None without log-scales.
        length: number of positions consumed.
    """

    kv: Tensor | None = None
    ref: Tensor | None = None
    length: int = 0


# -- the core: raw (unnormalised) sums, no autograd ---------------------------------------
def _chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor | None,
    b: Tensor | None,
    kv0: Tensor | None,
    ref0: Tensor | None,
    chunk: int,
    need_state: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``out_t = Σ_{s≤t} (q_t·k_s) e^{a_s+b_t} v_s + (q_t·kv0) e^{ref0+b_t}`` and the final state.

    Args:
        q: ``(B, H, T, F)``; k: ``(B, H, T, F)``; v: ``(B, H, T, E)``.
        a: ``(B, H, T)`` key log-scales or None; b: ``(B, H, T)`` query log-scales (None iff
            ``a`` is None). Callers guarantee ``a_s + b_t <= 0`` for ``s <= t`` and
            ``ref0 + b_t <= 0``.
        kv0: ``(B, H, F, E)`` initial state or None; ref0: ``(B, H)`` its log reference.
        chunk: chunk length ``C``.
        need_state: also return the final ``(kv, ref)``.

    Returns:
        ``out (B, H, T, E)``, final ``kv (B, H, F, E)`` and ``ref (B, H)`` (None unless asked).
    """
    bsz, heads, t_len, feat = q.shape
    e_dim = v.shape[-1]
    n = math.ceil(t_len / chunk)
    pad = n * chunk - t_len
    if pad:
        # zero keys and values add nothing; NEG log-scales keep every factor finite
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        if a is not None and b is not None:
            a, b = (F.pad(x, (0, pad), value=NEG) for x in (a, b))
    bh = bsz * heads

    def chunks(x: Tensor) -> Tensor:
        # (B, H, n·C, X) -> (n, B·H, C, X), chunk-major so that each chunk's slice is contiguous
        return x.reshape(bh, n, chunk, x.shape[-1]).transpose(0, 1).contiguous()

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    ac = a.reshape(bh, n, chunk).transpose(0, 1) if a is not None else None
    bc = b.reshape(bh, n, chunk).transpose(0, 1) if b is not None else None

    # intra-chunk: every chunk's (C, C) block at once; memory O(T·C)
    scores = qc @ kc.transpose(-1, -2)  # (n, BH, C_q, C_k)
    if ac is not None and bc is not None:
        # clamp: only masked (future) pairs can exceed 0, and they are zeroed next
        scores.mul_((ac[:, :, None, :] + bc[:, :, :, None]).clamp_(max=0.0).exp_())
    keep = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    scores.masked_fill_(~keep, 0.0)
    out = scores @ vc  # (n, BH, C, E)
    del scores

    # inter-chunk: a running (F, E) state carried across groups of GROUP chunks; inside a group the
    # state each chunk reads is a weighted sum of the carried state and the earlier chunks' sums
    kv = kv0.reshape(bh, feat, e_dim) if kv0 is not None else q.new_zeros(bh, feat, e_dim)
    ref = ref0.reshape(bh) if ref0 is not None else q.new_full((bh,), NEG)
    for g0 in range(0, n, GROUP):
        g1 = min(n, g0 + GROUP)
        keys = kc[g0:g1]  # (g, BH, C, F)
        if ac is not None and bc is not None:
            # reference after each chunk: running max of the key log-scales (never a later chunk's)
            refs = torch.maximum(ac[g0:g1].amax(dim=-1).cummax(dim=0).values, ref)  # (g, BH)
            keys = keys * (ac[g0:g1] - refs[..., None]).exp()[..., None]
            refs_all = torch.cat([ref[None], refs]).T  # (BH, g + 1): [carried, after chunk 0, ...]
            # weight of sum j in the state read after position c: exp(ref_j - ref_c) <= 1, j <= c
            weights = (refs_all[:, None, :] - refs_all[:, :, None]).clamp_(max=0.0).exp_()
            weights = weights * _lower(g1 - g0, q)  # (BH, g + 1, g + 1)
        else:
            weights = _lower(g1 - g0, q)
        sums = keys.transpose(-1, -2) @ vc[g0:g1]  # (g, BH, F, E)
        sums = torch.cat([kv[None], sums]).reshape(g1 - g0 + 1, bh, feat * e_dim).transpose(0, 1)
        states = (weights @ sums).reshape(bh, g1 - g0 + 1, feat, e_dim)  # states[:, c]: before chunk c
        reads = qc[g0:g1] @ states[:, :-1].transpose(0, 1)  # (g, BH, C, E)
        if ac is not None and bc is not None:
            reads.mul_((refs_all.T[:-1, :, None] + bc[g0:g1]).exp()[..., None])
            ref = refs_all[:, -1].contiguous()
        out[g0:g1] += reads
        kv = states[:, -1]

    out = out.transpose(0, 1).reshape(bsz, heads, n * chunk, e_dim)[:, :, :t_len]
    if not need_state:
        return out, None, None
    return out, kv.reshape(bsz, heads, feat, e_dim).clone(), (ref.reshape(bsz, heads) if a is not None else None)


def _lower(g: int, like: Tensor) -> Tensor:
    """``(g + 1, g + 1)`` lower-triangular ones: the state before chunk ``c`` sums entries ``0..c``."""
    return torch.ones(g + 1, g + 1, dtype=like.dtype, device=like.device).tril()


def _flip(x: Tensor | None) -> Tensor | None:
    if x is None:
        return None
    return x.flip(2)


class _ChunkedCausal(torch.autograd.Function):
    """Autograd for :func:`_chunked`: saves only the inputs; the backward is three core calls."""

    @staticmethod
    def forward(ctx: Any, *args: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
        q, k, v, a, b, kv0, ref0, chunk, need_state = args
        ctx.save_for_backward(q, k, v, a, b, kv0, ref0)
        ctx.chunk = chunk
        out, kv, ref = _chunked(q, k, v, a, b, kv0, ref0, chunk, need_state)
        for t in (kv, ref):
            if t is not None:
                ctx.mark_non_differentiable(t)
        return out, kv, ref

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple[Tensor | None, ...]:
        grad_out = grads[0].contiguous()
        q, k, v, a, b, kv0, ref0 = ctx.saved_tensors
        c = ctx.chunk
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq = dk = dv = None
        if need_q:
            # dq_t = Σ_{s≤t} (do_t·v_s) k_s e^{a_s+b_t} + (do_t·kv0ᵀ) e^{ref0+b_t}
            kv0_t = kv0.transpose(-1, -2) if kv0 is not None else None
            dq = _chunked(grad_out, v, k, a, b, kv0_t, ref0, c, False)[0]
        if need_k or need_v:
            # anti-causal sums run the causal core backwards in time
            go_r, q_r, k_r, v_r = (x.flip(2) for x in (grad_out, q, k, v))
            a_r, b_r = _flip(a), _flip(b)
            if need_k:  # dk_s = Σ_{t≥s} (v_s·do_t) q_t e^{a_s+b_t}
                dk = _chunked(v_r, go_r, q_r, b_r, a_r, None, None, c, False)[0].flip(2)
            if need_v:  # dv_s = Σ_{t≥s} (k_s·q_t) do_t e^{a_s+b_t}
                dv = _chunked(k_r, q_r, go_r, b_r, a_r, None, None, c, False)[0].flip(2)
        return dq, dk, dv, None, None, None, None, None, None


# -- public functions ----------------------------------------------------------------------
def causal_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_log_scale: Tensor | None = None,
    state: PrefixState | None = None,
    chunk_size: int = 64,
    need_state: bool = False,
) -> tuple[Tensor, PrefixState | None]:
    """Unnormalised causal linear attention ``Σ_{s≤t} (q_t·k_s e^{a_s}) v_s``, chunked.

    Args:
        q: ``(B, H, T, F)`` query features.
        k: ``(B, H, T, F)`` key features (zero rows for padded keys).
        v: ``(B, H, T, E)`` values (append a ones column to get the normaliser).
        key_log_scale: ``(B, H, T)`` detached log-scale ``a_s`` of each key's features, or None.
        state: a :class:`PrefixState` of earlier positions (treated as a constant by autograd).
        chunk_size: tokens per chunk.
        need_state: return the state after the last position.

    Returns:
        ``(B, H, T, E)`` sums scaled by ``exp(-M_t)`` where ``M_t`` is the running maximum of the
        key log-scales (1 when there are none), and the new state (or None).
    """
    if state is not None and state.kv is not None and (key_log_scale is None) != (state.ref is None):
        raise ValueError("key_log_scale must be given on every call or on none (it was not on an earlier one)")
    kv0 = state.kv if state is not None else None
    ref0 = state.ref if state is not None else None
    b = None
    if key_log_scale is not None:
        running = key_log_scale.cummax(dim=-1).values
        if ref0 is not None:
            running = torch.maximum(running, ref0[..., None])
        b = -running
    out, kv, ref = _ChunkedCausal.apply(q, k, v, key_log_scale, b, kv0, ref0, chunk_size, need_state)
    if not need_state:
        return out, None
    length = (state.length if state is not None else 0) + q.shape[2]
    return out, PrefixState(kv, ref, length)


def recurrent_step(
    q: Tensor, k: Tensor, v: Tensor, state: PrefixState, *, key_log_scale: Tensor | None = None
) -> Tensor:
    """One token of causal linear attention as an RNN: update ``state`` in place, then read it.

    Args:
        q: ``(B, H, 1, F)`` query features; k: ``(B, H, 1, F)`` key features; v: ``(B, H, 1, E)``.
        state: the running :class:`PrefixState` (updated in place).
        key_log_scale: ``(B, H, 1)`` detached log-scale of the key's features, or None.

    Returns:
        ``(B, H, 1, E)``, equal to the last row of :func:`causal_linear_attention` over the prefix.
        O(F·E) per head, whatever the context length.
    """
    outer = k.transpose(-1, -2) @ v  # (B, H, F, E)
    if key_log_scale is not None:
        a = key_log_scale[..., 0]
        ref = a if state.ref is None else torch.maximum(state.ref, a)
        outer = outer * (a - ref).exp()[..., None, None]
        if state.kv is not None and state.ref is not None:
            outer = outer + state.kv * (state.ref - ref).exp()[..., None, None]
        state.ref = ref
    elif state.kv is not None:
        outer = outer + state.kv
    state.kv = outer
    state.length += 1
    return q @ outer


def kernel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    key_padding_mask: Tensor | None = None,
    key_log_scale: Tensor | None = None,
    normalize: bool = True,
    chunk_size: int = 64,
) -> Tensor:
    """Linear attention over precomputed features, with the library's conventions.

    Args:
        q: ``(B, H, T, F)`` query features.
        k: ``(B, H, S, F)`` key features.
        v: ``(B, H, S, Dv)`` values.
        causal: end-aligned causal (query ``i`` sees keys ``j <= i + S - T``).
        key_padding_mask: bool ``(B, S)``, True = real key; padded keys are removed exactly.
        key_log_scale: ``(B, H, S)`` detached per-key log-scales of ``k`` (see module docstring).
        normalize: divide by ``Σ φ(q)·φ(k)`` (rows whose normaliser is not positive give zeros).
        chunk_size: chunk length of the causal core.

    Returns:
        ``(B, H, T, Dv)`` in the features' dtype.
    """
    t_len, s_len, dv = q.shape[2], k.shape[2], v.shape[-1]
    k, v, key_log_scale = _drop_padded(k, v, key_log_scale, key_padding_mask)
    if not causal:
        if key_log_scale is not None:
            k = k * (key_log_scale - key_log_scale.amax(dim=-1, keepdim=True)).exp()[..., None]
        kv = k.transpose(-1, -2) @ v  # (B, H, F, Dv)
        if not normalize:
            return q @ kv
        # the normaliser rides along as one more (tiny) column instead of a ones column in v
        return normalise(q @ torch.cat([kv, k.sum(dim=-2)[..., None]], dim=-1), dv)
    if normalize:
        v = torch.cat([v, v.new_ones((*v.shape[:-1], 1))], dim=-1)
    if t_len <= s_len:
        # queries sit at the last T positions: give the first S - T positions empty queries
        q_full = F.pad(q, (0, 0, s_len - t_len, 0))
        out = causal_linear_attention(q_full, k, v, key_log_scale=key_log_scale, chunk_size=chunk_size)[0]
        out = out[:, :, s_len - t_len :]
    else:
        # the first T - S queries see no key at all
        out = causal_linear_attention(
            q[:, :, t_len - s_len :], k, v, key_log_scale=key_log_scale, chunk_size=chunk_size
        )[0]
        out = F.pad(out, (0, 0, t_len - s_len, 0))
    return normalise(out, dv) if normalize else out


def kernel_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: PrefixState,
    *,
    key_padding_mask: Tensor | None = None,
    key_log_scale: Tensor | None = None,
    normalize: bool = True,
    chunk_size: int = 64,
) -> Tensor:
    """Append ``t`` positions to ``state`` and return their outputs (recurrent decoding).

    One token uses :func:`recurrent_step`; a longer chunk (a prompt) the chunked core.

    Args:
        q: ``(B, H, t, F)``; k: ``(B, H, t, F)``; v: ``(B, H, t, Dv)``.
        state: a :class:`PrefixState`, updated in place.
        key_padding_mask: bool ``(B, t)`` for the new positions.
        key_log_scale: ``(B, H, t)`` detached key log-scales, or None.
        normalize: as in :func:`kernel_attention`.
        chunk_size: chunk length for multi-token steps.

    Returns:
        ``(B, H, t, Dv)``.
    """
    dv = v.shape[-1]
    k, v, key_log_scale = _drop_padded(k, v, key_log_scale, key_padding_mask)
    if normalize:
        v = torch.cat([v, v.new_ones((*v.shape[:-1], 1))], dim=-1)
    if q.shape[2] == 1:
        out = recurrent_step(q, k, v, state, key_log_scale=key_log_scale)
    else:
        out, new = causal_linear_attention(
            q, k, v, key_log_scale=key_log_scale, state=state, chunk_size=chunk_size, need_state=True
        )
        assert new is not None
        state.kv, state.ref, state.length = new.kv, new.ref, new.length
    return normalise(out, dv) if normalize else out


def normalise(out: Tensor, dv: int) -> Tensor:
    """Split ``(…, Dv + 1)`` sums into numerator and normaliser; zeros where the normaliser is not positive."""
    return out[..., :dv] / _safe_denominator(out[..., dv:])


def _safe_denominator(den: Tensor) -> Tensor:
    # With non-negative features a zero normaliser means every weight is zero, so the numerator
    # is exactly zero too: dividing it by 1 gives the zeros of a query that sees no key. (A
    # reciprocal would overflow for tiny but positive normalisers.)
    return torch.where(den > 0, den, torch.ones_like(den))


def upcast(x: Tensor) -> Tensor:
    """Half-precision inputs are accumulated in float32: sums run over thousands of keys."""
    return x.float() if x.element_size() < 4 else x


def _drop_padded(
    k: Tensor, v: Tensor, key_log_scale: Tensor | None, key_padding_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    # Zero features and values of padded keys, and keep them out of every running maximum.
    if key_padding_mask is None:
        return k, v, key_log_scale
    real = key_padding_mask[:, None, :, None]
    k = k.masked_fill(~real, 0.0)
    v = v.masked_fill(~real, 0.0)
    if key_log_scale is not None:
        key_log_scale = key_log_scale.masked_fill(~real[..., 0], NEG)
    return k, v, key_log_scale
