"""Absolute position embeddings added to token embeddings: sinusoidal and learned.

Sinusoidal: Vaswani et al. 2017 (arXiv:1706.03762), section 3.5.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnkit.core.errors import check_non_negative_int, check_positive_int


def _positions(length: int, offset: int, device: torch.device | None) -> Tensor:
    # length 0 is an empty table, for empty inputs (T = 0)
    check_non_negative_int("length", length)
    check_non_negative_int("offset", offset)
    return torch.arange(offset, offset + length, device=device)


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos position embeddings.

    Args:
        dim: embedding width (even).
        base: wavelength base (10000 in the paper).
    """

    inv_freq: Tensor

    def __init__(self, dim: int, *, base: float = 10000.0) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        if dim % 2:
            raise ValueError(f"dim must be even for sinusoidal positions, got {dim}")
        self.dim = dim
        inv_freq = torch.exp(-math.log(base) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        """Embeddings of positions ``offset .. offset+length-1``. Returns ``(length, dim)``."""
        pos = _positions(length, offset, self.inv_freq.device).float()
        angles = pos[:, None] * self.inv_freq[None, :]  # (length, dim/2)
        return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)


class LearnedPositions(nn.Module):
    """A learned embedding per absolute position.

    Args:
        dim: embedding width.
        max_len: number of positions; longer inputs raise.
    """

    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        self.max_len = check_positive_int("max_len", max_len, example=2048)
        self.embedding = nn.Embedding(max_len, dim)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, length: int, offset: int = 0) -> Tensor:
        """Embeddings of positions ``offset .. offset+length-1``. Returns ``(length, dim)``."""
        if offset + length > self.max_len:
            raise ValueError(
                f"position {offset + length - 1} is beyond max_len={self.max_len} of the learned positions "
                "(raise max_len or use rotary/sinusoidal positions)"
            )
        return self.embedding(_positions(length, offset, self.embedding.weight.device))
