"""Head pruning: the pruned model equals the unpruned one with the heads' output columns zeroed (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import attnkit
from attnkit.compress import attention_layers, head_importance, prune_ffn, prune_heads, quantize, register_head_state
from attnkit.compress import heads as heads_module
from attnkit.data.tasks import IGNORE_INDEX
from tests.compress.helpers import lm_batch, tiny_encoder, tiny_lm, zero_out_columns

ATOL = 1e-12


def _assert_pruned_matches(model, pruned, removed, batch) -> None:
    reference = zero_out_columns(model, removed, linear="to_out", width=None)
    with torch.no_grad():
        expected = reference(batch.input_ids, attention_mask=batch.attention_mask)
        got = pruned(batch.input_ids, attention_mask=batch.attention_mask)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # the zeroed heads mattered: a test that cannot fail proves nothing
    with torch.no_grad():
        unpruned = model(batch.input_ids, attention_mask=batch.attention_mask)
    assert (unpruned - expected).abs().max() > 1e-6


@pytest.mark.parametrize("mechanism", attnkit.list_attention())
def test_every_mechanism_prunes_to_the_zeroed_reference(mechanism: str) -> None:
    options = attnkit.get_spec(mechanism).small_options
    model = tiny_encoder(attention=mechanism, attention_options=options)
    batch = lm_batch()
    with torch.no_grad():  # mechanisms with lazily created state (routing's centroids) create it here
        model(batch.input_ids, attention_mask=batch.attention_mask)
    removed = {attention_layers(model)[0]: [1], attention_layers(model)[1]: [0, 3]}
    pruned, result = prune_heads(copy.deepcopy(model), {0: [1], 1: [0, 3]})
    assert result.removed == removed
    assert [pruned.get_submodule(p).heads for p in attention_layers(pruned)] == [3, 2]
    _assert_pruned_matches(model, pruned, removed, batch)


def test_projections_really_shrink() -> None:
    model = tiny_lm()
    path = attention_layers(model)[0]
    pruned, result = prune_heads(copy.deepcopy(model), {path: [0, 2]})
    attention = pruned.get_submodule(path)
    assert attention.to_q.weight.shape == (16, 32)
    assert attention.to_k.weight.shape == attention.to_v.weight.shape == (16, 32)
    assert attention.to_out.weight.shape == (32, 16)
    assert result.parameters_before - result.parameters_after == 4 * 16 * 32
    assert pruned.compression_record.heads == {path: [1, 3]}


def test_routing_keeps_the_centroids_of_the_kept_heads() -> None:
    model = tiny_encoder(attention="routing", attention_options={"num_clusters": 2, "window": 4})
    path = attention_layers(model)[0]
    mechanism = model.get_submodule(path).attention
    assert mechanism.centroids.numel() == 0  # created on first use ...
    pruned, _ = prune_heads(copy.deepcopy(model), {path: [0, 2]})
    model(lm_batch().input_ids)  # ... so the unpruned model makes them now
    kept = pruned.get_submodule(path).attention.centroids
    torch.testing.assert_close(kept, mechanism.centroids[[1, 3]], atol=0, rtol=0)
    _assert_pruned_matches(model, pruned, {path: [0, 2]}, lm_batch())


@pytest.mark.parametrize("position", ["alibi", "t5"])
def test_position_biases_are_sliced(position: str) -> None:
    model = tiny_lm(position=position)
    batch = lm_batch()
    pruned, result = prune_heads(copy.deepcopy(model), {0: [0], 1: [1, 2]})
    _assert_pruned_matches(model, pruned, result.removed, batch)


def test_grouped_query_attention_removes_whole_groups() -> None:
    model = tiny_lm(kv_heads=2, position="rotary")
    batch = lm_batch()
    pruned, result = prune_heads(copy.deepcopy(model), {1: [2, 3]})
    attention = pruned.get_submodule(attention_layers(pruned)[1])
    assert (attention.heads, attention.kv_heads) == (2, 1)
    assert attention.to_k.weight.shape == (8, 32)
    _assert_pruned_matches(model, pruned, result.removed, batch)
    # decoding with the cache still equals a full recompute after pruning
    with torch.no_grad():
        full = pruned(batch.input_ids[:1])
        cache = pruned.new_cache()
        steps = [pruned(batch.input_ids[:1, t : t + 1], cache=cache) for t in range(batch.input_ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-10, rtol=0)


def test_grouped_query_amount_prunes_groups() -> None:
    model = tiny_lm(kv_heads=2)
    pruned, result = prune_heads(copy.deepcopy(model), 0.25, score="magnitude")
    assert sum(len(h) for h in result.removed.values()) == 2  # one group of two query heads
    (heads,) = result.removed.values()
    assert heads in ([0, 1], [2, 3])
    _assert_pruned_matches(model, pruned, result.removed, lm_batch())


def _reference_loss(model, batch) -> torch.Tensor:
    """Per-example mean next-token cross-entropy over counted targets, written out."""
    logits = model(batch.input_ids, attention_mask=batch.attention_mask)
    logp = torch.log_softmax(logits, dim=-1)
    counted = batch.labels != IGNORE_INDEX
    picked = logp.gather(-1, batch.labels.clamp(min=0)[..., None])[..., 0]
    return -(picked * counted).sum(dim=1) / counted.sum(dim=1)


def test_gradient_importance_matches_finite_differences() -> None:
    """Michel et al.: E_x |dL_x/dξ_h|, with ξ_h scaling head h's output = its to_out columns."""
    model = tiny_lm()
    batch = lm_batch(rows=4)
    scores = head_importance(model, score="gradient", data=[batch])
    eps = 1e-6
    for path in attention_layers(model):
        attention = model.get_submodule(path)
        width = attention.head_dim
        expected = []
        for h in range(attention.heads):
            losses = []
            for sign in (1.0, -1.0):
                probe = copy.deepcopy(model)
                with torch.no_grad():
                    probe.get_submodule(path).to_out.weight[:, h * width : (h + 1) * width] *= 1.0 + sign * eps
                    losses.append(_reference_loss(probe, batch))
            expected.append(((losses[0] - losses[1]) / (2 * eps)).abs().mean())
        torch.testing.assert_close(scores[path], torch.stack(expected), rtol=1e-5, atol=1e-9)


