"""The quality suite: every mechanism on LRA-style tasks, MQAR and passkey, two seeds, one budget per task.

``attnkit arena --suite quality`` trains the same small :mod:`attnkit.models` model with each
registered mechanism on every suite task (:data:`attnkit.arena.config.SUITE_TASKS`), with the
task's budget (:data:`~attnkit.arena.config.SUITE_BUDGETS`: steps, width, depth, length, rate,
chosen so that exact attention reaches the published regime) and each of two seeds. Next to
the mechanisms sit each task's no-context baseline and, per mechanism, its decoding-state size
at the task's length (:mod:`attnkit.arena.state_size`), the recall-vs-state trade-off of Zoology.

Cells (one mechanism, task, seed) are independent, so they run in worker processes at one
thread each (two workers use both cores of a 2-core machine), are stored in the arena's
:class:`~attnkit.arena.cells.CellCache` as each finishes, and a rerun after an interruption
trains only the cells still missing. :func:`attnkit.arena.leaderboard.aggregate` turns the
rows into the leaderboard and the facts file.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

import attnkit
from attnkit.arena.cells import CellCache, cell_key
from attnkit.arena.config import SUITE_SEEDS, SUITE_TASKS, ArenaConfig, TaskBudget, suite_budgets
from attnkit.arena.quality import suite_options, train_quality_cell
from attnkit.arena.runner import check_device, resolve_mechanisms
from attnkit.arena.state_size import decoding_state_bytes
from attnkit.arena.tasks import QualityTask, suite_baseline, suite_task

#: The suites ``attnkit arena --suite`` knows.
SUITES: tuple[str, ...] = ("quality",)
#: The row name of the no-context baseline (a cell kind of its own in the cache).
BASELINE_ROW = "no_context"


@dataclass(frozen=True)
class SuiteConfig:
    """Settings of one quality-suite run.

    Attributes:
        mechanisms: names to train; empty = every registered mechanism (``full``, the exact
            reference, is always added).
        tasks: a subset of :data:`~attnkit.arena.config.SUITE_TASKS`.
        seeds: every cell is trained once per seed; the leaderboard shows mean and spread.
        full: LRA lengths (:data:`~attnkit.arena.config.SUITE_BUDGETS_FULL`; hours on a CPU).
        workers: processes training cells at once, one thread each (2 on a 2-core machine).
        device: ``"cpu"`` or ``"cuda[:N]"`` (on CUDA, set ``workers=1``).
        custom_budgets: budgets to run instead of the preset's (calibration, tests); ``tasks``
            and ``full`` then select nothing.
    """

    mechanisms: tuple[str, ...] = ()
    tasks: tuple[str, ...] = SUITE_TASKS
    seeds: tuple[int, ...] = SUITE_SEEDS
    full: bool = False
    workers: int = 2
    device: str = "cpu"
    custom_budgets: tuple[TaskBudget, ...] = ()

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError(f"tasks must name at least one suite task among {', '.join(SUITE_TASKS)}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed (e.g. --seeds 0,1)")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {list(self.seeds)}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"workers must be a positive integer, got {self.workers!r} (use --workers 2 on 2 cores)")
        suite_budgets(full=self.full, tasks=self.tasks)  # validates the task names

    @property
    def budgets(self) -> tuple[TaskBudget, ...]:
        """The budgets of the chosen tasks, headline MQAR first, then its sweep."""
        return self.custom_budgets or suite_budgets(full=self.full, tasks=self.tasks)


@dataclass(frozen=True)
class SuiteCell:
    """One training run: ``mechanism`` (or :data:`BASELINE_ROW`) on ``budget`` with ``seed``."""

    mechanism: str
    budget: TaskBudget
    seed: int
    device: str = "cpu"

    @property
    def kind(self) -> str:
        """The cache kind: ``"suite"`` for a trained cell, ``"suite-baseline"`` for the baseline."""
        return "suite-baseline" if self.mechanism == BASELINE_ROW else "suite"

    @property
    def options(self) -> dict[str, Any]:
        """The mechanism's options at the task's length (:func:`~attnkit.arena.quality.suite_options`)."""
        if self.mechanism == BASELINE_ROW:
            return {}
        return suite_options(self.mechanism, quality_task(self.budget).length)

    def params(self) -> dict[str, Any]:
        """What identifies the cell besides the mechanism and its options (its cache key)."""
        return {"budget": self.budget.as_dict(), "seed": self.seed, "device": self.device.split(":")[0]}

    def key(self) -> dict[str, Any]:
        """The :func:`~attnkit.arena.cells.cell_key` the result is stored under."""
        return cell_key(self.kind, self.mechanism, self.options, self.params())


@functools.lru_cache(maxsize=64)
def quality_task(budget: TaskBudget) -> QualityTask:
    """The :class:`~attnkit.arena.tasks.QualityTask` a budget trains on (built once per process)."""
    return suite_task(budget.task, learning_rate=budget.learning_rate, **dict(budget.options))


def cell_config(cell: SuiteCell) -> ArenaConfig:
    """The :class:`~attnkit.arena.config.ArenaConfig` that carries a cell's model size and budget."""
    budget = cell.budget
    return ArenaConfig(
        tasks=(),
        train_steps=budget.steps,
        eval_batches=budget.eval_batches,
        model_dim=budget.dim,
        model_depth=budget.depth,
        model_heads=budget.heads,
        model_token_shift=budget.token_shift,
        task_length=quality_task(budget).length,
        batch_size=budget.batch_size,
        device=cell.device,
        seed=cell.seed,
    )


