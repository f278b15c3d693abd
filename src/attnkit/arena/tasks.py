"""The arena's quality tasks, sized for a CPU budget, on :mod:`attnkit.data`'s generators.

Every task yields :class:`attnkit.data.tasks.Batch` objects, the trainer's own: ``input_ids
(B, T)`` long, ``attention_mask (B, T)`` bool (True = real token; all True where nothing is
padded) and ``labels`` ``(B, T)`` (per token, ``-100`` where nothing is scored) or ``(B,)``
(per sequence). Batches are generated once per process and shared by every mechanism
(memoised), from disjoint train and validation splits, so all mechanisms see exactly the
same data. A task's ``kind`` names the :mod:`attnkit.models` model that sits it
(:func:`attnkit.train.modeling.model_class`).

- ``mqar`` (kind ``mlm``: a bidirectional :class:`~attnkit.models.MaskedLanguageModel`
  predicting each query's value): :class:`attnkit.data.tasks.MQAR` with ``task_length // 8`` pairs over
  ``2 x pairs`` keys and values, every pair queried once in random order: ``3 x pairs``
  tokens (24 at the default length 64; measured: larger vocabularies, more pairs or
  filler gaps push the exact model's learning step past the budget, and a task no
  mechanism learns ranks nothing). The answer slots after the queries are dropped (each
  query is scored with its value), so bidirectional mechanisms sit the same task
  without reading the answer next door.
- ``listops`` (kind ``classification``: :class:`~attnkit.models.SequenceClassifier`, mean
  pooling): :class:`attnkit.data.tasks.ListOps` (LRA recipe) with expressions of
  ``task_length // 4`` to ``task_length`` tokens and depth at most 6.
- ``lm`` (kind ``lm``: :class:`~attnkit.models.LanguageModel`): next-byte prediction on the standard library's source files
  (:func:`attnkit.data.sources.stdlib_files`; train and validation files are disjoint).

The quality suite (:mod:`attnkit.arena.suite`) builds its tasks with :func:`suite_task`, on the
:mod:`attnkit.data.tasks` generators at the suite's own lengths: ``mqar`` (Zoology's ``length``
and pairs, answer slots dropped as above), ``listops``, ``text_classification``,
``document_matching``, ``pathfinder``, ``passkey`` (next-token form: the passkey's digits are
predicted after the question, a causal task) and ``char_lm``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnkit.data.sources import stdlib_files
from attnkit.data.tasks import IGNORE_INDEX, Batch, Task, TaskKind, make_task, no_context_baseline

#: Bytes of text read for the language-modelling task (train, validation).
LM_BYTES = {"train": 2_000_000, "validation": 300_000}


@dataclass(frozen=True)
class QualityTask:
    """A task the quality stage trains on.

    Attributes:
        name: ``"mqar"``, ``"listops"`` or ``"lm"``.
        length: longest sequence.
        vocab_size: input vocabulary.
        num_outputs: classes of the head (the vocabulary, for per-token tasks).
        kind: the model that sits the task: ``"lm"`` (causal), ``"mlm"`` (bidirectional, per
            token) or ``"classification"`` (one label per sequence).
        metric: ``"accuracy"`` or ``"bits_per_char"``.
        learning_rate: AdamW learning rate that trains the small model within the budget.
        source: the :mod:`attnkit.data.tasks` generator of a suite task (:func:`suite_task`);
            empty for the arena's own three tasks.
        source_options: that generator's options, as sorted ``(name, value)`` pairs (hashable,
            so the batches stay memoised).
    """

    name: str
    length: int
    vocab_size: int
    num_outputs: int
    kind: TaskKind
    metric: str
    learning_rate: float
    source: str = ""
    source_options: tuple[tuple[str, Any], ...] = ()

    def data_task(self) -> Task:
        """The :mod:`attnkit.data.tasks` generator behind a suite task.

        Raises:
            ValueError: for one of the arena's own tasks (they have no single generator).
        """
        if not self.source:
            raise ValueError(f"task {self.name!r} is not a suite task; build suite tasks with suite_task()")
        return make_task(self.source, **dict(self.source_options))

    @property
    def causal(self) -> bool:
        """Whether the task needs causal attention (language modelling)."""
        return self.kind == "lm"

    @property
    def pooled(self) -> bool:
        """Whether the task has one label per sequence."""
        return self.kind == "classification"

    def batches(self, split: str, count: int, batch_size: int, seed: int) -> list[Batch]:
        """``count`` batches of ``split`` (``"train"`` or ``"validation"``), the same for the same arguments."""
        return _batches(self, split, count, batch_size, seed)


def get_task(name: str, *, length: int) -> QualityTask:
    """The task ``name`` at sequence length ``length``.

    Raises:
        ValueError: unknown task, or a length too short for it.
    """
    if length < 32:
        raise ValueError(f"task_length must be at least 32 for the quality tasks, got {length}")
    if name == "mqar":
        vocab = _mqar_task(length).vocab_size  # answers are value tokens: the head predicts input ids
        return QualityTask("mqar", length, vocab, vocab, "mlm", "accuracy", 1e-2)
    if name == "listops":
        return QualityTask("listops", length, _listops_task(length).vocab_size, 10, "classification", "accuracy", 3e-3)
    if name == "lm":
        # 1e-2 rather than 3e-3: 3.36 vs 3.54 bits/char for exact attention after the default
        # 120 steps (measured), so the short budget shows more than the unigram statistics
        return QualityTask("lm", length, 256, 256, "lm", "bits_per_char", 1e-2)
    raise ValueError(f"task must be one of 'mqar', 'listops', 'lm', got {name!r}")


def _mqar_task(length: int) -> Task:
    pairs = max(4, length // 8)  # 2 tokens per pair + 1 per query: 3 x pairs tokens in all
    return make_task("mqar", num_pairs=pairs, num_keys=2 * pairs, num_values=2 * pairs)


def _listops_task(length: int) -> Task:
    return make_task("listops", min_length=length // 4, max_length=length, max_depth=6)


#: The model kind of each suite task. MQAR is scored in place (answer slots dropped) by a
#: bidirectional model, so mechanisms without a causal mode sit it too; passkey and char_lm are
#: language modelling (causal). Passkey's next-token form is the one a small model learns within a
#: CPU budget: each digit is found by matching the text before it ("... is 4" -> "1"), an
#: induction look-up like MQAR's, where the answer-slot form must also count digit positions.
SUITE_KINDS: dict[str, TaskKind] = {
    "mqar": "mlm",
    "listops": "classification",
    "text_classification": "classification",
    "document_matching": "classification",
    "pathfinder": "classification",
    "passkey": "lm",
    "char_lm": "lm",
}


def suite_task(name: str, *, learning_rate: float, **options: Any) -> QualityTask:
    """A quality-suite task: the :mod:`attnkit.data.tasks` generator ``name`` with ``options``.

    Args:
        name: one of :data:`SUITE_KINDS`.
        learning_rate: AdamW peak rate of its cells.
        **options: the generator's options (``MQAR(num_pairs=..., length=...)``,
            ``Pathfinder(size=...)``, ...).

    Raises:
        ValueError: an unknown task or a bad option (from the generator, naming it).
    """
    if name not in SUITE_KINDS:
        raise ValueError(f"suite task must be one of {', '.join(SUITE_KINDS)}, got {name!r}")
    source = make_task(name, **options)
    kind = SUITE_KINDS[name]
    length = source.max_length - (source.options()["num_queries"] if name == "mqar" else 0)  # answers dropped
    num_outputs = source.num_classes if kind == "classification" and source.num_classes else source.vocab_size
    metric = "bits_per_char" if name == "char_lm" else "accuracy"
    return QualityTask(
        name, length, source.vocab_size, num_outputs, kind, metric, learning_rate, name, tuple(sorted(options.items()))
    )


def suite_baseline(task: QualityTask, seed: int) -> dict[str, Any]:
    """The suite task's no-context baseline (:func:`attnkit.data.tasks.no_context_baseline`).

    Returns:
        ``{"metric", "value", "what"}``.
    """
    return no_context_baseline(task.data_task(), seed=seed).as_dict()


@functools.lru_cache(maxsize=16)
def _batches(task: QualityTask, split: str, count: int, batch_size: int, seed: int) -> list[Batch]:
    if task.source:
        return _generated(task.data_task(), task.name, split, count, batch_size, seed)
    if task.name == "lm":
        return _lm_batches(task.length, split, count, batch_size, seed)
    source = _mqar_task(task.length) if task.name == "mqar" else _listops_task(task.length)
    return _generated(source, task.name, split, count, batch_size, seed)


def _generated(source: Task, name: str, split: str, count: int, batch_size: int, seed: int) -> list[Batch]:
    """``count`` consecutive batches of ``source`` (MQAR's answer slots dropped)."""
    out = []
    for i in range(count):
        batch = source.batch(batch_size, seed=seed, split=split, start=i * batch_size)
        if name == "mqar":
            tokens, labels = _queries_only(batch.input_ids, batch.labels)
            batch = Batch(tokens, torch.ones_like(tokens, dtype=torch.bool), labels)
        out.append(batch)
    return out


def _queries_only(tokens: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the answer slots of MQAR's ``... q1 a1 q2 a2`` tail: ``... q1 q2``, each scored with its value.

    The answer would otherwise sit right next to its query, where any bidirectional
    mechanism reads it; without it, causal and bidirectional mechanisms sit the same task.
    """
    scored = labels != IGNORE_INDEX  # (B, T): the query positions
    first = int(scored.int().argmax(dim=1).min())  # where the queries start (same in every row)
    keep = torch.ones(tokens.shape[1], dtype=torch.bool)
    keep[first + 1 :: 2] = False  # the answer slots
    return tokens[:, keep], labels[:, keep]


@functools.lru_cache(maxsize=2)
def _corpus(split: str) -> Tensor:
    """Up to ``LM_BYTES[split]`` bytes of standard-library source as a long tensor."""
    chunks, size = [], 0
    for path in stdlib_files(split):
        data = path.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= LM_BYTES[split]:
            break
    text = b"".join(chunks)[: LM_BYTES[split]]
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def _lm_batches(length: int, split: str, count: int, batch_size: int, seed: int) -> list[Batch]:
    text = _corpus(split)
    if len(text) <= length + 1:
        raise ValueError(f"the corpus is too short for task_length={length}; use a shorter task length")
    gen = torch.Generator().manual_seed(seed)
    out: list[Batch] = []
    for _ in range(count):
        starts = torch.randint(len(text) - length - 1, (batch_size,), generator=gen)
        windows = torch.stack([text[s : s + length + 1] for s in starts.tolist()])  # (B, T + 1)
        tokens = windows[:, :-1]
        out.append(Batch(tokens, torch.ones_like(tokens, dtype=torch.bool), windows[:, 1:]))
    return out