def test_gradient_amount_removes_the_least_important_heads() -> None:
    model = tiny_lm()
    batch = lm_batch()
    scores = head_importance(model, data=[batch])
    normalised = {p: s / s.norm() for p, s in scores.items()}
    ranked = sorted((float(v), p, h) for p, s in normalised.items() for h, v in enumerate(s.tolist()))
    _, result = prune_heads(copy.deepcopy(model), 0.3, data=[batch])
    chosen = sorted((p, h) for p, hs in result.removed.items() for h in hs)
    assert chosen == sorted((p, h) for _, p, h in ranked[:2])  # round(0.3 * 8 heads) = 2
    for s in result.importance.values():
        assert abs(sum(v * v for v in s) - 1.0) < 1e-9  # normalised per layer (Michel et al. section 4.2)


def test_magnitude_score_finds_a_silenced_head() -> None:
    model = tiny_lm()
    path = attention_layers(model)[1]
    with torch.no_grad():
        model.get_submodule(path).to_out.weight[:, 16:24] *= 1e-3  # head 2 barely contributes
    _, result = prune_heads(copy.deepcopy(model), 1 / 8, score="magnitude")
    assert result.removed == {path: [2]}


def test_amount_never_empties_a_layer() -> None:
    model = tiny_lm(heads=2, dim=16)
    path0 = attention_layers(model)[0]
    with torch.no_grad():  # layer 0's heads are the least important by far
        model.get_submodule(path0).to_out.weight.mul_(1e-3)
    pruned, result = prune_heads(copy.deepcopy(model), 0.5, score="magnitude")
    assert all(a.heads >= 1 for a in (pruned.get_submodule(p) for p in attention_layers(pruned)))
    assert sum(len(h) for h in result.removed.values()) == 2


def test_pruning_twice_composes_in_the_record() -> None:
    model = tiny_lm()
    path = attention_layers(model)[0]
    pruned, _ = prune_heads(copy.deepcopy(model), {path: [0]})
    pruned, _ = prune_heads(pruned, {path: [1]})  # current head 1 = original head 2
    assert pruned.compression_record.heads[path] == [1, 3]
    _assert_pruned_matches(model, pruned, {path: [0, 2]}, lm_batch())


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        ({0: [0, 1, 2, 3]}, "all 4 heads"),
        ({0: [4]}, r"heads \[4\] do not exist"),
        ({0: [1, 1]}, "twice"),
        ({5: [0]}, "out of range"),
        ({"decoder.nope": [0]}, "neither a layer index nor a module path"),
        (1.0, r"amount must be a fraction in \[0, 1\)"),
        (-0.1, "amount must be a fraction"),
        (0.9, "at most 6 can go"),
    ],
)
def test_bad_amounts_are_refused(amount, message: str) -> None:
    model = tiny_lm()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message) as info:
        prune_heads(model, amount, **({} if isinstance(amount, dict) else {"score": "magnitude"}))
    assert "amount" in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing changed


