"""Fine-tuning: init_from copies exactly the matching tensors; freeze keeps parameters bit-identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnkit.models import Encoder, EncoderDecoder, SequenceClassifier, TransformerConfig
from attnkit.train import TrainConfig, Trainer
from attnkit.train.init import freeze, init_from

from .conftest import tiny_config


def _config(**changes: object) -> TransformerConfig:
    base = {"vocab_size": 30, "dim": 16, "depth": 2, "heads": 2, "max_len": 32, "num_classes": 3}
    return TransformerConfig(**{**base, **changes})  # type: ignore[arg-type]


def test_classifier_starts_from_a_pretrained_encoder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pretrained = Encoder(_config(vocab_size=31))  # one extra row: a <mask> token after the vocabulary
    pretrained.save_pretrained(tmp_path / "enc")
    torch.manual_seed(1)
    classifier = SequenceClassifier(_config())
    fresh = {name: tensor.clone() for name, tensor in classifier.state_dict().items()}
    result = init_from(classifier, tmp_path / "enc")
    saved = pretrained.state_dict()
    for name, tensor in classifier.state_dict().items():
        if name == "embed.tokens.weight":
            assert torch.equal(tensor, saved[name][:30])  # the shared token rows
        elif name in saved:
            assert torch.equal(tensor, saved[name]), name
        else:
            assert torch.equal(tensor, fresh[name]), name  # the new head keeps its initialisation
    assert result.resized == ["embed.tokens.weight"]
    assert sorted(result.new) == ["head.bias", "head.weight"]
    assert len(result.loaded) == len(saved) - 1 and not result.unused


def test_encoder_decoder_takes_the_encoder_and_reports_the_rest(tmp_path: Path) -> None:
    Encoder(_config()).save_pretrained(tmp_path / "enc")
    model = EncoderDecoder(_config())
    result = init_from(model, tmp_path / "enc")
    assert all(name.startswith(("embed.", "encoder.")) for name in result.loaded)
    assert any(name.startswith("decoder.") for name in result.new)


def test_mismatched_shapes_and_missing_weights_are_named(tmp_path: Path) -> None:
    Encoder(_config(dim=32)).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match=r"tensors have other shapes.*encoder\.layers\.0\..*saved \(.*32"):
        init_from(SequenceClassifier(_config()), tmp_path / "wide")
    with pytest.raises(FileNotFoundError, match=r"init_from='.*nothing': no model\.safetensors"):
        init_from(SequenceClassifier(_config()), tmp_path / "nothing")


def test_freeze_patterns_must_match() -> None:
    model = SequenceClassifier(_config())
    frozen = freeze(model, ["embed.*", "encoder.layers.0.*"])
    assert frozen and all(n.startswith(("embed.", "encoder.layers.0.")) for n in frozen)
    assert all(p.requires_grad == (n not in frozen) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match=r"freeze pattern 'encoder\.layer\.\*' matches no parameter"):
        freeze(model, ["encoder.layer.*"])


def test_a_run_fine_tunes_another_runs_weights_with_frozen_embeddings(tmp_path: Path) -> None:
    options = {"min_length": 2, "max_length": 6, "num_symbols": 8}
    first = Trainer(TrainConfig.from_dict(tiny_config(tmp_path / "a", task="reverse", task_options=options)))
    first.fit()
    config = tiny_config(
        tmp_path / "b", task="reverse", task_options=options, init_from=str(tmp_path / "a"), freeze=["embed.*"]
    )
    second = Trainer(TrainConfig.from_dict(config))
    start = {name: tensor.clone() for name, tensor in second.model.state_dict().items()}
    best = EncoderDecoder.from_pretrained(tmp_path / "a" / "best").state_dict()
    assert all(torch.equal(start[name], best[name]) for name in best)  # loaded exactly
    second.fit()
    after = second.model.state_dict()
    assert torch.equal(after["embed.tokens.weight"], best["embed.tokens.weight"])  # frozen: bit-identical
    assert not torch.equal(after["lm_head.proj.weight"], best["lm_head.proj.weight"]) or not torch.equal(
        after["decoder.norm.weight"], best["decoder.norm.weight"]
    )
    with pytest.raises(ValueError, match="freeze"):
        TrainConfig.from_dict({**config, "freeze": "embed.*"})
