"""Feed-forward channel pruning: equals the unpruned model with the channels' w_out columns zeroed (float64)."""

from __future__ import annotations

import copy

import pytest
import torch

from attnkit.compress import feed_forward_layers, prune_ffn
from attnkit.compress.importance import gate_gradients, per_example_loss
from tests.compress.helpers import lm_batch, tiny_lm, zero_out_columns


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_pruned_channels_equal_zeroed_columns(activation: str) -> None:
    model = tiny_lm(activation=activation, ff_chunks=2)
    batch = lm_batch()
    paths = feed_forward_layers(model)
    hidden = model.get_submodule(paths[0]).w_out.in_features
    removed = {paths[0]: [0, 5, hidden - 1], paths[1]: list(range(0, hidden, 3))}
    pruned, result = prune_ffn(copy.deepcopy(model), removed)
    ff = pruned.get_submodule(paths[0])
    assert ff.w_out.weight.shape == (32, hidden - 3)
    assert ff.w_in.weight.shape[0] == (hidden - 3) * (2 if activation == "swiglu" else 1)
    assert result.units_after == {paths[0]: hidden - 3, paths[1]: hidden - len(removed[paths[1]])}
    reference = zero_out_columns(model, removed, linear="w_out", width=1)
    with torch.no_grad():
        expected = reference(batch.input_ids, attention_mask=batch.attention_mask)
        got = pruned(batch.input_ids, attention_mask=batch.attention_mask)
        unpruned = model(batch.input_ids, attention_mask=batch.attention_mask)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    assert (unpruned - expected).abs().max() > 1e-6


def test_gradient_channel_scores_match_finite_differences() -> None:
    model = tiny_lm(dim=16, depth=1, ff_dim=8)
    batch = lm_batch()
    (path,) = feed_forward_layers(model)
    ff = model.get_submodule(path)
    scores = gate_gradients(model, [batch], {path: (ff.w_out, 8)}, max_batches=1)[path]
    eps = 1e-6
    expected = []
    for c in range(8):
        losses = []
        for sign in (1.0, -1.0):
            probe = copy.deepcopy(model)
            with torch.no_grad():
                probe.get_submodule(path).w_out.weight[:, c] *= 1.0 + sign * eps
                logits = probe(batch.input_ids, attention_mask=batch.attention_mask)
            losses.append(per_example_loss(logits, batch.labels))
        expected.append(((losses[0] - losses[1]) / (2 * eps)).abs().mean())
    torch.testing.assert_close(scores, torch.stack(expected), rtol=1e-5, atol=1e-9)


def test_amount_prunes_the_weakest_channels_by_magnitude() -> None:
    model = tiny_lm(ff_dim=16)
    path = feed_forward_layers(model)[1]
    with torch.no_grad():
        model.get_submodule(path).w_out.weight[:, [3, 11]] *= 1e-4
    _, result = prune_ffn(copy.deepcopy(model), 2 / 32, score="magnitude")
    assert result.removed == {path: [3, 11]}
    assert str(result).startswith("pruned 2 of 32 channels (magnitude score)")


def test_gradient_amount_runs_and_records() -> None:
    model = tiny_lm(ff_dim=16)
    pruned, result = prune_ffn(copy.deepcopy(model), 0.5, data=[lm_batch()])
    assert sum(result.units_after.values()) == 16
    assert pruned.compression_record.ffn.keys() == result.removed.keys()


@pytest.mark.parametrize(
    ("amount", "message"),
    [({0: list(range(16))}, "all 16 channels"), ({1: [16]}, "do not exist"), (0.99, "at most 30 can go")],
)
def test_bad_amounts_are_refused(amount, message: str) -> None:
    model = tiny_lm(ff_dim=16)
    with pytest.raises(ValueError, match=message) as info:
        prune_ffn(model, amount, **({} if isinstance(amount, dict) else {"score": "magnitude"}))
    assert "amount" in str(info.value)
