"""Data for training and evaluation.

* :mod:`attnkit.data.tasks`: seeded synthetic tasks (ListOps, copy, MQAR, reverse, sort) and the
  quality suite's tasks on real local text (text_classification, document_matching, pathfinder,
  passkey, char_lm), with random access, disjoint splits and the positions that count (``batch.target_mask``);
* :mod:`attnkit.data.tokenizers`: byte-level and BPE tokenizers saved with the model;
* :mod:`attnkit.data.sources`: the standard-library corpus, text files and JSONL, streamed;
* :mod:`attnkit.data.batching`: length-bucketed, seeded, resumable batching;
* :mod:`attnkit.data.pipeline`: :func:`build_data`, from a task name or data path to streams.
"""

from attnkit.data.batching import BucketBatcher, ShuffledStream, TaskStream, eval_batches
from attnkit.data.pipeline import TrainingData, build_data
from attnkit.data.tasks import IGNORE_INDEX, Batch, Example, Task, collate, make_task
from attnkit.data.tokenizers import BPETokenizer, ByteTokenizer, load_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "BPETokenizer",
    "Batch",
    "BucketBatcher",
    "ByteTokenizer",
    "Example",
    "ShuffledStream",
    "Task",
    "TaskStream",
    "TrainingData",
    "build_data",
    "collate",
    "eval_batches",
    "load_tokenizer",
    "make_task",
]
