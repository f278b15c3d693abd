"""A test-only approximate mechanism, registered for the duration of one test.

``pooled_keys`` attends over keys and values averaged in blocks of ``block`` positions:
a genuine (crude) approximation of softmax attention with no causal mode, so the
arena's and advisor's capability handling and error measurement have something
non-exact to chew on while the real approximate mechanisms are being written.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch.nn.functional as F
from torch import Tensor

import attnkit
from attnkit.arena import ArenaConfig
from attnkit.core import registry

TOY = "pooled_keys"


class PooledKeys(attnkit.AttentionMechanism):
    """Softmax attention over block means of the keys and values (approximate)."""

    def __init__(self, *, block: int = 4) -> None:
        super().__init__()
        self.block = block

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, **_: Any) -> Tensor:
        b, h, s, d = k.shape
        pad = (-s) % self.block
        # mean over each block of keys/values (the last block may be shorter)
        k_pooled = F.avg_pool1d(F.pad(k, (0, 0, 0, pad)).reshape(b * h, s + pad, d).transpose(1, 2), self.block)
        v_pooled = F.avg_pool1d(F.pad(v, (0, 0, 0, pad)).reshape(b * h, s + pad, -1).transpose(1, 2), self.block)
        k_pooled = k_pooled.transpose(1, 2).reshape(b, h, -1, d)
        v_pooled = v_pooled.transpose(1, 2).reshape(b, h, -1, v.shape[-1])
        return F.scaled_dot_product_attention(q, k_pooled, v_pooled)


@pytest.fixture
def toy_mechanism() -> Iterator[str]:
    """Register ``pooled_keys`` for one test, then remove it so other suites never see it."""
    caps = attnkit.Capabilities(
        exact=False,
        causal=False,
        key_padding=False,
        cross_attention=False,
        decoding=None,
        complexity="O(N^2 / block)",
        family="low_rank",
        error_budget=1.0,
        summary="test-only: softmax over block-averaged keys",
    )
    attnkit.register(TOY, caps, small_options={"block": 4}, benchmark_options={"block": 8})(PooledKeys)
    try:
        yield TOY
    finally:
        registry._REGISTRY.pop(TOY, None)


@pytest.fixture
def tiny_config() -> ArenaConfig:
    """An arena config that runs every stage in seconds."""
    return ArenaConfig.preset(
        "quick",
        lengths=(64, 128),
        heads=2,
        head_dim=16,
        repeats=1,
        cell_seconds=0.05,
        fidelity_length=64,
        fidelity_heads=2,
        tasks=("mqar", "listops"),
        train_steps=3,
        eval_batches=1,
        model_dim=16,
        model_heads=2,
        model_depth=1,
        task_length=32,
        batch_size=4,
    )
