"""Tiny models, batches and the zeroed-columns reference shared by the compression tests."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from attnkit import Encoder, LanguageModel, TransformerConfig
from attnkit.data.tasks import IGNORE_INDEX, Batch

VOCAB = 40


def tiny_config(**overrides: Any) -> TransformerConfig:
    values: dict[str, Any] = {"vocab_size": VOCAB, "dim": 32, "depth": 2, "heads": 4, "max_len": 64}
    values.update(overrides)
    return TransformerConfig(**values)


def tiny_lm(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides: Any) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(tiny_config(**overrides)).to(dtype).eval()


def tiny_encoder(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides: Any) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(tiny_config(**overrides)).to(dtype).eval()


def lm_batch(rows: int = 3, length: int = 13, *, seed: int = 0, padded: bool = True) -> Batch:
    """Next-token targets; with ``padded`` the last row ends in padding (mask False, label ignored)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.bool)
    if padded:
        mask[-1, length - 4 :] = False
        ids[-1, length - 4 :] = 0
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(mask[:, 1:], ids[:, 1:], IGNORE_INDEX)
    return Batch(ids, mask, labels)


def zero_out_columns(model: nn.Module, removed: dict[str, list[int]], *, linear: str, width: int | None) -> nn.Module:
    """A copy of ``model`` with the input columns of ``{path}.{linear}`` that carry the removed units zeroed.

    ``width``: columns per unit (a head's head_dim); None reads it from the attention module.
    """
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for path, units in removed.items():
            module = ref.get_submodule(path)
            w = width if width is not None else module.head_dim
            weight = getattr(module, linear).weight
            for u in units:
                weight[:, u * w : (u + 1) * w] = 0.0
    return ref
