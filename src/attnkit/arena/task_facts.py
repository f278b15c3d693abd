"""Measured task quality for the advisor: the quality suite's facts file, its schema, the task names.

``attnkit advise --task recall`` weighs each mechanism's quality on a task, as the quality
suite (``attnkit arena --suite quality``) measured it. The suite's results reach the advisor
as one JSON document (the default ships as package data, :func:`default_facts_path`)::

    {"suite": "quality", "meta": {...},
     "tasks": {TASK: {"metric": "accuracy" | "bpc", "higher_is_better": bool,
                      "baseline": float, "length": int,
                      "mechanisms": {MECH: {"mean": float, "spread": float, "seeds": [float, ...],
                                            "state_bytes": int | null, "step_ms": float}}}}}

``TASK`` is one of :data:`SUITE_TASKS`, or a variant of one (``mqar@pairs=32,length=128``, a
cell of the MQAR sweep); accuracy is a fraction in ``[0, 1]``; ``baseline`` is
the no-context score (majority class, unigram bits per character; null where the suite
could not measure it); ``mean ± spread`` is the
score over ``seeds``; ``length`` is the sequence length the suite trained at. The task the
advisor weighs needs a figure for exact attention (``full``), the reference every tolerance is
taken from. Mechanisms absent from a task are explained by ``meta.failures`` and
``meta.not_applicable`` (``[{"task", "mechanism", "error" | "reason"}]``) where present.
:func:`load_task_facts` checks all of it and says which key of which task is wrong.

Users name tasks in their own words (:data:`TASK_ALIASES`: ``recall`` is ``mqar``, ``needle``
is ``passkey``, ``text`` is ``char_lm``); :func:`resolve_task` maps them to the suite's names.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from attnkit.arena.config import SUITE_TASKS

#: The names ``--task`` accepts, each mapped to the suite task that measures it.
TASK_ALIASES: dict[str, str] = {
    "recall": "mqar",
    "mqar": "mqar",
    "associative_recall": "mqar",
    "classification": "text_classification",
    "text_classification": "text_classification",
    "retrieval": "document_matching",
    "document_matching": "document_matching",
    "matching": "document_matching",
    "listops": "listops",
    "pathfinder": "pathfinder",
    "passkey": "passkey",
    "needle": "passkey",
    "lm": "char_lm",
    "char_lm": "char_lm",
    "text": "char_lm",
    "language_modelling": "char_lm",
    "language_modeling": "char_lm",
}

#: The mechanism every quality tolerance is measured from.
REFERENCE = "full"

#: How to produce a facts file, for every message that needs one.
PRODUCE_FACTS = "run 'attnkit arena --suite quality --out DIR' (the quality suite), then pass --facts DIR/results.json"


def resolve_task(name: str) -> str:
    """The suite task that measures ``name`` (case and ``-``/``_`` insensitive).

    Raises:
        ValueError: an unknown name; the message lists every accepted one.
    """
    key = name.strip().lower().replace("-", "_")
    if key in TASK_ALIASES:
        return TASK_ALIASES[key]
    choices = ", ".join(f"{alias} (= {task})" if alias != task else alias for alias, task in TASK_ALIASES.items())
    close = difflib.get_close_matches(key, TASK_ALIASES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"--task must be one of {choices}; got {name!r}{hint}")


@dataclass(frozen=True)
class QualityFigure:
    """One mechanism's measured quality on one task.

    Attributes:
        mean: the score, averaged over ``seeds`` (accuracy as a fraction, or bits per character).
        spread: its uncertainty; ``mean ± spread`` is the range the advisor treats as one value.
        seeds: the score of each seed (or each evaluation, for ``--data``).
        state_bytes: bytes of the decoding state the mechanism carries at the task's length (None = n/a).
        step_ms: time of one training step in the suite (None = not recorded).
    """

    mean: float
    spread: float
    seeds: tuple[float, ...] = ()
    state_bytes: int | None = None
    step_ms: float | None = None

    def overlaps(self, other: QualityFigure) -> bool:
        """Whether ``mean ± spread`` of the two figures overlap: a difference the noise can explain."""
        return abs(self.mean - other.mean) <= self.spread + other.spread


@dataclass(frozen=True)
class TaskFacts:
    """What the suite (or ``--data``) measured on one task.

    Attributes:
        task: the suite's task name (or ``"your data"``).
        metric: ``"accuracy"`` or ``"bpc"`` (bits per character).
        higher_is_better: True for accuracy, False for bits per character.
        baseline: the no-context score (majority class / unigram); None where the suite failed to measure it.
        length: the sequence length the figures were measured at.
        figures: each measured mechanism's figure; always includes :data:`REFERENCE`.
        source: where the facts came from (a path, or a description), for the printed answer.
        notes: why a mechanism has no figure, where that is known (``{"linformer": "no causal mode"}``).
    """

    task: str
    metric: str
    higher_is_better: bool
    baseline: float | None
    length: int
    figures: dict[str, QualityFigure]
    source: str
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def reference(self) -> QualityFigure:
        """Exact attention's figure."""
        return self.figures[REFERENCE]

    def better(self, a: float, b: float) -> bool:
        """Whether score ``a`` is strictly better than ``b`` on this metric."""
        return a > b if self.higher_is_better else a < b

    def format(self, value: float) -> str:
        """A score as the answer prints it: ``99.4%`` or ``3.12 bpc``."""
        return f"{100 * value:.1f}%" if self.metric == "accuracy" else f"{value:.3f} bpc"


