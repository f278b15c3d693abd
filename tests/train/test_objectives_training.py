"""Training with a pretraining objective: span corruption of a text corpus through the normal trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from attnkit.data.pipeline import build_data
from attnkit.train import TrainConfig, Trainer

from .conftest import tiny_config


def _corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(12):
        (folder / f"doc{i}.txt").write_text(f"document {i}: the quick brown fox jumps over the lazy dog. " * 6)
    return folder


def test_span_objective_trains_an_encoder_decoder(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path)
    config = tiny_config(
        tmp_path / "run",
        task=str(corpus),
        task_options={},
        seq_len=32,
        objective="span",
        objective_options={"noise_density": 0.2},
        max_steps=3,
        eval_every=3,
        checkpoint_every=3,
    )
    trainer = Trainer(TrainConfig.from_dict(config))
    assert type(trainer.model).__name__ == "EncoderDecoder"
    assert trainer.model_config.vocab_size == 260 + 100  # bytes + specials, then the sentinels
    metrics = trainer.fit()
    assert {"loss", "perplexity"} <= set(metrics)
    example = next(trainer.data.stream("train"))
    assert any(token >= 260 for token in example.input_ids)  # sentinels in the encoder input


def test_objective_errors_are_named(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path)
    base = tiny_config(tmp_path / "run", task=str(corpus), task_options={})
    with pytest.raises(ValueError, match=r"objective.*must be one of 'causal', 'mlm', 'span'"):
        TrainConfig.from_dict({**base, "objective": "bert"})
    with pytest.raises(ValueError, match=r"objective_options.*noise_rate"):
        TrainConfig.from_dict({**base, "objective": "span", "objective_options": {"noise_rate": 0.1}})
    with pytest.raises(ValueError, match=r"objective_options.*only applies to objective = 'mlm' or 'span'"):
        TrainConfig.from_dict({**base, "objective_options": {"noise_density": 0.1}})
    with pytest.raises(ValueError, match=r"turns a language-modelling corpus.*'reverse' is a seq2seq task"):
        build_data("reverse", objective="span")


def test_mlm_objective_trains_a_masked_language_model_and_a_classifier_fine_tunes_it(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path)
    config = tiny_config(
        tmp_path / "mlm",
        task=str(corpus),
        task_options={},
        seq_len=32,
        objective="mlm",
        max_steps=3,
        eval_every=3,
        checkpoint_every=3,
    )
    trainer = Trainer(TrainConfig.from_dict(config))
    assert type(trainer.model).__name__ == "MaskedLanguageModel"
    assert trainer.model_config.vocab_size == 260 + 1  # bytes + specials, then <mask>
    metrics = trainer.fit()
    assert {"loss", "accuracy", "perplexity"} <= set(metrics)
    example = next(trainer.data.stream("train"))
    counted = [label for label in example.labels if label != -100]
    assert len(counted) == round(0.15 * 33)  # a window of seq_len + 1 tokens, none special
    # The pretrained encoder starts a byte-level classifier: embed.* (without the <mask> row) and encoder.* load.
    labelled = tmp_path / "labelled.jsonl"
    rows = [
        f'{{"text": "sample {i} " , "label": {i % 2}, "split": "{"train" if i < 16 else "validation"}"}}'
        for i in range(20)
    ]
    labelled.write_text("\n".join(rows) + "\n")
    fine = tiny_config(
        tmp_path / "cls", task=str(labelled), task_options={}, seq_len=32, init_from=str(tmp_path / "mlm")
    )
    classifier = Trainer(TrainConfig.from_dict(fine))
    assert classifier.initialised is not None and classifier.initialised.resized == ["embed.tokens.weight"]
    pretrained = trainer.model.state_dict()
    for name, tensor in classifier.model.state_dict().items():
        if name.startswith("encoder."):
            assert torch.equal(tensor, pretrained[name]), name
    assert torch.equal(classifier.model.state_dict()["embed.tokens.weight"], pretrained["embed.tokens.weight"][:260])
