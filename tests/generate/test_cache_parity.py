"""Logits with the decoding cache equal logits without it, for every registered decoding mechanism.

Parametrized over the registry: a mechanism that declares ``decoding`` is tested as soon
as it is registered, with its ``small_options``. Mechanisms without a decoding state fall
back to recomputation with a single warning.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import attnkit
from attnkit import EncoderDecoder, LanguageModel, TransformerConfig
from attnkit.generate import sessions


def caps(name: str) -> attnkit.Capabilities:
    return attnkit.attention_capabilities(name)


DECODING = [n for n in attnkit.list_attention() if caps(n).causal and caps(n).decoding is not None]
NO_STATE = [n for n in attnkit.list_attention() if caps(n).causal and caps(n).decoding is None]
LENGTH = 23  # not a multiple of common block/window sizes


def config(name: str, **changes: object) -> TransformerConfig:
    base: dict = {
        "vocab_size": 31,
        "dim": 32,
        "depth": 2,
        "heads": 4,
        "attention": name,
        "attention_options": attnkit.get_spec(name).small_options,
        "position": "rotary",
        "eos_token_id": None,
    }
    return TransformerConfig(**{**base, **changes})


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 31, (batch, length), generator=torch.Generator().manual_seed(seed))


def feed_in_chunks(model: LanguageModel, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    cache = model.new_cache()
    pieces, start = [], 0
    for size in [5, 1, 3, *[1] * LENGTH]:
        if start >= x.shape[1]:
            break
        stop = min(start + size, x.shape[1])
        step_mask = mask[:, start:stop] if mask is not None else None
        pieces.append(model(x[:, start:stop], attention_mask=step_mask, cache=cache))
        start = stop
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("name", DECODING)
@pytest.mark.parametrize("padded", [False, True])
def test_language_model_cache_equals_recompute(name: str, padded: bool) -> None:
    if padded and not caps(name).key_padding:
        pytest.skip("mechanism has no key padding")
    torch.manual_seed(0)
    model = LanguageModel(config(name)).eval()
    x = ids(2, LENGTH)
    mask = None
    if padded:
        mask = torch.ones(2, LENGTH, dtype=torch.bool)
        mask[1, :6] = False  # left padding, as in batched generation
    with torch.no_grad():
        full = model(x, attention_mask=mask)
        cached = feed_in_chunks(model, x, mask)
    real = mask if mask is not None else torch.ones(2, LENGTH, dtype=torch.bool)
    torch.testing.assert_close(cached[real], full[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", DECODING)
def test_generation_with_and_without_cache_agree(name: str) -> None:
    torch.manual_seed(1)
    model = LanguageModel(config(name)).eval()
    prompt = ids(2, 5, seed=1)
    a = model.generate(prompt, 8, use_cache=True)
    b = model.generate(prompt, 8, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", DECODING)
def test_encoder_decoder_cache_equals_recompute(name: str) -> None:
    torch.manual_seed(2)
    cfg = config(name, attention="full", attention_options={}, decoder_attention=name)
    cfg = cfg.replace(decoder_attention_options=attnkit.get_spec(name).small_options)
    model = EncoderDecoder(cfg).eval()
    src, tgt = ids(2, 9, seed=2), ids(2, 15, seed=3)
    src_mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    with torch.no_grad():
        memory = model.encode(src, src_mask=src_mask)
        full = model.decode(tgt, memory, src_mask=src_mask)
        cache = model.new_cache()
        steps = [model.decode(tgt[:, i : i + 1], memory, src_mask=src_mask, cache=cache) for i in range(15)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", DECODING)
def test_beam_search_reorders_every_state(name: str) -> None:
    """Beam search moves rows between steps; the cache must follow (equal to recompute)."""
    torch.manual_seed(3)
    model = LanguageModel(config(name)).eval()
    prompt = ids(2, 6, seed=4)
    a = model.generate(prompt, 6, num_beams=3, num_return_sequences=2, use_cache=True)
    b = model.generate(prompt, 6, num_beams=3, num_return_sequences=2, use_cache=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", NO_STATE)
def test_mechanisms_without_state_recompute_and_warn_once(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sessions, "_WARNED", set())
    torch.manual_seed(4)
    model = LanguageModel(config(name)).eval()
    prompt = ids(1, 8, seed=5)
    with pytest.warns(UserWarning, match=f"attention '{name}' has no incremental decoding state"):
        a = model.generate(prompt, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = model.generate(prompt, 5)  # said once only
        c = model.generate(prompt, 5, use_cache=False)
    assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(ValueError, match="decoding"):
        model(prompt, cache=model.new_cache())


def test_mixed_layers_fall_back_only_when_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    if not NO_STATE:
        pytest.skip("every registered causal mechanism has a decoding state")
    monkeypatch.setattr(sessions, "_WARNED", set())
    name = NO_STATE[0]
    options = [attnkit.get_spec(n).small_options for n in ("full", name)]
    model = LanguageModel(config("full", attention=["full", name], attention_options=options)).eval()
    assert sessions.mechanisms_without_state(model) == [name]
    with pytest.warns(UserWarning, match=name):
        assert sessions.resolve_use_cache(model, True) is False
    assert sessions.resolve_use_cache(LanguageModel(config("full")), True) is True
