"""Real text already on the machine for the byte-level tasks: the standard library's sources.

Nothing is downloaded: the tasks read the running interpreter's standard-library ``.py`` files
(:func:`attnkit.data.sources.stdlib_files`, about 30 MB) and use their bytes as tokens with the
ids of :class:`~attnkit.data.tokenizers.ByteTokenizer` (byte ``b`` is id ``b + 4``; ids 0-3 are
``<pad> <bos> <eos> <sep>``; 260 ids in all), so a model trained on these tasks reads text
exactly as one trained on ``task = "text"``.

A task over files must keep every file in one split, which the token-hash rule of
:class:`~attnkit.data.tasks.base.Task` cannot promise (two windows of one file hash apart).
:class:`FileSplitTask` therefore draws each example from the files of its own split, so
train, validation and test never share a file.
"""

from __future__ import annotations

import abc
import bisect
import functools
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from attnkit.data.sources import stdlib_files
from attnkit.data.tasks.base import Example, Task, check_split
from attnkit.data.tokenizers import SPECIAL_TOKENS, ByteTokenizer

#: Id of byte 0 (the special tokens come first).
BYTE_OFFSET = len(SPECIAL_TOKENS)
BYTE_VOCAB_SIZE = ByteTokenizer.vocab_size
SEP_ID = SPECIAL_TOKENS.index("<sep>")

T = TypeVar("T")


def byte_ids(data: bytes) -> tuple[int, ...]:
    """Token ids of raw bytes (``b + 4`` each)."""
    return tuple(b + BYTE_OFFSET for b in data)


def byte_token_names() -> list[str]:
    """A readable name for each of the 260 byte-task ids (printable ASCII as itself)."""
    return [*SPECIAL_TOKENS, *(chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in range(256))]


def read_window(path: Path, offset: int, size: int) -> bytes:
    """Up to ``size`` bytes of ``path`` from byte ``offset`` on."""
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(size)


@functools.lru_cache(maxsize=3)
def corpus_files(split: str) -> tuple[tuple[Path, ...], tuple[int, ...]]:
    """The standard-library files of ``split`` and their cumulative byte sizes.

    The split is the one of ``task = "text"`` (a hash of each file's path), so a model
    pretrained on that corpus has never read a validation or test file of these tasks.
    """
    files = tuple(stdlib_files(split))
    ends = []
    total = 0
    for path in files:
        total += path.stat().st_size
        ends.append(total)
    return files, tuple(ends)


def corpus_window(rng: random.Random, split: str, size: int) -> bytes:
    """``size`` bytes read from a uniform position of ``split``'s files laid end to end.

    A window that runs past the end of a file continues at the start of the next one (after a
    newline) and wraps around from the last file to the first, so any ``size`` fits.
    """
    files, ends = corpus_files(split)
    position = rng.randrange(ends[-1])
    index = bisect.bisect_right(ends, position)
    offset = position - (ends[index - 1] if index else 0)
    out = bytearray()
    while len(out) < size:
        out += read_window(files[index], offset, size - len(out))
        if len(out) < size:
            out += b"\n"
        index, offset = (index + 1) % len(files), 0
    return bytes(out[:size])


class FileSplitTask(Task):
    """A task over real files whose examples are drawn from the files of their own split.

    Subclasses implement :meth:`draw` (one example of a given split) instead of
    :meth:`~attnkit.data.tasks.base.Task.sample`. Example ``index`` of a split is drawn from the
    same seeded ``random.Random`` as every other task's, so random access, resuming and
    sharding work the same way.
    """

    @abc.abstractmethod
    def draw(self, rng: random.Random, split: str) -> Example | None:
        """Draw one example of ``split`` from ``rng``; None rejects the draw."""

    def sample(self, rng: random.Random) -> Example | None:
        """A training example (the :class:`Task` interface); prefer :meth:`example`, which takes a split."""
        return self.draw(rng, "train")

    def example(self, index: int, *, seed: int = 0, split: str = "train") -> Example:
        """Example ``index`` of ``split`` under ``seed``, from that split's files only.

        Raises:
            ValueError: for an unknown split or a negative index.
            RuntimeError: if no accepted draw is found in ``max_attempts`` draws.
        """
        return self.first_draw(index, seed, split, self.draw)

    def first_draw(self, index: int, seed: int, split: str, draw: Callable[[random.Random, str], T | None]) -> T:
        """The first accepted result of ``draw`` for example ``index`` of ``split`` under ``seed``.

        Any ``draw`` that makes the same calls on the generator as :meth:`draw` lands on the same
        example, which lets a task return more than the :class:`Example` (a record of where a
        needle sits, say).
        """
        check_split(split)
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        rng = random.Random(f"attnkit:{self.name}:{seed}:{split}:{index}")
        for _ in range(self.max_attempts):
            result = draw(rng, split)
            if result is not None:
                return result
        raise RuntimeError(
            f"{self.name}: no example in {self.max_attempts} draws satisfied the options {self.options()}"
        )

    def token_names(self) -> list[str]:
        return byte_token_names()

    def decode(self, ids: Sequence[int]) -> str:
        """Byte ids as text (``<sep>`` shown as such; padding skipped; bytes decoded as UTF-8)."""
        out, run = [], bytearray()
        for i in ids:
            if BYTE_OFFSET <= i < BYTE_VOCAB_SIZE:
                run.append(i - BYTE_OFFSET)
            elif 0 < i < BYTE_OFFSET:
                out.append(run.decode("utf-8", errors="replace") + SPECIAL_TOKENS[i])
                run = bytearray()
        return "".join(out) + run.decode("utf-8", errors="replace")
