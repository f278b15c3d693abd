"""``attnkit advise --data FILE``: a short quality arena on your own data.

Two formats, told apart by the file's suffix:

- ``.jsonl`` / ``.ndjson``: one ``{"text": ..., "label": ...}`` object per line, byte-level
  classification (labels are strings, integers or booleans, mapped to class ids in sorted order; other
  keys are ignored and reported). A text longer than the training length is cut to its first
  ``length`` bytes; shorter ones are padded (the attention mask marks the padding).
- anything else: plain UTF-8 text, byte-level language modelling scored in bits per
  character (per UTF-8 byte; one byte is one character in ASCII text).

Every mechanism trains the same small model (:func:`attnkit.arena.quality.build_model`, as the
arena's quality cells: width 64, 2 layers, rotary positions, the token shift) from the same
seed on the same batches through :func:`attnkit.train.loop_api.train_on_batches`, then is
scored on a held-out split: a stratified 20% of the examples (at least one of each label with
two or more examples), or the last 10% of the text. The no-context baseline is the majority
class, or a unigram byte model (add-one smoothed) fit on the training split.

The figure's spread is the standard error of the held-out score (over examples, or over
held-out windows of text), so two mechanisms within each other's spread tie on quality.

Budget: :data:`DEFAULT_STEPS` steps of :data:`BATCH_SIZE` sequences of :data:`DEFAULT_LENGTH`
bytes per mechanism, on one CPU thread. Measured on the 2-core development machine with all 19
registered mechanisms on a 232-example file, the whole ``attnkit advise --data`` command
(training, then the speed measurements) took 3 min 21 s of CPU time (the slow approximate
mechanisms dominate), which was 9 min 54 s of wall time under a load average of 10. ``--mechanisms`` narrows the field; ``--data-steps`` and
``--data-length`` trade time for a sharper answer.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

import attnkit
from attnkit.arena.config import ArenaConfig
from attnkit.arena.quality import UNMASKED_NOTE, build_model, maskable, quality_options
from attnkit.arena.task_facts import QualityFigure, TaskFacts
from attnkit.arena.tasks import QualityTask
from attnkit.core.errors import check_positive_int
from attnkit.data.tasks import IGNORE_INDEX, Batch, Example, collate
from attnkit.data.tasks.corpus import BYTE_VOCAB_SIZE, byte_ids
from attnkit.train.loop_api import train_on_batches
from attnkit.train.modeling import forward

#: Training steps per mechanism (one batch each).
DEFAULT_STEPS = 100
#: Bytes per training sequence.
DEFAULT_LENGTH = 128
#: Sequences per training batch.
BATCH_SIZE = 16
#: Fewest labelled examples worth a train/held-out split.
MIN_EXAMPLES = 10
#: Held-out examples (or windows of text) scored per mechanism, at most.
MAX_EVAL = 512
#: AdamW learning rates (the arena's: ListOps' for classification, its LM task's for text).
LEARNING_RATES = {"classification": 3e-3, "lm": 1e-2}
#: Suffixes read as JSONL; every other file is plain text.
JSONL_SUFFIXES = (".jsonl", ".ndjson")


@dataclass(frozen=True)
class UserData:
    """A validated ``--data`` file.

    Attributes:
        path: the file.
        kind: ``"classification"`` (JSONL) or ``"lm"`` (plain text).
        texts: each example's UTF-8 bytes (classification) or the whole file (``lm``, one entry).
        labels: each example's class id (classification; empty for ``lm``).
        label_names: class id -> the label as written in the file.
        ignored_keys: JSONL keys other than ``text`` and ``label`` (reported, not used).
    """

    path: Path
    kind: Literal["classification", "lm"]
    texts: tuple[bytes, ...]
    labels: tuple[int, ...] = ()
    label_names: tuple[str, ...] = ()
    ignored_keys: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for the printed answer: what was read."""
        if self.kind == "lm":
            return f"{self.path}: {len(self.texts[0]):,} bytes of text, character-level language modelling (bpc)"
        counts = Counter(self.labels)
        labels = ", ".join(f"{self.label_names[i]} ({counts[i]})" for i in range(len(self.label_names)))
        line = f"{self.path}: {len(self.texts)} examples, byte-level classification over {labels}"
        return line + (f"; ignored keys: {', '.join(self.ignored_keys)}" if self.ignored_keys else "")


