"""Byte-level text classification, after LRA's "Text" task on real text already on the machine.

Long Range Arena (Tay et al., "Long Range Arena: A Benchmark for Efficient Transformers", 2021,
https://arxiv.org/abs/2011.04006) classifies IMDB reviews read byte by byte, 4K bytes each. IMDB
is not on the machine; the standard library is. The label here is the package a source file
belongs to, among six families (default :data:`FAMILIES`; files per family for CPython 3.11):
``asyncio`` (31: event loop, transports, streams), ``email`` (28: MIME parsing, headers),
``idlelib`` (57: the IDLE editor's Tk interface), ``importlib`` (21: import machinery, metadata),
``multiprocessing`` (23: processes, pools, shared memory) and ``xml`` (19: DOM, SAX, ElementTree).

Only files of at least :data:`MIN_FILE_BYTES` count, and test directories are left out (a test
file reads like a test whatever it tests), as is ``encodings`` (near-identical generated codec
tables).

An example is a window of ``length`` bytes at a uniform offset of a uniform file of a uniform
class (so classes are balanced and the majority baseline is ``1 / len(families)``); a file
shorter than ``length`` is taken whole and padded by collation (the attention mask marks the
padding). Each family's files are ordered by a hash of their path and cut 80/10/10 into
train/validation/test with at least one file in each, so no file is in two splits and every
class is in every split.
"""

from __future__ import annotations

import functools
import hashlib
import random
from pathlib import Path
from typing import Any

from attnkit.data.sources import stdlib_root
from attnkit.data.tasks.base import SPLITS, Example, check_range
from attnkit.data.tasks.corpus import BYTE_VOCAB_SIZE, FileSplitTask, byte_ids, read_window

FAMILIES: tuple[str, ...] = ("asyncio", "email", "idlelib", "importlib", "multiprocessing", "xml")
#: Smaller files (mostly empty ``__init__.py``) say nothing about their package.
MIN_FILE_BYTES = 512
_TEST_DIRECTORIES = frozenset({"test", "tests", "idle_test"})


def _path_hash(path: Path) -> bytes:
    return hashlib.blake2b(path.as_posix().encode(), digest_size=8).digest()


@functools.lru_cache(maxsize=64)
def family_files(family: str) -> tuple[Path, ...]:
    """The non-test ``.py`` files of at least :data:`MIN_FILE_BYTES` under the standard library's ``family``."""
    root = stdlib_root()
    found = []
    for path in sorted((root / family).rglob("*.py")):
        rel = path.relative_to(root)
        if _TEST_DIRECTORIES.isdisjoint(rel.parts[1:-1]) and path.stat().st_size >= MIN_FILE_BYTES:
            found.append(path)
    return tuple(found)


def split_family(files: tuple[Path, ...]) -> dict[str, tuple[Path, ...]]:
    """Cut one family's files 80/10/10 by a hash of their path, at least one file per split.

    Raises:
        ValueError: for fewer than three files.
    """
    if len(files) < len(SPLITS):
        raise ValueError(f"a family needs at least {len(SPLITS)} files (one per split), got {len(files)}")
    root = stdlib_root()
    ordered = sorted(files, key=lambda p: _path_hash(p.relative_to(root)))
    held_out = max(1, round(0.1 * len(files)))
    return {
        "test": tuple(ordered[:held_out]),
        "validation": tuple(ordered[held_out : 2 * held_out]),
        "train": tuple(ordered[2 * held_out :]),
    }


def available_families() -> dict[str, int]:
    """Top-level standard-library packages with enough files to be a class, and their file counts, largest first."""
    root = stdlib_root()
    names = [p.name for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file() and p.name != "test"]
    sizes = {name: len(family_files(name)) for name in names}
    return {n: sizes[n] for n in sorted(sizes, key=lambda n: (-sizes[n], n)) if sizes[n] >= len(SPLITS)}


class ByteTextClassification(FileSplitTask):
    """Which standard-library package a window of source bytes comes from.

    Args:
        length: bytes per example (LRA Text: 4,000; 1,024 is a CPU-sized run); longer files
            are cut to a random window of this length, shorter ones padded.
        families: top-level standard-library packages, one class each, in label order
            (``attnkit.data.tasks.text_classification.available_families()`` lists them).
    """

    name = "text_classification"
    kind = "classification"
    vocab_size = BYTE_VOCAB_SIZE

    def __init__(self, *, length: int = 4096, families: tuple[str, ...] = FAMILIES) -> None:
        check_range("length", length, "length", length)
        if (
            not isinstance(families, (list, tuple))
            or not all(isinstance(f, str) and f.isidentifier() for f in families)
            or len(set(families)) != len(families)
            or len(families) < 2
        ):
            raise ValueError(
                f"families must be a list of at least two distinct package names, got {families!r} "
                f"(for example {list(FAMILIES)!r})"
            )
        self.length = length
        self.families = tuple(families)
        self.num_classes = len(self.families)
        self.files: list[dict[str, tuple[Path, ...]]] = [self._split(f) for f in self.families]

    def _split(self, family: str) -> dict[str, tuple[Path, ...]]:
        files = family_files(family)
        if len(files) < len(SPLITS):
            raise ValueError(
                f"family {family!r} has {len(files)} non-test source files of at least {MIN_FILE_BYTES} bytes "
                f"under {stdlib_root()}, and a class needs at least {len(SPLITS)} (one per split); "
                "choose among (files): " + ", ".join(f"{n} ({c})" for n, c in available_families().items())
            )
        return split_family(files)

    @property
    def max_length(self) -> int:
        return self.length

    def options(self) -> dict[str, Any]:
        return {"length": self.length, "families": list(self.families)}

    def draw(self, rng: random.Random, split: str) -> Example:
        label = rng.randrange(len(self.families))
        path = rng.choice(self.files[label][split])
        offset = rng.randrange(max(1, path.stat().st_size - self.length + 1))
        return Example(input_ids=byte_ids(read_window(path, offset, self.length)), label=label)
