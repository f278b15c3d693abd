"""reorder_batch: beam search moves rows of any mechanism's state, and leaves the rest alone."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attnkit.core.base import KVState
from attnkit.models.cache import reorder_batch


@dataclass
class RollingState:
    keys: torch.Tensor
    counter: torch.Tensor  # (window,): not batch-leading, must be kept
    history: list[torch.Tensor] = field(default_factory=list)
    step: int = 0


class OwnReorder:
    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def reorder_batch(self, index: torch.Tensor) -> OwnReorder:
        self.calls.append(index.tolist())
        return self


def test_batch_leading_tensors_are_indexed_everywhere() -> None:
    batch = 3
    keys = torch.arange(batch * 2 * 4, dtype=torch.float32).view(batch, 2, 4)
    counter = torch.tensor([7, 8, 9, 10, 11])
    state = RollingState(keys, counter, [keys.clone(), torch.zeros(2)], step=5)
    index = torch.tensor([2, 2, 0])
    out = reorder_batch({"s": state, "t": (keys, 4)}, index, batch)
    assert out["s"] is state
    assert torch.equal(state.keys, keys[[2, 2, 0]])
    assert torch.equal(state.counter, counter) and state.step == 5
    assert torch.equal(state.history[0], keys[[2, 2, 0]]) and torch.equal(state.history[1], torch.zeros(2))
    assert torch.equal(out["t"][0], keys[[2, 2, 0]]) and out["t"][1] == 4


def test_kv_state_and_custom_reorder() -> None:
    kv = KVState()
    kv.append(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 3, 4), torch.tensor([[False, True, True], [True] * 3]))
    keys, pad = kv.keys.clone(), kv.key_padding.clone()
    reorder_batch(kv, torch.tensor([1, 0]), 2)
    assert torch.equal(kv.keys, keys[[1, 0]]) and torch.equal(kv.key_padding, pad[[1, 0]])
    own = OwnReorder()
    assert reorder_batch([own], torch.tensor([0, 0]), 2)[0] is own and own.calls == [[0, 0]]
