"""Targets shared by every suite: SDPA (the baseline) and attnkit's registered mechanisms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


def qkv(length: int, *, batch: int = 1, heads: int = 8, dim: int = 64, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Protocol inputs ``(B, H, L, D)`` fp32 with gradients."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, length, dim, generator=g).requires_grad_(True) for _ in range(3))


def sdpa(length: int, causal: bool) -> Callable[[], torch.Tensor]:
    """PyTorch's fused ``scaled_dot_product_attention``."""
    q, k, v = qkv(length)
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def attnkit_mechanism(length: int, causal: bool, *, name: str, **options: Any) -> Callable[[], torch.Tensor]:
    """A registered attnkit mechanism on the protocol inputs."""
    import attnkit

    module = attnkit.build_attention(name, **options)
    q, k, v = qkv(length)
    return lambda: module(q, k, v, causal=causal)
