"""Input checks shared by every mechanism: each error names the argument, what it got and what was expected."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

#: What to do with the masks PyTorch users bring: ``attention_mask`` is bool, True = real token.
_MASK_CONVERSIONS = (
    "convert it: a 0/1 mask (1 = real token) -> mask.bool(); an additive float mask "
    "(0 = keep, -inf = drop) -> mask == 0; PyTorch's key_padding_mask (True = padding) -> ~key_padding_mask"
)


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_qkv(q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None = None) -> None:
    """Validate projected queries, keys, values and an optional padding mask.

    Empty sequences (``T = 0`` or ``S = 0``) and an empty batch are valid, as in
    :func:`torch.nn.functional.scaled_dot_product_attention`; the head dim must be positive.

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
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(f"k must have shape ({b}, {h}, S, {d}) to match q {_shape(q)}, got {_shape(k)}")
    if v.shape[0] != b or v.shape[1] != h or v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have shape ({b}, {h}, {k.shape[2]}, Dv) to match k {_shape(k)}, got {_shape(v)}")
    if d == 0:
        # Empty sequences are fine (T = 0 or S = 0, as in SDPA), but scores over zero channels
        # would all be 0: a uniform average that no sensible model asks for.
        raise ValueError(f"the head dim D of q and k must be > 0, got q {_shape(q)}, k {_shape(k)}")
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor):
            raise ValueError(f"attention_mask must be a bool tensor (B, S), got {type(attention_mask).__name__}")
        if attention_mask.dtype != torch.bool:
            # Never reinterpreted: a float mask may be 0/1 or additive (0/-inf), which mean opposite things.
            raise ValueError(
                f"attention_mask must have dtype torch.bool (True = real token), got {attention_mask.dtype}; "
                + _MASK_CONVERSIONS
            )
        if tuple(attention_mask.shape) != (b, k.shape[2]):
            raise ValueError(
                f"attention_mask must have shape (B, S) = ({b}, {k.shape[2]}), got {_shape(attention_mask)}"
            )
        if attention_mask.device != q.device:
            raise ValueError(f"attention_mask must be on {q.device} like q, got {attention_mask.device}")


def check_no_key_padding_mask(kwargs: Mapping[str, Any]) -> None:
    """Refuse PyTorch's ``key_padding_mask`` keyword, whose meaning is the opposite of attnkit's mask.

    ``torch.nn.MultiheadAttention(key_padding_mask=...)`` marks *padding* with True; attnkit's
    ``attention_mask`` marks *real tokens* with True (the Hugging Face convention). Accepting the
    PyTorch name, or routing it anywhere, would silently invert a user's mask.

    Args:
        kwargs: the keyword arguments a call did not recognise.

    Raises:
        TypeError: when ``kwargs`` holds ``key_padding_mask``, saying what to pass instead.
    """
    if "key_padding_mask" in kwargs:
        raise TypeError(
            "key_padding_mask is torch.nn.MultiheadAttention's argument, where True = padding; attnkit's "
            "argument is attention_mask, a bool (B, S) tensor where True = a real token (the opposite "
            "meaning): pass attention_mask=~key_padding_mask"
        )
