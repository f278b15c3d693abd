"""``generate`` through the bridge: cached decoding equals recomputing the whole prefix (greedy).

Tokens must be equal, and so must every step's logits (fp32, relative 1e-4): greedy tokens of a
tiny random model can survive a wrong attention, its logits cannot.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

import attnkit
import attnkit.hf.bridge
from tests.hf.helpers import RTOL, padded_batch, relative_error, tiny, with_mechanism

WINDOW = 4
NEW_TOKENS = 3 * WINDOW  # the rolling window is overtaken three times
KV_DECODING = [n for n in attnkit.list_attention() if attnkit.attention_capabilities(n).decoding is not None]
RECOMPUTING = [
    n
    for n in attnkit.list_attention()
    if attnkit.attention_capabilities(n).causal
    and attnkit.attention_capabilities(n).decoding is None
    and not attnkit.attention_capabilities(n).cross_attention
]


def greedy(model, ids: torch.Tensor, mask: torch.Tensor, *, use_cache: bool, new: int = NEW_TOKENS) -> torch.Tensor:
    return generated(model, ids, mask, use_cache=use_cache, new=new)[0]


def generated(
    model, ids: torch.Tensor, mask: torch.Tensor, *, use_cache: bool, new: int = NEW_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens ``(B, T + new)`` and the logits of every step ``(new, B, V)``."""
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.logits)


def assert_same_generation(first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert torch.equal(first[0], second[0])
    assert relative_error(first[1], second[1]) <= RTOL


def options(name: str) -> dict:
    return {"window": WINDOW} if name == "sliding_window" else dict(attnkit.get_spec(name).small_options)


@pytest.mark.parametrize("name", KV_DECODING)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_generation_equals_recomputation(name: str, family: str) -> None:
    model = with_mechanism(tiny(family), name, **options(name))
    ids, mask = padded_batch([8, 5], side="left", seed=5)
    cached = generated(model, ids, mask, use_cache=True)
    assert cached[0].shape == (2, 8 + NEW_TOKENS)
    assert_same_generation(cached, generated(model, ids, mask, use_cache=False))


def test_full_generation_equals_transformers_generation() -> None:
    reference = tiny("llama")
    ids, mask = padded_batch([8, 5], side="left", seed=6)
    bridged = with_mechanism(reference, "full")
    assert_same_generation(
        generated(bridged, ids, mask, use_cache=True), generated(reference, ids, mask, use_cache=True)
    )


def test_mistral_sliding_cache_equals_transformers_sliding_window() -> None:
    # Transformers keeps only the last window-1 keys for these layers; the mechanism continues from them.
    reference = tiny("mistral", sliding_window=WINDOW)
    bridged = with_mechanism(reference, "sliding_window", window=WINDOW)
    ids, mask = padded_batch([8, 5], side="left", seed=7)
    out = generated(bridged, ids, mask, use_cache=True)
    assert_same_generation(out, generated(bridged, ids, mask, use_cache=False))
    assert_same_generation(out, generated(reference, ids, mask, use_cache=True))


@pytest.fixture
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attnkit.hf.bridge, "_WARNED", set())  # the warning is once per process


@pytest.mark.parametrize("name", RECOMPUTING)
def test_mechanisms_without_decoding_state_recompute(name: str, fresh_warnings: None) -> None:
    base = tiny("llama")
    with pytest.warns(UserWarning, match="recomputes the whole prefix"):
        model = with_mechanism(base, name, **options(name))
    assert model.generation_config.use_cache is False
    ids, mask = padded_batch([8, 5], side="left", seed=8)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    # Reference: a plain greedy loop over full forwards of the growing sequence (rows that
    # produced the end-of-sequence token continue with padding, as generate does).
    eos = model.generation_config.eos_token_id
    expected, expected_mask = ids, mask
    finished = torch.zeros(len(ids), dtype=torch.bool)
    with torch.no_grad():
        for _ in range(4):
            positions = (expected_mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(expected, attention_mask=expected_mask, position_ids=positions, use_cache=False).logits
            token = logits[:, -1].argmax(-1).masked_fill(finished, 0)
            finished |= token == eos
            expected = torch.cat([expected, token[:, None]], dim=1)
            expected_mask = torch.cat([expected_mask, torch.ones_like(expected_mask[:, :1])], dim=1)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="use_cache=False"):
        greedy(model, ids, mask, use_cache=True, new=2)


def test_the_recompute_warning_is_given_once(fresh_warnings: None) -> None:
    if not RECOMPUTING:
        pytest.skip("every causal self-attention mechanism has a decoding state")
    name = RECOMPUTING[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with_mechanism(tiny("llama"), name, **options(name))
        with_mechanism(tiny("llama"), name, **options(name))
    assert sum("recomputes the whole prefix" in str(w.message) for w in caught) == 1
