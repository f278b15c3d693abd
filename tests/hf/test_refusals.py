"""What the bridge cannot honour exactly is refused with a message that says why and what to do."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnkit  # noqa: E402
import attnkit.hf  # noqa: E402
from attnkit.hf.attention import attached  # noqa: E402
from tests.hf.helpers import RTOL, outputs, padded_batch, positions, relative_error, tiny, with_mechanism  # noqa: E402

T5 = {"d_model": 32, "d_ff": 64, "num_layers": 1, "num_heads": 2, "d_kv": 16, "vocab_size": 50}


def test_an_unsupported_family_is_named_with_the_reason() -> None:
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(**T5))
    with pytest.raises(ValueError, match=r"'t5' family.*position_bias.*Supported families: bert, gpt2"):
        attnkit.hf.apply(t5, "full")


def test_an_unchecked_family_is_refused_too() -> None:
    config = transformers.GPTNeoXConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50
    )
    with pytest.raises(ValueError, match=r"'gpt_neox' family.*not been checked"):
        attnkit.hf.apply(transformers.GPTNeoXForCausalLM(config), "linear")


@pytest.mark.parametrize("name", ["linformer", "nystrom"])
def test_a_mechanism_without_causal_form_is_refused_in_a_decoder(name: str) -> None:
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"causal=True is not supported.*LlamaAttention is a causal"):
        attnkit.hf.apply(model, name)
    assert all(attached(m) is None for m in model.modules())  # nothing was half-applied
    assert model.config._attn_implementation == "sdpa"


def test_output_attentions_is_refused() -> None:
    model = with_mechanism(tiny("llama"), "full")
    with pytest.raises(ValueError, match=r"output_attentions=True"):
        model(torch.randint(1, 90, (1, 6)), output_attentions=True)


@pytest.mark.parametrize(("option", "value"), [("softcap", 30.0), ("head_mask", torch.ones(2, 4))])
def test_an_option_the_bridge_does_not_know_is_refused(option: str, value: object) -> None:
    model = with_mechanism(tiny("llama"), "full")
    with pytest.raises(ValueError, match=rf"passes {option}= to its attention"):
        model(torch.randint(1, 90, (1, 6)), **{option: value})


def test_attention_dropout_in_training_is_refused_unless_the_mechanism_applies_it() -> None:
    model = with_mechanism(tiny("llama", attention_dropout=0.1), "linear")
    ids = torch.randint(1, 90, (2, 8))
    model(ids)  # eval mode: no dropout asked for
    model.train()
    with pytest.raises(ValueError, match=r"attention dropout p=0\.1 in training.*attention_dropout=0\.0"):
        model(ids)
    full = with_mechanism(tiny("llama", attention_dropout=0.1), "full").train()
    full(ids)  # full inherits the layer's dropout
    assert attached(full.model.layers[0].self_attn).dropout == 0.1


def test_a_layer_score_scale_is_inherited_or_refused() -> None:
    # GPT-2 can scale scores by 1 / (sqrt(head_dim) * (layer + 1)).
    scaled = {"scale_attn_by_inverse_layer_idx": True}
    with pytest.raises(ValueError, match=r"scales scores by 0\.125.*no scale option"):
        attnkit.hf.apply(tiny("gpt2", **scaled), "linear")
    reference = tiny("gpt2", **scaled)
    bridged = with_mechanism(reference, "full")
    ids, mask = padded_batch([12, 7], side="left", seed=13)
    kwargs = {"position_ids": positions(mask)}
    real = mask.bool()
    assert (
        relative_error(outputs(bridged, ids, mask, **kwargs)[real], outputs(reference, ids, mask, **kwargs)[real])
        <= RTOL
    )
    with pytest.raises(ValueError, match=r"differs from the layer's own score scale"):
        attnkit.hf.apply(tiny("gpt2"), "full", scale=0.5)


def test_packed_sequences_in_one_row_are_refused() -> None:
    model = with_mechanism(tiny("llama"), "full")
    restart = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    with pytest.raises(ValueError, match=r"neither causal, bidirectional nor a causal sliding window"):
        model(torch.randint(1, 90, (1, 10)), position_ids=restart, use_cache=False)


def test_a_static_cache_is_refused() -> None:
    model = with_mechanism(tiny("llama"), "full")
    with pytest.raises(ValueError, match=r"keys to end at the last query.*dynamic cache"):
        model.generate(torch.randint(1, 90, (1, 6)), max_new_tokens=2, cache_implementation="static", do_sample=False)


def test_a_ready_4d_mask_is_read_exactly_or_refused() -> None:
    model = with_mechanism(tiny("llama"), "linear")
    ids, mask = padded_batch([10, 6], side="left", seed=14)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    dense = (causal[None] & mask.bool()[:, None, :])[:, None]  # (B, 1, T, T)
    kwargs = {"position_ids": positions(mask)}
    expected = outputs(model, ids, mask, **kwargs)
    real = mask.bool()
    assert torch.equal(outputs(model, ids, dense, **kwargs)[real], expected[real])
    additive = torch.zeros(dense.shape).masked_fill(~dense, torch.finfo(torch.float32).min)
    assert torch.equal(outputs(model, ids, additive, **kwargs)[real], expected[real])
    with pytest.raises(ValueError, match="additive score biases"):
        outputs(model, ids, additive + 0.5 * dense, **kwargs)
    with pytest.raises(ValueError, match="not a padded causal"):
        outputs(model, ids, dense & ~torch.eye(10, dtype=torch.bool), **kwargs)


def test_bad_arguments_to_apply() -> None:
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"distinct indices among 0\.\.1"):
        attnkit.hf.apply(model, "full", layers=[0, 5])
    with pytest.raises(ValueError, match=r"distinct indices"):
        attnkit.hf.apply(model, "full", layers=[1, 1])
    with pytest.raises(TypeError, match=r"unknown option"):
        attnkit.hf.apply(model, "sliding_window", windw=4)
    with pytest.raises(ValueError, match=r"unknown attention 'slidingwindow'"):
        attnkit.hf.apply(model, "slidingwindow")
    with pytest.raises(ValueError, match=r"JSON values"):
        attnkit.hf.apply(model, "sliding_window", window=torch.tensor(4))
    with pytest.raises(TypeError, match=r"PreTrainedModel"):
        attnkit.hf.apply(torch.nn.Linear(2, 2), "full")  # type: ignore[arg-type]


def test_applying_again_replaces_the_mechanism() -> None:
    model = with_mechanism(tiny("llama"), "linear")
    attnkit.hf.apply(model, "full")
    reference = tiny("llama")
    ids, mask = padded_batch([10, 6], side="left", seed=15)
    kwargs = {"position_ids": positions(mask)}
    real = mask.bool()
    assert (
        relative_error(outputs(model, ids, mask, **kwargs)[real], outputs(reference, ids, mask, **kwargs)[real]) <= RTOL
    )
    assert model.config.attnkit["mechanism"] == "full"
    assert model.config.attnkit["base_attn_implementation"] == "sdpa"
