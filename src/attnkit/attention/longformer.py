"""Longformer attention: a (dilated) sliding window plus global tokens.

"Longformer: The Long-Document Transformer" (Beltagy et al. 2020, arXiv:2004.05150).
Every query sees its window (exactly the keys of :mod:`attnkit.attention.sliding_window`);
a *global* token sees every key and is seen by every query (causality still applies in
the causal variant). Global tokens are chosen per call, ``global_tokens=``, as a bool
``(B, S)`` mask over positions or an int count of leading tokens; without it the
constructor's ``num_global_tokens`` leading tokens are global (none by default).

Runs as three parts on the blocked core, joined exactly through their log-sum-exps:
the window (``O(T·w)``), every query against the global keys outside its window
(``O(T·G)``) and the global queries against all keys (``O(G·S)``): ``O(N·(w + G))`` in all.
Supports causal, key padding, ALiBi/T5 score biases and decoding with a growing KV cache
(global keys stay visible to every later query, so the cache cannot roll).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnkit.attention.pattern import (
    PatternAttention,
    PatternCall,
    default_group_size,
    pattern_capabilities,
    sliding_window_attention,
)
from attnkit.core.errors import check_non_negative_int, check_positive_int
from attnkit.core.registry import register
from attnkit.kernels.blocked import (
    GatherPattern,
    consecutive_groups,
    dense_rows_pattern,
    gathered_attention_with_lse,
    merge_attention,
)
from attnkit.masks.functions import Mask, causal_mask, sliding_window_mask
from attnkit.masks.patterns import longformer_mask


def _global_positions(flags: Tensor) -> Tensor:
    """Positions of the True entries of bool ``(B, S)``, left-packed: int64 ``(B, G)``, ``-1`` padded."""
    count = int(flags.sum(dim=1).max())
    positions = torch.arange(flags.shape[1], device=flags.device).expand_as(flags)
    order = torch.where(flags, positions, flags.shape[1]).sort(dim=1).values[:, :count]
    return torch.where(order < flags.shape[1], order, -1)


@register(
    "longformer",
    pattern_capabilities(
        complexity="O(N·(w+g))",
        summary="sliding window + dilation + global tokens (per call: bool mask or leading count)",
    ),
    small_options={"window": 6, "num_global_tokens": 2},
    benchmark_options={"window": 512, "num_global_tokens": 1},
)
class LongformerAttention(PatternAttention):
    """Longformer attention.

    Args:
        window: the sliding window ``w`` (see :mod:`attnkit.attention.sliding_window`).
        dilation: window dilation ``d``.
        num_global_tokens: leading tokens that are global when a call gives no ``global_tokens``.
        backend: ``"auto"``, ``"blocked"`` or ``"flex"``.
        scale: score scale; default ``1/sqrt(D)``.

    Per call: ``global_tokens`` = bool ``(B, S)`` (True = global) or an int count of leading tokens.
    """

    call_options = ("global_tokens",)

    def __init__(
        self,
        *,
        window: int = 512,
        dilation: int = 1,
        num_global_tokens: int = 0,
        backend: str = "auto",
        scale: float | None = None,
    ) -> None:
        super().__init__(backend=backend, scale=scale)
        self.window = check_positive_int("window", window, example=512)
        self.dilation = check_positive_int("dilation", dilation, example=1)
        self.num_global_tokens = check_non_negative_int("num_global_tokens", num_global_tokens)

    def global_flags(
        self, batch: int, kv_len: int, global_tokens: Any, device: torch.device | None = None
    ) -> Tensor | None:
        """The global tokens as bool ``(B, S)``, or None when there are none.

        Raises:
            ValueError: ``global_tokens`` is neither an int ``>= 0`` nor a bool ``(B, S)`` tensor.
        """
        if global_tokens is None:
            global_tokens = self.num_global_tokens
        if isinstance(global_tokens, Tensor):
            if global_tokens.dtype != torch.bool or tuple(global_tokens.shape) != (batch, kv_len):
                raise ValueError(
                    f"global_tokens must be a bool tensor of shape (B, S) = ({batch}, {kv_len}) or an int count, "
                    f"got {global_tokens.dtype} of shape {tuple(global_tokens.shape)}"
                )
            flags = global_tokens.to(device)
        else:
            count = check_non_negative_int("global_tokens", global_tokens)
            flags = torch.zeros(batch, kv_len, dtype=torch.bool, device=device)
            flags[:, :count] = True
        return flags if bool(flags.any()) else None

    def pattern(self, q_len: int, kv_len: int, *, causal: bool, **call_kwargs: Any) -> Mask:
        global_tokens = call_kwargs.get("global_tokens")
        batch = global_tokens.shape[0] if isinstance(global_tokens, Tensor) else 1
        flags = self.global_flags(batch, kv_len, global_tokens)
        return longformer_mask(q_len, kv_len, self.window, causal=causal, dilation=self.dilation, global_tokens=flags)

    def _blocked(self, q: Tensor, k: Tensor, v: Tensor, call: PatternCall) -> Tensor:
        b, _, t_len, _ = q.shape
        s_len = k.shape[2]
        offset = s_len - t_len
        opts = call.softmax_options()
        window = sliding_window_attention(q, k, v, self.window, causal=call.causal, dilation=self.dilation, **opts)
        flags = self.global_flags(b, s_len, call.options.get("global_tokens"), q.device)
        if flags is None:
            return window[0]
        positions = _global_positions(flags)  # (B, G)
        local = sliding_window_mask(t_len, s_len, self.window, causal=call.causal, dilation=self.dilation)
        order = causal_mask(t_len, s_len)

        # every query against the global keys outside its window
        size = default_group_size(self.window)
        groups = consecutive_groups(t_len, size)
        outside = ~local & order if call.causal else ~local
        keys = GatherPattern(size, positions[:, None, None, :].expand(-1, 1, groups, -1), outside)
        global_keys = gathered_attention_with_lse(q, k, v, keys, **opts)
        out = merge_attention([window, global_keys])

        # global queries against every key (they replace those rows)
        rows = torch.where(positions >= offset, positions - offset, -1)
        dense = dense_rows_pattern(rows, s_len, order if call.causal else None)
        global_rows, _ = gathered_attention_with_lse(q, k, v, dense, **opts)
        is_global = flags[:, offset:][:, None, :, None]
        return torch.where(is_global, global_rows, out)
