"""No-context baselines: what a model that ignores the sequence scores on a task.

A quality number means something only next to what ignoring the input already scores: a trained
model at or below it has learned nothing about the sequence, whatever its mechanism. Computed
from the data itself, not a formula, so it also catches skewed labels (ListOps' values are far
from uniform):

* accuracy tasks (classification, and the scored positions of MQAR, passkey, copy, ...): the
  best constant prediction, i.e. the most frequent training target, scored on held-out
  examples (the majority class);
* bits-per-character tasks (``char_lm``): a unigram model of the training targets, add-one
  smoothed over the vocabulary, scored on held-out examples.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from attnkit.data.tasks.base import IGNORE_INDEX, Example, Task, check_range, check_split

#: Tasks measured in bits per character; every other task is measured by accuracy.
BITS_PER_CHAR_TASKS: frozenset[str] = frozenset({"char_lm"})


@dataclass(frozen=True)
class Baseline:
    """A no-context baseline.

    Attributes:
        metric: ``"accuracy"`` (higher is better) or ``"bits_per_char"`` (lower is better).
        value: the baseline's score on the held-out examples.
        what: how it predicts (``"majority class"``, ``"unigram model"``).
        targets: how many held-out targets it was scored on.
    """

    metric: str
    value: float
    what: str
    targets: int

    def as_dict(self) -> dict[str, Any]:
        """``{"metric", "value", "what"}``, the form the arena's reports store."""
        return {"metric": self.metric, "value": self.value, "what": self.what}


def metric_of(task: Task) -> str:
    """``"bits_per_char"`` for character-level language modelling, else ``"accuracy"``."""
    return "bits_per_char" if task.name in BITS_PER_CHAR_TASKS else "accuracy"


def scored_targets(examples: Iterable[Example]) -> list[int]:
    """Every target that counts: the class of a classification example, the scored labels of the others."""
    out: list[int] = []
    for example in examples:
        if example.label is not None:
            out.append(example.label)
        else:
            out.extend(y for y in example.labels if y != IGNORE_INDEX)
    return out


def majority_accuracy(train_targets: list[int], eval_targets: list[int]) -> float:
    """Accuracy on ``eval_targets`` of always answering the most frequent of ``train_targets``."""
    _require_targets(train_targets, eval_targets)
    best = Counter(train_targets).most_common(1)[0][0]
    return sum(1 for y in eval_targets if y == best) / len(eval_targets)


def unigram_bits_per_char(train_targets: list[int], eval_targets: list[int], vocab_size: int) -> float:
    """Mean bits per target on ``eval_targets`` of an add-one smoothed unigram model of ``train_targets``."""
    _require_targets(train_targets, eval_targets)
    counts = Counter(train_targets)
    total = len(train_targets) + vocab_size
    return -sum(math.log2((counts[y] + 1) / total) for y in eval_targets) / len(eval_targets)


def _require_targets(train_targets: list[int], eval_targets: list[int]) -> None:
    if not train_targets or not eval_targets:
        raise ValueError(
            f"a baseline needs scored targets in both sets, got {len(train_targets)} training and "
            f"{len(eval_targets)} evaluation targets; draw more examples"
        )


def no_context_baseline(
    task: Task,
    *,
    seed: int = 0,
    train_examples: int = 512,
    eval_examples: int = 256,
    eval_split: str = "validation",
) -> Baseline:
    """The no-context baseline of ``task``, fit on its training split and scored on ``eval_split``.

    Args:
        task: any task.
        seed: the data seed (the same as the runs it is printed next to).
        train_examples: training examples the constant or unigram model is fit on.
        eval_examples: held-out examples it is scored on (the first ones of ``eval_split``).
        eval_split: ``"validation"`` or ``"test"``.

    Returns:
        The baseline (accuracy: majority class; ``char_lm``: unigram bits per character).

    Raises:
        ValueError: for a bad count or split.
    """
    check_range("train_examples", train_examples, "train_examples", train_examples)
    check_range("eval_examples", eval_examples, "eval_examples", eval_examples)
    if check_split(eval_split) == "train":
        raise ValueError(
            "eval_split must be 'validation' or 'test': a baseline scored on its own training data flatters it"
        )
    train = scored_targets(task.examples(train_examples, seed=seed, split="train"))
    held_out = scored_targets(task.examples(eval_examples, seed=seed, split=eval_split))
    if metric_of(task) == "bits_per_char":
        value = unigram_bits_per_char(train, held_out, task.vocab_size)
        return Baseline("bits_per_char", value, "unigram model", len(held_out))
    return Baseline("accuracy", majority_accuracy(train, held_out), "majority class", len(held_out))
