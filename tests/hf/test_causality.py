"""Causality and padding through whole Transformers models, for every registered mechanism.

Exact checks: changing future tokens leaves earlier logits bit-identical and gives exactly
zero gradient; changing the content of padding tokens leaves real tokens' outputs bit-identical.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import attnkit
from tests.hf.helpers import VOCAB, outputs, padded_batch, positions, tiny, with_mechanism

NAMES = attnkit.list_attention()
# apply() warns once that lsh, routing and sinkhorn make generate() recompute (tested in test_generate.py)
pytestmark = pytest.mark.filterwarnings("ignore:attention '.*' has no incremental decoding state")
CAUSAL = [n for n in NAMES if attnkit.attention_capabilities(n).causal]
CUT = 7  # tokens from this position on are changed


def small(name: str) -> dict:
    return dict(attnkit.get_spec(name).small_options)


@pytest.mark.parametrize("name", CAUSAL)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_future_tokens_change_nothing_before_them(name: str, family: str) -> None:
    model = with_mechanism(tiny(family), name, **small(name))
    ids, mask = padded_batch([16, 13], side="left", seed=3)
    changed = ids.clone()
    changed[:, CUT:] = torch.randint(1, VOCAB, changed[:, CUT:].shape, generator=torch.Generator().manual_seed(9))
    kwargs = {"position_ids": positions(mask)}
    before, after = outputs(model, ids, mask, **kwargs), outputs(model, changed, mask, **kwargs)
    real = mask[:, :CUT].bool()
    assert torch.equal(before[:, :CUT][real], after[:, :CUT][real])
    assert not torch.equal(before[:, CUT:], after[:, CUT:])  # the change did reach the model


@pytest.mark.parametrize("name", CAUSAL)
def test_no_gradient_flows_from_the_past_to_the_future(name: str) -> None:
    model = with_mechanism(tiny("llama"), name, **small(name))
    embeds = model.get_input_embeddings()(torch.randint(1, VOCAB, (2, 16))).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits
    logits[:, :CUT].sum().backward()
    assert embeds.grad is not None
    assert torch.count_nonzero(embeds.grad[:, CUT:]) == 0
    assert torch.count_nonzero(embeds.grad[:, :CUT]) > 0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_content_changes_no_real_token(name: str, side: str) -> None:
    causal = attnkit.attention_capabilities(name).causal
    model = with_mechanism(tiny("llama" if causal else "bert"), name, **small(name))
    ids, mask = padded_batch([16, 11, 6], side=side, seed=4)
    other = torch.where(mask.bool(), ids, (ids * 7 + 3) % (VOCAB - 1) + 1)
    assert not torch.equal(other, ids)
    kwargs = {"position_ids": positions(mask)}
    real = mask.bool()
    assert torch.equal(outputs(model, ids, mask, **kwargs)[real], outputs(model, other, mask, **kwargs)[real])
