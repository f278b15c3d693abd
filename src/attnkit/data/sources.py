"""Real-data sources, streamed: text files (language modelling) and JSONL records.

* :func:`stdlib_files` is the built-in corpus that needs no download: the running
  interpreter's standard-library ``.py`` files (about 30 MB), split deterministically into
  train/validation/test by a hash of each file's path relative to the library root.
* :class:`TextChunkStream` tokenizes files one at a time and cuts them into windows of
  ``seq_len + 1`` tokens (inputs and next-token targets); nothing is held but one file.
* :class:`JsonlDataset` indexes a JSONL file by byte offsets in one streaming pass (which
  also validates every record, so a bad line fails before training with its file and line)
  and reads records on demand. Fields: ``text`` (language modelling), ``text`` + ``label``
  (+ optional ``text_pair``) (classification), ``source`` + ``target`` (seq2seq), or
  ``context`` (a list of turns, oldest first) + ``response`` (dialogue: a seq2seq task whose
  input is the most recent turns that fit, joined by ``<sep>``; :func:`truncate_history`).
  An optional ``split`` field places a record; otherwise a hash of the line does (80/10/10).

Every stream is an iterator of :class:`~attnkit.data.tasks.Example` with ``state_dict()`` /
``load_state_dict()`` so training resumes at the exact example.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from attnkit.data.tasks.base import Example, TaskKind, check_split
from attnkit.data.tokenizers import BOS_ID, EOS_ID, SEP_ID, Tokenizer

_SPLIT_EDGES = {"train": (0, 80), "validation": (80, 90), "test": (90, 100)}


def hash_split(key: str) -> str:
    """The split owning ``key`` (80% train, 10% validation, 10% test), stable across machines."""
    bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % 100
    return next(name for name, (lo, hi) in _SPLIT_EDGES.items() if lo <= bucket < hi)


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(split: str) -> list[Path]:
    """The standard-library ``.py`` files of ``split``, sorted (installed packages excluded)."""
    check_split(split)
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        if hash_split(rel) == split:
            files.append(path)
    if not files:
        raise FileNotFoundError(f"no standard-library .py files found under {root}")
    return files


def text_files(path: str | os.PathLike[str]) -> list[Path]:
    """A text file itself, or the ``.txt``/``.md``/``.py`` files under a directory, sorted."""
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".md", ".py"))
        if files:
            return files
        raise ValueError(f"{p}: directory has no .txt, .md or .py files to train on")
    raise FileNotFoundError(f"data path {p} does not exist")


class TextChunkStream:
    """Token windows cut from text files, for language modelling.

    Each epoch visits the files in a seeded order; each file becomes consecutive windows of
    ``seq_len + 1`` tokens overlapping by one (the input and its shifted targets); a shorter
    tail window is kept. With ``split`` set, only windows whose ``(file, index)`` hash lands in
    that split are used (for a single file that cannot be split by file).

    Args:
        files: text files (read as UTF-8, undecodable bytes replaced).
        tokenizer: any :class:`~attnkit.data.tokenizers.Tokenizer`.
        seq_len: model input length ``T``.
        seed: shuffles the file order per epoch.
        loop: start a new epoch at the end (training) or stop (evaluation).
        split: optional window-level split filter.
    """

    def __init__(
        self,
        files: Sequence[Path],
        tokenizer: Tokenizer,
        *,
        seq_len: int,
        seed: int = 0,
        loop: bool = True,
        split: str | None = None,
    ) -> None:
        if not files:
            raise ValueError("TextChunkStream needs at least one file")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.files = list(files)
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.seed = seed
        self.loop = loop
        self.split = None if split is None else check_split(split)
        self.epoch, self.file_index, self.chunk_index = 0, 0, 0
        self._cached: tuple[int, int, list[Example]] | None = None

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.files)))
        random.Random(f"attnkit:text:{self.seed}:{epoch}").shuffle(order)
        return order

    def _chunks(self, epoch: int, position: int) -> list[Example]:
        if self._cached is not None and self._cached[:2] == (epoch, position):
            return self._cached[2]
        path = self.files[self._order(epoch)[position]]
        ids = self.tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
        chunks = []
        for k, begin in enumerate(range(0, max(len(ids) - 1, 0), self.seq_len)):
            if self.split is not None and hash_split(f"{path.name}:{k}") != self.split:
                continue
            window = ids[begin : begin + self.seq_len + 1]
            chunks.append(Example(input_ids=tuple(window[:-1]), labels=tuple(window[1:])))
        self._cached = (epoch, position, chunks)
        return chunks

    def __iter__(self) -> Iterator[Example]:
        return self

    def __next__(self) -> Example:
        empty_files = 0
        while True:
            chunks = self._chunks(self.epoch, self.file_index)
            if self.chunk_index < len(chunks):
                self.chunk_index += 1
                return chunks[self.chunk_index - 1]
            empty_files = empty_files + 1 if not chunks else 0
            self.file_index, self.chunk_index = self.file_index + 1, 0
            if self.file_index == len(self.files):
                if not self.loop:
                    raise StopIteration
                if empty_files >= len(self.files):
                    raise ValueError(f"no text windows in {len(self.files)} files (all empty for this split?)")
                self.epoch, self.file_index = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "file_index": self.file_index, "chunk_index": self.chunk_index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.file_index, self.chunk_index = state["epoch"], state["file_index"], state["chunk_index"]


def _record_error(path: Path, line: int, message: str) -> ValueError:
    return ValueError(f"{path}, line {line}: {message}")


def _record_format(record: dict[str, Any]) -> str:
    if "context" in record or "response" in record:
        return "dialogue"
    if "source" in record or "target" in record:
        return "seq2seq"
    return "classification" if "label" in record else "lm"


#: The fields each record format needs; a dialogue is a sequence-to-sequence task.
_REQUIRED: dict[str, tuple[str, ...]] = {
    "lm": ("text",),
    "classification": ("text", "label"),
    "seq2seq": ("source", "target"),
    "dialogue": ("context", "response"),
}
_KIND_OF_FORMAT: dict[str, TaskKind] = {"lm": "lm", "classification": "classification", "seq2seq": "seq2seq"}


def truncate_history(turns: Sequence[Sequence[int]], limit: int, *, separator: int = SEP_ID) -> list[int]:
    """The most recent dialogue turns that fit in ``limit`` tokens, joined by ``separator``.

    Whole turns are dropped from the oldest end until the rest (with one separator between
    turns) fits; when even the last turn is longer than ``limit``, its last ``limit`` tokens are
    kept (the end of a turn is what the response answers).
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    kept: list[Sequence[int]] = []
    used = 0
    for turn in reversed(turns):
        cost = len(turn) + (1 if kept else 0)
        if used + cost > limit:
            break
        kept.append(turn)
        used += cost
    if not kept:
        return list(turns[-1][-limit:]) if turns else []
    out: list[int] = []
    for i, turn in enumerate(reversed(kept)):
        if i:
            out.append(separator)
        out.extend(turn)
    return out


