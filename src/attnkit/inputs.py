"""Inputs with realistic structure for tests, demos and the arena.

Efficient attention targets data where nearby tokens are similar (text, audio, images):
attention mass concentrates, and approximations have a fair chance. i.i.d. noise makes
every mechanism look alike (near-uniform attention), so fidelity is measured here on
locally correlated sequences instead. Two generators:

- :func:`structured_qkv`: queries and keys are *independent* smooth random walks: each
  sequence is locally correlated, but where a query's attention mass lands is arbitrary.
- :func:`self_attention_qkv`: queries and keys are projections of the *same* smooth
  hidden sequence, as in a self-attention layer over text-like states, so the mass
  concentrates near the diagonal (about 80% within ±128 positions at length 1024) while
  the rest spreads over earlier and later states that happen to be similar.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _smooth_walk(shape: tuple[int, int, int, int], g: torch.Generator) -> Tensor:
    """float64 ``(B, H, L, D)``: a random walk along ``L`` (steps 0.3), centred and normalised to
    unit variance, plus noise 0.3: neighbouring positions are similar, distant ones are not."""
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.3).cumsum(dim=2)
    x = x - x.mean(dim=2, keepdim=True)
    x = x / x.std(dim=(2, 3), keepdim=True).clamp(min=1e-6)
    return x + 0.3 * torch.randn(*shape, generator=g, dtype=torch.float64)


def _deliver(
    q: Tensor, k: Tensor, v: Tensor, *, dtype: torch.dtype, device: torch.device | str | None, requires_grad: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The float64 draws as the caller asked for them: dtype, device, leaves that require grad or not."""
    out = [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (q, k, v)]
    return out[0], out[1], out[2]


def structured_qkv(
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    dim: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    requires_grad: bool = False,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Locally correlated ``q (B, H, T, D)``, ``k (B, H, S, D)``, ``v (B, H, S, D)``.

    Queries and keys are smooth random walks (normalised to unit variance) plus noise,
    scaled so scores span a few units; values are standard normal.
    """
    g = torch.Generator().manual_seed(seed)
    q = _smooth_walk((batch, heads, q_len, dim), g) * 1.5
    k = _smooth_walk((batch, heads, kv_len, dim), g) * 1.5
    v = torch.randn(batch, heads, kv_len, dim, generator=g, dtype=torch.float64)
    return _deliver(q, k, v, dtype=dtype, device=device, requires_grad=requires_grad)


def self_attention_qkv(
    batch: int,
    heads: int,
    length: int,
    dim: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    requires_grad: bool = False,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Self-attention inputs ``q, k, v (B, H, L, D)`` over one smooth hidden sequence per head.

    The hidden states ``x`` are a normalised random walk plus noise; ``q = x W`` and
    ``k = x W + noise`` share one random orthogonal ``W`` per head, so ``q_t · k_s`` is
    largest where ``x_s`` resembles ``x_t``, mostly at nearby positions. Values are
    standard normal, independent of ``x``, so an output error measures how well the
    attention weights are reproduced rather than how smooth the values are.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (batch, heads, length, dim)
    x = _smooth_walk(shape, g)
    w = torch.linalg.qr(torch.randn(heads, dim, dim, generator=g, dtype=torch.float64))[0]  # (H, D, D)
    q = x @ w
    k = q + 0.3 * torch.randn(*shape, generator=g, dtype=torch.float64)
    v = torch.randn(*shape, generator=g, dtype=torch.float64)
    return _deliver(q, k, v, dtype=dtype, device=device, requires_grad=requires_grad)
