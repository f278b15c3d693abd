"""Evaluation metrics: accuracy, loss, perplexity, bits per character, BLEU, ROUGE.

:class:`MetricAccumulator` sums token-level statistics over batches (so the result is the
exact corpus value, not a mean of batch means); :func:`bleu`, :func:`chrf` and :func:`rouge`
score generated text with ``sacrebleu`` and ``rouge-score``, tokenized for the target language
(:mod:`attnkit.metrics.text`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from attnkit.metrics.text import bleu, chrf, rouge, text_language

IGNORE_INDEX = -100

__all__ = ["MetricAccumulator", "bleu", "chrf", "exact_match", "rouge", "text_language", "token_statistics"]


def token_statistics(logits: Tensor, labels: Tensor) -> tuple[float, int, int]:
    """Summed cross-entropy (nats), number of counted targets, and correct argmax predictions.

    Args:
        logits: ``(..., C)`` scores.
        labels: ``(...)`` long targets; ``IGNORE_INDEX`` (-100) positions are skipped.

    Returns:
        ``(loss_sum, count, correct)``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits (..., C) must match labels (...): got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    keep = flat_labels != IGNORE_INDEX
    loss_sum = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    correct = (flat_logits.argmax(-1) == flat_labels) & keep
    return float(loss_sum), int(keep.sum()), int(correct.sum())


@dataclass
class MetricAccumulator:
    """Corpus-level loss, accuracy, perplexity and bits per character.

    Attributes:
        loss_sum: summed cross-entropy in nats.
        count: number of scored targets.
        correct: number of correct argmax predictions.
        characters: characters (bytes) the targets cover; when > 0, ``bpc`` is reported as
            ``loss_sum / characters / ln 2`` (for a byte tokenizer, characters = targets).
    """

    loss_sum: float = 0.0
    count: int = 0
    correct: int = 0
    characters: int = 0

    def update(self, logits: Tensor, labels: Tensor, *, characters: int = 0) -> None:
        """Add one batch (``logits (..., C)``, ``labels (...)``)."""
        loss_sum, count, correct = token_statistics(logits, labels)
        self.loss_sum += loss_sum
        self.count += count
        self.correct += correct
        self.characters += characters

    def result(self, *, perplexity: bool = True) -> dict[str, float]:
        """``loss`` (mean nats per target), ``accuracy``, and ``perplexity`` / ``bpc`` where they apply."""
        if self.count == 0:
            raise ValueError("no scored targets were accumulated (every label was IGNORE_INDEX?)")
        loss = self.loss_sum / self.count
        out = {"loss": loss, "accuracy": self.correct / self.count}
        if perplexity:
            out["perplexity"] = math.exp(min(loss, 700.0))
        if self.characters:
            out["bpc"] = self.loss_sum / self.characters / math.log(2)
        return out


def exact_match(hypotheses: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> float:
    """Fraction of hypotheses equal to their reference (whole-sequence accuracy)."""
    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"need as many hypotheses as references (> 0), got {len(hypotheses)} and {len(references)}")
    return sum(list(h) == list(r) for h, r in zip(hypotheses, references)) / len(references)
