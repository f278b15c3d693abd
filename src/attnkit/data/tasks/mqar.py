"""Multi-query associative recall (MQAR), from Zoology (Arora et al., "Zoology: Measuring and
Improving Recall in Efficient Language Models", 2023, https://arxiv.org/abs/2312.04927).

A sequence lists ``num_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (keys and values from
disjoint vocabularies, distinct within a sequence), then ``num_queries`` of the keys again,
each followed by its value: ``q1 a1 q2 a2 ...``. Trained as a language model; only the
query positions are scored (the logits at ``q_j`` must predict ``a_j``). Between the pairs
and the queries, ``gap`` filler tokens may be inserted to stretch the recall distance.

Softmax attention solves it at small width; fixed-state models (linear attention) need
a state that grows with ``num_pairs``.

Ids: 0 padding, 1 filler, 2 .. ``num_keys + 1`` keys, then ``num_values`` values.
"""

from __future__ import annotations

import random
from typing import Any

from attnkit.data.tasks.base import IGNORE_INDEX, Example, Task, check_range

FILLER_ID = 1
KEY_OFFSET = 2


class MQAR(Task):
    """Multi-query associative recall.

    Args:
        num_pairs: key-value pairs per sequence.
        num_queries: queried keys (a random subset of the pairs, in random order);
            default ``num_pairs``.
        num_keys: size of the key vocabulary (``>= num_pairs``).
        num_values: size of the value vocabulary (``>= num_pairs``).
        gap: filler tokens between the pairs and the queries.
    """

    name = "mqar"
    kind = "lm"

    def __init__(
        self,
        *,
        num_pairs: int = 8,
        num_queries: int | None = None,
        num_keys: int = 64,
        num_values: int = 64,
        gap: int = 0,
    ) -> None:
        queries = num_pairs if num_queries is None else num_queries
        check_range("num_queries", queries, "num_pairs", num_pairs)
        check_range("num_pairs", num_pairs, "num_keys", num_keys)
        check_range("num_pairs", num_pairs, "num_values", num_values)
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0:
            raise ValueError(f"gap must be a non-negative integer, got {gap!r}")
        self.num_pairs = num_pairs
        self.num_queries = queries
        self.num_keys = num_keys
        self.num_values = num_values
        self.gap = gap
        self.vocab_size = KEY_OFFSET + num_keys + num_values

    @property
    def max_length(self) -> int:
        return 2 * self.num_pairs + self.gap + 2 * self.num_queries

    def options(self) -> dict[str, Any]:
        return {
            "num_pairs": self.num_pairs,
            "num_queries": self.num_queries,
            "num_keys": self.num_keys,
            "num_values": self.num_values,
            "gap": self.gap,
        }

    def token_names(self) -> list[str]:
        keys = [f"k{i}" for i in range(self.num_keys)]
        values = [f"v{i}" for i in range(self.num_values)]
        return ["<pad>", "<filler>", *keys, *values]

    def sample(self, rng: random.Random) -> Example:
        keys = [KEY_OFFSET + k for k in rng.sample(range(self.num_keys), self.num_pairs)]
        value_offset = KEY_OFFSET + self.num_keys
        values = [value_offset + v for v in rng.sample(range(self.num_values), self.num_pairs)]
        tokens: list[int] = []
        for key, value in zip(keys, values):
            tokens += [key, value]
        tokens += [FILLER_ID] * self.gap
        labels = [IGNORE_INDEX] * len(tokens)
        for pair in rng.sample(range(self.num_pairs), self.num_queries):
            tokens += [keys[pair], values[pair]]
            labels += [values[pair], IGNORE_INDEX]
        return Example(input_ids=tuple(tokens), labels=tuple(labels))
