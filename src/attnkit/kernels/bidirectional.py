"""Bidirectional linear attention ``φq (φkᵀ v) / φq (φkᵀ 1)``, a group of (batch, head) slices at a time.

Every query sees every (real) key, so the keys' sums ``Σ φ(k_s) v_sᵀ`` (F, Dv) and ``Σ φ(k_s)``
(F,) are formed once per head and read by every query: time O(N·F·Dv), memory O(N·(F + Dv)).
The feature map is applied inside, a group of heads at a time (about
:data:`~attnkit.kernels.linear_features.BLOCK_BYTES` of features), so the products that read a
group's features find them in cache; the backward pass is written by hand.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnkit.kernels.buffers import empty_buffer
from attnkit.kernels.linear_features import FeatureMap, group_features, head_groups, rowdot, safe_denominator, scratch


def grouped_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attention_mask: Tensor | None = None,
    feature_map: FeatureMap | None = None,
    normalize: bool = True,
) -> Tensor:
    """Bidirectional linear attention, with its own autograd.

    Args:
        q: ``(B, H, T, F)`` query features, or queries when ``feature_map`` is given.
        k: ``(B, H, S, F)`` key features, or keys when ``feature_map`` is given.
        v: ``(B, H, S, Dv)`` values.
        attention_mask: bool ``(B, S)``, True = real key; padded keys' features and values are zeroed.
        feature_map: ``φ``, applied here a group of heads at a time, or None.
        normalize: divide by ``Σ_s φ(q)·φ(k_s)`` (rows whose normaliser is not positive give zeros).

    Returns:
        ``(B, H, T, Dv)``.
    """
    out: Tensor = _GroupedKernel.apply(q, k, v, attention_mask, feature_map, normalize)
    return out


class _GroupedKernel(torch.autograd.Function):
    """The autograd of :func:`grouped_linear_attention`.

    A group's features are written into the saved ``(B·H, L, F)`` buffers and read by its
    products at once, while still in cache; the backward pass, written by hand, reads them back
    (faster, measured, than recomputing them a group at a time in cache). A group is contiguous
    in memory, unlike a block of rows across heads (slower, measured). The normaliser is a
    separate matrix-vector product: a ones column on ``v`` makes every product 65 wide, which
    MKL runs markedly slower. With a feature map, the query and key gradients are written over
    the spent features (a group at a time, once its products have read them): two fresh
    ``(B·H, L, F)`` tensors fewer per step, whose first touch costs page faults; a second
    backward over the same graph recomputes the features from ``q`` and ``k``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        real: Tensor | None,
        feature_map: FeatureMap | None,
        normalize: bool,
    ) -> Tensor:
        bsz, heads, t_len, feat = q.shape
        s_len, e_dim = k.shape[2], v.shape[-1]
        bh = bsz * heads
        q3, k3, v3 = (x.reshape(bh, x.shape[2], x.shape[3]) for x in (q, k, v))
        # True = real key, one row per (batch, head)
        real3 = real[:, None, :, None].expand(bsz, heads, s_len, 1).reshape(bh, s_len, 1) if real is not None else None
        if real3 is not None:  # padded values are zeroed too: no inf or nan there leaks through 0 · v
            v3 = v3.masked_fill(~real3, 0.0)
        phi_q = q3 if feature_map is None else empty_buffer(q3, q3.shape)
        phi_k = k3 if feature_map is None and real3 is None else empty_buffer(k3, k3.shape)
        kv = q3.new_empty(bh, feat, e_dim)
        z = q3.new_empty(bh, 1, feat) if normalize else None
        out = empty_buffer(q3, (bh, t_len, e_dim))
        den = q3.new_empty(bh, t_len, 1) if normalize else None
        for a, b in head_groups(bh, max(t_len, s_len), feat):
            phi = group_features(k3[a:b], feature_map, phi_k[a:b], real3[a:b] if real3 is not None else None)
            torch.bmm(phi.transpose(1, 2), v3[a:b], out=kv[a:b])
            if z is not None:
                torch.sum(phi, dim=1, keepdim=True, out=z[a:b])
            phi = group_features(q3[a:b], feature_map, phi_q[a:b], None)
            block = torch.bmm(phi, kv[a:b], out=out[a:b])
            if z is not None and den is not None:
                block.div_(safe_denominator(torch.bmm(phi, z[a:b].transpose(1, 2), out=den[a:b])))
        if feature_map is None:
            ctx.save_for_backward(phi_q, phi_k, v3, real3, kv, z, out, den)
        else:
            # the features are our own buffers: handed to the backward, which writes dq and dk over
            # them (no fresh (L, F) tensors there); a second backward recomputes them from q and k
            ctx.save_for_backward(q, k, v3, real3, kv, z, out, den)
            ctx.features = [(phi_q, phi_k)]
        ctx.feature_map = feature_map
        return out.view(bsz, heads, t_len, e_dim)

    @staticmethod
    def features(q: Tensor, k: Tensor, real3: Tensor | None, feature_map: FeatureMap) -> tuple[Tensor, Tensor]:
        """``φ(q), φ(k)`` as the forward pass made them (padded keys' rows zeroed), for a second backward."""
        q3, k3 = (x.reshape(-1, x.shape[2], x.shape[3]) for x in (q, k))
        phi_q, phi_k = q3.new_empty(q3.shape), k3.new_empty(k3.shape)
        for a, b in head_groups(q3.shape[0], max(q3.shape[1], k3.shape[1]), q3.shape[-1]):
            group_features(k3[a:b], feature_map, phi_k[a:b], real3[a:b] if real3 is not None else None)
            group_features(q3[a:b], feature_map, phi_q[a:b], None)
        return phi_q, phi_k

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        phi_q, phi_k, v3, real3, kv, z, out, den = ctx.saved_tensors
        feature_map = ctx.feature_map
        if feature_map is not None:  # phi_q, phi_k saved as q, k
            phi_q, phi_k = (
                ctx.features.pop() if ctx.features else _GroupedKernel.features(phi_q, phi_k, real3, feature_map)
            )
        bh, t_len, feat = phi_q.shape
        s_len, e_dim = phi_k.shape[1], v3.shape[-1]
        grad = grad_out.reshape(bh, t_len, e_dim)
        groups = head_groups(bh, max(t_len, s_len), max(feat, e_dim))
        group_shape = (groups[0][1], max(t_len, s_len), max(feat, e_dim))
        # one group's scaled gradient (n, T, E); then row products and the features' derivative (n, L, F)
        scaled = empty_buffer(phi_q, group_shape)
        spare = phi_q.new_empty(group_shape)
        if feature_map is None:  # q and k are the features: gradients of their own
            dq, dk = empty_buffer(phi_q, phi_q.shape), empty_buffer(phi_k, phi_k.shape)
        else:  # written over the features, each group once nothing reads its features any more
            dq, dk = phi_q, phi_k
        dv = empty_buffer(v3, v3.shape)
        d_kv = phi_q.new_empty(groups[0][1], feat, e_dim)
        d_z = phi_q.new_empty(groups[0][1], 1, feat)
        for a, b in groups:
            n = b - a
            g, phi = grad[a:b], phi_q[a:b]
            grad_den = None
            if den is not None and z is not None:
                # out = num / den: d num = g / den, d den = -(g · out) / den (zero where den was not positive)
                block_den = den[a:b]
                g = torch.div(g, safe_denominator(block_den), out=scratch(scaled, n, t_len, e_dim))
                grad_den = rowdot(g, out[a:b], spare).neg_().masked_fill_(block_den <= 0, 0.0)
                torch.bmm(grad_den.transpose(1, 2), phi, out=d_z[:n])
            torch.bmm(phi.transpose(1, 2), g, out=d_kv[:n])
            derivative = (
                None if feature_map is None else feature_map.derivative_into(phi, scratch(spare, n, t_len, feat))
            )
            target = torch.bmm(g, kv[a:b].transpose(1, 2), out=dq[a:b])
            if grad_den is not None and z is not None:
                target.addcmul_(grad_den, z[a:b])
            if derivative is not None:
                target.mul_(derivative)
            phi = phi_k[a:b]
            torch.bmm(phi, d_kv[:n], out=dv[a:b])
            derivative = (
                None if feature_map is None else feature_map.derivative_into(phi, scratch(spare, n, s_len, feat))
            )
            target = torch.bmm(v3[a:b], d_kv[:n].transpose(1, 2), out=dk[a:b])
            if grad_den is not None:  # the normaliser's gradient reaches every key's features alike
                target.add_(d_z[:n])
            if derivative is not None:
                target.mul_(derivative)
            if real3 is not None:
                target.masked_fill_(~real3[a:b], 0.0)
        lead = grad_out.shape[:2]
        return dq.view(*lead, t_len, feat), dk.view(*lead, s_len, feat), dv.view(*lead, s_len, e_dim), None, None, None
