"""Rotary position embeddings (RoFormer, Su et al. 2021, arXiv:2104.09864).

Rotates pairs of query/key channels by an angle proportional to the absolute position,
so that ``q·k`` depends only on the relative offset. Applied to ``q`` and ``k`` before the
mechanism, it works with every mechanism (it changes inputs, not the attention maths).
Channels are paired as ``(x[i], x[i + D/2])`` (the GPT-NeoX layout).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit.core.errors import check_positive_float, check_positive_int


class RotaryEmbedding(nn.Module):
    """Rotary embedding for head dimension ``head_dim``.

    Args:
        head_dim: per-head width (even).
        base: frequency base (10000 in the paper).
    """

    inv_freq: Tensor

    def __init__(self, head_dim: int, *, base: float = 10000.0) -> None:
        super().__init__()
        check_positive_int("head_dim", head_dim)
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
        check_positive_float("base", base)
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x (B, H, T, D)`` at integer ``positions``: ``(T,)`` shared by the batch, or ``(B, T)``
        per row (left-padded batches). Returns ``(B, H, T, D)``."""
        return apply_rotary(x, positions, self.inv_freq)

    def rotate_pair(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Rotate queries ``(B, H, T, D)`` and keys ``(B, H_kv, T, D)`` at the same ``positions``,
        computing the angles once (what attention needs; half the work of two :meth:`forward` calls)."""
        cos, sin = rotary_tables(positions, self.inv_freq, q)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def rotary_tables(positions: Tensor, inv_freq: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` over the full head width for rotating ``x (B, H, T, D)`` at ``positions``.

    ``cos`` repeats ``cos(position · inv_freq)`` for both halves of the channels; ``sin`` carries
    the sign of each half: ``(-sin, sin)``, so that ``x · cos + swap_halves(x) · sin`` is the
    rotation. Shapes broadcast against ``x``: ``(T, D)`` or ``(B, 1, T, D)``.

    Raises:
        ValueError: ``positions`` is not ``(T,)`` or ``(B, T)``.
    """
    t = x.shape[-2]
    if positions.dim() == 1 and positions.shape[0] == t:
        angles = positions.to(torch.float32)[:, None] * inv_freq  # (T, D/2)
    elif positions.dim() == 2 and tuple(positions.shape) == (x.shape[0], t):
        angles = positions.to(torch.float32)[:, None, :, None] * inv_freq  # (B, 1, T, D/2)
    else:
        raise ValueError(f"positions must have shape ({t},) or ({x.shape[0]}, {t}), got {tuple(positions.shape)}")
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # (x1, x2) -> (x1·cos - x2·sin, x2·cos + x1·sin): rolling by D/2 swaps the halves.
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin


def apply_rotary(x: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Rotate channel pairs ``(x[i], x[i + D/2])`` of ``x (B, H, T, D)`` by ``position · inv_freq[i]``.

    Args:
        x: ``(B, H, T, D)`` queries or keys.
        positions: integer ``(T,)`` (one position per token, shared by the batch) or ``(B, T)``.
        inv_freq: ``(D/2,)`` frequencies (:attr:`RotaryEmbedding.inv_freq`).

    Returns:
        ``(B, H, T, D)`` in ``x``'s dtype.

    Raises:
        ValueError: ``positions`` is not ``(T,)`` or ``(B, T)``.
    """
    cos, sin = rotary_tables(positions, inv_freq, x)
    return _rotate(x, cos, sin)
