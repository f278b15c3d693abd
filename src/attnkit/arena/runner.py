"""Run the arena: every stage over every mechanism, cell by cell, resumable.

Stages, in order: efficiency sweeps, fidelity, quality training. Each cell is looked up
in the :class:`~attnkit.arena.cells.CellCache` first and stored as soon as it is
measured, so an interrupted run (Ctrl-C, a killed job) picks up where it stopped. Budget
stops are decisions, not measurements: they are recomputed from the stored cells on
every run, so raising a budget resumes a sweep where it was cut.

Efficiency cells go by (mode, causal, length): exact attention's own cell first, then each
mechanism's, timed in rounds interleaved with exact attention (see
:mod:`attnkit.arena.efficiency`) wherever exact attention's own cell at that length ran;
past exact attention's budget a mechanism is timed alone and has no speed-up. The
1-minute load average is recorded before and after every efficiency cell.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import attnkit
from attnkit.arena.cells import CellCache, cell_key, machine_fingerprint
from attnkit.arena.config import FIDELITY_INPUTS, MODES, ArenaConfig
from attnkit.arena.efficiency import (
    Baseline,
    LoadReader,
    budget_stop,
    efficiency_params,
    load_average,
    measure_efficiency,
    thread_count,
    usable_cores,
    warm_up_libraries,
)
from attnkit.arena.fidelity import fidelity_params, measure_fidelity
from attnkit.arena.quality import (
    fidelity_options,
    quality_options,
    quality_params,
    task_is_causal,
    train_quality_cell,
)
from attnkit.core.base import AttentionMechanism
from attnkit.metrics.memory import PeakMemoryMeter

BASELINE = "full"


def resolve_mechanisms(requested: tuple[str, ...] | list[str]) -> list[str]:
    """Requested names (or every registered one), validated, with the ``full`` baseline first.

    Raises:
        ValueError: an unknown name (the message suggests the closest registered one).
    """
    names = list(requested) or attnkit.list_attention()
    for name in names:
        attnkit.get_spec(name)
    return [BASELINE, *[n for n in dict.fromkeys(names) if n != BASELINE]]


def causal_modes(name: str) -> list[bool]:
    """``[False, True]`` where the mechanism has a causal mode, else ``[False]``."""
    return [False, True] if attnkit.attention_capabilities(name).causal else [False]


def check_device(device: str) -> None:
    """Raise a ``ValueError`` saying what to do when ``device`` is not usable here."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available here; use --device cpu")


@dataclass
class ArenaRun:
    """Everything an arena run produced, before assembly into ``results.json``.

    Attributes:
        config: the settings.
        mechanisms: measured names, baseline first.
        efficiency: one row per efficiency cell (measured, cached or stopped).
        fidelity: one row per fidelity cell.
        quality: one row per quality cell.
        seconds: wall time of this invocation.
        cache_hits: cells reused from an earlier run.
        cache_misses: cells measured now.
        load_average: the machine's 1-minute load average at the start and end (other
            processes competing for the CPU inflate every timing; -1 where unknown).
        threads: the intra-op CPU threads the efficiency and fidelity cells ran on.
        cores: the CPU cores the run could use (a load average above it means processes
            waited for a core).
    """

    config: ArenaConfig
    mechanisms: list[str]
    efficiency: list[dict[str, Any]] = field(default_factory=list)
    fidelity: list[dict[str, Any]] = field(default_factory=list)
    quality: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    load_average: list[float] = field(default_factory=list)
    threads: int = 0
    cores: int = 0
    cache_hits: int = 0
    cache_misses: int = 0