def test_splitting_a_key_value_group_is_refused() -> None:
    model = tiny_lm(kv_heads=2)
    with pytest.raises(ValueError, match=r"amount: .*whole groups \[\[0, 1\], \[2, 3\]\]"):
        prune_heads(model, {0: [1]})
    assert model.get_submodule(attention_layers(model)[0]).heads == 4


def test_gradient_score_needs_data_and_a_known_score() -> None:
    model = tiny_lm()
    with pytest.raises(ValueError, match="score='gradient' needs data"):
        prune_heads(model, 0.25)
    with pytest.raises(ValueError, match="score must be one of"):
        prune_heads(model, 0.25, score="random")


def test_undeclared_mechanism_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_lm()
    table = dict(heads_module._HEAD_STATE)
    del table["full"]
    monkeypatch.setattr(heads_module, "_HEAD_STATE", table)
    with pytest.raises(ValueError, match="attention 'full' is not known to head pruning"):
        prune_heads(model, {0: [0]})
    register_head_state("full", None)
    prune_heads(model, {0: [0]})


def test_quantized_model_is_refused_before_anything_changes() -> None:
    model = tiny_lm(dtype=torch.float32)
    quantize(model, modules=[f"{attention_layers(model)[1]}.to_q"])
    with pytest.raises(ValueError, match="prune before quantizing"):
        prune_heads(model, {0: [0], 1: [0]})
    assert model.get_submodule(attention_layers(model)[0]).heads == 4


def test_gradient_loss_helper_matches_reference() -> None:
    from attnkit.compress.importance import per_example_loss

    model = tiny_lm()
    batch = lm_batch()
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=batch.attention_mask)
        expected = _reference_loss(model, batch)
    torch.testing.assert_close(per_example_loss(logits, batch.labels).double(), expected, rtol=1e-6, atol=1e-9)
    classes = torch.randn(3, 5)
    labels = torch.tensor([0, 4, 2])
    torch.testing.assert_close(per_example_loss(classes, labels), F.cross_entropy(classes, labels, reduction="none"))


def test_encoder_decoder_prunes_self_and_cross_attention() -> None:
    from attnkit import EncoderDecoder
    from attnkit.data.tasks import Batch
    from tests.compress.helpers import tiny_config

    torch.manual_seed(0)
    model = EncoderDecoder(tiny_config(bos_token_id=1, eos_token_id=2)).double().eval()
    src, tgt = torch.randint(3, 40, (2, 9)), torch.randint(3, 40, (2, 7))
    batch = Batch(src, torch.ones_like(src, dtype=torch.bool), torch.randint(3, 40, (2, 7)), tgt, tgt > 0)
    assert len(attention_layers(model)) == 6  # 2 encoder, 2 decoder self, 2 decoder cross
    cross = "decoder.layers.1.cross_attention.attention"
    pruned, result = prune_heads(copy.deepcopy(model), {0: [3], 2: [1], cross: [0, 2]})
    assert pruned.get_submodule(cross).heads == 2
    _, scored = prune_heads(copy.deepcopy(model), 0.25, data=[batch])  # gradients reach every kind of layer
    assert all(sum(s) > 0 for s in scored.importance.values())
    reference = zero_out_columns(model, result.removed, linear="to_out", width=None)
    with torch.no_grad():
        torch.testing.assert_close(pruned(src, tgt), reference(src, tgt), atol=ATOL, rtol=0)


def test_score_and_data_are_refused_with_explicit_heads() -> None:
    # They rank heads for a fractional amount only; with {layer: [heads]} they used to be ignored silently.
    model = tiny_lm()
    for kwargs in ({"score": "magnitude"}, {"data": [object()]}):
        with pytest.raises(ValueError, match="drop score= and data="):
            prune_heads(model, {0: [1]}, **kwargs)
        with pytest.raises(ValueError, match="drop score= and data="):
            prune_ffn(model, {0: [1]}, **kwargs)
