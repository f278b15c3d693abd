"""Mechanisms are submodules of the Transformers attention layers; ``attn_implementation="attnkit_<name>"`` works."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnkit  # noqa: E402
import attnkit.hf  # noqa: E402
from attnkit.hf.attention import attached  # noqa: E402
from tests.hf.helpers import FAMILIES, outputs, padded_batch, positions, tiny, with_mechanism  # noqa: E402


def test_mechanism_parameters_train_with_the_model() -> None:
    model = with_mechanism(tiny("bert", attention_probs_dropout_prob=0.0), "linformer", proj_len=8, max_len=32)
    names = [n for n, _ in model.named_parameters() if ".attnkit." in n]
    assert names == [
        f"bert.encoder.layer.{i}.attention.self.attnkit.{p}" for i in range(2) for p in ("proj_k", "proj_v")
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    model.train()
    loss = model(torch.randint(1, 90, (2, 12)), labels=torch.tensor([0, 2])).loss
    loss.backward()
    optimizer.step()
    for name, parameter in model.named_parameters():
        if name in names:
            assert not torch.equal(parameter, before[name]), f"{name} did not move"


def test_mechanisms_follow_the_model_across_dtype_and_mode() -> None:
    model = with_mechanism(tiny("bert"), "linformer", proj_len=8, max_len=32)
    mechanism = attached(model.bert.encoder.layer[0].attention.self)
    assert mechanism is not None and not mechanism.training
    model.train()
    assert mechanism.training
    model.to(torch.float64)
    assert mechanism.proj_k.dtype == torch.float64


@pytest.mark.parametrize("family", list(FAMILIES))
def test_attn_implementation_builds_parameter_free_mechanisms(family: str) -> None:
    attnkit.hf.register()
    built = tiny(family, attn_implementation="attnkit_sliding_window")
    applied = with_mechanism(tiny(family), "sliding_window")  # default options, same weights
    ids, mask = padded_batch([12, 7], side="right", seed=18)
    kwargs = {"position_ids": positions(mask)}
    assert torch.equal(outputs(built, ids, mask, **kwargs), outputs(applied, ids, mask, **kwargs))
    windows = [attached(m).window for m in built.modules() if attached(m) is not None]
    assert windows == [256, 256]


def test_attn_implementation_refuses_mechanisms_with_state() -> None:
    attnkit.hf.register()
    model = tiny("bert", attn_implementation="attnkit_linformer")
    with pytest.raises(ValueError, match=r"keeps parameters or buffers \(proj_k, proj_v\).*attnkit\.hf\.apply"):
        model(torch.randint(1, 90, (1, 8)))


def test_register_names_every_mechanism() -> None:
    names = attnkit.hf.register()
    assert names == [f"attnkit_{n}" for n in attnkit.list_attention()]
    assert set(names) <= set(transformers.AttentionInterface._global_mapping)


def test_apply_returns_the_same_model_and_keeps_the_weights() -> None:
    model = tiny("llama")
    weights = copy.deepcopy(model.state_dict())
    assert attnkit.hf.apply(model, "full") is model
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