class CellRunner:
    """Cache-or-measure for one run, with a shared progress bar.

    Args:
        cache: where cells are read and written.
        machine: :func:`machine_fingerprint`, added to machine-bound cells' keys.
        bar: the progress bar advanced once per cell.
        read_load: reads the 1-minute load average recorded around each efficiency cell
            (tests inject a fake one).
    """

    def __init__(
        self, cache: CellCache, machine: dict[str, Any], bar: tqdm, *, read_load: LoadReader = load_average
    ) -> None:
        self.cache, self.machine, self.bar, self.read_load = cache, machine, bar, read_load

    def get(
        self,
        kind: str,
        name: str,
        options: dict[str, Any],
        params: dict[str, Any],
        compute: Callable[[], dict[str, Any]],
        *,
        machine_bound: bool = True,
    ) -> dict[str, Any]:
        """The row of one cell: stored result if present, else ``compute()`` (then stored).

        ``machine_bound`` cells (timings) are keyed on this machine; others (errors,
        trained accuracies) are reproducible anywhere with the same settings.
        """
        full_params = {**params, "machine": self.machine} if machine_bound else params
        key = cell_key(kind, name, options, full_params)
        self.bar.set_postfix_str(f"{kind} {name} {_describe(params)}", refresh=True)
        result = self.cache.get(key)
        if result is None:
            started = time.perf_counter()
            result = compute()
            result["cell_seconds"] = round(time.perf_counter() - started, 3)
            self.cache.put(key, result)
            result = {**result, "cached": False}
        else:
            result = {**result, "cached": True}
        self.bar.update(1)
        return {"mechanism": name, **params, **result}


def _describe(params: dict[str, Any]) -> str:
    parts = [f"L={params['length']}" if "length" in params else ""]
    for key in ("task", "input", "mode"):
        if key in params:
            parts.append(str(params[key]))
    if params.get("causal"):
        parts.append("causal")
    return " ".join(p for p in parts if p)


def build_seeded(name: str, options: dict[str, Any], seed: int) -> AttentionMechanism | str:
    """Build ``name`` after seeding torch; a construction error comes back as its message."""
    torch.manual_seed(seed)  # random features, hashes and projections are reproducible
    try:
        return attnkit.build_attention(name, **options)
    except (ValueError, TypeError) as err:
        return f"{type(err).__name__}: {err}"


def run_arena(
    config: ArenaConfig,
    out_dir: Path | str,
    *,
    resume: bool = True,
    progress: bool = True,
    stages: tuple[str, ...] = ("efficiency", "fidelity", "quality"),
    read_load: LoadReader = load_average,
) -> ArenaRun:
    """Measure every mechanism of ``config`` and return the rows (cells cached under ``out_dir``).

    Args:
        config: what to measure.
        out_dir: the report folder; cells go to ``out_dir/cells``.
        resume: reuse cells stored by earlier runs with identical settings.
        progress: show a progress bar (on stderr).
        stages: which of ``"efficiency"``, ``"fidelity"``, ``"quality"`` to run.
        read_load: reads the 1-minute load average (injected by tests).

    Raises:
        ValueError: an unknown mechanism or stage, or an unavailable device.
    """
    for stage in stages:
        if stage not in ("efficiency", "fidelity", "quality"):
            raise ValueError(f"stages must be among 'efficiency', 'fidelity', 'quality', got {stage!r}")
    check_device(config.device)
    names = resolve_mechanisms(config.mechanisms)
    run = ArenaRun(config, names, load_average=[_load(read_load)], cores=usable_cores())
    cache = CellCache(Path(out_dir), enabled=resume)
    started = time.perf_counter()
    total = _planned_cells(config, names, stages)
    with (
        thread_count(config.threads) as run.threads,
        tqdm(total=total, desc="arena", unit="cell", disable=not progress, dynamic_ncols=True) as bar,
    ):
        # keyed on the thread count in force
        cells = CellRunner(cache, machine_fingerprint(config.device), bar, read_load=read_load)
        if "efficiency" in stages:
            run.efficiency = list(_efficiency_rows(config, names, cells))
        if "fidelity" in stages:
            run.fidelity = list(_fidelity_rows(config, names, cells))
        if "quality" in stages:
            run.quality = list(_quality_rows(config, names, cells))
        bar.set_postfix_str("done")
    run.seconds = time.perf_counter() - started
    run.load_average.append(_load(read_load))
    run.cache_hits, run.cache_misses = cache.hits, cache.misses
    return run


