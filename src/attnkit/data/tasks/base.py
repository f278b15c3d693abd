"""What every task shares: the example and batch types, collation, seeded random access.

A task is a generator of :class:`Example` objects. Example ``i`` of a split is drawn from
its own ``random.Random`` seeded by ``(task name, seed, split, i)``, so any example can be
regenerated on its own: a stream is resumable from a single integer and shardable across
processes without coordination.

Splits are disjoint by construction: an example belongs to the split chosen by a hash of
its tokens (80% train, 10% validation, 10% test), and a draw that lands in another split
is rejected. An evaluation example therefore never appears in training, even for tasks
with a small space of examples (short ListOps trees).

Conventions (all tasks):
    * token id 0 is padding; ``IGNORE_INDEX`` (-100) marks positions that do not count;
    * ``kind == "lm"``: ``labels[t]`` is the target of the logits at position ``t`` (already
      shifted), ``IGNORE_INDEX`` where the task does not score;
    * ``kind == "classification"``: ``label`` is the class;
    * ``kind == "seq2seq"``: ``input_ids`` feed the encoder, ``decoder_input_ids`` start
      with BOS, ``labels`` are aligned to them and end with EOS.
"""

from __future__ import annotations

import abc
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

IGNORE_INDEX = -100
PAD_ID = 0
TaskKind = Literal["classification", "lm", "mlm", "seq2seq"]
SPLITS: tuple[str, ...] = ("train", "validation", "test")
# Percent of the hash space owned by each split, cumulative.
_SPLIT_EDGES = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}


@dataclass(frozen=True)
class Example:
    """One example of any task (see the module docstring for the conventions).

    Attributes:
        input_ids: model (or encoder) input, length ``T``.
        labels: per-position targets, aligned to ``input_ids`` (lm) or to
            ``decoder_input_ids`` (seq2seq); empty for classification.
        label: the class (classification only).
        decoder_input_ids: decoder input (seq2seq only), starting with BOS.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...] = ()
    label: int | None = None
    decoder_input_ids: tuple[int, ...] | None = None

    @property
    def length(self) -> int:
        """The longest of the example's sequences (what bucketing sorts by)."""
        return max(len(self.input_ids), len(self.decoder_input_ids or ()))

    @property
    def num_targets(self) -> int:
        """How many positions count in the loss and accuracy."""
        if self.label is not None:
            return 1
        return sum(1 for y in self.labels if y != IGNORE_INDEX)


@dataclass
class Batch:
    """Padded tensors ready for a model.

    Attributes:
        input_ids: ``(B, T)`` long, padded with the pad id.
        attention_mask: ``(B, T)`` bool, True for real tokens.
        labels: ``(B,)`` long classes (classification), or ``(B, T)`` / ``(B, T_tgt)`` long
            targets with ``IGNORE_INDEX`` at positions that do not count.
        decoder_input_ids: ``(B, T_tgt)`` long (seq2seq only).
        decoder_attention_mask: ``(B, T_tgt)`` bool (seq2seq only).
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    decoder_input_ids: Tensor | None = None
    decoder_attention_mask: Tensor | None = None

    @property
    def size(self) -> int:
        """Number of rows ``B``."""
        return int(self.input_ids.shape[0])

    @property
    def target_mask(self) -> Tensor:
        """Bool mask of the positions that count, shaped like ``labels``."""
        return self.labels != IGNORE_INDEX

    @property
    def num_targets(self) -> int:
        """Number of positions that count."""
        return int(self.target_mask.sum())

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) input tokens, encoder and decoder together (for tokens/s)."""
        n = int(self.attention_mask.sum())
        if self.decoder_attention_mask is not None:
            n += int(self.decoder_attention_mask.sum())
        return n

    def rows(self, index: slice | Tensor) -> Batch:
        """The batch restricted to some rows (used to shard a global batch across processes)."""

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        return Batch(
            self.input_ids[index],
            self.attention_mask[index],
            self.labels[index],
            pick(self.decoder_input_ids),
            pick(self.decoder_attention_mask),
        )

    def to(self, device: torch.device | str) -> Batch:
        """A copy with every tensor on ``device``."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.labels.to(device),
            move(self.decoder_input_ids),
            move(self.decoder_attention_mask),
        )


def _pad(rows: Sequence[Sequence[int]], value: int, multiple: int) -> tuple[Tensor, Tensor]:
    """Right-pad ``rows`` into a ``(B, T)`` long tensor and its ``(B, T)`` bool real-token mask."""
    longest = max(len(r) for r in rows)
    longest = -(-longest // multiple) * multiple
    ids = torch.full((len(rows), longest), value, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = True
    return ids, mask


def collate(examples: Sequence[Example], *, pad_id: int = PAD_ID, pad_to_multiple_of: int = 1) -> Batch:
    """Pad a list of examples of one task into a :class:`Batch`.

    Args:
        examples: at least one example, all of the same kind.
        pad_id: id written into padded input positions.
        pad_to_multiple_of: round the padded length up to a multiple of this (block-sparse
            mechanisms like lengths that are multiples of their block).

    Returns:
        The batch; padded label positions hold ``IGNORE_INDEX``.

    Raises:
        ValueError: for an empty list or mixed kinds.
    """
    if not examples:
        raise ValueError("collate needs at least one example, got an empty list")
    if pad_to_multiple_of < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    classification = examples[0].label is not None
    seq2seq = examples[0].decoder_input_ids is not None
    if any((e.label is not None) != classification or (e.decoder_input_ids is not None) != seq2seq for e in examples):
        raise ValueError("collate got examples of different kinds (classification, lm, seq2seq) in one batch")
    input_ids, attention_mask = _pad([e.input_ids for e in examples], pad_id, pad_to_multiple_of)
    if classification:
        labels = torch.tensor([e.label for e in examples], dtype=torch.long)
        return Batch(input_ids, attention_mask, labels)
    if seq2seq:
        dec_ids, dec_mask = _pad([e.decoder_input_ids or () for e in examples], pad_id, pad_to_multiple_of)
        labels, _ = _pad([e.labels for e in examples], IGNORE_INDEX, pad_to_multiple_of)
        return Batch(input_ids, attention_mask, labels, dec_ids, dec_mask)
    labels, _ = _pad([e.labels for e in examples], IGNORE_INDEX, pad_to_multiple_of)
    return Batch(input_ids, attention_mask, labels)


def split_of(example: Example) -> str:
    """The split an example belongs to, from a hash of its tokens (stable across runs and machines)."""
    tokens = [*example.input_ids, -1, *(example.decoder_input_ids or ())]
    digest = hashlib.blake2b(",".join(map(str, tokens)).encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "little") % 100
    return next(name for name, (lo, hi) in _SPLIT_EDGES.items() if lo <= bucket < hi)


def check_split(split: str) -> str:
    """Return ``split`` if it is a known split name, else raise ``ValueError``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}, got {split!r}")
    return split


