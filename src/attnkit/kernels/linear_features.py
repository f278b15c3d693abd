"""What the linear-attention kernels share: feature maps applied in cache-sized blocks, and the conventions.

Kernel attention replaces ``exp(q·k)`` by ``φ(q)·φ(k)``. The kernels may apply ``φ`` themselves
(a :class:`FeatureMap`), a block of rows or a group of heads at a time, so that each pass over
the features finds them in cache and no autograd graph is kept for ``φ``. Also here: the
conventions every kernel follows (padded keys removed exactly, a normaliser that is not positive
gives zeros; half precision is computed in float32, :mod:`attnkit.kernels.precision`).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import Tensor

from attnkit.kernels.buffers import empty_buffer

#: Log-scale given to padded keys: exp(NEG - anything finite) underflows to exactly 0.
NEG = -1e30

#: bytes of one block of features: small enough that the passes over it and the products that
#: read it right after find it in cache
BLOCK_BYTES = 1 << 21


class FeatureMap(Protocol):
    """A feature map ``φ`` the kernels apply themselves, into buffers of their own.

    Its derivative must be expressible through ``φ(x)`` itself (true for elu+1, relu and
    identity), so that the backward pass needs only the saved features.
    """

    def into(self, x: Tensor, out: Tensor) -> Tensor:
        """Write ``φ(x)`` into ``out`` (same shape) and return it."""
        ...

    def derivative_into(self, phi: Tensor, out: Tensor) -> Tensor:
        """Write ``φ'(x)`` into ``out`` given ``phi = φ(x)`` (left unchanged) and return it."""
        ...


def spans(length: int, rows: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of consecutive blocks of ``rows`` rows covering ``length``."""
    return [(a, min(a + rows, length)) for a in range(0, length, rows)]


def head_groups(bh: int, length: int, width: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of consecutive groups of (batch, head) slices of about :data:`BLOCK_BYTES`."""
    return spans(bh, max(1, BLOCK_BYTES // (4 * length * width)))


def _block_rows(bh: int, width: int) -> int:
    return max(16, BLOCK_BYTES // (4 * bh * width))


def scratch(buf: Tensor, *shape: int) -> Tensor:
    """A contiguous ``shape`` view at the start of the preallocated ``buf`` (reused, never reallocated)."""
    return buf.view(-1)[: math.prod(shape)].view(shape)


def features_by_rows(x: Tensor, feature_map: FeatureMap) -> Tensor:
    """``φ(x)`` for ``x (BH, L, D)`` into a new tensor, a block of rows at a time so each pass stays in cache."""
    out = empty_buffer(x, x.shape)
    for a, b in spans(x.shape[1], _block_rows(x.shape[0], x.shape[-1])):
        feature_map.into(x[:, a:b], out[:, a:b])
    return out


def chain_features_(grad: Tensor, phi: Tensor, feature_map: FeatureMap) -> None:
    """``grad ← grad · φ'(x)`` in place for ``grad, phi = φ(x) (BH, L, D)``, a block of rows at a time."""
    rows = _block_rows(phi.shape[0], phi.shape[-1])
    buf = phi.new_empty(phi.shape[0], rows, phi.shape[-1])
    for a, b in spans(phi.shape[1], rows):
        block = grad[:, a:b]
        block.mul_(feature_map.derivative_into(phi[:, a:b], scratch(buf, *block.shape)))


def group_features(x: Tensor, feature_map: FeatureMap | None, out: Tensor, real: Tensor | None) -> Tensor:
    """``φ(x)`` for a group ``x (n, L, D)`` into ``out``, rows of padded keys zeroed; ``x`` when it is φ already."""
    if feature_map is None and real is None:
        return x
    phi = out.copy_(x) if feature_map is None else feature_map.into(x, out)
    return phi.masked_fill_(~real, 0.0) if real is not None else phi


class _Features(torch.autograd.Function):
    """``φ(x)`` for a whole tensor, keeping only ``φ(x)`` for the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, feature_map: FeatureMap) -> Tensor:
        phi = feature_map.into(x, empty_buffer(x, x.shape))
        ctx.save_for_backward(phi)
        ctx.feature_map = feature_map
        return phi

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (phi,) = ctx.saved_tensors
        derivative = ctx.feature_map.derivative_into(phi, torch.empty_like(phi))
        return derivative.mul_(grad), None


def apply_features(x: Tensor, feature_map: FeatureMap) -> Tensor:
    """``φ(x)`` with autograd, for paths that need the features as a tensor (causal with padding, decoding)."""
    out: Tensor = _Features.apply(x, feature_map)
    return out


def rowdot(x: Tensor, y: Tensor, spare: Tensor) -> Tensor:
    """``(n, L, 1)`` row-wise dot products of ``x, y (n, L, E)``, the product formed in ``spare``'s storage when it fits."""
    if spare.is_contiguous() and spare.numel() >= x.numel():
        return torch.mul(x, y, out=scratch(spare, *x.shape)).sum(dim=-1, keepdim=True)
    return torch.linalg.vecdot(x, y)[..., None]


def safe_denominator(den: Tensor) -> Tensor:
    """``den`` with every entry that is not positive replaced by 1.

    With non-negative features a zero normaliser means every weight is zero, so the numerator
    is exactly zero too: dividing it by 1 gives the zeros of a query that sees no key. (A
    reciprocal would overflow for tiny but positive normalisers.)
    """
    return torch.where(den > 0, den, torch.ones_like(den))


def normalise(out: Tensor, dv: int) -> Tensor:
    """Split ``(…, Dv + 1)`` sums into numerator and normaliser; zeros where the normaliser is not positive."""
    return out[..., :dv] / safe_denominator(out[..., dv:])


def drop_padded(
    k: Tensor, v: Tensor, key_log_scale: Tensor | None, attention_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Zero the features and values of padded keys, and keep them out of every running maximum.

    Args:
        k: ``(B, H, S, F)`` key features; v: ``(B, H, S, Dv)`` values.
        key_log_scale: ``(B, H, S)`` or None.
        attention_mask: bool ``(B, S)``, True = real key, or None (nothing padded).

    Returns:
        ``k``, ``v`` and ``key_log_scale`` (:data:`NEG` on padded keys).
    """
    if attention_mask is None:
        return k, v, key_log_scale
    real = attention_mask[:, None, :, None]
    k = k.masked_fill(~real, 0.0)
    v = v.masked_fill(~real, 0.0)
    if key_log_scale is not None:
        key_log_scale = key_log_scale.masked_fill(~real[..., 0], NEG)
    return k, v, key_log_scale
