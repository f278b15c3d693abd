"""Magnitude pruning: exactly the requested sparsity, the largest weights kept (brute force)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from attnkit.compress import prune_magnitude
from tests.compress.helpers import lm_batch, tiny_lm


def _linears(model: nn.Module) -> dict[str, torch.Tensor]:
    """Untied nn.Linear weights (the LM head shares the embedding and is skipped)."""
    return {
        n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear and "lm_head" not in n
    }


def _brute_force_keep(weights: list[torch.Tensor], amount: float) -> list[torch.Tensor]:
    """Masks keeping all but the round(amount * n) smallest |w|, by sorting every weight."""
    flat = torch.cat([w.flatten() for w in weights])
    count = round(amount * flat.numel())
    order = sorted(range(flat.numel()), key=lambda i: abs(float(flat[i])))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[order[:count]] = False
    return list(keep.split([w.numel() for w in weights]))


@pytest.mark.parametrize("amount", [0.0, 0.37, 0.5, 0.9])
def test_global_scope_zeroes_the_globally_smallest(amount: float) -> None:
    model = tiny_lm()
    before = _linears(model)
    pruned, result = prune_magnitude(copy.deepcopy(model), amount)
    after = _linears(pruned)
    masks = _brute_force_keep(list(before.values()), amount)
    for (name, w0), keep in zip(before.items(), masks):
        w1 = after[name]
        keep = keep.view_as(w0)
        assert torch.equal(w1[keep], w0[keep]), name  # kept weights untouched
        assert bool((w1[~keep] == 0).all()), name
    total = sum(w.numel() for w in before.values())
    assert result.total == total
    assert result.zeros == round(amount * total) == sum(int((w == 0).sum()) for w in after.values())
    assert "lm_head.proj" in result.skipped and "tied" in result.skipped["lm_head.proj"]


def test_layer_scope_zeroes_each_layers_smallest() -> None:
    model = tiny_lm()
    before = _linears(model)
    pruned, result = prune_magnitude(copy.deepcopy(model), 0.3, scope="layer")
    for name, w0 in before.items():
        (keep,) = _brute_force_keep([w0], 0.3)
        w1 = pruned.get_submodule(name).weight.detach()
        assert torch.equal(w1.flatten()[keep], w0.flatten()[keep])
        assert bool((w1.flatten()[~keep] == 0).all())
        assert result.sparsity[name] == round(0.3 * w0.numel()) / w0.numel()


def test_pruning_is_permanent_and_the_model_still_works() -> None:
    model = tiny_lm()
    pruned, _ = prune_magnitude(model, 0.5)
    for module in pruned.modules():
        assert not hasattr(module, "weight_orig") and not hasattr(module, "weight_mask")
        assert not module._forward_pre_hooks
    assert all(not n.endswith(("_orig", "_mask")) for n in pruned.state_dict())
    batch = lm_batch()
    assert torch.isfinite(pruned(batch.input_ids)).all()


def test_explicit_modules_and_errors() -> None:
    model = tiny_lm()
    path = "decoder.layers.0.feed_forward.ff.w_in"
    _, result = prune_magnitude(copy.deepcopy(model), 0.5, modules=[path])
    assert list(result.sparsity) == [path] and result.sparsity[path] == 0.5
    with pytest.raises(ValueError, match=r"modules: lm_head.proj cannot be pruned: its weight is tied"):
        prune_magnitude(model, 0.5, modules=["lm_head.proj"])
    with pytest.raises(ValueError, match=r"modules: decoder.norm is a LayerNorm; only nn.Linear"):
        prune_magnitude(model, 0.5, modules=["decoder.norm"])
    with pytest.raises(ValueError, match="modules: the model has no module 'nope'"):
        prune_magnitude(model, 0.5, modules=["nope"])
    with pytest.raises(ValueError, match="amount must be a fraction of weights"):
        prune_magnitude(model, 1.5)
    with pytest.raises(ValueError, match="scope must be one of"):
        prune_magnitude(model, 0.5, scope="row")
