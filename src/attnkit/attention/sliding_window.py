"""Sliding-window (local) attention: each query sees the keys within a fixed distance.

Local self-attention as in "Image Transformer" (Parmar et al. 2018, arXiv:1802.05751) and
the windowed attention of Longformer (Beltagy et al. 2020, arXiv:2004.05150).

Which keys (``w`` = ``window``, ``d`` = ``dilation``, query at absolute position ``p``):

- causal: ``p - d·(w-1), ..., p - d, p`` — exactly ``w`` keys including the query's own;
- bidirectional: ``p + d·m`` for ``|m| <= w // 2`` — symmetric, including self (``w`` keys
  for odd ``w``, ``w + 1`` for even ``w``).

Runs on the blocked gather core in ``O(T·w)`` time and memory, forward and backward (a
dilated window is split into ``d`` interleaved undilated ones, so dilation costs nothing
extra), or on FlexAttention (see :class:`~attnkit.kernels.pattern_attention.PatternAttention`).
Supports causal, key padding, ALiBi/T5 score biases and a rolling decoding cache that keeps
only the ``d·(w-1)`` most recent positions: ``O(w·d)`` memory however long the generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from attnkit.core.base import KVState
from attnkit.core.capabilities import Capabilities
from attnkit.core.errors import check_positive_int
from attnkit.core.registry import register
from attnkit.core.types import ScoreBias
from attnkit.kernels.blocked import gathered_attention_with_lse, span_pattern
from attnkit.kernels.pattern_attention import PatternAttention
from attnkit.masks.functions import Mask, sliding_window_mask


def window_extent(window: int, dilation: int, causal: bool) -> tuple[int, int]:
    """How far the window reaches before and after the query: ``(before, after)`` positions."""
    if causal:
        return dilation * (window - 1), 0
    return dilation * (window // 2), dilation * (window // 2)


def default_group_size(reach: int) -> int:
    """Queries per group for a window reaching ``reach`` keys beyond the group: about a quarter
    of it (the gathered span is ``group + reach``, so the waste stays near 25%), 16 to 128."""
    return int(min(128, max(16, (reach // 4) // 16 * 16)))


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    *,
    causal: bool,
    dilation: int = 1,
    attention_mask: Tensor | None = None,
    score_bias: ScoreBias | None = None,
    scale: float | None = None,
    group_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Sliding-window softmax attention on the blocked core (queries end-aligned, ``T <= S``).

    Args:
        q: ``(B, H, T, D)``.
        k: ``(B, H, S, D)``.
        v: ``(B, H, S, Dv)``.
        window: ``w``, see the module docstring for exactly which keys.
        causal: causal or bidirectional window.
        dilation: ``d``, spacing between window keys.
        attention_mask: bool ``(B, S)``, True = real token.
        score_bias: additive bias ``(h, q_pos, kv_pos)``.
        scale: score scale, default ``1/sqrt(D)``.
        group_size: queries per gathered group; default from :func:`default_group_size`.

    Returns:
        ``out (B, H, T, Dv)`` and the per-row log-sum-exp ``(B, H, T)`` (``-inf`` for empty rows).
    """
    t_len, s_len = q.shape[2], k.shape[2]
    if dilation > 1 and t_len == s_len:
        return _interleaved(q, k, v, window, causal, dilation, attention_mask, score_bias, scale, group_size)
    before, after = window_extent(window, dilation, causal)
    size = group_size or default_group_size(before + after)
    element = sliding_window_mask(t_len, s_len, window, causal=causal, dilation=dilation)
    pattern = span_pattern(t_len, s_len, size, before=before, after=after, element_mask=element, device=q.device)
    return gathered_attention_with_lse(
        q, k, v, pattern, attention_mask=attention_mask, score_bias=score_bias, scale=scale
    )


