"""One entry point from a task name or data path to streams the trainer can use.

:func:`build_data` returns a :class:`TrainingData`: the task kind, the vocabulary and class
counts the model must be built with, a resumable training stream and fixed evaluation sets.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnkit.data.batching import ExampleStream, ShuffledStream, TaskStream
from attnkit.data.catalogs import corpus_file, gettext_locale
from attnkit.data.docstrings import TASK_NAME as DOCSTRINGS
from attnkit.data.docstrings import corpus_file as docstring_corpus
from attnkit.data.objectives import OBJECTIVES, MaskedLM, ObjectiveStream, SpanCorruption, make_objective
from attnkit.data.sources import JsonlDataset, TextChunkStream, stdlib_files, text_files
from attnkit.data.tasks import TASK_NAMES, Example, Task, TaskKind, make_task
from attnkit.data.tasks.base import check_split
from attnkit.data.tokenizers import BOS_ID, EOS_ID, PAD_ID, BPETokenizer, ByteTokenizer, load_tokenizer, make_tokenizer

Tokenizer = ByteTokenizer | BPETokenizer


@dataclass
class TrainingData:
    """The data side of a training run.

    Attributes:
        name: the task name or data path.
        kind: ``"classification"``, ``"lm"`` or ``"seq2seq"``.
        vocab_size: token ids the model must embed.
        num_classes: classes (classification only).
        max_length: longest sequence the model will see.
        task: the synthetic task (None for real data).
        tokenizer: the tokenizer (None for synthetic tasks).
        seed: data seed.
    """

    name: str
    kind: TaskKind
    vocab_size: int
    num_classes: int | None
    max_length: int
    task: Task | None
    tokenizer: Tokenizer | None
    seed: int
    _files: dict[str, list[Path]] | None = None
    _jsonl: Path | None = None
    _seq_len: int = 256
    pad_id: int = PAD_ID
    bos_id: int | None = None
    eos_id: int | None = None
    objective: MaskedLM | SpanCorruption | None = None

    def stream(self, split: str = "train", *, loop: bool = True) -> ExampleStream:
        """A resumable stream over ``split`` (infinite for synthetic tasks and for ``loop=True``)."""
        inner = self._text_stream(split, loop=loop)
        if self.objective is None:
            return inner
        return ObjectiveStream(inner, self.objective, seed=self.seed, split=split)

    def _text_stream(self, split: str, *, loop: bool) -> ExampleStream:
        check_split(split)
        if self.task is not None:
            return TaskStream(self.task, seed=self.seed, split=split)
        assert self.tokenizer is not None
        if self._jsonl is not None:
            dataset = JsonlDataset(self._jsonl, self.tokenizer, split=split, max_length=self._seq_len)
            if len(dataset) == 0:
                raise ValueError(
                    f"{self._jsonl}: no records in the {split!r} split (records go to train/validation/test by "
                    "a hash of the line, 80/10/10, unless they carry a 'split' field)"
                )
            return ShuffledStream(dataset, seed=self.seed, loop=loop, shuffle=split == "train")
        assert self._files is not None
        files = self._files[split] if split in self._files else self._files["all"]
        window_split = None if split in self._files else split
        return TextChunkStream(
            files, self.tokenizer, seq_len=self._seq_len, seed=self.seed, loop=loop, split=window_split
        )

    def eval_examples(self, split: str = "validation", count: int = 256) -> list[Example]:
        """The first ``count`` distinct examples of ``split`` (a fixed evaluation set)."""
        if self.task is not None:
            return self.task.examples(count, seed=self.seed, split=split, unique=True)
        return list(itertools.islice(self.stream(split, loop=False), count))

    def decode(self, ids: list[int]) -> str:
        """Token ids as text (for BLEU/ROUGE and samples; an objective's extra tokens are dropped)."""
        if self.tokenizer is not None:
            return self.tokenizer.decode([i for i in ids if i < self.tokenizer.vocab_size])
        assert self.task is not None
        return self.task.decode(ids)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (logged at the start of training)."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "vocab_size": self.vocab_size}
        if self.num_classes is not None:
            out["num_classes"] = self.num_classes
        if self.task is not None:
            out["options"] = self.task.options()
        else:
            out["tokenizer"] = "byte" if isinstance(self.tokenizer, ByteTokenizer) else "bpe"
        if self.objective is not None:
            out["objective"] = type(self.objective).__name__
        return out


def _jsonl_texts(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                yield from (
                    record[k] for k in ("text", "text_pair", "source", "target") if isinstance(record.get(k), str)
                )


def _tokenizer(
    name: str,
    vocab_size: int,
    directory: str | os.PathLike[str] | None,
    files: list[Path] | None,
    *,
    jsonl: Path | None = None,
) -> Tokenizer:
    """The tokenizer saved in ``directory``, else a new one (BPE trains on the training text)."""
    if directory is not None and (Path(directory) / "tokenizer.json").is_file():
        return load_tokenizer(directory)
    texts: Iterator[str] | None = None
    if name == "bpe" and jsonl is not None:
        texts = _jsonl_texts(jsonl)
    elif name == "bpe" and files is not None:
        # A few hundred files are plenty to learn merges and keep start-up to seconds.
        texts = (f.read_text(encoding="utf-8", errors="replace") for f in files[:400])
    return make_tokenizer(name, texts, vocab_size=vocab_size)


def build_data(
    task: str,
    *,
    objective: str = "causal",
    objective_options: dict[str, Any] | None = None,
    **options: Any,
) -> TrainingData:
    """Build the data for ``task`` (see :func:`build_task_data`), turned into ``objective``'s examples.

    Args:
        task: see :func:`build_task_data`.
        objective: ``"causal"`` (the task as it is), ``"mlm"`` (BERT masked LM of a
            language-modelling corpus: a bidirectional encoder task) or ``"span"`` (T5 span
            corruption: an encoder-decoder task); see :mod:`attnkit.data.objectives`.
        objective_options: the objective's settings (``mask_prob``, ... for mlm;
            ``noise_density``, ``mean_span_length``, ... for span).
        **options: :func:`build_task_data`'s keyword arguments.

    Raises:
        ValueError: for an unknown objective, options it does not take, or a task that is not a
            language-modelling corpus.
    """
    data = build_task_data(task, **options)
    if objective == "causal":
        if objective_options:
            raise ValueError(f"objective_options apply to the mlm and span objectives, not to objective={objective!r}")
        return data
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if data.kind != "lm" or data.tokenizer is None:
        raise ValueError(
            f"objective={objective!r} turns a language-modelling corpus into training examples; task {task!r} is a "
            f"{data.kind} task (use task = 'text', a folder of text files or a JSONL file of 'text' records)"
        )
    transform = make_objective(objective, data.tokenizer.vocab_size, objective_options or {})
    if isinstance(transform, MaskedLM):
        return dataclasses.replace(
            data, kind="mlm", vocab_size=transform.vocab_size, max_length=data.max_length + 1, objective=transform
        )
    return dataclasses.replace(
        data,
        kind="seq2seq",
        vocab_size=transform.vocab_size,
        max_length=data.max_length + 1,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        objective=transform,
    )


def build_task_data(
    task: str,
    *,
    task_options: dict[str, Any] | None = None,
    seq_len: int = 256,
    tokenizer: str = "byte",
    tokenizer_vocab_size: int = 4096,
    seed: int = 0,
    tokenizer_dir: str | os.PathLike[str] | None = None,
) -> TrainingData:
    """Build the data for ``task``.

    Args:
        task: a synthetic task name, ``"text"`` (the standard-library corpus),
            ``"gettext:LOCALE"`` (English→LOCALE pairs from the machine's message catalogs,
            :mod:`attnkit.data.catalogs`), ``"docstrings"`` (summarization: standard-library code →
            its docstring's summary, :mod:`attnkit.data.docstrings`), or a path to a ``.jsonl`` file, a text file or a
            directory of text files.
        task_options: the synthetic task's options.
        seq_len: text window length / JSONL truncation length.
        tokenizer: ``"byte"`` or ``"bpe"`` for real data.
        tokenizer_vocab_size: BPE vocabulary size.
        seed: data seed.
        tokenizer_dir: load the tokenizer saved there if present (a resumed or evaluated run
            must use the exact tokenizer it was trained with).

    Raises:
        ValueError: for options that do not fit the task.
        FileNotFoundError: for a data path that does not exist.
    """
    if task in TASK_NAMES:
        t = make_task(task, **(task_options or {}))
        seq2seq = t.kind == "seq2seq"
        return TrainingData(
            name=task,
            kind=t.kind,
            vocab_size=t.vocab_size,
            num_classes=t.num_classes,
            max_length=t.max_length,
            task=t,
            tokenizer=None,
            seed=seed,
            bos_id=1 if seq2seq else None,
            eos_id=2 if seq2seq else None,
        )
    if task_options:
        raise ValueError(f"task_options only apply to synthetic tasks ({', '.join(TASK_NAMES)}), not {task!r}")
    if task == "text":
        files = {split: stdlib_files(split) for split in ("train", "validation", "test")}
    else:
        locale = gettext_locale(task)
        if locale is not None:
            path = corpus_file(locale)
        elif task == DOCSTRINGS:
            path = docstring_corpus()
        else:
            path = Path(task)
        if path.suffix == ".jsonl":
            tok = _tokenizer(tokenizer, tokenizer_vocab_size, tokenizer_dir, None, jsonl=path)
            probe = JsonlDataset(path, tok, split="train", max_length=seq_len)
            return TrainingData(
                name=task if locale is not None or task == DOCSTRINGS else str(path),
                kind=probe.kind,
                vocab_size=tok.vocab_size,
                num_classes=probe.num_classes,
                max_length=seq_len + 1,
                task=None,
                tokenizer=tok,
                seed=seed,
                _jsonl=path,
                _seq_len=seq_len,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
            )
        found = text_files(path)
        files = {"all": found} if len(found) < 10 else _split_files(found)
    tok = _tokenizer(tokenizer, tokenizer_vocab_size, tokenizer_dir, files.get("train", files.get("all")))
    return TrainingData(
        name=task,
        kind="lm",
        vocab_size=tok.vocab_size,
        num_classes=None,
        max_length=seq_len,
        task=None,
        tokenizer=tok,
        seed=seed,
        _files=files,
        _seq_len=seq_len,
    )


def _split_files(files: list[Path]) -> dict[str, list[Path]]:
    from attnkit.data.sources import hash_split

    out: dict[str, list[Path]] = {"train": [], "validation": [], "test": []}
    for f in files:
        out[hash_split(f.name)].append(f)
    if not all(out.values()):
        return {"all": files}
    return out
