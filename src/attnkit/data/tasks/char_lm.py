"""Character-level language modelling on the built-in real-text corpus, at a fixed context length.

The quality suite's bits-per-character task: each example is a window of ``length + 1`` bytes
read from a uniform position of the standard library's sources laid end to end
(:func:`attnkit.data.tasks.corpus.corpus_window`), with the ids of the byte tokenizer; the model
reads the first ``length`` bytes and every position predicts the next byte. Bits per byte equal
bits per character on this almost entirely ASCII text.

``task = "text"`` trains on the same files (same split) read in order, one file after another;
this task gives random access to fixed-length windows instead, which the arena's quality cells
draw from, and has a no-context baseline (:func:`attnkit.data.tasks.baselines.no_context_baseline`:
a unigram byte model's bits per character).
"""

from __future__ import annotations

import random
from typing import Any

from attnkit.data.tasks.base import Example, check_range
from attnkit.data.tasks.corpus import BYTE_VOCAB_SIZE, FileSplitTask, byte_ids, corpus_window


class CharLM(FileSplitTask):
    """Next-byte prediction over ``length``-byte windows of the standard library's sources.

    Args:
        length: context length in bytes (the quality suite uses 1,024 and more).
    """

    name = "char_lm"
    kind = "lm"
    vocab_size = BYTE_VOCAB_SIZE

    def __init__(self, *, length: int = 1024) -> None:
        check_range("length", length, "length", length)
        self.length = length

    @property
    def max_length(self) -> int:
        return self.length

    def options(self) -> dict[str, Any]:
        return {"length": self.length}

    def draw(self, rng: random.Random, split: str) -> Example:
        ids = byte_ids(corpus_window(rng, split, self.length + 1))
        return Example(input_ids=ids[:-1], labels=ids[1:])
