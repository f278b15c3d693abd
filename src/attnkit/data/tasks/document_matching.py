"""Byte-level document matching, after LRA's "Retrieval" task, on the standard library's sources.

Long Range Arena (Tay et al., 2021, https://arxiv.org/abs/2011.04006) asks whether two papers of
the ACL Anthology Network cite each other, reading each as 4K bytes. Here the question is whether
two byte windows come from the same standard-library file: a positive pair is two windows of one
file that do not overlap (so matching them needs more than spotting a shared substring), a
negative pair is one window of each of two different files. Pairs are balanced (label 1 with
probability 1/2), so the majority baseline is 1/2.

The input is ``window_a <sep> window_b`` (``2 x window + 1`` tokens); LRA's two-tower variant
encodes the halves separately, which a model can do by splitting at the ``<sep>`` (id 3). Only
files of at least ``2 x window`` bytes are used, so both windows are always full length and the
length says nothing about the label. Files are split as for ``task = "text"`` (a hash of their
path, 80/10/10), so no file is in two splits.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any

from attnkit.data.tasks.base import SPLITS, Example, check_range
from attnkit.data.tasks.corpus import BYTE_VOCAB_SIZE, SEP_ID, FileSplitTask, byte_ids, corpus_files, read_window


@functools.lru_cache(maxsize=16)
def long_files(split: str, min_bytes: int) -> tuple[tuple[Path, int], ...]:
    """``(path, size)`` of the files of ``split`` with at least ``min_bytes`` bytes."""
    files, _ = corpus_files(split)
    sized = ((path, path.stat().st_size) for path in files)
    return tuple((path, size) for path, size in sized if size >= min_bytes)


class DocumentMatching(FileSplitTask):
    """Do two byte windows come from the same file? (binary classification, 1 = same file)

    Args:
        window: bytes per window (LRA Retrieval: 4,000 per document); the input is
            ``2 x window + 1`` tokens.
    """

    name = "document_matching"
    kind = "classification"
    vocab_size = BYTE_VOCAB_SIZE
    num_classes = 2

    def __init__(self, *, window: int = 4096) -> None:
        check_range("window", window, "window", window)
        self.window = window
        for split in SPLITS:
            count = len(long_files(split, 2 * window))
            if count < 2:
                raise ValueError(
                    f"only {count} standard-library files of the {split!r} split have at least 2 x window = "
                    f"{2 * window} bytes, and negative pairs need two; use a smaller window (1024, say)"
                )

    @property
    def max_length(self) -> int:
        return 2 * self.window + 1

    def options(self) -> dict[str, Any]:
        return {"window": self.window}

    def draw(self, rng: random.Random, split: str) -> Example:
        files = long_files(split, 2 * self.window)
        same = rng.random() < 0.5
        first = rng.randrange(len(files))
        path, size = files[first]
        if same:
            # Two disjoint windows: the first ends before the second starts, then either order.
            start_a = rng.randrange(size - 2 * self.window + 1)
            start_b = rng.randrange(start_a + self.window, size - self.window + 1)
            if rng.random() < 0.5:
                start_a, start_b = start_b, start_a
            a, b = read_window(path, start_a, self.window), read_window(path, start_b, self.window)
        else:
            # Any other file: rng.randrange over the others, skipping the first one.
            second = rng.randrange(len(files) - 1)
            other, other_size = files[second + (second >= first)]
            a = read_window(path, rng.randrange(size - self.window + 1), self.window)
            b = read_window(other, rng.randrange(other_size - self.window + 1), self.window)
        return Example(input_ids=(*byte_ids(a), SEP_ID, *byte_ids(b)), label=int(same))
