"""The Hugging Face suites measure what they say: the converted model computes the SDPA model's function
(where the mechanism is exact), and a decode step continues the prefilled context."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks.suites import hf_convert, hf_decode


def test_training_step_of_a_covering_window_equals_the_sdpa_models() -> None:
    # A window covering the whole sequence is exact: the two closures compute the same loss.
    sdpa = hf_convert.training_step(48, True, attention="sdpa")()
    window = hf_convert.training_step(48, True, attention="sliding_window", window=64)()
    assert sdpa.requires_grad and sdpa.shape == ()
    torch.testing.assert_close(window, sdpa, rtol=1e-5, atol=1e-6)
    linear = hf_convert.training_step(48, True, attention="linear")()
    assert torch.isfinite(linear) and not torch.equal(linear, sdpa)


@pytest.mark.parametrize("cache", ["attnkit state", "transformers kv"])
def test_decode_step_continues_the_prefilled_context(cache: str) -> None:
    length = 20
    step = hf_decode.decode_step(length, True, attention="linear", cache=cache)
    with torch.no_grad():
        logits = step()
    # Reference: the whole sequence (prompt + the greedy next token) through a fresh model, no cache.
    model = hf_convert.llama("linear", length + 4096)
    prompt = torch.randint(0, hf_convert.VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        first = model(input_ids=prompt, use_cache=False).logits[:, -1:].argmax(-1)
        full = model(input_ids=torch.cat([prompt, first], 1), use_cache=False).logits[:, -1:]
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-5)
    assert step.info()["cache_bytes"] > 0  # type: ignore[attr-defined]
