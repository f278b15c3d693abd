"""Reversible layers: gradients equal ordinary autograd through the same coupling, memory flat in depth."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnkit
from attnkit import Encoder, EncoderDecoder, LanguageModel, TransformerConfig
from attnkit.models.reversible import coupled_forward


def config(**changes: object) -> TransformerConfig:
    base: dict = {"vocab_size": 29, "dim": 32, "depth": 3, "heads": 4, "reversible": True, "dropout": 0.1}
    return TransformerConfig(**{**base, **changes})


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 29, (batch, length), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model: nn.Module, run, *, recompute: bool, seed: int) -> tuple[torch.Tensor, dict]:
    for _, stack in model.named_stacks():
        stack.recompute = recompute
    model.zero_grad()
    torch.manual_seed(seed)
    out = run(model)
    loss = (out.float() ** 2).mean() + out.float().sin().sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def assert_parity(model: nn.Module, run, *, atol: float, seed: int = 3) -> None:
    out_a, grads_a = loss_and_grads(model, run, recompute=True, seed=seed)
    out_b, grads_b = loss_and_grads(model, run, recompute=False, seed=seed)
    assert torch.equal(out_a, out_b), "the recomputing forward must be the same computation"
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(model.parameters()))
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("position", ["rotary", "alibi", "learned"])
def test_language_model_gradient_parity_with_dropout(position: str) -> None:
    torch.manual_seed(0)
    model = LanguageModel(config(position=position)).train()
    x = ids(2, 13)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, :3] = False
    assert_parity(model, lambda m: m(x, attention_mask=mask), atol=1e-5)


def test_encoder_decoder_gradient_parity_reaches_the_encoder() -> None:
    torch.manual_seed(1)
    model = EncoderDecoder(config(activation="swiglu", norm="rmsnorm", ff_chunks=2)).train()
    src, tgt = ids(2, 9, 1), ids(2, 7, 2)
    assert_parity(model, lambda m: m(src, tgt), atol=1e-5)
    _, grads = loss_and_grads(model, lambda m: m(src, tgt), recompute=True, seed=0)
    assert grads["encoder.layers.0.self_attention.attention.to_q.weight"].abs().sum() > 0


def test_float64_parity_is_tight() -> None:
    torch.manual_seed(2)
    model = LanguageModel(config()).double().train()
    x = ids(2, 10)
    assert_parity(model, lambda m: m(x), atol=1e-10)


def test_dropout_is_replayed_not_disabled() -> None:
    torch.manual_seed(3)
    model = LanguageModel(config(dropout=0.5)).train()
    x = ids(1, 8)
    torch.manual_seed(4)
    a = model(x)
    torch.manual_seed(5)
    b = model(x)
    assert not torch.allclose(a, b), "dropout must be active in training"
    # the caller's random stream after backward is the same as without reversible layers
    torch.manual_seed(6)
    model(x).sum().backward()
    after_reversible = torch.rand(3)
    for _, stack in model.named_stacks():
        stack.recompute = False
    torch.manual_seed(6)
    model(x).sum().backward()
    assert torch.equal(after_reversible, torch.rand(3))


def test_reversible_equals_explicit_coupling() -> None:
    """The model output equals (a + b) / 2 of the RevNet coupling written out by hand."""
    torch.manual_seed(7)
    model = LanguageModel(config(dropout=0.0, depth=2)).eval()
    x = ids(2, 6)
    hidden = model.embed(x, torch.arange(6).expand(2, 6))
    inputs = attnkit.models.layers.LayerInputs(positions=torch.arange(6).expand(2, 6))
    branches = [b for layer in model.decoder.layer_list() for b in layer.branches()]
    a = b = hidden
    with torch.no_grad():
        for i, branch in enumerate(branches):
            if i % 2 == 0:
                a = a + branch(b, inputs, None)
            else:
                b = b + branch(a, inputs, None)
        expected = model.lm_head(model.decoder.norm((a + b) / 2))
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(coupled_forward(branches, hidden, hidden, inputs, None), (a + b) / 2)


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward, parameters excluded."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)  # only what the forward pass stores; backward's recomputation is transient
    out.sum().backward()
    return total


def test_saved_activations_do_not_grow_with_depth() -> None:
    x = ids(2, 32)
    rev = [saved_activation_bytes(LanguageModel(config(depth=d, dropout=0.0)), x) for d in (2, 6)]
    plain = [saved_activation_bytes(LanguageModel(config(depth=d, dropout=0.0, reversible=False)), x) for d in (2, 6)]
    assert rev[1] == rev[0], f"reversible saved bytes grew with depth: {rev}"
    assert plain[1] > 2 * plain[0], f"plain model should store activations per layer: {plain}"


def stochastic_safe(name: str) -> bool:
    caps = attnkit.attention_capabilities(name)
    return caps.exact or caps.family in ("kernel", "low_rank")


@pytest.mark.parametrize("name", attnkit.list_attention())
def test_every_mechanism_gradient_parity(name: str) -> None:
    """Randomness a mechanism draws in training (e.g. hash rotations) is replayed too."""
    torch.manual_seed(8)
    spec = attnkit.get_spec(name)
    model = Encoder(config(attention=name, attention_options=spec.small_options, position="rotary")).train()
    x = ids(2, 24, 5)
    assert_parity(model, lambda m: m(x), atol=1e-4)
