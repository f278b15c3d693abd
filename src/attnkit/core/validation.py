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


def check_qkv(q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None = None, *, grouped: bool = False) -> None:
    """Validate projected queries, keys, values and an optional padding mask.

    Empty sequences (``T = 0`` or ``S = 0``) and an empty batch are valid, as in
    :func:`torch.nn.functional.scaled_dot_product_attention`; the head dim must be positive.

    Args:
        q: ``(B, H, T, D)`` queries.
        k: ``(B, H, S, D)`` keys.
        v: ``(B, H, S, Dv)`` values.
        attention_mask: optional bool ``(B, S)``, True for real tokens.
        grouped: also accept grouped-query keys/values: ``k``/``v`` with ``H_kv`` heads,
            ``H_kv`` dividing ``H``, each serving ``H // H_kv`` query heads.

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
    # keys/values carry H heads, or (grouped) H_kv heads with H_kv dividing H
    h_kv = k.shape[1] if grouped and k.shape[1] > 0 and h % k.shape[1] == 0 else h
    heads = f"{h} or a divisor of {h}" if grouped else str(h)
    if k.shape[0] != b or k.shape[1] != h_kv or k.shape[3] != d:
        raise ValueError(f"k must have shape ({b}, {heads}, S, {d}) to match q {_shape(q)}, got {_shape(k)}")
    if v.shape[0] != b or v.shape[1] != h_kv or v.shape[2] != k.shape[2]:
        raise ValueError(
            f"v must have shape ({b}, {k.shape[1]}, {k.shape[2]}, Dv) to match k {_shape(k)}, got {_shape(v)}"
        )
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


def check_ids(name: str, ids: Any, vocab_size: int, *, allow_empty: bool = False) -> Tensor:
    """Validate token ids: an integer tensor ``(B, T)`` with values in ``[0, vocab_size)``.

    ``allow_empty`` accepts ``B = 0`` or ``T = 0`` (a forward pass then returns an empty
    output, as attention does); generation and pooling need at least one token.
    """
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be an integer tensor of shape (B, T), got {got}")
    if ids.numel() == 0:
        if allow_empty:
            return ids.long()
        raise ValueError(f"{name} must not be empty, got shape {tuple(ids.shape)}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size})")
    return ids.long()


def check_mask(name: str, mask: Any, ids: Tensor) -> Tensor | None:
    """Validate a padding mask for ``ids``; returns it as bool, or None when nothing is padded."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(ids.shape):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor of shape {tuple(ids.shape)} (True = real token), got {got}")
    if mask.dtype != torch.bool:
        # Float masks are refused, not guessed: PyTorch's are additive (0 = keep, -inf = drop).
        if mask.is_floating_point() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(
                f"{name} must be bool (True = real token) or 0/1 integers (1 = real token), got dtype "
                f"{mask.dtype}; convert a 0/1 float mask with mask.bool(), an additive one (0 = keep, "
                "-inf = drop) with mask == 0"
            )
        mask = mask.bool()
    if mask.device != ids.device:
        raise ValueError(f"{name} must be on {ids.device} like the ids, got {mask.device}")
    return None if bool(mask.all()) else mask
