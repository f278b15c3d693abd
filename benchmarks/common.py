"""Targets shared by the suites: SDPA (the baseline) and attnkit's registered mechanisms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

#: The protocol's shape: B=1, H=8, D=64, fp32.
HEADS, DIM = 8, 64


def qkv(length: int, *, batch: int = 1, heads: int = HEADS, dim: int = DIM, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Protocol inputs ``(B, H, L, D)`` fp32 with gradients."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, length, dim, generator=g).requires_grad_(True) for _ in range(3))


def sdpa(length: int, causal: bool) -> Callable[[], torch.Tensor]:
    """PyTorch's fused ``scaled_dot_product_attention``."""
    q, k, v = qkv(length)
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def attnkit_mechanism(length: int, causal: bool, *, name: str, **options: Any) -> Callable[[], torch.Tensor]:
    """A registered attnkit mechanism on the protocol inputs ``(1, 8, T, 64)``."""
    import attnkit

    module = attnkit.build_attention(name, **options)
    q, k, v = qkv(length)
    return lambda: module(q, k, v, causal=causal)


def attnkit_projected(length: int, causal: bool, *, name: str, **options: Any) -> Callable[[], torch.Tensor]:
    """An attnkit mechanism behind q/k/v projections 512 → 512 (the work the HF layers do inside)."""
    import attnkit

    module = attnkit.build_attention(name, **options)
    proj = torch.nn.ModuleList(torch.nn.Linear(HEADS * DIM, HEADS * DIM) for _ in range(3))
    x = torch.randn(1, length, HEADS * DIM, requires_grad=True)

    def run() -> torch.Tensor:
        q, k, v = (p(x).view(1, length, HEADS, DIM).transpose(1, 2) for p in proj)  # (1, 8, T, 64) each
        return module(q, k, v, causal=causal)

    return run


def heads_last(length: int, width: int) -> torch.Tensor:
    """A ``(1, T, width)`` input with gradients, for layers taking the head-concatenated layout."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, length, width, generator=g).requires_grad_(True)
