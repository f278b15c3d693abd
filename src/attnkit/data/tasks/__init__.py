"""Seeded tasks: ListOps, copy (duplication), MQAR, reverse and sort, and the quality suite's tasks.

The quality suite (after Long Range Arena and Zoology) adds byte-level tasks on real text
already on the machine (the standard library's sources) and generated images:

========================  ==============  =====================================================
name                      kind            what
========================  ==============  =====================================================
``listops``               classification  LRA ListOps (up to 2K tokens at LRA's settings)
``text_classification``   classification  LRA-style Text: which package a byte window is from
``document_matching``     classification  LRA-style Retrieval: are two byte windows one file's
``pathfinder``            classification  LRA-style Pathfinder: are two marks joined by a curve
``mqar``                  lm              Zoology's multi-query associative recall
``passkey``               lm              a passkey hidden at a chosen depth of 1K-8K bytes
``char_lm``               lm              next-byte prediction, bits per character
========================  ==============  =====================================================

:func:`attnkit.data.tasks.baselines.no_context_baseline` gives each task's no-context baseline
(majority class; unigram bits per character for ``char_lm``). LRA's pixel-sequence "Image" task
has no counterpart: no labelled image set ships with the installed packages.

Two ways in:

* one-call batches, for the arena and notebooks::

      from attnkit.data import tasks
      batch = tasks.listops(32, seed=0, min_length=50, max_length=200)   # a Batch
      batch.input_ids, batch.attention_mask, batch.labels                # (B, T), (B, T), (B,)
      batch = tasks.mqar(32, seed=0, num_pairs=8)
      batch.labels[batch.target_mask]                                    # the queried values only

* task objects, for vocabulary sizes and streaming::

      task = tasks.make_task("copy", max_length=64)
      task.vocab_size, task.kind, task.max_length
      task.example(12345, seed=0, split="validation")                    # random access

Every function takes ``count`` (rows), keyword ``seed``, ``split`` (``"train"``,
``"validation"``, ``"test"``, disjoint by construction), ``start`` (index of the first
example) and the task's own options; the same arguments always give the same batch.
"""

from __future__ import annotations

from typing import Any

from attnkit.data.tasks.base import (
    IGNORE_INDEX,
    PAD_ID,
    SPLITS,
    Batch,
    Example,
    Task,
    TaskKind,
    collate,
    split_of,
)
from attnkit.data.tasks.baselines import Baseline, no_context_baseline
from attnkit.data.tasks.char_lm import CharLM
from attnkit.data.tasks.copy import CopyTask
from attnkit.data.tasks.document_matching import DocumentMatching
from attnkit.data.tasks.listops import ListOps
from attnkit.data.tasks.mqar import MQAR
from attnkit.data.tasks.passkey import PasskeyRecord, PasskeyRetrieval
from attnkit.data.tasks.pathfinder import Pathfinder
from attnkit.data.tasks.seq2seq import SequenceTransduction
from attnkit.data.tasks.text_classification import ByteTextClassification

__all__ = [
    "IGNORE_INDEX",
    "MQAR",
    "PAD_ID",
    "SPLITS",
    "TASK_NAMES",
    "Baseline",
    "Batch",
    "ByteTextClassification",
    "CharLM",
    "CopyTask",
    "DocumentMatching",
    "Example",
    "ListOps",
    "PasskeyRecord",
    "PasskeyRetrieval",
    "Pathfinder",
    "SequenceTransduction",
    "Task",
    "TaskKind",
    "collate",
    "copy_task",
    "listops",
    "make_task",
    "mqar",
    "no_context_baseline",
    "reverse",
    "sort",
    "split_of",
]

TASK_NAMES: tuple[str, ...] = (
    "listops",
    "copy",
    "mqar",
    "reverse",
    "sort",
    "text_classification",
    "document_matching",
    "pathfinder",
    "passkey",
    "char_lm",
)
#: The class of each task name (``reverse`` and ``sort`` are :class:`SequenceTransduction` modes).
_CLASSES: dict[str, type[Task]] = {
    "listops": ListOps,
    "copy": CopyTask,
    "mqar": MQAR,
    "reverse": SequenceTransduction,
    "sort": SequenceTransduction,
    "text_classification": ByteTextClassification,
    "document_matching": DocumentMatching,
    "pathfinder": Pathfinder,
    "passkey": PasskeyRetrieval,
    "char_lm": CharLM,
}


def make_task(name: str, **options: Any) -> Task:
    """Build a synthetic task by name.

    Args:
        name: one of :data:`TASK_NAMES`.
        **options: the task's constructor arguments (see each class).

    Raises:
        ValueError: for an unknown name or option (listing the accepted ones).
    """
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASK_NAMES)}")
    if name in ("reverse", "sort"):
        if "mode" in options:
            raise ValueError(f"task {name!r} fixes mode={name!r}; remove the 'mode' option")
        options = {**options, "mode": name}
    cls = _CLASSES[name]
    try:
        return cls(**options)
    except TypeError as err:
        import inspect

        accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise ValueError(f"bad option for task {name!r}: {err}; accepted options: {', '.join(accepted)}") from err


def _batch(name: str, count: int, seed: int, split: str, start: int, options: dict[str, Any]) -> Batch:
    return make_task(name, **options).batch(count, seed=seed, split=split, start=start)


def listops(count: int, *, seed: int = 0, split: str = "train", start: int = 0, **options: Any) -> Batch:
    """A batch of ListOps examples: ``labels`` is ``(B,)``, classes 0-9 (see :class:`ListOps`)."""
    return _batch("listops", count, seed, split, start, options)


def copy_task(count: int, *, seed: int = 0, split: str = "train", start: int = 0, **options: Any) -> Batch:
    """A batch of ``0 w 0 w`` sequences; ``labels`` ``(B, T)`` score the second copy only (see :class:`CopyTask`)."""
    return _batch("copy", count, seed, split, start, options)


def mqar(count: int, *, seed: int = 0, split: str = "train", start: int = 0, **options: Any) -> Batch:
    """A batch of MQAR sequences; ``labels`` ``(B, T)`` score the query positions only (see :class:`MQAR`)."""
    return _batch("mqar", count, seed, split, start, options)


def reverse(count: int, *, seed: int = 0, split: str = "train", start: int = 0, **options: Any) -> Batch:
    """A seq2seq batch: reverse the source (see :class:`SequenceTransduction`)."""
    return _batch("reverse", count, seed, split, start, options)


def sort(count: int, *, seed: int = 0, split: str = "train", start: int = 0, **options: Any) -> Batch:
    """A seq2seq batch: sort the source (see :class:`SequenceTransduction`)."""
    return _batch("sort", count, seed, split, start, options)
