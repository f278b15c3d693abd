"""``save_pretrained`` -> ``attnkit.hf.load`` restores the attnkit choice and the mechanism state bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnkit  # noqa: E402
import attnkit.hf  # noqa: E402
from attnkit.hf.attention import attached  # noqa: E402
from tests.hf.helpers import outputs, padded_batch, positions, tiny, with_mechanism  # noqa: E402

NAMES = attnkit.list_attention()
# apply() warns once that lsh, routing and sinkhorn make generate() recompute (tested in test_generate.py)
pytestmark = pytest.mark.filterwarnings("ignore:attention '.*' has no incremental decoding state")


def _tiny_for(name: str):
    """A decoder for causal mechanisms, else BERT (without attention dropout: the state is moved in training mode)."""
    return (
        tiny("llama") if attnkit.attention_capabilities(name).causal else tiny("bert", attention_probs_dropout_prob=0.0)
    )


def _move_state_off_its_initial_values(model) -> None:
    """Make every mechanism's state differ from what building it afresh gives, so a load that
    rebuilt instead of reading the checkpoint would be caught."""
    model.train()
    ids = torch.randint(1, 90, (2, 20))
    model(ids)  # routing records centroid statistics in training mode; performer counts calls
    for mechanism in (m for m in model.modules() if isinstance(m, attnkit.AttentionMechanism)):
        mechanism.after_optimizer_step()  # routing moves its centroids
        if isinstance(mechanism, attnkit.PerformerAttention):
            mechanism.redraw_features()
        with torch.no_grad():
            for parameter in mechanism.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
    model.eval()


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_bit_exact(name: str, tmp_path: Path) -> None:
    options = dict(attnkit.get_spec(name).small_options)
    model = with_mechanism(_tiny_for(name), name, **options)
    _move_state_off_its_initial_values(model)
    model.save_pretrained(tmp_path)
    loaded = attnkit.hf.load(tmp_path)

    assert type(loaded) is type(model)
    assert loaded.config.attnkit == model.config.attnkit
    assert loaded.config._attn_implementation == f"attnkit_{name}"
    state, restored = model.state_dict(), loaded.state_dict()
    assert state.keys() == restored.keys()
    for key in state:
        assert torch.equal(state[key], restored[key]), key
    ids, mask = padded_batch([14, 9], side="right", seed=10)
    kwargs = {"position_ids": positions(mask)}
    assert torch.equal(outputs(loaded, ids, mask, **kwargs), outputs(model, ids, mask, **kwargs))


def test_config_records_the_choice(tmp_path: Path) -> None:
    model = with_mechanism(tiny("llama"), "sliding_window", window=5, layers=[1])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["attnkit"] == {
        "format": 1,
        "mechanism": "sliding_window",
        "options": {"window": 5},
        "layers": [1],
        "base_attn_implementation": "sdpa",
    }
    assert config["attn_implementation"] == "attnkit_sliding_window"


def test_hybrid_round_trip_keeps_the_other_layers(tmp_path: Path) -> None:
    model = with_mechanism(_tiny_for("linformer"), "linformer", proj_len=8, max_len=32, layers=[0])
    _move_state_off_its_initial_values(model)
    model.save_pretrained(tmp_path)
    loaded = attnkit.hf.load(tmp_path)
    layers = loaded.bert.encoder.layer
    assert attached(layers[0].attention.self) is not None
    assert attached(layers[1].attention.self) is None
    ids, mask = padded_batch([14, 9], side="right", seed=11)
    assert torch.equal(outputs(loaded, ids, mask), outputs(model, ids, mask))


def test_auto_class_restores_a_mechanism_without_state(tmp_path: Path) -> None:
    model = with_mechanism(tiny("llama"), "sliding_window", window=3)
    model.save_pretrained(tmp_path)
    attnkit.hf.register()
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    ids, mask = padded_batch([14, 9], side="left", seed=12)
    kwargs = {"position_ids": positions(mask)}
    assert torch.equal(outputs(auto, ids, mask, **kwargs), outputs(model, ids, mask, **kwargs))
    assert attached(auto.model.layers[0].self_attn).window == 3  # the saved option, not the default


def test_auto_class_refuses_a_mechanism_with_state(tmp_path: Path) -> None:
    with_mechanism(tiny("bert"), "linformer", proj_len=8, max_len=32).save_pretrained(tmp_path)
    attnkit.hf.register()
    auto = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"attnkit\.hf\.load"):
        auto(torch.randint(1, 90, (1, 8)))


def test_load_refuses_a_directory_without_attnkit(tmp_path: Path) -> None:
    tiny("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no 'attnkit' entry"):
        attnkit.hf.load(tmp_path)


def test_load_refuses_mismatched_mechanism_tensors(tmp_path: Path) -> None:
    model = with_mechanism(tiny("bert"), "linformer", proj_len=8, max_len=32)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["attnkit"]["options"]["share_kv"] = True  # proj_v saved, but the rebuilt mechanism has none
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unexpected"):
        attnkit.hf.load(tmp_path)
