"""The fine-tune after pruning: it lowers the task loss and keeps magnitude-pruned weights at zero."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from attnkit.compress import finetune, prune_magnitude, quantize
from tests.compress.helpers import lm_batch, tiny_lm


def _ce(model, batch) -> float:
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=batch.attention_mask)
    return F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100).item()


def _linear_zeros(model) -> int:
    return sum(int((m.weight == 0).sum()) for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_finetune_lowers_the_loss_and_keeps_pruned_zeros() -> None:
    model = tiny_lm(dtype=torch.float32)
    prune_magnitude(model, 0.5)
    zeros = _linear_zeros(model)
    batch = lm_batch(rows=4)
    before = _ce(model, batch)
    regrow = copy.deepcopy(model)
    _, result = finetune(model, itertools.repeat(batch), steps=15, lr=1e-2, log_every=5, progress=False)
    assert _ce(model, batch) < 0.8 * before
    assert result.final["ce"] == result.history[-1]["ce"] and [h["step"] for h in result.history] == [5.0, 10.0, 15.0]
    assert _linear_zeros(model) == zeros and not model.training
    finetune(regrow, itertools.repeat(batch), steps=2, lr=1e-2, keep_zeros=False, progress=False)
    assert _linear_zeros(regrow) < zeros // 10


def test_finetune_refuses_int8_layers_and_bad_settings() -> None:
    model = tiny_lm(dtype=torch.float32, tie_embeddings=False)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        finetune(model, [lm_batch()], steps=0)
    with pytest.raises(ValueError, match="data ran out after 1 batches but steps=2"):
        finetune(model, [lm_batch()], steps=2, progress=False)
    quantize(model, "int8_dynamic", route="torchao")
    with pytest.raises(ValueError, match="cannot be trained: fine-tune before quantizing"):
        finetune(model, [lm_batch()], steps=1)
