"""No-context baselines against brute-force counts, and the quality suite's tasks from a training config."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest

from attnkit.data import build_data, tasks
from attnkit.data.tasks import IGNORE_INDEX, Example
from attnkit.data.tasks.baselines import majority_accuracy, unigram_bits_per_char
from attnkit.data.tasks.corpus import byte_ids
from attnkit.data.tokenizers import ByteTokenizer

#: Small settings of every task, quick to draw.
SMALL: dict[str, dict[str, object]] = {
    "listops": {"min_length": 5, "max_length": 60},
    "copy": {"min_length": 4, "max_length": 8},
    "mqar": {"num_pairs": 4, "num_keys": 16, "num_values": 16, "length": 32},
    "reverse": {"max_length": 8},
    "sort": {"max_length": 8},
    "text_classification": {"length": 128},
    "document_matching": {"window": 128},
    "pathfinder": {"size": 16, "min_path_length": 6, "max_path_length": 12},
    "passkey": {"length": 256},
    "char_lm": {"length": 128},
}


def brute_force_targets(examples: list[Example]) -> list[int]:
    out: list[int] = []
    for ex in examples:
        out += [ex.label] if ex.label is not None else [y for y in ex.labels if y != IGNORE_INDEX]
    return out


def test_every_task_has_small_settings_here() -> None:
    assert set(SMALL) == set(tasks.TASK_NAMES)


@pytest.mark.parametrize("name", [n for n in SMALL if n != "char_lm"])
def test_accuracy_baseline_is_the_majority_training_target_scored_on_held_out_data(name: str) -> None:
    task = tasks.make_task(name, **SMALL[name])
    baseline = tasks.no_context_baseline(task, seed=1, train_examples=64, eval_examples=32)
    train = brute_force_targets(task.examples(64, seed=1, split="train"))
    held_out = brute_force_targets(task.examples(32, seed=1, split="validation"))
    counts = Counter(train)
    top = max(counts.values())
    # Any most frequent training target is a best constant; ties all score within the set below.
    scores = {sum(y == c for y in held_out) / len(held_out) for c, n in counts.items() if n == top}
    assert baseline.metric == "accuracy" and baseline.what == "majority class"
    assert baseline.value in scores
    assert baseline.targets == len(held_out)
    assert baseline.as_dict() == {"metric": "accuracy", "value": baseline.value, "what": "majority class"}


@pytest.mark.parametrize(
    ("name", "options", "expected", "tolerance"),
    [
        ("pathfinder", SMALL["pathfinder"], 0.5, 0.12),  # balanced classes
        ("document_matching", SMALL["document_matching"], 0.5, 0.12),  # balanced pairs
        ("text_classification", SMALL["text_classification"], 1 / 6, 0.08),  # six balanced families
        ("mqar", {"num_pairs": 8, "num_keys": 32, "num_values": 32}, 1 / 32, 0.03),  # a constant value
        ("passkey", SMALL["passkey"], 0.1, 0.05),  # a constant digit
    ],
)
def test_accuracy_baselines_sit_at_chance_where_the_labels_are_uniform(
    name: str, options: dict[str, object], expected: float, tolerance: float
) -> None:
    baseline = tasks.no_context_baseline(tasks.make_task(name, **options), train_examples=200, eval_examples=120)
    assert abs(baseline.value - expected) < tolerance


def test_char_lm_baseline_is_a_smoothed_unigram_bits_per_char() -> None:
    task = tasks.CharLM(length=128)
    baseline = tasks.no_context_baseline(task, train_examples=40, eval_examples=20, eval_split="test")
    train = [y for ex in task.examples(40, seed=0) for y in ex.labels]
    held_out = [y for ex in task.examples(20, seed=0, split="test") for y in ex.labels]
    counts = Counter(train)
    bits = [-math.log2((counts[y] + 1) / (len(train) + 260)) for y in held_out]
    assert baseline.metric == "bits_per_char" and baseline.what == "unigram model"
    assert baseline.value == pytest.approx(sum(bits) / len(bits), rel=1e-12)
    # Python source: far below a uniform byte (8 bits), far above a model that reads context.
    assert 3.5 < baseline.value < 6.0


def test_baseline_helpers_on_hand_counted_cases() -> None:
    assert majority_accuracy([1, 1, 2], [1, 2, 2, 1]) == 0.5
    # Unigram over 2 symbols, add-one: P(0) = (3 + 1) / (4 + 2), P(1) = (1 + 1) / 6.
    assert unigram_bits_per_char([0, 0, 0, 1], [0, 1], 2) == pytest.approx((math.log2(6 / 4) + math.log2(6 / 2)) / 2)
    with pytest.raises(ValueError, match="a baseline needs scored targets in both sets"):
        majority_accuracy([], [1])
    with pytest.raises(ValueError, match="eval_split must be 'validation' or 'test'"):
        tasks.no_context_baseline(tasks.make_task("pathfinder"), eval_split="train")
    with pytest.raises(ValueError, match="eval_examples must be an integer >= 1"):
        tasks.no_context_baseline(tasks.make_task("pathfinder"), eval_examples=0)


# ----------------------------------------------------------------------------- from a training config


@pytest.mark.parametrize("name", ["text_classification", "document_matching", "pathfinder", "passkey", "char_lm"])
def test_quality_tasks_build_training_data_and_stream(name: str) -> None:
    data = build_data(name, task_options=SMALL[name], seed=3)
    task = tasks.make_task(name, **SMALL[name])
    assert (data.kind, data.vocab_size, data.num_classes) == (task.kind, task.vocab_size, task.num_classes)
    assert data.max_length == task.max_length
    streamed = list(itertools.islice(data.stream("validation"), 3))
    assert streamed == task.examples(3, seed=3, split="validation")
    assert all(len(e.input_ids) <= data.max_length for e in streamed)
    assert data.describe()["options"] == task.options()


def test_byte_tasks_use_the_byte_tokenizers_ids() -> None:
    # A model trained on task = "text" (byte tokenizer) reads these tasks' tokens the same way.
    text = "def f(x):\n\treturn 'é'"
    assert list(byte_ids(text.encode())) == ByteTokenizer().encode(text)
    assert tasks.CharLM().vocab_size == ByteTokenizer.vocab_size


def test_training_config_accepts_the_quality_tasks_and_names_bad_options() -> None:
    from attnkit.train.config import TrainConfig

    config = TrainConfig.from_dict({"task": "passkey", "out_dir": "runs/x", "task_options": {"length": 2048}})
    assert config.task_options == {"length": 2048}
    with pytest.raises(ValueError, match=r"task_options.*invalid for task 'pathfinder'.*accepted options: size"):
        TrainConfig.from_dict({"task": "pathfinder", "out_dir": "runs/x", "task_options": {"sizes": 16}})