def _load(read_load: LoadReader) -> float:
    value = read_load()
    return -1.0 if value is None else value  # -1: the run-level record has always meant "unknown"


def _planned_cells(config: ArenaConfig, names: list[str], stages: tuple[str, ...]) -> int:
    total = 0
    for name in names:
        n_causal = len(causal_modes(name))
        if "efficiency" in stages:
            total += n_causal * len(MODES) * len(config.lengths)
        if "fidelity" in stages:
            total += n_causal * len(FIDELITY_INPUTS)
        if "quality" in stages:
            total += len(config.tasks)
    return total


def efficiency_cell(
    config: ArenaConfig,
    name: str,
    module: AttentionMechanism | str,
    causal: bool,
    mode: str,
    length: int,
    done: list[dict[str, Any]],
    cells: CellRunner,
    meter: PeakMemoryMeter,
    *,
    reference: Baseline | None = None,
) -> dict[str, Any]:
    """The row of one efficiency cell: cached, measured, or ``stopped`` by the budget.

    ``done`` holds the same sweep's earlier rows (shorter lengths); the new row is appended.
    The sweep's first cell measured in this process pays its code path's one-time costs
    in an extra untracked step (see :func:`~attnkit.arena.efficiency.measure_efficiency`).
    With ``reference``, the cell is timed in rounds interleaved with it. The row carries the
    1-minute load average read before and after the measurement (``load_before``,
    ``load_after``; None where the platform has none).
    """
    first_use = not any(r.get("cached") is False for r in done)
    reason = budget_stop(config, mode, done, length)
    if reason is not None:
        cells.bar.update(1)
        row = {"mechanism": name, "length": length, "causal": causal, "mode": mode, "status": "stopped"}
        row["reason"] = reason
    else:

        def compute() -> dict[str, Any]:
            if isinstance(module, str):
                return {"status": "error", "error": module}
            module.train(mode == "fwd+bwd")
            before = cells.read_load()
            result = measure_efficiency(
                module, config, length, causal, mode, meter, first_use=first_use, reference=reference
            )
            return {**result, "load_before": before, "load_after": cells.read_load()}

        options = attnkit.get_spec(name).benchmark_options
        params = efficiency_params(config, length, causal, mode, reference)
        row = cells.get("efficiency", name, options, params, compute)
    done.append(row)
    return row


def baseline_cell(
    config: ArenaConfig,
    baseline: Baseline | None,
    module: AttentionMechanism | str,
    causal: bool,
    mode: str,
    length: int,
    done: list[dict[str, Any]],
    cells: CellRunner,
    meter: PeakMemoryMeter,
) -> dict[str, Any]:
    """Exact attention's own cell (timed alone); measured now, it leaves ``baseline`` warm at this shape."""
    row = efficiency_cell(config, BASELINE, module, causal, mode, length, done, cells, meter)
    if baseline is not None and row["status"] == "ok" and row.get("cached") is False:
        baseline.warm.add((length, causal, mode))
    return row


def make_baseline(module: AttentionMechanism | str) -> Baseline | None:
    """Exact attention (built, or its construction error) as the reference of interleaved cells."""
    if isinstance(module, str):
        return None
    return Baseline(BASELINE, module, attnkit.get_spec(BASELINE).benchmark_options)


def reference_at(baseline: Baseline | None, baseline_row: dict[str, Any] | None) -> Baseline | None:
    """The reference a mechanism's cell interleaves with: exact attention where its own cell at
    the same (length, causal, mode) ran, else None (past its budget, or it failed: timed alone)."""
    if baseline is None or baseline_row is None or baseline_row["status"] != "ok":
        return None
    return baseline