def _interleaved(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    causal: bool,
    dilation: int,
    attention_mask: Tensor | None,
    score_bias: ScoreBias | None,
    scale: float | None,
    group_size: int | None,
) -> tuple[Tensor, Tensor]:
    # Positions p = r + d·m with the same residue r form an undilated sequence over m:
    # run d undilated windows side by side as extra batch rows.
    b, h, length, _ = q.shape
    d = dilation
    rows = -(-length // d)
    pad = rows * d - length

    def split(x: Tensor) -> Tensor:  # (B, H, L, E) -> (B·d, H, rows, E)
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.view(b, h, rows, d, -1).permute(0, 3, 1, 2, 4).reshape(b * d, h, rows, -1)

    real = attention_mask if attention_mask is not None else torch.ones(b, length, dtype=torch.bool, device=q.device)
    real = torch.nn.functional.pad(real, (0, pad), value=False).view(b, rows, d).transpose(1, 2).reshape(b * d, rows)
    bias = None
    if score_bias is not None:
        outer = score_bias

        def bias(hi: Tensor, q_pos: Tensor, kv_pos: Tensor) -> Tensor:
            return outer(hi, q_pos * d, kv_pos * d)

    out, lse = sliding_window_attention(
        split(q),
        split(k),
        split(v),
        window,
        causal=causal,
        attention_mask=real,
        score_bias=bias,
        scale=scale,
        group_size=group_size,
    )

    def join(x: Tensor) -> Tensor:  # (B·d, H, rows, E) -> (B, H, L, E)
        return x.view(b, d, h, rows, -1).permute(0, 2, 3, 1, 4).reshape(b, h, rows * d, -1)[:, :, :length]

    return join(out), join(lse[..., None])[..., 0]


@dataclass
class WindowCache(KVState):
    """A rolling KV cache that keeps only the last ``capacity`` positions (``decoding="window_cache"``).

    Attributes:
        capacity: positions kept after each step, ``dilation·(window-1)``: every key a future
            query can still see.
    """

    capacity: int = 0
    preallocate: ClassVar[bool] = False  # trimmed every step: small, a plain concatenation is cheapest

    def trim(self) -> None:
        """Drop the positions no future query can see."""
        if self.length > self.capacity and self.keys is not None and self.values is not None:
            start = self.length - self.capacity
            self.keys = self.keys[:, :, start:].contiguous()
            self.values = self.values[:, :, start:].contiguous()
            if self.key_padding is not None:
                self.key_padding = self.key_padding[:, start:].contiguous()


@register(
    "sliding_window",
    Capabilities(
        exact=True,
        causal=True,
        key_padding=True,
        cross_attention=False,
        decoding="window_cache",
        complexity="O(N·w)",
        family="sparse",
        score_bias=True,
        summary="local attention over a (dilated) window of w keys, rolling O(w) decoding cache",
    ),
    small_options={"window": 7},
    benchmark_options={"window": 256},
)
class SlidingWindowAttention(PatternAttention):
    """Sliding-window attention.

    Args:
        window: ``w``: causal windows hold ``w`` keys including self; bidirectional ones
            ``w // 2`` on each side plus self.
        dilation: ``d``: window keys every ``d`` positions.
        group_size: queries gathered together on the blocked core (a speed knob; default
            about a quarter of the window).
        backend: ``"auto"``, ``"blocked"`` or ``"flex"``.
        scale: score scale; default ``1/sqrt(D)``.
    """

    def __init__(
        self,
        *,
        window: int = 256,
        dilation: int = 1,
        group_size: int | None = None,
        backend: str = "auto",
        scale: float | None = None,
    ) -> None:
        super().__init__(backend=backend, scale=scale)
        self.window = check_positive_int("window", window, example=256)
        self.dilation = check_positive_int("dilation", dilation, example=1)
        self.group_size = None if group_size is None else check_positive_int("group_size", group_size, example=64)

    def pattern(self, q_len: int, kv_len: int, *, causal: bool, **call_kwargs: Any) -> Mask:
        return sliding_window_mask(q_len, kv_len, self.window, causal=causal, dilation=self.dilation)

    def _blocked(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool,
        attention_mask: Tensor | None,
        score_bias: ScoreBias | None,
        **call_kwargs: Any,
    ) -> Tensor:
        out, _ = sliding_window_attention(
            q,
            k,
            v,
            self.window,
            causal=causal,
            dilation=self.dilation,
            attention_mask=attention_mask,
            score_bias=score_bias,
            scale=self.scale,
            group_size=self.group_size,
        )
        return out

    def new_state(self) -> WindowCache:
        """An empty rolling cache holding at most ``dilation·(window-1)`` positions between steps."""
        return WindowCache(capacity=self.dilation * (self.window - 1))

    def _decode(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        state: Any,
        *,
        attention_mask: Tensor | None,
        score_bias: ScoreBias | None,
    ) -> Tensor:
        if not isinstance(state, WindowCache):
            raise ValueError(f"state must come from {type(self).__name__}.new_state(), got {type(state).__name__}")
        state.append(k, v, attention_mask)
        assert state.keys is not None and state.values is not None
        out = self._attend(
            q,
            state.keys,
            state.values,
            causal=True,
            attention_mask=state.key_padding,
            mask=None,
            score_bias=score_bias,
        )
        state.trim()
        return out