def read_user_data(path: Path | str) -> UserData:
    """Read and validate a ``--data`` file (format by suffix, see the module docstring).

    Raises:
        FileNotFoundError: no such file.
        ValueError: an empty file, text that is not UTF-8, a JSONL line that is not an object
            with ``text`` and ``label`` (with its line number), a single label, too few examples.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    raw = path.read_bytes()
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"--data {path} is not UTF-8 text: byte 0x{raw[err.start]:02x} at offset {err.start} (line {line}); "
            "convert it first (e.g. iconv -f latin1 -t utf-8)"
        ) from err
    if not content.strip():
        raise ValueError(f'--data {path} is empty: give a JSONL file of {{"text", "label"}} lines or plain text')
    if path.suffix.lower() in JSONL_SUFFIXES:
        return _read_jsonl(path, content)
    return UserData(path, "lm", (content.encode("utf-8"),))


def _read_jsonl(path: Path, content: str) -> UserData:
    texts: list[bytes] = []
    raw_labels: list[str] = []
    extra: set[str] = set()
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        at = f"--data {path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f'{at} is not JSON ({err.msg}); each line must be {{"text": ..., "label": ...}}') from err
        if not isinstance(row, dict):
            raise ValueError(f'{at} is a {type(row).__name__}, not an object {{"text": ..., "label": ...}}')
        missing = [key for key in ("text", "label") if key not in row]
        if missing:
            raise ValueError(
                f'{at}: missing key(s) {", ".join(map(repr, missing))} (each line needs "text" and "label")'
            )
        text, label = row["text"], row["label"]
        if not isinstance(text, str) or not text:
            raise ValueError(f'{at}: "text" must be a non-empty string, got {text!r}')
        if not isinstance(label, (str, int)):  # bool is an int: true/false labels are fine
            raise ValueError(f'{at}: "label" must be a string, an integer or a boolean, got {label!r}')
        texts.append(text.encode("utf-8"))
        raw_labels.append(json.dumps(label) if isinstance(label, bool) else str(label))
        extra |= set(row) - {"text", "label"}
    names = sorted(set(raw_labels), key=lambda s: (not s.lstrip("-").isdigit(), _natural(s)))
    if len(names) < 2:
        raise ValueError(
            f"--data {path}: every example has label {names[0]!r}; classification needs at least two labels"
        )
    if len(texts) < MIN_EXAMPLES:
        raise ValueError(
            f"--data {path} has {len(texts)} examples; a train/held-out split needs at least {MIN_EXAMPLES}"
        )
    ids = {name: i for i, name in enumerate(names)}
    labels = tuple(ids[label] for label in raw_labels)
    return UserData(path, "classification", tuple(texts), labels, tuple(names), tuple(sorted(extra)))


def _natural(label: str) -> tuple[int, str]:
    """Integers in numeric order (``2`` before ``10``), other labels alphabetically."""
    return (int(label), "") if label.lstrip("-").isdigit() else (0, label)


@dataclass(frozen=True)
class DataSplits:
    """Batches every mechanism trains and is scored on (the same for all of them).

    Attributes:
        task: the model's task description (vocabulary, outputs, kind, metric, learning rate).
        train: ``steps`` training batches.
        held_out: the held-out batches; each row is one scored unit (example or window).
        baseline: the no-context score on the held-out split.
    """

    task: QualityTask
    train: list[Batch]
    held_out: list[Batch]
    baseline: float


def make_splits(data: UserData, *, steps: int, length: int, seed: int = 0) -> DataSplits:
    """Train and held-out batches of ``length`` bytes, and the no-context baseline.

    Raises:
        ValueError: a bad ``steps``/``length``, or text too short for ``length``.
    """
    check_positive_int("data_steps", steps, example=DEFAULT_STEPS)
    check_positive_int("data_length", length, example=DEFAULT_LENGTH)
    rng = random.Random(seed)
    if data.kind == "classification":
        return _classification_splits(data, steps, length, rng)
    return _lm_splits(data, steps, length, rng)


def _classification_splits(data: UserData, steps: int, length: int, rng: random.Random) -> DataSplits:
    examples = [Example(byte_ids(t[:length]), label=y) for t, y in zip(data.texts, data.labels)]
    train: list[Example] = []
    held_out: list[Example] = []
    for label in range(len(data.label_names)):  # stratified: every label with 2+ examples is scored
        members = [e for e in examples if e.label == label]
        rng.shuffle(members)
        cut = max(1, round(0.2 * len(members))) if len(members) > 1 else 0
        held_out += members[:cut]
        train += members[cut:]
    rng.shuffle(held_out)  # so a cap at MAX_EVAL keeps every label
    held_out = held_out[:MAX_EVAL]
    batches = [collate([rng.choice(train) for _ in range(BATCH_SIZE)]) for _ in range(steps)]
    majority = Counter(e.label for e in train).most_common(1)[0][0]
    baseline = sum(e.label == majority for e in held_out) / len(held_out)
    task = QualityTask(
        "classification",
        length,
        BYTE_VOCAB_SIZE,
        len(data.label_names),
        "classification",
        "accuracy",
        LEARNING_RATES["classification"],
    )
    return DataSplits(task, batches, _chunks(held_out), baseline)


def _lm_splits(data: UserData, steps: int, length: int, rng: random.Random) -> DataSplits:
    text = data.texts[0]
    cut = int(0.9 * len(text))
    train_text, held_text = text[:cut], text[cut:]
    window = length + 1  # inputs and next-byte targets
    if len(held_text) < window or len(train_text) < window:
        raise ValueError(
            f"--data {data.path} has {len(text):,} bytes; language modelling at --data-length {length} needs at least "
            f"{10 * window:,} (its last 10% is held out and must hold one window): give more text or a shorter --data-length"
        )

    def lm_example(chunk: bytes) -> Example:
        ids = byte_ids(chunk)
        return Example(ids[:-1], labels=ids[1:])

    def train_batch() -> Batch:
        starts = [rng.randrange(len(train_text) - window + 1) for _ in range(BATCH_SIZE)]
        return collate([lm_example(train_text[s : s + window]) for s in starts])

    starts = range(0, len(held_text) - window + 1, window)[:MAX_EVAL]  # disjoint held-out windows
    held_out = [lm_example(held_text[s : s + window]) for s in starts]
    # unigram over the 256 byte values, add-one smoothed, fit on the training text, scored on the same targets
    counts = Counter(train_text)
    total = len(train_text) + 256
    scored = b"".join(held_text[s + 1 : s + window] for s in starts)
    baseline = -sum(math.log2((counts[b] + 1) / total) for b in scored) / len(scored)
    task = QualityTask("lm", length, BYTE_VOCAB_SIZE, BYTE_VOCAB_SIZE, "lm", "bits_per_char", LEARNING_RATES["lm"])
    return DataSplits(task, [train_batch() for _ in range(steps)], _chunks(held_out), baseline)


def _chunks(examples: list[Example]) -> list[Batch]:
    return [collate(examples[i : i + BATCH_SIZE]) for i in range(0, len(examples), BATCH_SIZE)]


@dataclass
class DataRun:
    """Every mechanism's held-out score on the user's data.

    Attributes:
        data: the file that was read.
        splits: what was trained and scored.
        facts: the scores as quality facts for :func:`attnkit.arena.advisor.decide`.
        notes: per mechanism, a caveat on its figure (e.g. padding it could not mask).
        seconds: training wall time per mechanism.
    """

    data: UserData
    splits: DataSplits
    facts: TaskFacts
    notes: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def run_data_arena(
    data: UserData,
    mechanisms: list[str],
    *,
    steps: int = DEFAULT_STEPS,
    length: int = DEFAULT_LENGTH,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> DataRun:
    """Train and score the same small model with each mechanism on ``data``.

    Mechanisms that cannot sit the task (no causal mode for language modelling) or that
    raise get no figure, with the reason in ``facts.notes``.

    Raises:
        ValueError: bad settings, or text too short for ``length``.
    """
    import time

    splits = make_splits(data, steps=steps, length=length, seed=seed)
    cfg = ArenaConfig.preset(
        "default", task_length=length, train_steps=steps, batch_size=BATCH_SIZE, seed=seed, device=device
    )
    metric = "accuracy" if splits.task.metric == "accuracy" else "bpc"
    facts = TaskFacts(data.path.name, metric, metric == "accuracy", splits.baseline, length, {}, "your data")
    run = DataRun(data, splits, facts)
    threads = torch.get_num_threads()
    if not device.startswith("cuda"):
        torch.set_num_threads(1)  # as the arena's quality cells: a model this small only contends with more
    try:
        with tqdm(mechanisms, desc="train on --data", unit="mechanism", disable=not progress) as bar:
            for name in bar:
                bar.set_postfix_str(name)
                started = time.perf_counter()
                outcome = _train_one(name, splits, cfg)
                run.seconds[name] = round(time.perf_counter() - started, 2)
                if isinstance(outcome, str):
                    facts.notes[name] = outcome
                    continue
                facts.figures[name] = outcome
                if not attnkit.attention_capabilities(name).key_padding and _has_padding(splits):
                    run.notes[name] = UNMASKED_NOTE
    finally:
        torch.set_num_threads(threads)
    return run


def _has_padding(splits: DataSplits) -> bool:
    return any(not bool(b.attention_mask.all()) for b in [*splits.train, *splits.held_out])


def _train_one(name: str, splits: DataSplits, cfg: ArenaConfig) -> QualityFigure | str:
    """The held-out figure of mechanism ``name``, or why it has none."""
    caps = attnkit.attention_capabilities(name)
    if splits.task.causal and not caps.causal:
        return "no causal mode, which language modelling needs"
    device = torch.device(cfg.device)
    try:
        model = build_model(name, quality_options(name, cfg), splits.task, cfg).to(device)
        train_on_batches(
            model,
            maskable(splits.train, caps.key_padding),
            lr=splits.task.learning_rate,
            warmup_steps=max(1, cfg.train_steps // 10),
            min_lr_ratio=1.0,  # constant after warm-up, as the arena's quality cells train
            device=device,
        )
        units = _score_units(model, maskable(splits.held_out, caps.key_padding), device)
    except (RuntimeError, ValueError, TypeError) as err:
        return f"raised {type(err).__name__}: {str(err).strip()[:200]}"
    mean = sum(units) / len(units)
    # standard error of the mean over held-out units: the noise of scoring on this many examples
    variance = sum((u - mean) ** 2 for u in units) / max(1, len(units) - 1)
    return QualityFigure(mean, math.sqrt(variance / len(units)), (mean,))


@torch.no_grad()
def _score_units(model: torch.nn.Module, batches: list[Batch], device: torch.device) -> list[float]:
    """Per held-out row: 1/0 for a correct/wrong class, or the row's bits per byte."""
    model.eval()
    units: list[float] = []
    for batch in batches:
        batch = batch.to(device)
        logits = forward(model, batch)  # (B, C) or (B, T, V)
        if logits.dim() == 2:
            units += (logits.argmax(-1) == batch.labels).double().tolist()
            continue
        keep = batch.labels != IGNORE_INDEX  # (B, T)
        nll = F.cross_entropy(logits.transpose(1, 2), batch.labels.clamp(min=0), reduction="none")  # (B, T)
        bits = (nll * keep).sum(1) / keep.sum(1) / math.log(2)
        units += bits.double().tolist()
    return units


def data_summary(run: DataRun) -> dict[str, Any]:
    """A JSON-ready summary of the data run (for ``--json``)."""
    return {
        "file": str(run.data.path),
        "kind": run.data.kind,
        "labels": list(run.data.label_names),
        "train_batches": len(run.splits.train),
        "held_out_rows": sum(b.size for b in run.splits.held_out),
        "baseline": run.facts.baseline,
        "train_seconds": run.seconds,
        "notes": {**run.facts.notes, **run.notes},
    }
