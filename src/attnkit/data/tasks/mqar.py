"""Multi-query associative recall (MQAR), from Zoology (Arora et al., "Zoology: Measuring and
Improving Recall in Efficient Language Models", 2023, https://arxiv.org/abs/2312.04927).

A sequence lists ``num_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (keys and values from
disjoint vocabularies, distinct within a sequence), then ``num_queries`` of the keys again,
each followed by its value: ``q1 a1 q2 a2 ...``. Trained as a language model; only the
query positions are scored (the logits at ``q_j`` must predict ``a_j``). Between the pairs
and the queries, ``gap`` filler tokens may be inserted to stretch the recall distance, or
``length`` may fix the whole sequence's length (the gap then fills the rest).

A Zoology sweep maps onto the options: its ``num_kv_pairs`` is ``num_pairs``, its
``input_seq_len`` is ``length`` and its ``vocab_size`` V is ``num_keys + num_values`` (Zoology
draws keys from one half of its vocabulary and values from the other: ``num_keys = num_values =
V / 2``). Zoology spreads its queries over the rest of the sequence; here they come together
after the filler (the layout the arena's bidirectional variant relies on), so the recall
distance grows with ``length`` for every query alike.

No-context baseline: a model that cannot see the pairs can only answer a constant value, right
for about ``1 / num_values`` of the queries
(:func:`attnkit.data.tasks.baselines.no_context_baseline` measures it on the data).

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
        length: the sequence's total length (Zoology's ``input_seq_len``); the gap becomes
            ``length - 2 x num_pairs - 2 x num_queries``. Unset: ``2 x num_pairs + gap + 2 x num_queries``.
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
        length: int | None = None,
    ) -> None:
        queries = num_pairs if num_queries is None else num_queries
        check_range("num_queries", queries, "num_pairs", num_pairs)
        check_range("num_pairs", num_pairs, "num_keys", num_keys)
        check_range("num_pairs", num_pairs, "num_values", num_values)
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0:
            raise ValueError(f"gap must be a non-negative integer, got {gap!r}")
        if length is not None:
            gap = self._gap_for_length(length, gap, num_pairs, queries)
        self.length = length
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
            "length": self.length,
        }

    @staticmethod
    def _gap_for_length(length: int, gap: int, num_pairs: int, num_queries: int) -> int:
        """The filler that makes the sequence ``length`` tokens long (``gap``, if set, must agree)."""
        check_range("length", length, "length", length)
        needed = 2 * num_pairs + 2 * num_queries
        if length < needed:
            raise ValueError(
                f"length={length} is shorter than the {needed} tokens of {num_pairs} pairs and {num_queries} queries; "
                f"use length >= {needed} or fewer pairs"
            )
        if gap not in (0, length - needed):
            raise ValueError(
                f"gap={gap} and length={length} disagree (length sets gap = {length - needed}); set one of them"
            )
        return length - needed

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
