"""Input checks shared by every mechanism: each error names the argument, what it got and what was expected."""

from __future__ import annotations

import torch
from torch import Tensor


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_qkv(q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None = None) -> None:
    """Validate projected queries, keys, values and an optional key padding mask.

    Args:
        q: ``(B, H, T, D)`` queries.
        k: ``(B, H, S, D)`` keys.
        v: ``(B, H, S, Dv)`` values.
        attention_mask: optional bool ``(B, S)``, True for real tokens.

    Raises:
        ValueError: naming the argument, the shape/dtype/device it got and what was expected.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape (B, H, L, D), got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions (B, H, L, D), got shape {_shape(t)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    b, h, t_len, d = q.shape
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(f"k must have shape ({b}, {h}, S, {d}) to match q {_shape(q)}, got {_shape(k)}")
    if v.shape[0] != b or v.shape[1] != h or v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have shape ({b}, {h}, {k.shape[2]}, Dv) to match k {_shape(k)}, got {_shape(v)}")
    if t_len == 0 or k.shape[2] == 0 or d == 0:
        raise ValueError(
            f"empty sequences are not allowed: q {_shape(q)}, k {_shape(k)} (lengths and head dim must be > 0)"
        )
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor):
            raise ValueError(f"attention_mask must be a bool tensor (B, S), got {type(attention_mask).__name__}")
        if attention_mask.dtype != torch.bool:
            raise ValueError(
                f"attention_mask must have dtype torch.bool (True = real token), got {attention_mask.dtype}"
            )
        if tuple(attention_mask.shape) != (b, k.shape[2]):
            raise ValueError(
                f"attention_mask must have shape (B, S) = ({b}, {k.shape[2]}), got {_shape(attention_mask)}"
            )
        if attention_mask.device != q.device:
            raise ValueError(f"attention_mask must be on {q.device} like q, got {attention_mask.device}")
