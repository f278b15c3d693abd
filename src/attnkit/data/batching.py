"""Length-bucketed, seeded, resumable batching.

:class:`BucketBatcher` draws a pool of ``batch_size * bucket_batches`` examples from a
stream, sorts the pool by length (so each batch holds similar lengths and little padding),
cuts it into batches and yields them in a seeded random order. Its whole position is the
stream's state at the start of the current pool plus the number of batches already taken
from it: :meth:`BucketBatcher.state_dict` is a few integers, and after
:meth:`BucketBatcher.load_state_dict` the next batch is exactly the one an uninterrupted
run would have produced (mid-epoch included).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from attnkit.data.tasks.base import PAD_ID, Batch, Example, Task, check_split, collate


class ExampleStream(Protocol):
    """An iterator of examples whose position can be saved and restored."""

    def __iter__(self) -> Iterator[Example]: ...

    def __next__(self) -> Example: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class IndexedDataset(Protocol):
    """Random access to a finite set of examples."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


class TaskStream:
    """The examples ``0, 1, 2, ...`` of a synthetic task's split (infinite, each drawn on demand)."""

    def __init__(self, task: Task, *, seed: int = 0, split: str = "train") -> None:
        self.task, self.seed, self.split = task, seed, check_split(split)
        self.index = 0

    def __iter__(self) -> Iterator[Example]:
        return self

    def __next__(self) -> Example:
        example = self.task.example(self.index, seed=self.seed, split=self.split)
        self.index += 1
        return example

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


class ShuffledStream:
    """A finite dataset visited in a fresh seeded permutation every epoch.

    Args:
        dataset: anything with ``len`` and integer indexing.
        seed: permutation seed (epoch ``e`` uses ``(seed, e)``).
        loop: start another epoch at the end (training) or stop (evaluation).
        shuffle: False visits the examples in order.
    """

    def __init__(self, dataset: IndexedDataset, *, seed: int = 0, loop: bool = True, shuffle: bool = True) -> None:
        if len(dataset) == 0:
            raise ValueError("ShuffledStream got an empty dataset (no examples in this split?)")
        self.dataset, self.seed, self.loop, self.shuffle = dataset, seed, loop, shuffle
        self.epoch, self.position = 0, 0
        self._order: tuple[int, list[int]] | None = None

    def _permutation(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            order = list(range(len(self.dataset)))
            if self.shuffle:
                random.Random(f"attnkit:shuffle:{self.seed}:{self.epoch}").shuffle(order)
            self._order = (self.epoch, order)
        return self._order[1]

    def __iter__(self) -> Iterator[Example]:
        return self

    def __next__(self) -> Example:
        if self.position == len(self.dataset):
            if not self.loop:
                raise StopIteration
            self.epoch, self.position = self.epoch + 1, 0
        example = self.dataset[self._permutation()[self.position]]
        self.position += 1
        return example

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class BucketBatcher:
    """Batches of similar-length examples from a stream, deterministic and resumable.

    Args:
        stream: the example stream (its state is saved with the batcher's).
        batch_size: examples per batch.
        bucket_batches: batches per sorted pool; 1 disables bucketing.
        seed: seeds the order of batches within each pool.
        pad_id: padding id for :func:`~attnkit.data.tasks.collate`.
        pad_to_multiple_of: round padded lengths up to a multiple of this.
    """

    def __init__(
        self,
        stream: ExampleStream,
        *,
        batch_size: int,
        bucket_batches: int = 8,
        seed: int = 0,
        pad_id: int = PAD_ID,
        pad_to_multiple_of: int = 1,
    ) -> None:
        if batch_size < 1 or bucket_batches < 1:
            raise ValueError(f"batch_size and bucket_batches must be >= 1, got {batch_size} and {bucket_batches}")
        self.stream = stream
        self.batch_size, self.bucket_batches = batch_size, bucket_batches
        self.seed, self.pad_id, self.pad_to_multiple_of = seed, pad_id, pad_to_multiple_of
        self.pool_index, self.taken = 0, 0
        self._pool_start = stream.state_dict()
        self._batches: list[list[Example]] | None = None

    def _fill(self) -> list[list[Example]]:
        if self._batches is None:
            self.stream.load_state_dict(self._pool_start)
            pool: list[Example] = []
            for _ in range(self.batch_size * self.bucket_batches):
                try:
                    pool.append(next(self.stream))
                except StopIteration:
                    break
            # Stable sort: ties keep stream order, so the pool is a pure function of the stream state.
            pool.sort(key=lambda e: e.length)
            batches = [pool[i : i + self.batch_size] for i in range(0, len(pool), self.batch_size)]
            random.Random(f"attnkit:buckets:{self.seed}:{self.pool_index}").shuffle(batches)
            self._batches = batches
        return self._batches

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batches = self._fill()
        if self.taken == len(batches):
            self._pool_start = self.stream.state_dict()
            self.pool_index, self.taken, self._batches = self.pool_index + 1, 0, None
            batches = self._fill()
            if not batches:
                raise StopIteration
        self.taken += 1
        return collate(batches[self.taken - 1], pad_id=self.pad_id, pad_to_multiple_of=self.pad_to_multiple_of)

    def state_dict(self) -> dict[str, Any]:
        """The position: stream state at the current pool's start, pool number, batches taken."""
        return {"pool_start": dict(self._pool_start), "pool_index": self.pool_index, "taken": self.taken}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pool_start = dict(state["pool_start"])
        self.pool_index, self.taken = int(state["pool_index"]), int(state["taken"])
        self._batches = None


def eval_batches(
    examples: Sequence[Example], *, batch_size: int, pad_id: int = PAD_ID, pad_to_multiple_of: int = 1
) -> list[Batch]:
    """A fixed evaluation set as batches, sorted by length to waste little on padding."""
    ordered = sorted(examples, key=lambda e: e.length)
    return [
        collate(ordered[i : i + batch_size], pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
        for i in range(0, len(ordered), batch_size)
    ]
