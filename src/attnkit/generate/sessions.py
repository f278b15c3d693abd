"""Decoding sessions: "give me the next-token logits" for a language model or an encoder-decoder.

A session hides whether decoding uses the mechanisms' incremental states (one new token
per step through :class:`~attnkit.models.cache.ModelCache`) or recomputes the whole
prefix. The search loops (:mod:`attnkit.generate.search`) only see ``first()``,
``step(tokens)`` and ``reorder(index)``.

Which path is possible is read from the registry (``attention_capabilities(name).decoding``),
never from mechanism names: a model with any layer whose mechanism has no decoding state
recomputes, and says so once per set of mechanisms.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnkit.core.errors import check_bool, warn_once
from attnkit.core.registry import attention_capabilities

_WARNED: set[tuple[str, ...]] = set()


def mechanisms_without_state(model: Any) -> list[str]:
    """Self-attention mechanisms of the model's decoder that declare no decoding state."""
    names: list[str] = []
    for stack_name, stack in model.named_stacks():
        if stack_name != "decoder":
            continue
        for layer in stack.layer_list():
            for name in layer.mechanisms:  # a per-head mix: every group's mechanism
                if attention_capabilities(name).decoding is None and name not in names:
                    names.append(name)
    return names


def resolve_use_cache(model: Any, use_cache: bool) -> bool:
    """Whether to decode incrementally: ``use_cache`` unless a mechanism cannot (warned once)."""
    if not check_bool("use_cache", use_cache):
        return False
    missing = mechanisms_without_state(model)
    if not missing:
        return True
    key = tuple(sorted(missing))
    warn_once(
        _WARNED,
        key,
        f"attention {', '.join(map(repr, missing))} has no incremental decoding state; generation "
        "recomputes the whole prefix at every step (pass use_cache=False to silence this)",
        stacklevel=4,
    )
    return False


def left_align(ids: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Move every row's padding to the left, keeping the real tokens in order.

    Generation appends at the right end, so right-padded (or holed) prompts are
    rearranged; absolute positions count real tokens only, so outputs are unchanged.
    """
    if mask is None:
        return ids, None
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # pads (0) first, then real tokens
    return ids.gather(1, order), mask.gather(1, order)


class LanguageModelSession:
    """Next-token logits of a decoder-only model, from a left-aligned prompt.

    Args:
        model: a :class:`~attnkit.models.LanguageModel`.
        ids: ``(N, T)`` prompt, left-padded.
        mask: ``(N, T)`` bool or None.
        use_cache: incremental decoding (else recompute the prefix every step).
    """

    def __init__(self, model: Any, ids: Tensor, mask: Tensor | None, *, use_cache: bool) -> None:
        self.model = model
        self.ids = ids
        self.mask = mask
        self.cache = model.new_cache() if use_cache else None

    def first(self) -> Tensor:
        """Logits ``(N, V)`` after the prompt."""
        return self.model(self.ids, attention_mask=self.mask, cache=self.cache)[:, -1]

    def step(self, tokens: Tensor) -> Tensor:
        """Append ``tokens (N,)``; logits ``(N, V)`` for the next position."""
        if self.cache is not None:
            return self.model(tokens[:, None], cache=self.cache)[:, -1]
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        if self.mask is not None:
            self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return self.model(self.ids, attention_mask=self.mask)[:, -1]

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index (N',)`` (beam search)."""
        self.ids = self.ids.index_select(0, index)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder_batch(index)


class Seq2SeqSession:
    """Next-token logits of an encoder-decoder; the source is encoded once.

    Args:
        model: an :class:`~attnkit.models.EncoderDecoder`.
        src_ids: ``(N, S)``.
        src_mask: ``(N, S)`` bool or None.
        start_token: the decoder's first input.
        use_cache: incremental decoding.
    """

    def __init__(
        self, model: Any, src_ids: Tensor, src_mask: Tensor | None, start_token: int, *, use_cache: bool
    ) -> None:
        self.model = model
        self.src_mask = src_mask
        self.memory = model.encode(src_ids, src_mask=src_mask)
        self.tgt = torch.full((src_ids.shape[0], 1), start_token, dtype=torch.long, device=src_ids.device)
        self.cache = model.new_cache() if use_cache else None

    def _decode(self, ids: Tensor) -> Tensor:
        return self.model.decode(ids, self.memory, src_mask=self.src_mask, cache=self.cache)[:, -1]

    def first(self) -> Tensor:
        """Logits ``(N, V)`` after the start token."""
        return self._decode(self.tgt)

    def step(self, tokens: Tensor) -> Tensor:
        """Append ``tokens (N,)``; logits ``(N, V)``."""
        self.tgt = torch.cat([self.tgt, tokens[:, None]], dim=1)
        return self._decode(tokens[:, None] if self.cache is not None else self.tgt)

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index (N',)`` (beam search)."""
        self.tgt = self.tgt.index_select(0, index)
        self.memory = self.memory.index_select(0, index)
        if self.src_mask is not None:
            self.src_mask = self.src_mask.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder_batch(index)