class JsonlDataset:
    """Random access to the records of one split of a JSONL file, holding only byte offsets.

    Args:
        path: the ``.jsonl`` file.
        tokenizer: encodes the text fields.
        split: which records to expose.
        max_length: inputs are truncated to this many tokens.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: naming the file and line of the first bad record (invalid JSON, not an
            object, missing or mistyped fields, a kind different from the first record's).
    """

    def __init__(self, path: str | os.PathLike[str], tokenizer: Tokenizer, *, split: str, max_length: int) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"data file {self.path} does not exist")
        self.tokenizer = tokenizer
        self.split = check_split(split)
        self.max_length = max_length
        self.kind: TaskKind = "lm"
        self.format = "lm"
        self.num_classes: int | None = None
        self.offsets: list[int] = []
        self._index()

    def _index(self) -> None:
        kind: str | None = None
        top_label = -1
        with self.path.open("rb") as f:
            line_no, offset = 0, 0
            for raw in f:
                line_no += 1
                start, offset = offset, offset + len(raw)
                if not raw.strip():
                    continue
                record = self._parse(raw, line_no)
                this = _record_format(record)
                kind = kind or this
                if this != kind:
                    raise _record_error(
                        self.path, line_no, f"a {this} record in a {kind} file (fields {sorted(record)})"
                    )
                self._check_fields(record, kind, line_no)
                if kind == "classification":
                    top_label = max(top_label, record["label"])
                split = record.get("split") or hash_split(raw.decode("utf-8", errors="replace"))
                if split not in _SPLIT_EDGES:
                    raise _record_error(self.path, line_no, f"split must be train, validation or test, got {split!r}")
                if split == self.split:
                    self.offsets.append(start)
        if kind is None:
            raise ValueError(f"{self.path}: no records (expected one JSON object per line)")
        self.format = kind
        self.kind = _KIND_OF_FORMAT.get(kind, "seq2seq")
        self.num_classes = top_label + 1 if kind == "classification" else None

    def _parse(self, raw: bytes, line_no: int) -> dict[str, Any]:
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise _record_error(self.path, line_no, f"invalid JSON: {err}") from err
        if not isinstance(record, dict):
            raise _record_error(self.path, line_no, f"expected a JSON object, got {type(record).__name__}")
        return record

    def _check_fields(self, record: dict[str, Any], kind: str, line_no: int) -> None:
        for name in (*_REQUIRED[kind], *(("text_pair",) if "text_pair" in record else ())):
            if name not in record:
                raise _record_error(
                    self.path, line_no, f"missing field {name!r} (a {kind} record needs {_REQUIRED[kind]})"
                )
            if name == "context":
                turns = record[name]
                if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
                    raise _record_error(
                        self.path,
                        line_no,
                        f"field 'context' must be a non-empty list of strings (the turns), got {turns!r}",
                    )
            elif name != "label" and not isinstance(record[name], str):
                raise _record_error(self.path, line_no, f"field {name!r} must be a string, got {record[name]!r}")
        if kind == "classification":
            label = record["label"]
            if isinstance(label, bool) or not isinstance(label, int) or label < 0:
                raise _record_error(self.path, line_no, f"field 'label' must be an integer >= 0, got {label!r}")

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index: int) -> Example:
        with self.path.open("rb") as f:
            f.seek(self.offsets[index])
            record = json.loads(f.readline())
        encode, limit = self.tokenizer.encode, self.max_length
        if self.kind == "classification":
            ids = encode(record["text"])
            if "text_pair" in record:
                ids = [*ids, SEP_ID, *encode(record["text_pair"])]
            return Example(input_ids=tuple(ids[:limit] or [SEP_ID]), label=int(record["label"]))
        if self.kind == "seq2seq":
            dialogue = self.format == "dialogue"
            target = encode(record["response" if dialogue else "target"])[: limit - 1]
            source = (
                truncate_history([encode(turn) for turn in record["context"]], limit)
                if dialogue
                else encode(record["source"])[:limit]
            )
            return Example(
                input_ids=tuple(source or [SEP_ID]),
                decoder_input_ids=(BOS_ID, *target),
                labels=(*target, EOS_ID),
            )
        ids = [BOS_ID, *encode(record["text"])[: limit - 1], EOS_ID]
        return Example(input_ids=tuple(ids[:-1]), labels=tuple(ids[1:]))
