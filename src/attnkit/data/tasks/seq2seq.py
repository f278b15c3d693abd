"""Reverse and sort: small sequence-to-sequence tasks for the encoder-decoder.

The source is a uniform random string of ``num_symbols`` symbols; the target is the
source reversed (``mode="reverse"``) or sorted by symbol id (``mode="sort"``). The decoder
is teacher-forced on ``BOS + target`` and scored on ``target + EOS``.

Ids: 0 padding, 1 BOS, 2 EOS, 3 .. ``num_symbols + 2`` the symbols.
"""

from __future__ import annotations

import random
from typing import Any

from attnkit.data.tasks.base import Example, Task, check_range

BOS_ID = 1
EOS_ID = 2
SYMBOL_OFFSET = 3
MODES: tuple[str, ...] = ("reverse", "sort")


class SequenceTransduction(Task):
    """Reverse or sort a random string.

    Args:
        mode: ``"reverse"`` or ``"sort"``.
        min_length: shortest source (inclusive).
        max_length: longest source (inclusive).
        num_symbols: alphabet size.
    """

    kind = "seq2seq"

    def __init__(self, *, mode: str = "reverse", min_length: int = 8, max_length: int = 32, num_symbols: int = 32):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}, got {mode!r}")
        check_range("min_length", min_length, "max_length", max_length)
        check_range("num_symbols", num_symbols, "num_symbols", num_symbols, minimum=2)
        self.name = mode
        self.mode = mode
        self.min_length = min_length
        self.source_max_length = max_length
        self.num_symbols = num_symbols
        self.vocab_size = num_symbols + SYMBOL_OFFSET

    @property
    def max_length(self) -> int:
        return self.source_max_length + 1

    def options(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "min_length": self.min_length,
            "max_length": self.source_max_length,
            "num_symbols": self.num_symbols,
        }

    def token_names(self) -> list[str]:
        return ["<pad>", "<bos>", "<eos>", *(f"s{i}" for i in range(self.num_symbols))]

    def target_of(self, source: list[int]) -> list[int]:
        """The target sequence for ``source``."""
        return source[::-1] if self.mode == "reverse" else sorted(source)

    def sample(self, rng: random.Random) -> Example:
        length = rng.randint(self.min_length, self.source_max_length)
        source = [SYMBOL_OFFSET + rng.randrange(self.num_symbols) for _ in range(length)]
        target = self.target_of(source)
        return Example(
            input_ids=tuple(source),
            decoder_input_ids=(BOS_ID, *target),
            labels=(*target, EOS_ID),
        )
