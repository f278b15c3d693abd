"""Training with a pretraining objective: span corruption of a text corpus through the normal trainer."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    with pytest.raises(ValueError, match=r"objective.*must be one of 'causal', 'span'"):
        TrainConfig.from_dict({**base, "objective": "bert"})
    with pytest.raises(ValueError, match=r"objective_options.*noise_rate"):
        TrainConfig.from_dict({**base, "objective": "span", "objective_options": {"noise_rate": 0.1}})
    with pytest.raises(ValueError, match=r"objective_options.*only applies to objective = 'span'"):
        TrainConfig.from_dict({**base, "objective_options": {"noise_density": 0.1}})
    with pytest.raises(ValueError, match=r"turns a language-modelling corpus.*'reverse' is a seq2seq task"):
        build_data("reverse", objective="span")
