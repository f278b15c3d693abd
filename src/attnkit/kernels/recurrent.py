"""Recurrent decoding of causal linear attention: a running state of ``O(F·Dv)`` per head.

Causal linear attention is an RNN ("Transformers are RNNs", Katharopoulos et al. 2020,
arXiv:2006.16236): the state ``Σ_{s≤t} φ(k_s) [v_s, 1]ᵀ`` (numerator and normaliser) is all a
new query needs. One token costs O(F·Dv) per head whatever the context length; a prompt (several
tokens at once) goes through the chunked core of :mod:`attnkit.kernels.causal_prefix`, starting
from the state and leaving it updated. With key log-scales (see that module), the state is kept
relative to the running maximum ``ref`` of the log-scales seen so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.kernels.causal_prefix import CausalSettings, causal_prefix
from attnkit.kernels.linear_features import drop_padded, normalise


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

    Raises:
        ValueError: when ``key_log_scale`` is given now but was not for the state (or the reverse).
    """
    if state is not None and state.kv is not None and (key_log_scale is None) != (state.ref is None):
        raise ValueError("key_log_scale must be given on every call or on none (it was not on an earlier one)")
    result = causal_prefix(
        q,
        k,
        v,
        settings=CausalSettings(chunk_size=chunk_size, need_state=need_state),
        key_log_scale=key_log_scale,
        initial_sums=state.kv if state is not None else None,
        initial_ref=state.ref if state is not None else None,
    )
    if not need_state:
        return result.out, None
    length = (state.length if state is not None else 0) + q.shape[2]
    return result.out, PrefixState(result.sums, result.ref, length)


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
    # One token: the (F, 1) @ (1, E) product as a broadcast multiply gives the same numbers and skips a
    # matmul that can stall in the thread pool on a busy machine (seen with 2 threads, not with 1).
    outer = k.transpose(-1, -2) * v  # (B, H, F, E)
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


def kernel_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: PrefixState,
    *,
    attention_mask: Tensor | None = None,
    key_log_scale: Tensor | None = None,
    normalize: bool = True,
    chunk_size: int = 64,
) -> Tensor:
    """Append ``t`` positions to ``state`` and return their outputs (recurrent decoding).

    One token uses :func:`recurrent_step`; a longer chunk (a prompt) the chunked core.

    Args:
        q: ``(B, H, t, F)``; k: ``(B, H, t, F)``; v: ``(B, H, t, Dv)``.
        state: a :class:`PrefixState`, updated in place.
        attention_mask: bool ``(B, t)`` for the new positions.
        key_log_scale: ``(B, H, t)`` detached key log-scales, or None.
        normalize: divide by the normaliser (rows whose normaliser is not positive give zeros).
        chunk_size: chunk length for multi-token steps.

    Returns:
        ``(B, H, t, Dv)``.
    """
    dv = v.shape[-1]
    k, v, key_log_scale = drop_padded(k, v, key_log_scale, attention_mask)
    if q.shape[2] == 1:
        if normalize:
            v = torch.cat([v, v.new_ones((*v.shape[:-1], 1))], dim=-1)
        out = recurrent_step(q, k, v, state, key_log_scale=key_log_scale)
        return normalise(out, dv) if normalize else out
    # a prompt: the chunked core; with a normaliser, the state's last column is its running sum
    s0 = z0 = None
    if state.kv is not None:
        s0, z0 = (state.kv[..., :dv], state.kv[..., dv]) if normalize else (state.kv, None)
    result = causal_prefix(
        q,
        k,
        v,
        settings=CausalSettings(chunk_size=chunk_size, normalize=normalize, need_state=True),
        key_log_scale=key_log_scale,
        initial_sums=s0,
        initial_normaliser=z0,
        initial_ref=state.ref,
    )
    sums, z = result.sums, result.normaliser
    assert sums is not None  # need_state=True
    state.kv = torch.cat([sums, z[..., None]], dim=-1) if z is not None else sums
    state.ref = result.ref
    state.length += q.shape[2]
    return result.out
