"""``TransformerConfig(token_shift=k)``: a depthwise causal convolution over the token embeddings.

References are independent of the implementation: each shifted embedding is built by hand in
float64 loops, and a whole model is checked against the same model without the shift whose
token embeddings are replaced (by a forward hook) with those hand-built ones.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from attnkit.models import (
    Encoder,
    EncoderDecoder,
    LanguageModel,
    MaskedLanguageModel,
    SequenceClassifier,
    TransformerConfig,
    load_pretrained,
)
from attnkit.models.config import ConfigFieldError

VOCAB = 37


def config(**changes: object) -> TransformerConfig:
    base: dict = {"vocab_size": VOCAB, "dim": 16, "depth": 2, "heads": 2, "num_classes": 3, "max_len": 64}
    return TransformerConfig(**{**base, **changes})


def ids(batch: int, length: int, seed: int = 0) -> Tensor:
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def shift_by_hand(embeddings: Tensor, weight: Tensor, mask: Tensor | None = None) -> Tensor:
    """``y[b, t] = sum_j weight[j] * e[b, t - j]``, with ``e`` zero before position 0 and where padded."""
    batch, length, _ = embeddings.shape
    out = torch.zeros_like(embeddings)
    for b in range(batch):
        for t in range(length):
            for j in range(weight.shape[0]):
                s = t - j
                if s >= 0 and (mask is None or bool(mask[b, s])):
                    out[b, t] += weight[j] * embeddings[b, s]
    return out


def randomize_shift(model: nn.Module, seed: int) -> None:
    """Give the shift weights far from identity, so a model that skipped the shift would differ."""
    weight = model.embed.shift.weight  # type: ignore[union-attr]
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed), dtype=weight.dtype))


# -- the embedding --------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [2, 3, 5])
def test_embedding_equals_the_loop_by_hand_with_padding(width: int) -> None:
    torch.manual_seed(0)
    model = Encoder(config(token_shift=width, position="learned")).double().eval()
    randomize_shift(model, seed=width)
    x = ids(3, 7, seed=1)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, :3] = False  # left padding
    mask[2, 5:] = False  # right padding
    mask[0, 2] = False  # a hole: its embedding must not reach later positions
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    embed = model.embed
    tokens = embed.tokens.weight[x]  # (B, T, dim)
    expected = shift_by_hand(tokens, embed.shift.weight, mask) + embed.positions.embedding(positions)
    got = embed(x, positions, attention_mask=mask)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


MODELS = [LanguageModel, Encoder, SequenceClassifier, MaskedLanguageModel]


@pytest.mark.parametrize("model_class", MODELS, ids=lambda c: c.__name__)
def test_every_model_uses_the_shift_as_the_hand_built_reference(model_class: type[nn.Module]) -> None:
    """The model with the shift = the model without it fed the hand-shifted embeddings."""
    torch.manual_seed(1)
    shifted = model_class(config(token_shift=3)).double().eval()
    randomize_shift(shifted, seed=2)
    plain = model_class(config()).double().eval()
    missing, unexpected = plain.load_state_dict(shifted.state_dict(), strict=False)
    assert missing == [] and unexpected == ["embed.shift.weight"]
    weight = shifted.embed.shift.weight.detach()
    plain.embed.tokens.register_forward_hook(lambda module, inputs, out: shift_by_hand(out, weight))
    x = ids(2, 9, seed=3)
    torch.testing.assert_close(shifted(x), plain(x), atol=1e-10, rtol=0)
    without = model_class(config()).double().eval()
    without.load_state_dict(shifted.state_dict(), strict=False)
    assert not torch.allclose(shifted(x), without(x), atol=1e-3)  # the shift is not a no-op here


def test_encoder_decoder_shifts_source_and_target_embeddings() -> None:
    torch.manual_seed(2)
    shifted = EncoderDecoder(config(token_shift=2)).double().eval()
    randomize_shift(shifted, seed=4)
    plain = EncoderDecoder(config()).double().eval()
    plain.load_state_dict(shifted.state_dict(), strict=False)
    weight = shifted.embed.shift.weight.detach()
    plain.embed.tokens.register_forward_hook(lambda module, inputs, out: shift_by_hand(out, weight))
    src, tgt = ids(2, 8, seed=5), ids(2, 5, seed=6)
    torch.testing.assert_close(shifted(src, tgt), plain(src, tgt), atol=1e-10, rtol=0)


@pytest.mark.parametrize("model_class", [LanguageModel, Encoder, SequenceClassifier], ids=lambda c: c.__name__)
def test_left_padding_changes_nothing(model_class: type[nn.Module]) -> None:
    torch.manual_seed(3)
    model = model_class(config(token_shift=4)).eval()
    randomize_shift(model, seed=7)
    seq = ids(1, 7, seed=8)
    batch = torch.cat([torch.full((1, 3), 5, dtype=torch.long), seq], dim=1)  # 3 (non-zero) pads on the left
    mask = torch.ones(1, 10, dtype=torch.bool)
    mask[0, :3] = False
    padded = model(batch, attention_mask=mask)
    expected = model(seq)
    torch.testing.assert_close(padded if model_class is SequenceClassifier else padded[:, 3:], expected)


# -- causality and decoding -----------------------------------------------------------------------


def test_language_model_is_exactly_causal() -> None:
    """Changing token t leaves every output before t bitwise unchanged, with exactly zero gradient."""
    torch.manual_seed(4)
    lm = LanguageModel(config(token_shift=4)).eval()
    randomize_shift(lm, seed=9)
    x = ids(2, 12, seed=10)
    captured: list[Tensor] = []

    def keep(module: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
        out.retain_grad()
        captured.append(out)

    handle = lm.embed.tokens.register_forward_hook(keep)
    logits = lm(x)
    handle.remove()
    for t in range(1, 12):
        changed = x.clone()
        changed[:, t:] = changed[:, t:] % (VOCAB - 1) + 1  # every later token differs
        assert torch.equal(lm(changed)[:, :t], logits[:, :t]), t
        captured[0].grad = None
        logits[:, :t].sum().backward(retain_graph=True)
        grad = captured[0].grad
        assert grad is not None and torch.count_nonzero(grad[:, t:]) == 0, t
        assert torch.count_nonzero(grad[:, :t]) > 0


@pytest.mark.parametrize("width", [2, 4])
def test_cached_decoding_equals_recomputation(width: int) -> None:
    """A left-padded prompt in one step, then chunks shorter and longer than the history."""
    torch.manual_seed(5)
    lm = LanguageModel(config(token_shift=width)).eval()
    randomize_shift(lm, seed=11)
    x = ids(2, 12, seed=12)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :2] = False
    full = lm(x, attention_mask=mask)
    cache = lm.new_cache()
    pieces = [(0, 4), (4, 5), (5, 6), (6, 8), (8, 12)]
    steps = [lm(x[:, a:b], attention_mask=mask[:, a:b], cache=cache) for a, b in pieces]
    assert cache.shift_history is not None and cache.shift_history.shape == (2, width - 1, 16)
    torch.testing.assert_close(torch.cat(steps, dim=1)[mask], full[mask], atol=1e-5, rtol=1e-5)


def test_generation_with_and_without_cache_agree() -> None:
    torch.manual_seed(6)
    lm = LanguageModel(config(token_shift=3)).eval()
    randomize_shift(lm, seed=13)
    prompt = ids(3, 5, seed=14)
    cached = lm.generate(prompt, 8, use_cache=True)
    assert torch.equal(cached, lm.generate(prompt, 8, use_cache=False))
    beams = lm.generate(prompt, 6, num_beams=3, use_cache=True)
    assert torch.equal(beams, lm.generate(prompt, 6, num_beams=3, use_cache=False))


def test_history_follows_beam_reordering() -> None:
    torch.manual_seed(7)
    lm = LanguageModel(config(token_shift=3)).eval()
    randomize_shift(lm, seed=15)
    x = ids(3, 7, seed=16)
    cache = lm.new_cache()
    lm(x[:, :4], cache=cache)
    order = torch.tensor([2, 0, 0])
    cache.reorder_batch(order)
    out = lm(x[order, 4:], cache=cache)
    torch.testing.assert_close(out, lm(x[order])[:, 4:], atol=1e-5, rtol=1e-5)


def test_encoder_decoder_cached_decoding_equals_recomputation() -> None:
    torch.manual_seed(8)
    model = EncoderDecoder(config(token_shift=3)).eval()
    randomize_shift(model, seed=17)
    src, tgt = ids(2, 6, seed=18), ids(2, 5, seed=19)
    memory = model.encode(src)
    full = model.decode(tgt, memory)
    cache = model.new_cache()
    steps = [model.decode(tgt[:, t : t + 1], memory, cache=cache) for t in range(5)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


# -- saving and validation ----------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(9)
    lm = LanguageModel(config(token_shift=3)).eval()
    randomize_shift(lm, seed=20)
    lm.save_pretrained(tmp_path / "lm")
    loaded = load_pretrained(tmp_path / "lm").eval()
    assert isinstance(loaded, LanguageModel) and loaded.config.token_shift == 3
    assert torch.equal(loaded.embed.shift.weight, lm.embed.shift.weight)
    x = ids(2, 6, seed=21)
    assert torch.equal(loaded(x), lm(x))
    assert TransformerConfig.from_json(lm.config.to_json()).token_shift == 3


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "token_shift must be 0 \\(off\\) or a kernel width of at least 2, got -1"),
        (1, "token_shift must be 0 \\(off\\) or a kernel width of at least 2, got 1"),
        (2.0, "token_shift must be 0 \\(off\\) or a kernel width of at least 2, got 2.0"),
        ("2", "token_shift must be 0 \\(off\\) or a kernel width of at least 2, got '2'"),
        (True, "token_shift is the convolution's kernel width .* use token_shift=2"),
    ],
)
def test_bad_values_name_the_field(value: object, message: str) -> None:
    with pytest.raises(ConfigFieldError, match=message) as caught:
        config(token_shift=value)
    assert caught.value.path == ("token_shift",)


def test_off_by_default_with_no_parameters() -> None:
    model = LanguageModel(config())
    assert model.embed.shift is None
    assert not any("shift" in name for name, _ in model.named_parameters())
    cache = model.new_cache()
    model(ids(1, 3), cache=cache)
    assert cache.shift_history is None


def test_saved_bool_false_loads_as_off_and_saved_true_is_refused() -> None:
    """Configs saved while the field was a bool: ``false`` meant off; ``true`` had other weights."""
    data = config().to_dict()
    data["token_shift"] = False
    assert TransformerConfig.from_dict(data).token_shift == 0
    data["token_shift"] = True
    with pytest.raises(ConfigFieldError, match="use token_shift=2"):
        TransformerConfig.from_dict(data)