def check_range(name_min: str, low: int, name_max: str, high: int, *, minimum: int = 1) -> None:
    """Validate an inclusive integer range ``minimum <= low <= high``, naming both arguments."""
    for name, value in ((name_min, low), (name_max, high)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if low > high:
        raise ValueError(f"{name_min} must be <= {name_max}, got {name_min}={low} > {name_max}={high}")


class Task(abc.ABC):
    """A seeded generator of examples.

    Subclasses set ``name``, ``kind``, ``vocab_size`` (and ``num_classes`` for
    classification) and implement :meth:`sample`.
    """

    name: str = "task"
    kind: TaskKind = "lm"
    vocab_size: int = 0
    num_classes: int | None = None
    pad_id: int = PAD_ID
    #: Draws per example before giving up (a range no draw can satisfy would loop forever).
    max_attempts: int = 100_000

    @abc.abstractmethod
    def sample(self, rng: random.Random) -> Example | None:
        """Draw one example from ``rng``; None rejects the draw (e.g. outside the length range)."""

    @abc.abstractmethod
    def options(self) -> dict[str, Any]:
        """The task's settings, JSON-serialisable (logged and saved with checkpoints)."""

    @abc.abstractmethod
    def token_names(self) -> list[str]:
        """A readable name for every token id (index = id)."""

    @property
    @abc.abstractmethod
    def max_length(self) -> int:
        """Upper bound on :attr:`Example.length` (used to size the model's positions)."""

    def example(self, index: int, *, seed: int = 0, split: str = "train") -> Example:
        """Example ``index`` of ``split`` under ``seed``; the same arguments give the same example.

        Raises:
            ValueError: for an unknown split or a negative index.
            RuntimeError: if no accepted draw is found in ``max_attempts`` draws.
        """
        check_split(split)
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        rng = random.Random(f"attnkit:{self.name}:{seed}:{split}:{index}")
        for _ in range(self.max_attempts):
            ex = self.sample(rng)
            if ex is not None and split_of(ex) == split:
                return ex
        raise RuntimeError(
            f"{self.name}: no example in {self.max_attempts} draws satisfied the options {self.options()} "
            f"for split {split!r}; widen the length range"
        )

    def examples(
        self, count: int, *, seed: int = 0, split: str = "train", start: int = 0, unique: bool = False
    ) -> list[Example]:
        """Examples ``start .. start + count - 1`` of ``split``.

        Args:
            count: how many.
            seed: the task seed.
            split: ``"train"``, ``"validation"`` or ``"test"``.
            start: index of the first example.
            unique: skip repeats (LRA removes duplicate ListOps trees): examples are then the
                first ``count`` distinct ones from ``start`` on.

        Raises:
            ValueError: if ``unique`` and the split holds fewer distinct examples than asked
                (found within ``100 * count`` draws).
        """
        if not unique:
            return [self.example(start + i, seed=seed, split=split) for i in range(count)]
        seen: set[Example] = set()
        out: list[Example] = []
        for index in range(start, start + 100 * count + 1000):
            example = self.example(index, seed=seed, split=split)
            if example not in seen:
                seen.add(example)
                out.append(example)
                if len(out) == count:
                    return out
        raise ValueError(
            f"{self.name}: found only {len(out)} distinct {split} examples, asked for {count}; "
            f"widen the options {self.options()} or ask for fewer"
        )

    def batch(self, batch_size: int, *, seed: int = 0, split: str = "train", start: int = 0) -> Batch:
        """A padded :class:`Batch` of examples ``start .. start + batch_size - 1``."""
        return collate(self.examples(batch_size, seed=seed, split=split, start=start), pad_id=self.pad_id)

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids as readable text (padding and ``IGNORE_INDEX`` are skipped)."""
        names = self.token_names()
        return " ".join(names[i] for i in ids if 0 <= i < len(names) and i != self.pad_id)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"
