"""Boolean attention masks as small composable functions.

A mask is a function ``(b, h, q_idx, kv_idx) -> bool tensor`` evaluated on index
tensors that broadcast against each other (FlexAttention's ``mask_mod`` convention).
``True`` means "this query may attend to this key". Indices are local: ``q_idx`` runs
over the ``T`` queries and ``kv_idx`` over the ``S`` keys of one call. When ``T < S``
(decoding, or a chunk at the end of a sequence) queries are aligned to the *end* of
the keys: query ``i`` sits at absolute position ``i + (S - T)``.

Masks combine with ``&``, ``|`` and ``~``; :func:`materialize` evaluates one densely,
which is what the tests' float64 oracle consumes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.core.types import MaskFunction

#: The plain-function form a :class:`Mask` wraps (the same signature as the core's mask type).
MaskCallable = MaskFunction


class Mask:
    """A composable boolean mask function.

    Args:
        fn: ``(b, h, q_idx, kv_idx) -> bool tensor`` over broadcastable index tensors.
        name: a readable description used in ``repr``.
    """

    def __init__(self, fn: MaskCallable, name: str = "mask") -> None:
        self.fn = fn
        self.name = name

    def __call__(self, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.fn(b, h, q_idx, kv_idx)

    def __and__(self, other: Mask) -> Mask:
        return Mask(lambda b, h, q, k: self(b, h, q, k) & other(b, h, q, k), f"({self.name} & {other.name})")

    def __or__(self, other: Mask) -> Mask:
        return Mask(lambda b, h, q, k: self(b, h, q, k) | other(b, h, q, k), f"({self.name} | {other.name})")

    def __invert__(self) -> Mask:
        return Mask(lambda b, h, q, k: ~self(b, h, q, k), f"~{self.name}")

    def __repr__(self) -> str:
        return f"Mask({self.name})"

    def materialize(
        self, batch: int, heads: int, q_len: int, kv_len: int, device: torch.device | str | None = None
    ) -> Tensor:
        """Evaluate the mask densely. Returns a bool tensor ``(batch, heads, q_len, kv_len)``."""
        return materialize(self, batch, heads, q_len, kv_len, device=device)


def materialize(
    mask: Mask | MaskCallable,
    batch: int,
    heads: int,
    q_len: int,
    kv_len: int,
    device: torch.device | str | None = None,
) -> Tensor:
    """Evaluate ``mask`` on every (b, h, q, kv) index. Returns bool ``(batch, heads, q_len, kv_len)``."""
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    q = torch.arange(q_len, device=device).view(1, 1, -1, 1)
    k = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
    out = mask(b, h, q, k)
    return torch.as_tensor(out, device=device).to(torch.bool).expand(batch, heads, q_len, kv_len).clone()


def full_mask() -> Mask:
    """Every query may attend to every key."""
    return Mask(lambda b, h, q, k: torch.ones_like(q + k, dtype=torch.bool), "full")


def causal_mask(q_len: int, kv_len: int) -> Mask:
    """Key ``j`` is visible to query ``i`` iff ``j <= i + (kv_len - q_len)`` (end-aligned)."""
    offset = kv_len - q_len
    return Mask(lambda b, h, q, k: k <= q + offset, "causal")


def real_keys_mask(attention_mask: Tensor) -> Mask:
    """Keys where ``attention_mask[b, j]`` is True (a real token) are visible.

    The mask-function form of the mechanisms' ``attention_mask`` argument: bool ``(B, S)``,
    True = real token (the opposite of PyTorch's ``key_padding_mask``).
    """
    return Mask(lambda b, h, q, k: attention_mask[b, k], "real_keys")


def sliding_window_mask(q_len: int, kv_len: int, window: int, *, causal: bool, dilation: int = 1) -> Mask:
    """The sliding-window pattern in absolute positions (query ``i`` at ``p = i + kv_len - q_len``).

    Causal: keys ``p - d*(window-1), ..., p - d, p`` (``window`` keys including self).
    Bidirectional: keys ``p + d*m`` for ``|m| <= window // 2`` (``window`` keys for odd
    ``window``, ``window + 1`` for even ones, always symmetric and including self).
    ``d`` is ``dilation``.
    """
    offset = kv_len - q_len

    def fn(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        dist = (q + offset) - k
        if dilation == 1:  # the common case, without the grid arithmetic
            return (dist >= 0) & (dist <= window - 1) if causal else dist.abs() <= window // 2
        on_grid = dist.remainder(dilation) == 0
        steps = torch.div(dist, dilation, rounding_mode="floor")
        if causal:
            return on_grid & (steps >= 0) & (steps <= window - 1)
        return on_grid & (steps.abs() <= window // 2)

    return Mask(fn, f"sliding_window({window}, dilation={dilation}, causal={causal})")