def default_facts_path() -> Path:
    """The facts file that ships with attnkit (``attnkit/arena/data/quality_facts.json``; may not exist)."""
    return Path(str(resources.files("attnkit.arena"))) / "data" / "quality_facts.json"


def load_task_facts(path: Path | str | None, task: str, *, length: int | None = None) -> TaskFacts:
    """The facts of suite task ``task`` from the facts file at ``path`` (None = :func:`default_facts_path`).

    Args:
        path: the quality suite's ``results.json``.
        task: a suite task name (:data:`SUITE_TASKS`; see :func:`resolve_task`).
        length: the length the user asks about; where the file holds variants of the task
            (``mqar@pairs=32,length=128``), the one measured nearest this length is used.

    Raises:
        FileNotFoundError: no such file (the message says how to produce one).
        ValueError: not JSON, not the quality suite's schema (naming the key at fault), or no
            usable figures for ``task``.
    """
    if path is None:
        path = default_facts_path()
        if not path.is_file():
            raise FileNotFoundError(
                f"attnkit ships no quality facts yet ({path} does not exist), so --task has nothing to "
                f"weigh; {PRODUCE_FACTS}"
            )
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--facts {path}: no such file; {PRODUCE_FACTS}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--facts {path} is not a JSON file ({err}); {PRODUCE_FACTS}") from err
    return parse_task_facts(doc, task, source=str(path), length=length)


def parse_task_facts(doc: Any, task: str, *, source: str, length: int | None = None) -> TaskFacts:
    """Check a facts document against the schema (module docstring) and return ``task``'s facts.

    A task key is a suite task (``mqar``) or a variant of one (``mqar@pairs=32,length=128``, an
    MQAR sweep cell). Of ``task`` and its variants, the one whose length is nearest ``length``
    (on a log scale; the plain task on a tie, or when ``length`` is None) answers. The
    mechanisms a key lacks are explained from ``meta.failures`` and ``meta.not_applicable``
    where the suite listed them.

    Raises:
        ValueError: the first schema violation, naming its key path; ``task`` missing; or no
            exact-attention figure for it.
    """
    where = f"--facts {source}"
    _expect(
        isinstance(doc, dict) and doc.get("suite") == "quality",
        f'{where}: expected an object with "suite": "quality" (a quality-suite results file); {PRODUCE_FACTS}',
    )
    tasks = doc.get("tasks")
    _expect(isinstance(tasks, dict), f'{where}: "tasks" must be an object mapping task names to their facts')
    unknown = sorted(key for key in tasks if key.split("@")[0] not in SUITE_TASKS)
    _expect(
        not unknown,
        f"{where}: unknown task(s) {', '.join(unknown)}; tasks are {', '.join(SUITE_TASKS)} (or TASK@variant)",
    )
    # every task is checked, not only the one asked for: a broken file is reported whatever the question
    parsed = {key: _parse_task(entry, key, f"{where}: tasks.{key}", source) for key, entry in tasks.items()}
    candidates = [key for key in parsed if key.split("@")[0] == task]
    if not candidates:
        measured = ", ".join(parsed) or "none"
        raise ValueError(f"{where} has no figures for task {task!r} (it measured: {measured}); {PRODUCE_FACTS}")
    key = min(candidates, key=lambda k: (_distance(parsed[k].length, length), k != task, k))
    facts = parsed[key]
    facts.notes.update(_suite_notes(doc.get("meta"), key))
    if REFERENCE not in facts.figures:
        why = facts.notes.get(REFERENCE, "the file has none")
        raise ValueError(
            f"{where}: tasks.{key} has no figure for {REFERENCE!r} (exact attention: {why}), which every quality "
            f"tolerance is taken from; rerun the suite for this task"
        )
    return facts