def needs_causal(budget: TaskBudget) -> bool:
    """Whether the task's model is causal (``passkey`` and ``char_lm``: language modelling)."""
    return quality_task(budget).causal


def plan_cells(config: SuiteConfig) -> list[SuiteCell]:
    """Every cell of a run, grouped by task (so a worker's memoised batches serve many cells).

    Per budget and seed: the no-context baseline, then each mechanism (exact ``full`` first).
    Mechanisms without a causal mode are left out of causal tasks (:func:`skipped_cells` lists them).

    Raises:
        ValueError: an unknown mechanism.
    """
    names = resolve_mechanisms(config.mechanisms)
    cells = []
    for budget in config.budgets:
        causal = needs_causal(budget)
        for seed in config.seeds:
            cells.append(SuiteCell(BASELINE_ROW, budget, seed, config.device))
            for name in names:
                if causal and not attnkit.attention_capabilities(name).causal:
                    continue
                cells.append(SuiteCell(name, budget, seed, config.device))
    return cells


def skipped_cells(config: SuiteConfig) -> list[dict[str, Any]]:
    """The (mechanism, task) pairs :func:`plan_cells` leaves out, with the reason."""
    out = []
    for budget in config.budgets:
        if needs_causal(budget):
            for name in resolve_mechanisms(config.mechanisms):
                if not attnkit.attention_capabilities(name).causal:
                    out.append({"task": budget.key, "mechanism": name, "status": "n/a", "reason": "no causal mode"})
    return out


def train_cell(cell: SuiteCell) -> dict[str, Any]:
    """Train and evaluate one cell (or score the baseline); errors come back as ``status: error`` rows."""
    if cell.mechanism == BASELINE_ROW:
        started = time.perf_counter()
        result = {"status": "ok", **suite_baseline(quality_task(cell.budget), cell.seed)}
        result["train_seconds"] = round(time.perf_counter() - started, 2)
        return result
    return train_quality_cell(
        cell.mechanism, cell.options, quality_task(cell.budget), cell_config(cell), step_time=True
    )


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # the workers share the cores; one thread each contends least


def _train_indexed(job: tuple[int, SuiteCell]) -> tuple[int, dict[str, Any]]:
    index, cell = job
    return index, train_cell(cell)


@dataclass
class SuiteRun:
    """Everything a suite run produced.

    Attributes:
        config: the settings.
        rows: one row per planned cell: mechanism, task key, seed and the result.
        skipped: the pairs not run (:func:`skipped_cells`).
        state_bytes: ``{task key: {mechanism: bytes or None}}`` (:func:`state_sizes`).
        wall_s: wall time of this invocation.
        load_average: the 1-minute load average at the start and the end.
        cells_trained: cells trained now.
        cells_reused: cells read from the cache.
    """

    config: SuiteConfig
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    state_bytes: dict[str, dict[str, int | None]] = field(default_factory=dict)
    wall_s: float = 0.0
    load_average: list[float] = field(default_factory=list)
    cells_trained: int = 0
    cells_reused: int = 0


