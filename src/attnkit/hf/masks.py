"""What Transformers' mask builders hand the bridge: an explicit layout instead of a 4-D mask.

Transformers builds one attention mask per forward (per layer type) through the mask function
registered for ``config._attn_implementation`` (``AttentionMaskInterface``). The bridge registers
:func:`bridge_mask` there, so instead of a dense ``(B, 1, T, S)`` tensor every attention layer
receives a :class:`MaskLayout`: causal or not, an optional causal sliding window, and the key
padding ``(B, S)``, which is exactly what an attnkit mechanism takes. Nothing is guessed: the two
plain patterns are recognised by identity (Transformers' own ``causal_mask_function`` and
``bidirectional_mask_function``); any other mask function is evaluated densely (Transformers'
``sdpa_mask``) and must equal a causal sliding window, the causal or the bidirectional pattern
exactly, or the call is refused (packed sequences, chunked or block masks, image-token overlays).

Layers that keep Transformers' own attention (the other layers of a hybrid, cross-attention)
get the mask Transformers would have built for the original implementation, computed on demand
by :meth:`MaskLayout.base_mask` with the same arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    bidirectional_mask_function,
    causal_mask_function,
    sdpa_mask,
)

#: Dense mask elements evaluated per chunk when a mask function must be checked densely.
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class MaskLayout:
    """One attention mask, as the three facts an attnkit mechanism needs.

    Queries are end-aligned with the keys (``q_offset + T == kv_offset + S``), which is
    attnkit's convention for ``causal=True``.

    Attributes:
        causal: query ``i`` sees key ``j`` only when ``j <= i + S - T``.
        window: with ``causal``, a query also sees only the ``window`` most recent positions
            (itself included: Transformers' ``sliding_window``); None for no window.
        padding: bool ``(B, S)``, True = real key; None when every key is real.
        q_length: ``T``.
        kv_length: ``S``.
        q_offset: absolute position of the first query.
        kv_offset: absolute position of the first key (non-zero once a sliding cache drops keys).
        base: the attention implementation of the layers that keep Transformers' attention.
        arguments: the mask builder's arguments, to build the base implementation's mask.
    """

    causal: bool
    window: int | None
    padding: Tensor | None
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    base: str
    arguments: dict[str, Any] = field(repr=False)
    _base_mask: Any = field(default=None, repr=False)
    _base_built: bool = field(default=False, repr=False)

    def base_mask(self) -> Any:
        """The mask Transformers would have built for :attr:`base` (built once, on first use)."""
        if not self._base_built:
            self._base_mask = ALL_MASK_ATTENTION_FUNCTIONS[self.base](**self.arguments)
            self._base_built = True
        return self._base_mask

    def describe(self) -> str:
        """A short readable summary for error messages."""
        kind = (
            "bidirectional" if not self.causal else "causal" if self.window is None else f"causal window {self.window}"
        )
        return (
            f"{kind}, T={self.q_length}, S={self.kv_length}, {'padded' if self.padding is not None else 'no padding'}"
        )


def bridge_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Any = causal_mask_function,
    attention_mask: Tensor | None = None,
    local_size: int | None = None,
    config: Any = None,
    **kwargs: Any,
) -> MaskLayout:
    """The ``AttentionMaskInterface`` function registered under every ``attnkit_<mechanism>`` name.

    Takes what Transformers passes to any mask builder (see ``masking_utils.sdpa_mask``) and
    returns a :class:`MaskLayout`.

    Raises:
        ValueError: a causal mask whose keys do not end at the last query (a static cache), or
            a mask function that is not a causal sliding window, causal or bidirectional.
    """
    arguments = {
        "batch_size": batch_size,
        "q_length": q_length,
        "kv_length": kv_length,
        "q_offset": q_offset,
        "kv_offset": kv_offset,
        "mask_function": mask_function,
        "attention_mask": attention_mask,
        "config": config,
        **kwargs,
    }
    if local_size is not None:
        arguments["local_size"] = local_size
    q_start = int(q_offset)
    padding = _padding(attention_mask, kv_length, kv_offset)
    if mask_function is causal_mask_function:
        causal, window = True, None
    elif mask_function is bidirectional_mask_function:
        causal, window = False, None
    else:
        causal, window = _recognise(arguments, local_size)
    if causal and q_start + q_length != kv_offset + kv_length:
        # attnkit's causal convention aligns the last query with the last key.
        raise ValueError(
            f"attnkit.hf needs the keys to end at the last query, got queries at {q_start}..{q_start + q_length - 1} "
            f"and keys at {kv_offset}..{kv_offset + kv_length - 1} (a static or offloaded cache); "
            "generate with the default dynamic cache (cache_implementation='dynamic')"
        )
    spec = getattr(config, "attnkit", None)
    base = spec.get("base_attn_implementation", "sdpa") if isinstance(spec, dict) else "sdpa"
    return MaskLayout(causal, window, padding, q_length, kv_length, q_start, kv_offset, base, arguments)


def _padding(attention_mask: Tensor | None, kv_length: int, kv_offset: int) -> Tensor | None:
    # The 2-D mask covers absolute positions 0..; the keys are kv_offset..kv_offset+S-1.
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"expected a 2-D (batch, length) attention_mask, got shape {tuple(attention_mask.shape)}")
    real = attention_mask.to(torch.bool)
    missing = kv_offset + kv_length - real.shape[1]
    if missing > 0:  # keys beyond the mask's end are not real tokens (Transformers pads with False)
        real = torch.nn.functional.pad(real, (0, missing), value=False)
    real = real[:, kv_offset : kv_offset + kv_length]
    return None if bool(real.all()) else real


def _recognise(arguments: dict[str, Any], local_size: int | None) -> tuple[bool, int | None]:
    """Evaluate an unrecognised mask function densely and name its pattern, or refuse."""
    candidates: list[tuple[bool, int | None]] = []
    if local_size is not None:
        candidates.append((True, int(local_size)))
    candidates += [(True, None), (False, None)]
    batch, q_length, kv_length = arguments["batch_size"], arguments["q_length"], arguments["kv_length"]
    q_start, kv_offset = int(arguments["q_offset"]), arguments["kv_offset"]
    rows = max(1, _CHUNK_ELEMENTS // max(1, batch * kv_length))
    matching = list(candidates)
    for start in range(0, q_length, rows):
        stop = min(q_length, start + rows)
        dense = sdpa_mask(
            batch_size=batch,
            q_length=stop - start,
            kv_length=kv_length,
            q_offset=q_start + start,
            kv_offset=kv_offset,
            mask_function=arguments["mask_function"],
            attention_mask=None,
            allow_is_causal_skip=False,
            allow_is_bidirectional_skip=False,
            use_vmap=arguments.get("use_vmap", False),
            device=arguments.get("device", "cpu"),
        )  # (B, 1, rows, S), padding left out: it is read separately
        assert dense is not None
        distance = (  # absolute query position minus absolute key position, (rows, S)
            torch.arange(q_start + start, q_start + stop, device=dense.device)[:, None]
            - torch.arange(kv_offset, kv_offset + kv_length, device=dense.device)[None, :]
        )
        matching = [c for c in matching if bool((dense == _pattern(distance, *c)).all())]
        if not matching:
            raise ValueError(
                "attnkit.hf cannot pass this attention mask to an attnkit mechanism: it is neither causal, "
                "bidirectional nor a causal sliding window (packed sequences in one row, a chunked or block mask, "
                "or a custom overlay); give each sequence its own row with a 2-D attention_mask instead"
            )
    return matching[0]


def _pattern(distance: Tensor, causal: bool, window: int | None) -> Tensor:
    if not causal:
        return torch.ones_like(distance, dtype=torch.bool)
    allowed = distance >= 0
    return allowed if window is None else allowed & (distance < window)


def layout_from_dense(mask: Tensor, *, window: int | None) -> MaskLayout:
    """Read a ready 4-D mask a caller passed instead of a 2-D one, or refuse it.

    Args:
        mask: ``(B, 1 or H, T, S)`` bool (True = may attend) or additive float (0 = attend,
            a very negative value = masked).
        window: the causal sliding window the layer declares, tried first when given.

    Returns:
        The layout, with padding read from the last query row (which sees every real key
        under each accepted pattern) and the whole mask checked against it.

    Raises:
        ValueError: the mask carries a bias, differs between heads, or is not a padded
            causal / causal-window / bidirectional pattern.
    """
    if mask.dim() != 4:
        raise ValueError(f"expected a 4-D attention mask (B, 1, T, S), got shape {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        allowed = mask
    else:
        floor = torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | (mask <= floor)).all()):
            raise ValueError(
                "the 4-D attention mask carries additive score biases (values other than 0 and -inf); "
                "attnkit mechanisms take no score bias through attnkit.hf"
            )
        allowed = mask == 0
    if allowed.shape[1] != 1 and not bool((allowed == allowed[:, :1]).all()):
        raise ValueError("the 4-D attention mask differs between heads; attnkit.hf needs one mask for all heads")
    allowed = allowed[:, 0]  # (B, T, S)
    _, q_length, kv_length = allowed.shape
    if q_length > kv_length:
        raise ValueError(f"the 4-D attention mask has more queries ({q_length}) than keys ({kv_length})")
    padding = allowed[:, -1, :]  # (B, S)
    distance = torch.arange(kv_length - q_length, kv_length, device=mask.device)[:, None] - torch.arange(
        kv_length, device=mask.device
    )
    candidates: list[tuple[bool, int | None]] = ([(True, window)] if window is not None else []) + [
        (True, None),
        (False, None),
    ]
    for causal, win in candidates:
        expected = _pattern(distance, causal, win)[None] & padding[:, None, :]  # (B, T, S)
        # A row with nothing visible outputs zeros in attnkit; callers fill such rows either way.
        empty = ~expected.any(dim=-1, keepdim=True)
        if bool(((allowed == expected) | empty).all()):
            layout = MaskLayout(
                causal,
                win,
                None if bool(padding.all()) else padding,
                q_length,
                kv_length,
                kv_length - q_length,
                0,
                base="",
                arguments={},
            )
            layout._base_mask, layout._base_built = mask, True  # the base implementation gets the mask as given
            return layout
    raise ValueError(
        "the 4-D attention mask is not a padded causal, causal sliding window or bidirectional pattern; "
        "pass a 2-D (batch, length) attention_mask instead"
    )
