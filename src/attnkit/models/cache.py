"""The decoding cache of a whole model, and batch reordering of any mechanism's state.

A :class:`ModelCache` holds one ``(self-attention, cross-attention)``
:class:`~attnkit.attention.multi_head.AttentionCache` pair per layer, each wrapping the
state its mechanism declared (a KV cache, a rolling window, a recurrent state), plus
the absolute position of every row's next token (for left-padded batches).

Beam search reorders rows between steps. Mechanism states are defined by their
mechanisms, so :func:`reorder_batch` walks any state generically: every tensor whose
first dimension is the batch is indexed; anything else (counters, settings) is kept.
A state class may instead define ``reorder_batch(index)`` returning the reordered state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from attnkit.attention.multi_head import AttentionCache


def reorder_batch(obj: Any, index: Tensor, batch: int) -> Any:
    """Select rows ``index (N,)`` of every batch-leading tensor inside ``obj``.

    Args:
        obj: a tensor, list, tuple, dict, dataclass or plain object holding tensors.
        index: long ``(N,)`` rows to keep, in order.
        batch: the current batch size (only tensors with ``shape[0] == batch`` are indexed).

    Returns:
        The reordered object (objects and dataclasses are updated in place and returned).
    """
    if isinstance(obj, Tensor):
        return obj.index_select(0, index) if obj.dim() >= 1 and obj.shape[0] == batch else obj
    if isinstance(obj, (nn.Module, type)):
        return obj  # never walk into modules or classes a state may reference
    if hasattr(obj, "reorder_batch"):
        return obj.reorder_batch(index)
    if isinstance(obj, list):
        return [reorder_batch(v, index, batch) for v in obj]
    if isinstance(obj, tuple):
        return tuple(reorder_batch(v, index, batch) for v in obj)
    if isinstance(obj, dict):
        return {k: reorder_batch(v, index, batch) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            setattr(obj, f.name, reorder_batch(getattr(obj, f.name), index, batch))
        return obj
    if hasattr(obj, "__dict__"):
        for name, value in vars(obj).items():
            setattr(obj, name, reorder_batch(value, index, batch))
        return obj
    return obj


@dataclass
class ModelCache:
    """Incremental-decoding state of a model (from ``model.new_cache()``).

    Attributes:
        layers: per layer, the ``(self-attention, cross-attention)`` caches.
        next_position: ``(B,)`` absolute position of each row's next real token, or None
            before the first step.
        length: number of tokens consumed (padding included).
        shift_history: ``(B, token_shift - 1, dim)`` token embeddings of the last positions consumed
            (zeros where they were padding or before the first token), which the token shift's
            convolution needs next; None before the first step or without ``token_shift``.
    """

    layers: list[tuple[AttentionCache, AttentionCache]]
    next_position: Tensor | None = None
    length: int = 0
    shift_history: Tensor | None = None
    batch: int = field(default=0, repr=False)

    def reorder_batch(self, index: Tensor) -> ModelCache:
        """Keep rows ``index (N,)`` of every state (beam search); returns ``self``."""
        batch = self.batch
        for self_cache, cross_cache in self.layers:
            self_cache.state = reorder_batch(self_cache.state, index, batch)
            if cross_cache.context is not None:
                cross_cache.context = reorder_batch(cross_cache.context, index, batch)
        if self.next_position is not None:
            self.next_position = self.next_position.index_select(0, index)
        if self.shift_history is not None:
            self.shift_history = self.shift_history.index_select(0, index)
        self.batch = int(index.shape[0])
        return self