def run_suite(
    config: SuiteConfig,
    out_dir: Path | str,
    *,
    resume: bool = True,
    progress: bool = True,
    train: Callable[[SuiteCell], dict[str, Any]] = train_cell,
) -> SuiteRun:
    """Train every cell of ``config`` not already in ``out_dir``'s cache, and collect the rows.

    Args:
        config: what to run.
        out_dir: the report folder; cells are stored under ``out_dir/cells`` as they finish.
        resume: reuse stored cells (False trains every cell again, still storing them).
        progress: a progress bar on stderr.
        train: trains one cell (``config.workers == 1`` calls it in this process; more workers
            always use :func:`train_cell`). Workers are *spawned* processes, which import the
            calling script again: a script that calls this with ``workers > 1`` must do so under
            ``if __name__ == "__main__":`` (``attnkit arena --suite`` does).

    Raises:
        ValueError: an unknown mechanism or an unusable device.
        KeyboardInterrupt: passed on after the workers are stopped; finished cells stay cached.
    """
    check_device(config.device)
    started = time.perf_counter()
    run = SuiteRun(config, load_average=[_load()])
    cells = plan_cells(config)
    cache = CellCache(Path(out_dir), enabled=resume)
    results: dict[int, dict[str, Any]] = {}
    pending = []
    for index, cell in enumerate(cells):
        stored = cache.get(cell.key())
        if stored is None:
            pending.append((index, cell))
        else:
            results[index] = {**stored, "cached": True}
    with tqdm(total=len(cells), initial=len(results), desc="quality suite", unit="cell", disable=not progress) as bar:
        for index, result in _results(pending, config.workers, train):
            cache.put(cells[index].key(), result)
            results[index] = {**result, "cached": False}
            bar.set_postfix_str(f"{cells[index].mechanism} {cells[index].budget.key} seed {cells[index].seed}")
            bar.update(1)
    run.rows = [_row(cell, results[i]) for i, cell in enumerate(cells)]
    run.skipped = skipped_cells(config)
    run.state_bytes = state_sizes(config)
    run.cells_trained, run.cells_reused = len(pending), len(cells) - len(pending)
    run.wall_s = round(time.perf_counter() - started, 1)
    run.load_average.append(_load())
    return run


def _results(
    pending: list[tuple[int, SuiteCell]], workers: int, train: Callable[[SuiteCell], dict[str, Any]]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(index, result)`` as cells finish: in this process, or from a pool of one-thread workers."""
    if workers == 1 or len(pending) <= 1:
        for index, cell in pending:
            yield index, train(cell)
        return
    # spawn, not fork: a forked child inherits the parent's OpenMP thread pool, which can deadlock
    context = multiprocessing.get_context("spawn")
    with context.Pool(min(workers, len(pending)), initializer=_worker_init, maxtasksperchild=None) as pool:
        try:
            yield from pool.imap_unordered(_train_indexed, pending, chunksize=1)
        except BaseException:
            pool.terminate()
            raise


def _row(cell: SuiteCell, result: dict[str, Any]) -> dict[str, Any]:
    return {"mechanism": cell.mechanism, "task": cell.budget.key, "seed": cell.seed, **result}


def state_sizes(config: SuiteConfig) -> dict[str, dict[str, int | None]]:
    """Each mechanism's decoding-state bytes per sequence at each task's length, over the model's layers.

    None where the mechanism has no decoding state (it recomputes over the prefix).
    """
    sizes: dict[str, dict[str, int | None]] = {}
    for budget in config.budgets:
        length = quality_task(budget).length
        per_task: dict[str, int | None] = {}
        for name in resolve_mechanisms(config.mechanisms):
            one_layer = decoding_state_bytes(
                name,
                suite_options(name, length),
                length=length,
                heads=budget.heads,
                head_dim=budget.dim // budget.heads,
            )
            per_task[name] = None if one_layer is None else one_layer * budget.depth
        sizes[budget.key] = per_task
    return sizes


def _load() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not available on this platform
        return -1.0
