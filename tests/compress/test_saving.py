"""Saved pruned and quantized models load back exactly (safetensors + JSON, never a pickle)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from attnkit import LanguageModel, TransformerConfig
from attnkit.compress import (
    fbgemm_available,
    load_compressed,
    prune_ffn,
    prune_heads,
    prune_magnitude,
    quantize,
    save_compressed,
)
from tests.compress.helpers import lm_batch, tiny_encoder, tiny_lm


def _assert_same(saved, loaded) -> None:
    batch = lm_batch()
    assert saved.state_dict().keys() == loaded.state_dict().keys()
    for key, value in saved.state_dict().items():
        other = loaded.state_dict()[key]
        assert value.dtype == other.dtype and torch.equal(value, other), key
    with torch.no_grad():
        a = saved(batch.input_ids, attention_mask=batch.attention_mask)
        b = loaded(batch.input_ids, attention_mask=batch.attention_mask)
    assert torch.equal(a, b)
    assert loaded.compression_record == saved.compression_record


def test_pruned_model_round_trips(tmp_path: Path) -> None:
    model = tiny_lm(kv_heads=2, position="alibi", activation="swiglu")
    prune_heads(model, {0: [0, 1]})
    prune_ffn(model, 0.3, data=[lm_batch()])
    prune_heads(model, {1: [2, 3]})
    save_compressed(model, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "compression.json",
        "config.json",
        "model.safetensors",
    ]
    loaded = load_compressed(tmp_path / "m")
    assert isinstance(loaded, LanguageModel) and loaded.get_submodule(
        "decoder.layers.0.self_attention.attention"
    ).position_bias.slopes.shape == (2,)
    _assert_same(model, loaded)


def test_pruned_routing_model_round_trips(tmp_path: Path) -> None:
    model = tiny_encoder(attention="routing", attention_options={"num_clusters": 2, "window": 4})
    model(lm_batch().input_ids)
    prune_heads(model, {0: [3], 1: [0, 1]})
    save_compressed(model, tmp_path / "r")
    _assert_same(model, load_compressed(tmp_path / "r"))


ROUTES = [
    pytest.param(
        "int8_dynamic",
        "fbgemm",
        marks=pytest.mark.skipif(not fbgemm_available(), reason="no fbgemm engine"),
        id="dynamic-fbgemm",
    ),
    pytest.param("int8_dynamic", "torchao", id="dynamic-torchao"),
    pytest.param("int8_weight_only", "torchao", id="weight_only-torchao"),
]


@pytest.mark.parametrize(("mode", "route"), ROUTES)
def test_pruned_and_quantized_model_round_trips(tmp_path: Path, mode: str, route: str) -> None:
    model = tiny_lm(dtype=torch.float32, tie_embeddings=False)
    prune_heads(model, 0.25, score="magnitude")
    quantize(model, mode, route=route)
    save_compressed(model, tmp_path / "q")
    loaded = load_compressed(tmp_path / "q")
    record = json.loads((tmp_path / "q" / "compression.json").read_text())
    assert len(record["quantized"]) == 12  # q, k, v, out, w_in, w_out of 2 layers; the LM head stays float
    assert all(v == {"mode": mode, "route": route} for v in record["quantized"].values())
    assert loaded.get_submodule("decoder.layers.0.feed_forward.ff.w_in").qweight.dtype == torch.int8
    _assert_same(model, loaded)


def test_magnitude_pruned_model_loads_either_way(tmp_path: Path) -> None:
    model = tiny_lm()
    prune_magnitude(model, 0.6)
    save_compressed(model, tmp_path / "s")
    for loaded in (load_compressed(tmp_path / "s"), LanguageModel.from_pretrained(tmp_path / "s")):
        for key, value in model.state_dict().items():
            assert torch.equal(value, loaded.state_dict()[key]), key


def test_nothing_is_overwritten_unless_asked(tmp_path: Path) -> None:
    model = tiny_lm()
    save_compressed(model, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    prune_heads(model, {0: [0]})
    with pytest.raises(
        ValueError, match=r"already holds config\.json, model\.safetensors, compression\.json; pass overwrite"
    ):
        save_compressed(model, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    save_compressed(model, tmp_path / "m", overwrite=True)
    _assert_same(model, load_compressed(tmp_path / "m"))


def test_bad_records_fail_clearly(tmp_path: Path) -> None:
    model = tiny_lm()
    prune_heads(model, {1: [1, 2]})
    save_compressed(model, tmp_path / "m")
    record = tmp_path / "m" / "compression.json"
    record.write_text("{not json")
    with pytest.raises(ValueError, match=r"compression\.json is not valid JSON"):
        load_compressed(tmp_path / "m")
    record.write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="has format 99"):
        load_compressed(tmp_path / "m")
    record.write_text(json.dumps({"format": 1, "heads": {"decoder.layers.9.self_attention.attention": [0]}}))
    with pytest.raises(ValueError, match="compression record: the model has no module"):
        load_compressed(tmp_path / "m")
    with pytest.raises(ValueError, match="must be an attnkit model"):
        save_compressed(copy.deepcopy(model.decoder), tmp_path / "x")


def test_the_models_own_loaders_read_a_compressed_folder(tmp_path: Path) -> None:
    # attnkit generate / eval load through from_pretrained and load_pretrained: a pruned folder used to fail
    # there with a list of shape mismatches.
    from attnkit.models.pretrained import load_pretrained

    torch.manual_seed(0)
    model = LanguageModel(TransformerConfig(vocab_size=30, dim=32, depth=2, heads=4)).eval()
    prune_heads(model, {0: [1], 1: [0, 2]})
    save_compressed(model, tmp_path)
    x = torch.randint(0, 30, (2, 7))
    for loaded in (LanguageModel.from_pretrained(tmp_path), load_pretrained(tmp_path)):
        assert [layer.self_attention.attention.heads for layer in loaded.decoder.layer_list()] == [3, 2]
        assert torch.equal(loaded(x), model(x))
