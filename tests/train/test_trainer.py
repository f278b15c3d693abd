"""End-to-end training on tiny models: every task kind, files written, accumulation, eval metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attnkit.train import TrainConfig, Trainer

from .conftest import tiny_config


def _run(tmp_path: Path, **overrides: object) -> Trainer:
    trainer = Trainer(TrainConfig.from_dict(tiny_config(tmp_path / "run", **overrides)))
    trainer.fit()
    return trainer


@pytest.mark.parametrize(
    ("task", "options", "expected"),
    [
        ("copy", {"min_length": 3, "max_length": 6}, {"perplexity"}),
        ("listops", {"min_length": 5, "max_length": 30}, set()),
        ("reverse", {"min_length": 2, "max_length": 6, "num_symbols": 8}, {"perplexity"}),
        ("mqar", {"num_pairs": 3, "num_keys": 8, "num_values": 8}, {"perplexity"}),
    ],
)
def test_each_task_kind_trains_and_writes_its_files(tmp_path: Path, task: str, options: dict, expected: set) -> None:
    trainer = _run(tmp_path, task=task, task_options=options, max_steps=3, eval_every=3, checkpoint_every=2)
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(records[0])
    assert {"eval_loss", "eval_accuracy"} | {f"eval_{k}" for k in expected} <= set(records[-1])
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_00000002", "step_00000003"]
    for directory in ("model", "best"):
        assert (out / directory / "model.safetensors").is_file() and (out / directory / "config.json").is_file()
    # The saved model reloads and reproduces the trained model's outputs.
    reloaded = type(trainer.model).from_pretrained(out / "model")
    batch = trainer.data.task.batch(2, seed=9) if trainer.data.task else None
    assert batch is not None
    from attnkit.train.modeling import forward

    trainer.model.eval()
    assert torch.equal(forward(reloaded, batch), forward(trainer.model, batch))


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    one = _run(tmp_path / "a", max_steps=3, eval_every=0)
    two = _run(tmp_path / "b", max_steps=3, eval_every=0, grad_accum=2)
    for (name, p), q in zip(one.model.named_parameters(), two.model.parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5, msg=name)


def test_seq2seq_evaluation_reports_generation_metrics(tmp_path: Path) -> None:
    trainer = _run(
        tmp_path, task="sort", task_options={"min_length": 2, "max_length": 5, "num_symbols": 6}, max_steps=2
    )
    metrics = trainer.evaluate(generate=True)
    assert {"exact_match", "bleu", "chrf", "rouge1", "rouge2", "rougeL", "loss", "perplexity"} <= set(metrics)
    assert 0.0 <= metrics["exact_match"] <= 1.0 and 0.0 <= metrics["bleu"] <= 100.0


def test_bf16_autocast_and_existing_checkpoints_guard(tmp_path: Path) -> None:
    trainer = _run(tmp_path, precision="bf16", max_steps=2, eval_every=0)
    assert trainer.step == 2
    with pytest.raises(ValueError, match="already holds checkpoints; pass --resume"):
        Trainer(TrainConfig.from_dict(tiny_config(tmp_path / "run")))
    with pytest.raises(ValueError, match="fp16' needs a GPU"):
        Trainer(TrainConfig.from_dict(tiny_config(tmp_path / "other", precision="fp16")))


def test_text_corpus_language_model_reports_bpc(tmp_path: Path) -> None:
    trainer = _run(tmp_path, task="text", task_options={}, seq_len=32, max_steps=2, eval_every=2, eval_examples=8)
    metrics = trainer.evaluate()
    assert metrics["bpc"] == pytest.approx(metrics["loss"] / 0.6931471805599453)
    assert (tmp_path / "run" / "model" / "tokenizer.json").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_training_on_gpu_with_mixed_precision(tmp_path: Path, precision: str) -> None:
    trainer = _run(tmp_path, device="cuda", precision=precision, max_steps=3, eval_every=3)
    assert next(trainer.model.parameters()).is_cuda
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert "eval_accuracy" in records[-1]


def test_bpe_tokenizer_is_trained_and_saved_with_the_model(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("".join(f"def function_{i}(x):\n    return x * {i}\n" for i in range(300)))
    trainer = _run(
        tmp_path, task=str(corpus), task_options={}, tokenizer="bpe", tokenizer_vocab_size=300, seq_len=16, max_steps=2
    )
    assert trainer.data.vocab_size == 300 and trainer.model_config.vocab_size == 300
    from attnkit.data.tokenizers import BPETokenizer, load_tokenizer

    saved = load_tokenizer(tmp_path / "run" / "model")
    assert isinstance(saved, BPETokenizer)
    text = "def function_7(x):"
    assert saved.encode(text) == trainer.data.tokenizer.encode(text)  # type: ignore[union-attr]
    assert "bpc" not in trainer.evaluate()  # bits per character need byte tokens


def test_tensorboard_is_optional(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    _run(tmp_path, tensorboard=True, max_steps=1, eval_every=0)
    if importlib.util.find_spec("tensorboard") is None:
        assert "tensorboard is not installed" in capsys.readouterr().err
    else:
        assert any((tmp_path / "run" / "tensorboard").iterdir())
