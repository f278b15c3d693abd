"""Shared test helpers: inputs with realistic structure and the oracle comparison."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import attnkit
from attnkit.attention.reference import reference_attention
from attnkit.inputs import structured_qkv

__all__ = ["TOL", "build", "oracle", "random_padding", "relative_error", "structured_qkv"]

TOL = {torch.float32: 1e-5, torch.float64: 1e-9, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def build(name: str, **extra: Any) -> attnkit.AttentionMechanism:
    """Build ``name`` with its registered small options (overridden by ``extra``), in eval mode."""
    spec = attnkit.get_spec(name)
    return attnkit.build_attention(name, **{**spec.small_options, **extra}).eval()


def random_padding(batch: int, length: int, *, seed: int = 0, min_real: int = 1) -> Tensor:
    """A bool ``(batch, length)`` key padding mask (True = real) with a random number of padded positions."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    for b in range(batch):
        real = int(torch.randint(min_real, length + 1, (1,), generator=g))
        # padding at the end for even rows, scattered for odd rows
        if b % 2 == 0:
            mask[b, real:] = False
        else:
            drop = torch.randperm(length, generator=g)[: length - real]
            mask[b, drop] = False
    return mask


def oracle(
    module: attnkit.AttentionMechanism,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    attention_mask: Tensor | None = None,
    **call_kwargs: Any,
) -> Tensor:
    """The float64 reference for ``module``: softmax over its declared pattern (exact
    mechanisms) or dense softmax attention (what approximate mechanisms approximate)."""
    pattern = module.pattern(q.shape[2], k.shape[2], causal=causal, **call_kwargs)
    return reference_attention(q, k, v, causal=causal, attention_mask=attention_mask, mask=pattern)


def relative_error(out: Tensor, ref: Tensor) -> float:
    """Relative Frobenius error ``‖out - ref‖ / ‖ref‖`` in float64."""
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm().clamp(min=1e-30))
