"""Sliding-window (local) attention: each query sees the keys within a fixed distance.

Local self-attention as in "Image Transformer" (Parmar et al. 2018, arXiv:1802.05751) and
the windowed attention of Longformer (Beltagy et al. 2020, arXiv:2004.05150).

Which keys (``w`` = ``window``, ``d`` = ``dilation``, query at absolute position ``p``):

- causal: ``p - d·(w-1), ..., p - d, p`` — exactly ``w`` keys including the query's own;
- bidirectional: ``p + d·m`` for ``|m| <= w // 2`` — symmetric, including self (``w`` keys
  for odd ``w``, ``w + 1`` for even ``w``).

Runs on the blocked gather core in ``O(T·w)`` time and memory, forward and backward (a
dilated window is split into ``d`` interleaved undilated ones, so dilation costs nothing
extra), or on FlexAttention (see :class:`~attnkit.attention.pattern.PatternAttention`).
Supports causal, key padding, ALiBi/T5 score biases and a rolling decoding cache that keeps
only the ``d·(w-1)`` most recent positions: ``O(w·d)`` memory however long the generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from attnkit.attention.pattern import (
    PatternAttention,
    PatternCall,
    pattern_capabilities,
    sliding_window_attention,
    window_extent,
)
from attnkit.core.base import KVState
from attnkit.core.errors import check_positive_int
from attnkit.core.registry import register
from attnkit.masks.functions import Mask, sliding_window_mask


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
    pattern_capabilities(
        complexity="O(N·w)",
        summary="local attention over a (dilated) window of w keys, rolling O(w) decoding cache",
        decoding="window_cache",
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

    def _blocked(self, q: Tensor, k: Tensor, v: Tensor, call: PatternCall) -> Tensor:
        options = call.softmax_options()
        out, _ = sliding_window_attention(
            q, k, v, self.window, causal=call.causal, dilation=self.dilation, group_size=self.group_size, **options
        )
        return out

    def new_state(self) -> WindowCache:
        """An empty rolling cache holding at most ``dilation·(window-1)`` positions between steps."""
        before, _ = window_extent(self.window, self.dilation, causal=True)  # the keys a later query can see
        return WindowCache(capacity=before)
