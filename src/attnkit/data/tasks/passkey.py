"""Passkey retrieval: find a number hidden at a chosen depth of a long real-text context.

After Mohtashami & Jaggi, "Landmark Attention: Random-Access Infinite Context Length for
Transformers" (2023, https://arxiv.org/abs/2305.16300), and the "needle in a haystack" tests
built on it. The haystack here is real text, a window of the standard library's sources (the
split's own files, :func:`attnkit.data.tasks.corpus.corpus_window`), so the model cannot skip it
as a repeated filler sentence; the needle is :data:`NEEDLE` with a random ``num_digits``-digit
passkey, inserted ``depth`` of the way into the haystack; the sequence ends with
:data:`QUESTION`, after which the passkey's digits are the targets. Everything is bytes, with the
ids of the byte tokenizer (260 ids).

Two forms of the targets:

* ``answer_slots=False`` (a causal language model, the usual form): the digits follow the
  question in the input and each is scored as the next token: the logits at the question's
  last byte predict the first digit, and so on. Greedy generation after the question answers.
* ``answer_slots=True`` (any mechanism, bidirectional ones included): the digits are replaced by
  ``num_digits`` ``<sep>`` tokens (id 3) and the logits *at* slot ``k`` predict digit ``k``, so the
  answer is never in the input.

The input is exactly ``length`` tokens in both forms. :meth:`PasskeyRetrieval.record` says where
each example's needle and answer sit.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from attnkit.data.tasks.base import IGNORE_INDEX, Example, check_range
from attnkit.data.tasks.corpus import BYTE_VOCAB_SIZE, SEP_ID, FileSplitTask, byte_ids, corpus_window

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is "
#: Haystack text containing this is redrawn, so the needle is the only one.
_MARKER = b"pass key"


@dataclass(frozen=True)
class PasskeyRecord:
    """Where one example's needle and answer sit.

    Attributes:
        example: the example itself.
        passkey: the digits, as text.
        depth: the fraction of the haystack before the needle.
        needle_start: index in ``example.input_ids`` of the needle's first token.
        answer_positions: indices in ``example.input_ids`` whose labels are the passkey's digits, in order.
    """

    example: Example
    passkey: str
    depth: float
    needle_start: int
    answer_positions: tuple[int, ...]


class PasskeyRetrieval(FileSplitTask):
    """Recall a passkey hidden in ``length`` bytes of real text (a language-modelling task).

    Args:
        length: input tokens (bytes) per example (1,024 to 8,192 for the quality suite).
        num_digits: digits of the passkey (uniform digits, a leading zero included).
        depth: where the needle goes, as the fraction of the haystack before it (0 = at the
            start, 1 = just before the question); unset draws a uniform depth per example.
        answer_slots: replace the answer digits by ``<sep>`` slots scored in place (for
            bidirectional mechanisms), instead of scoring them as next tokens.
    """

    name = "passkey"
    kind = "lm"
    vocab_size = BYTE_VOCAB_SIZE

    def __init__(
        self, *, length: int = 1024, num_digits: int = 5, depth: float | None = None, answer_slots: bool = False
    ) -> None:
        check_range("length", length, "length", length)
        check_range("num_digits", num_digits, "num_digits", num_digits)
        if depth is not None and (
            isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0 <= depth <= 1
        ):
            raise ValueError(f"depth must be a number in [0, 1] (or unset for a random depth), got {depth!r}")
        if not isinstance(answer_slots, bool):
            raise ValueError(f"answer_slots must be true or false, got {answer_slots!r}")
        self.length = length
        self.num_digits = num_digits
        self.depth = None if depth is None else float(depth)
        self.answer_slots = answer_slots
        fixed = len(NEEDLE.format(key="0" * num_digits)) + len(QUESTION) + num_digits
        # Next-token form: the input leaves out the last digit (nothing follows it to predict).
        shortest = fixed - (0 if answer_slots else 1)
        if length < shortest:
            raise ValueError(
                f"length={length} cannot hold the needle, the question and {num_digits} digits; "
                f"use length >= {shortest} (a haystack of length - {shortest} bytes)"
            )
        self.haystack_length = length - shortest

    @property
    def max_length(self) -> int:
        return self.length

    def options(self) -> dict[str, Any]:
        return {
            "length": self.length,
            "num_digits": self.num_digits,
            "depth": self.depth,
            "answer_slots": self.answer_slots,
        }

    def record(self, index: int, *, seed: int = 0, split: str = "train") -> PasskeyRecord:
        """Example ``index`` of ``split`` (the same as :meth:`example`) with where its needle and answer sit."""
        return self.first_draw(index, seed, split, self._draw_record)

    def draw(self, rng: random.Random, split: str) -> Example | None:
        record = self._draw_record(rng, split)
        return None if record is None else record.example

    def _draw_record(self, rng: random.Random, split: str) -> PasskeyRecord | None:
        passkey = "".join(rng.choice("0123456789") for _ in range(self.num_digits))
        depth = rng.random() if self.depth is None else self.depth
        haystack = corpus_window(rng, split, self.haystack_length)
        if _MARKER in haystack.lower():
            return None
        cut = int(depth * self.haystack_length)
        needle = NEEDLE.format(key=passkey).encode()
        question = QUESTION.encode()
        answer = byte_ids(passkey.encode())
        tokens = byte_ids(haystack[:cut] + needle + haystack[cut:] + question)
        if self.answer_slots:
            first, tail = len(tokens), (SEP_ID,) * self.num_digits  # slot k's own logits predict digit k
        else:
            first, tail = len(tokens) - 1, answer[:-1]  # the question's last byte predicts the first digit
        input_ids = (*tokens, *tail)
        labels = (IGNORE_INDEX,) * first + answer
        return PasskeyRecord(
            example=Example(input_ids=input_ids, labels=labels),
            passkey=passkey,
            depth=depth,
            needle_start=cut,
            answer_positions=tuple(range(first, first + self.num_digits)),
        )