def efficiency_sweep(
    config: ArenaConfig, name: str, causal: bool, mode: str, cells: CellRunner, module: AttentionMechanism | str
) -> list[dict[str, Any]]:
    """One mechanism's rows over ``config.lengths``; past the budget they are ``stopped`` rows saying why.

    Exact attention's own cells at each length are looked up (or measured) too, as in an
    arena run, so the mechanism's cells are interleaved with it and share the arena's keys;
    only the mechanism's rows are returned.
    """
    meter = PeakMemoryMeter(config.device)
    done: list[dict[str, Any]] = []
    if name == BASELINE:
        for length in config.lengths:
            efficiency_cell(config, name, module, causal, mode, length, done, cells, meter)
        return done
    full = build_seeded(BASELINE, attnkit.get_spec(BASELINE).benchmark_options, config.seed)
    baseline = make_baseline(full)
    baseline_done: list[dict[str, Any]] = []
    for length in config.lengths:
        own = baseline_cell(config, baseline, full, causal, mode, length, baseline_done, cells, meter)
        reference = reference_at(baseline, own)
        efficiency_cell(config, name, module, causal, mode, length, done, cells, meter, reference=reference)
    return done


def _efficiency_rows(config: ArenaConfig, names: list[str], cells: CellRunner) -> Iterator[dict[str, Any]]:
    # Cells go by (mode, causal, length) with exact attention first: each mechanism's cell then
    # interleaves with it at a shape it has just run, and within its budget.
    meter = PeakMemoryMeter(config.device)
    warm_up_libraries(config)
    modules = {name: build_seeded(name, attnkit.get_spec(name).benchmark_options, config.seed) for name in names}
    baseline = make_baseline(modules[BASELINE])
    sweeps: dict[tuple[str, bool, str], list[dict[str, Any]]] = {}
    for mode in MODES:
        for causal in (False, True):
            for length in config.lengths:
                for name in names:
                    if causal and not attnkit.attention_capabilities(name).causal:
                        continue
                    done = sweeps.setdefault((name, causal, mode), [])
                    if name == BASELINE:
                        yield baseline_cell(config, baseline, modules[name], causal, mode, length, done, cells, meter)
                        continue
                    reference = reference_at(baseline, sweeps[(BASELINE, causal, mode)][-1])
                    yield efficiency_cell(
                        config, name, modules[name], causal, mode, length, done, cells, meter, reference=reference
                    )


def _fidelity_rows(config: ArenaConfig, names: list[str], cells: CellRunner) -> Iterator[dict[str, Any]]:
    for name in names:
        options = fidelity_options(name, config)
        for input_kind in FIDELITY_INPUTS:
            for causal in causal_modes(name):
                params = fidelity_params(config, input_kind, causal)
                compute = partial(fidelity_cell, name, options, config, input_kind, causal)
                yield cells.get("fidelity", name, options, params, compute, machine_bound=False)


def fidelity_cell(
    name: str, options: dict[str, Any], config: ArenaConfig, input_kind: str, causal: bool
) -> dict[str, Any]:
    """Build ``name`` (seeded) and measure one fidelity cell; construction errors become error rows."""
    module = build_seeded(name, options, config.seed)
    if isinstance(module, str):
        return {"status": "error", "error": module}
    return measure_fidelity(module, config, input_kind, causal)


def _quality_rows(config: ArenaConfig, names: list[str], cells: CellRunner) -> Iterator[dict[str, Any]]:
    for name in names:
        options = quality_options(name, config)
        for task in config.tasks:
            params = quality_params(config, task)
            if task_is_causal(task) and not attnkit.attention_capabilities(name).causal:
                cells.bar.update(1)
                yield {"mechanism": name, **params, "status": "n/a", "reason": "no causal mode"}
                continue
            compute = partial(train_quality_cell, name, options, task, config)
            yield cells.get("quality", name, options, params, compute, machine_bound=False)
