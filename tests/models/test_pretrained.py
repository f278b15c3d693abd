"""save_pretrained / from_pretrained: bit-exact round trip, no unpickling, malformed files rejected."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit import Encoder, EncoderDecoder, LanguageModel, SequenceClassifier, TransformerConfig

CLASSES = [Encoder, LanguageModel, SequenceClassifier, EncoderDecoder]


def config(**changes: object) -> TransformerConfig:
    base: dict = {"vocab_size": 23, "dim": 16, "depth": 2, "heads": 2, "num_classes": 4, "position": "learned"}
    return TransformerConfig(**{**base, **changes})


def run(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x, x) if isinstance(model, EncoderDecoder) else model(x)


@pytest.mark.parametrize("cls", CLASSES)
def test_round_trip_is_bit_exact(cls: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = cls(config(position="t5", tie_embeddings=cls is not EncoderDecoder)).eval()
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]

    def no_pickle(*args: object, **kwargs: object) -> None:
        raise AssertionError("loading must not unpickle")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = cls.from_pretrained(tmp_path)
    assert type(loaded) is cls and loaded.config == model.config and not loaded.training
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert original[name].dtype == restored[name].dtype
        assert torch.equal(original[name], restored[name]), name
    x = torch.randint(0, 23, (2, 7))
    assert torch.equal(run(model, x), run(loaded, x))


def test_lazily_created_mechanism_state_round_trips(tmp_path: Path) -> None:
    # Routing's centroids are an empty buffer until the first forward sets them up; a model saved after
    # that holds (heads, clusters, head_dim) centroids that a freshly built model does not have yet.
    torch.manual_seed(0)
    model = LanguageModel(config(attention="routing", attention_options={"routing": {"num_clusters": 2}})).eval()
    x = torch.randint(0, 23, (2, 9))
    expected = model(x)
    centroids = {k: v for k, v in model.state_dict().items() if k.endswith("centroids")}
    assert centroids and all(v.numel() > 0 for v in centroids.values())
    model.save_pretrained(tmp_path)
    loaded = LanguageModel.from_pretrained(tmp_path)
    for name, value in centroids.items():
        assert torch.equal(loaded.state_dict()[name], value), name
    assert torch.equal(loaded(x), expected)


def test_tied_weights_stay_tied_and_are_stored_once(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = LanguageModel(config())
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "embed.tokens.weight" in keys and "lm_head.proj.weight" not in keys
    loaded = LanguageModel.from_pretrained(tmp_path)
    assert loaded.lm_head.proj.weight is loaded.embed.tokens.weight


def test_dtype_is_kept(tmp_path: Path) -> None:
    model = LanguageModel(config()).to(torch.float64)
    model.save_pretrained(tmp_path)
    loaded = LanguageModel.from_pretrained(tmp_path)
    assert loaded.embed.tokens.weight.dtype == torch.float64
    assert torch.equal(loaded.embed.tokens.weight, model.embed.tokens.weight)


def test_generic_loader_picks_the_class(tmp_path: Path) -> None:
    SequenceClassifier(config()).save_pretrained(tmp_path)
    assert isinstance(attnkit.load_pretrained(tmp_path), SequenceClassifier)
    with pytest.raises(ValueError, match="holds a SequenceClassifier, not a LanguageModel"):
        LanguageModel.from_pretrained(tmp_path)


def test_truncated_weights_are_rejected(tmp_path: Path) -> None:
    LanguageModel(config()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        LanguageModel.from_pretrained(tmp_path)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        LanguageModel.from_pretrained(tmp_path)


def test_weights_of_another_shape_are_rejected(tmp_path: Path) -> None:
    LanguageModel(config()).save_pretrained(tmp_path)
    cfg_path = tmp_path / "config.json"
    data = json.loads(cfg_path.read_text())
    data["dim"] = 32
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"does not match the model its config describes: .*shape mismatches"):
        LanguageModel.from_pretrained(tmp_path)
    data["dim"], data["depth"] = 16, 3
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"missing tensors \['decoder.layers.2"):
        LanguageModel.from_pretrained(tmp_path)


def test_bad_config_files_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no config.json in"):
        LanguageModel.from_pretrained(tmp_path)
    LanguageModel(config()).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        LanguageModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 23, "dim": 15, "heads": 2}))
    with pytest.raises(ValueError, match="not a valid attnkit config: dim must be divisible by heads"):
        LanguageModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config().to_dict()))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        LanguageModel.from_pretrained(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_is_not_reported_as_a_corrupt_file(tmp_path: Path) -> None:
    LanguageModel(config()).save_pretrained(tmp_path)
    with pytest.raises((RuntimeError, AssertionError)) as info:
        LanguageModel.from_pretrained(tmp_path, map_location="cuda")
    assert "corrupt" not in str(info.value) and "CUDA" in str(info.value)
