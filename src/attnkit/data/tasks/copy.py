"""The duplication task of Reformer (Kitaev et al., "Reformer: The Efficient Transformer",
2020, https://arxiv.org/abs/2001.04451).

A sequence ``0 w 0 w`` is modelled as a language model; only the second copy of ``w`` is
scored, so the model must find each token's twin half a sequence back. Reformer uses 127
symbols and ``|w| = 511``; shorter ``w`` is a fair CPU-sized proxy.

Ids: 0 padding, 1 the separator (Reformer's ``0``), 2 .. ``num_symbols + 1`` the symbols.
"""

from __future__ import annotations

import random
from typing import Any

from attnkit.data.tasks.base import IGNORE_INDEX, Example, Task, check_range

SEPARATOR_ID = 1
SYMBOL_OFFSET = 2


class CopyTask(Task):
    """The ``0 w 0 w`` duplication task (language modelling, loss on the second copy only).

    Args:
        min_length: shortest ``|w|`` (inclusive).
        max_length: longest ``|w|`` (inclusive); the sequence is ``2 |w| + 2`` tokens.
        num_symbols: size of the symbol alphabet (Reformer: 127).
    """

    name = "copy"
    kind = "lm"

    def __init__(self, *, min_length: int = 32, max_length: int = 32, num_symbols: int = 127) -> None:
        check_range("min_length", min_length, "max_length", max_length)
        check_range("num_symbols", num_symbols, "num_symbols", num_symbols, minimum=2)
        self.min_length = min_length
        self.word_max_length = max_length
        self.num_symbols = num_symbols
        self.vocab_size = num_symbols + SYMBOL_OFFSET

    @property
    def max_length(self) -> int:
        return 2 * self.word_max_length + 2

    def options(self) -> dict[str, Any]:
        return {"min_length": self.min_length, "max_length": self.word_max_length, "num_symbols": self.num_symbols}

    def token_names(self) -> list[str]:
        return ["<pad>", "<sep>", *(f"s{i}" for i in range(1, self.num_symbols + 1))]

    def sample(self, rng: random.Random) -> Example:
        length = rng.randint(self.min_length, self.word_max_length)
        word = [SYMBOL_OFFSET + rng.randrange(self.num_symbols) for _ in range(length)]
        tokens = [SEPARATOR_ID, *word, SEPARATOR_ID, *word]
        # Position t predicts token t + 1; the second copy starts at index length + 2, so the
        # scored positions are length + 1 .. 2 * length.
        labels = [IGNORE_INDEX] * len(tokens)
        for t in range(length + 1, 2 * length + 1):
            labels[t] = tokens[t + 1]
        return Example(input_ids=tuple(tokens), labels=tuple(labels))