def _distance(measured: int, asked: int | None) -> float:
    return 0.0 if asked is None else abs(math.log(measured / asked))


def _suite_notes(meta: Any, key: str) -> dict[str, str]:
    """Why the suite has no figure for a mechanism on task ``key``, from its ``meta`` (best effort: optional)."""
    notes: dict[str, str] = {}
    if not isinstance(meta, dict):
        return notes
    for field_name, prefix in (("not_applicable", ""), ("failures", "failed in the suite: ")):
        rows = meta.get(field_name)
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, dict) and row.get("task") == key and isinstance(row.get("mechanism"), str):
                why = row.get("reason") or row.get("error") or "no reason recorded"
                notes[row["mechanism"]] = prefix + str(why).strip()[:160]
    return notes


def _parse_task(entry: Any, task: str, at: str, source: str) -> TaskFacts:
    _expect(isinstance(entry, dict), f"{at} must be an object")
    metric = entry.get("metric")
    _expect(metric in ("accuracy", "bpc"), f'{at}.metric must be "accuracy" or "bpc", got {metric!r}')
    higher = entry.get("higher_is_better")
    _expect(isinstance(higher, bool), f"{at}.higher_is_better must be true or false, got {higher!r}")
    _expect(higher == (metric == "accuracy"), f"{at}.higher_is_better={higher} contradicts metric {metric!r}")
    # null: the suite's no-context cell failed; the advisor then says it cannot check the baseline
    baseline = None if entry.get("baseline") is None else _score(entry["baseline"], metric, f"{at}.baseline")
    length = entry.get("length")
    _expect(
        isinstance(length, int) and not isinstance(length, bool) and length > 0,
        f"{at}.length must be a positive integer (the suite's sequence length), got {length!r}",
    )
    mechanisms = entry.get("mechanisms")
    _expect(isinstance(mechanisms, dict), f"{at}.mechanisms must be an object mapping mechanism names to figures")
    figures = {name: _parse_figure(fig, metric, f"{at}.mechanisms.{name}") for name, fig in mechanisms.items()}
    return TaskFacts(task, metric, higher, baseline, length, figures, source)


def _parse_figure(fig: Any, metric: str, at: str) -> QualityFigure:
    _expect(isinstance(fig, dict), f"{at} must be an object with mean, spread, seeds, state_bytes, step_ms")
    missing = [key for key in ("mean", "spread", "seeds", "state_bytes", "step_ms") if key not in fig]
    _expect(not missing, f"{at} lacks {', '.join(missing)}")
    mean = _score(fig["mean"], metric, f"{at}.mean")
    spread = fig["spread"]
    _expect(_real(spread) and spread >= 0, f"{at}.spread must be a number >= 0, got {spread!r}")
    seeds = fig["seeds"]
    _expect(
        isinstance(seeds, list) and bool(seeds) and all(_real(s) for s in seeds),
        f"{at}.seeds must be a non-empty list of numbers (one score per seed), got {seeds!r}",
    )
    state = fig["state_bytes"]
    _expect(
        state is None or (isinstance(state, int) and not isinstance(state, bool) and state >= 0),
        f"{at}.state_bytes must be a non-negative integer or null, got {state!r}",
    )
    step_ms = fig["step_ms"]
    _expect(
        step_ms is None or (_real(step_ms) and step_ms > 0),
        f"{at}.step_ms must be a positive number or null, got {step_ms!r}",
    )
    return QualityFigure(float(mean), float(spread), tuple(map(float, seeds)), state, step_ms)


def _score(value: Any, metric: str, at: str) -> float:
    """A finite score; accuracy must be a fraction (the suite writes 0.994, not 99.4)."""
    _expect(_real(value) and math.isfinite(value), f"{at} must be a finite number, got {value!r}")
    if metric == "accuracy":
        _expect(0.0 <= value <= 1.0, f"{at} must be an accuracy fraction in [0, 1] (0.994, not 99.4), got {value!r}")
    else:
        _expect(value > 0, f"{at} must be a positive number of bits per character, got {value!r}")
    return float(value)


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
