"""Metrics against closed forms and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.metrics import MetricAccumulator, bleu, exact_match, rouge, token_statistics


def test_token_statistics_match_a_python_loop() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    labels[0, :2] = -100
    loss_sum, count, correct = token_statistics(logits, labels)
    want_loss, want_count, want_correct = 0.0, 0, 0
    for b in range(3):
        for t in range(5):
            y = int(labels[b, t])
            if y == -100:
                continue
            row = [float(x) for x in logits[b, t]]
            log_z = math.log(sum(math.exp(x) for x in row))
            want_loss += log_z - row[y]
            want_count += 1
            want_correct += int(max(range(7), key=lambda i: row[i]) == y)
    assert count == want_count == 13
    assert correct == want_correct
    assert loss_sum == pytest.approx(want_loss, rel=1e-5)


def test_accumulator_is_corpus_level_and_reports_ppl_and_bpc() -> None:
    acc = MetricAccumulator()
    uniform = torch.zeros(1, 4, 8)  # uniform over 8 classes: loss ln 8 per target
    acc.update(uniform, torch.tensor([[1, 2, -100, 3]]), characters=3)
    acc.update(uniform[:, :1], torch.tensor([[0]]), characters=1)
    out = acc.result()
    assert out["loss"] == pytest.approx(math.log(8))
    assert out["perplexity"] == pytest.approx(8.0)
    assert out["bpc"] == pytest.approx(3.0)  # log2(8) bits per character
    assert out["accuracy"] == pytest.approx(1 / 4)  # argmax of a tie is class 0: only the last target
    with pytest.raises(ValueError, match="no scored targets"):
        MetricAccumulator().result()


def test_exact_match_bleu_rouge() -> None:
    assert exact_match([[1, 2], [3]], [[1, 2], [4]]) == 0.5
    refs = ["the cat sat on the mat", "a quick brown fox jumps"]
    assert bleu(refs, refs) == pytest.approx(100.0)
    assert bleu(["completely unrelated words here", "nothing shared at all"], refs) < 5.0
    scores = rouge(refs, refs)
    assert scores == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    # Hand computation: hyp "the cat" vs ref "the cat sat": unigram P=1, R=2/3 -> F=0.8.
    assert rouge(["the cat"], ["the cat sat"])["rouge1"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="as many hypotheses as references"):
        bleu(["a"], [])
