"""The one measurement loop: every measurement in a fresh process, cells measured round-robin.

Protocol (the committed results were measured with it):

- Each measurement runs in a fresh Python process (``python -m benchmarks.harness --worker
  SPEC``), with ``torch.set_num_threads(threads)`` and ``OMP_NUM_THREADS``, importing attnkit from
  the ``src`` next to these benchmarks ahead of any installed copy (a ``git worktree`` snapshot
  measures its own code).
- The process builds the case's closure (untimed), takes ``warmup`` untimed steps (stopping once
  they have taken a quarter of the time budget), then times ``repeats`` steps (fewer when the
  remaining ones would overrun the time budget, never fewer than one) and reports their median
  and the peak resident memory the steps added over the state after building (``ru_maxrss``).
- A step is the closure's forward, plus ``backward`` of a ones gradient in a forward+backward
  cell, timed with ``time.perf_counter`` around its grad mode.
- The cases of one cell (part, length, causal, mode) are measured back to back; with
  ``rounds > 1`` they are measured round-robin that many times, order reversed every other round,
  and a row keeps the median of its rounds' medians (a slow phase of a shared machine then hits
  every case of the cell, not one). A case that fails, or takes longer than the part's
  ``max_seconds_per_step``, is not run at longer lengths.
- ``interleaved`` parts measure all cases of a cell in one fresh process, one step of each per
  round (order reversed every other round), and record each case's per-round time ratio to the
  part's reference: drift in background load hits both sides of every pair alike.
- With ``ATTNKIT_BENCH_LOCK=FILE`` each measurement holds an exclusive ``flock`` on FILE, so other
  heavy jobs started as ``flock -s FILE CMD`` pause while it runs (never wrap a whole suite in
  ``flock -x``: the harness takes the lock itself, per measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.suite import Case, Part

ROOT = Path(__file__).resolve().parent.parent
#: Measurements import attnkit from the ``src`` next to these benchmarks, ahead of any installed
#: copy, so a checkout (e.g. a ``git worktree`` snapshot) measures its own code.
PYTHONPATH = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
#: Rows keep every step time up to this many (the wrapper-overhead cell times 3000 calls: its
#: rows keep ``n_times`` and the median).
MAX_STORED_TIMES = 64


# ---------------------------------------------------------------------------------------------
# Inside the measurement process
# ---------------------------------------------------------------------------------------------


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _target(target: str) -> Callable[..., Callable[[], Any]]:
    """The function ``"module:function"`` names."""
    module_name, fn_name = target.split(":")
    return getattr(importlib.import_module(module_name), fn_name)


def _stepper(run: Callable[[], Any], backward: bool, grad_each_step: bool) -> Callable[[], float]:
    """One timed step of ``run``: forward (+ backward of a ones gradient), its grad mode inside the timing."""
    import torch

    grad_mode = torch.enable_grad if backward else torch.no_grad
    scope = grad_mode if grad_each_step else contextlib.nullcontext

    def step() -> float:
        start = time.perf_counter()
        with scope():
            out = run()
            if backward:
                out.backward(torch.ones_like(out))
        return time.perf_counter() - start

    return step


def _info(run: Callable[[], Any]) -> dict[str, Any]:
    info = getattr(run, "info", None)
    return dict(info()) if callable(info) else {}


def _grad_scope(spec: Mapping[str, Any], backward: bool) -> contextlib.AbstractContextManager[Any]:
    """The grad mode held around all steps when the part times them without entering it per step."""
    import torch

    if spec["grad_scope"] == "step":
        return contextlib.nullcontext()
    return torch.enable_grad() if backward else torch.no_grad()


def _single(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Time one closure: warm-up steps, then ``repeats`` timed steps within the time budget."""
    import torch

    build = _target(spec["target"])
    torch.manual_seed(0)
    run = build(spec["length"], spec["causal"], **spec["kwargs"])
    backward = spec["backward"]
    baseline = _maxrss_mb()
    step = _stepper(run, backward, spec["grad_scope"] == "step")
    with _grad_scope(spec, backward):
        # Warm up, but stop once the warm-up has taken a quarter of the time budget (steps that
        # long are far from any floor, and the allocator's settling is small next to them).
        warm = 0.0
        for _ in range(spec["warmup"]):
            warm += step()
            if warm > spec["time_budget"] / 4:
                break
        times: list[float] = []
        while len(times) < spec["repeats"]:
            times.append(step())
            # Stop early when the remaining repeats would blow the budget, but never before one timed run.
            if times[-1] * (spec["repeats"] - len(times)) > spec["time_budget"]:
                break
    result: dict[str, Any] = {
        "times": times,
        "median_s": statistics.median(times),
        "peak_mb": max(0.0, _maxrss_mb() - baseline),
    }
    info = _info(run)
    if info:
        result["info"] = info
    return result


def _interleaved(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Time several closures in one process, one step of each per round.

    Warm-up rounds and timed rounds alternate their order by their own index (round 0 in the
    declared order, round 1 reversed, ...). After ``min_repeats`` timed rounds, the measurement
    stops once ``time_budget`` seconds have passed since the warm-up.
    """
    import torch

    targets = spec["targets"]
    builders = [_target(t["target"]) for t in targets]
    torch.manual_seed(0)
    steps = []
    for t, build in zip(targets, builders):
        run = build(spec["length"], spec["causal"], **t["kwargs"])
        steps.append((t["label"], run, _stepper(run, t["backward"], spec["grad_scope"] == "step")))
    # one grad mode for every target of a "measurement"-scoped part (its targets share a mode)
    with _grad_scope(spec, any(t["backward"] for t in targets)):
        for r in range(spec["warmup"]):
            for _, _, step in steps if r % 2 == 0 else steps[::-1]:
                step()
        times: dict[str, list[float]] = {label: [] for label, _, _ in steps}
        deadline = time.perf_counter() + spec["time_budget"]
        for i in range(spec["repeats"]):
            for label, _, step in steps if i % 2 == 0 else steps[::-1]:
                times[label].append(step())
            if i + 1 >= spec["min_repeats"] and time.perf_counter() > deadline:
                break
    results: dict[str, Any] = {}
    for label, run, _ in steps:
        results[label] = {"times": times[label], "median_s": statistics.median(times[label])}
        info = _info(run)
        if info:
            results[label]["info"] = info
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Worker entry point: ``python -m benchmarks.harness --worker SPEC`` prints one JSON line."""
    parser = argparse.ArgumentParser(description="benchmark measurement worker (started by the runner)")
    parser.add_argument("--worker", required=True, help="JSON measurement spec")
    args = parser.parse_args(argv)
    spec = json.loads(args.worker)
    import torch

    torch.set_num_threads(spec["threads"])
    sys.path.insert(0, str(ROOT))
    result = _interleaved(spec) if "targets" in spec else _single(spec)
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# In the runner: one fresh process per measurement
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_machine() -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``$ATTNKIT_BENCH_LOCK`` (when set) during one measurement.

    On a shared machine, other jobs that take the same lock *shared* around their heavy work
    (``flock -s FILE cmd``) then pause while each measurement runs and resume between them,
    instead of either skewing the timings or waiting for a whole suite.
    """
    path = os.environ.get("ATTNKIT_BENCH_LOCK")
    if not path:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _interpreter(case: Case) -> tuple[str, str | None]:
    """The case's interpreter, and why it cannot run (``None`` when it can)."""
    if case.python is None:
        return sys.executable, None
    path = ROOT / case.python
    if not path.exists():
        return str(path), f"{case.python} not found: bash benchmarks/setup_env.sh builds the comparison environment"
    return str(path), None


def _spawn(python: str, spec: Mapping[str, Any], part: Part) -> tuple[str, Any]:
    """Run one worker under the lock: ``("ok", result)`` or ``(status, error message)``."""
    env = {**{k: v for k, v in part.env.items()}, **os.environ}
    env.update(OMP_NUM_THREADS=str(part.threads), PYTHONPATH=PYTHONPATH)
    cmd = [python, "-m", "benchmarks.harness", "--worker", json.dumps(spec)]
    try:
        with quiet_machine():
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=part.timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return "timeout", f"no result within {part.timeout:g} s"
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["killed"]
        return ("oom" if proc.returncode in (-9, 137) else "error"), tail[0][:300]
    return "ok", json.loads(proc.stdout.strip().splitlines()[-1])


def _base_row(case: Case, part: Part, length: int, causal: bool, mode: str, run: int) -> dict[str, Any]:
    row: dict[str, Any] = {
        "label": case.label,
        "role": case.role,
        "part": part.name,
        "length": length,
        "causal": causal,
        "mode": mode,
        "run": run,
    }
    if case.kwargs:
        row["params"] = dict(case.kwargs)
    if not case.autograd:
        row["autograd"] = False
    return row


def _with_times(row: dict[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` completed by a worker's result (long lists of step times are counted, not kept)."""
    times = result["times"]
    row.update(status="ok", median_s=result["median_s"])
    if len(times) <= MAX_STORED_TIMES:
        row["times"] = times
    else:
        row["n_times"] = len(times)
    if "peak_mb" in result:
        row["peak_mb"] = result["peak_mb"]
    if result.get("info"):
        row["info"] = result["info"]
    return row


def measure(case: Case, part: Part, length: int, causal: bool, mode: str, *, run: int = 0) -> dict[str, Any]:
    """Measure ``case`` in one cell, in a fresh process. Returns its row (``status`` ok/error/...)."""
    row = _base_row(case, part, length, causal, mode, run)
    python, missing = _interpreter(case)
    if missing:
        return {**row, "status": "skipped", "error": missing}
    spec = {
        "target": case.target,
        "kwargs": dict(case.kwargs),
        "length": length,
        "causal": causal,
        "backward": mode == "fwd+bwd" and case.autograd,
        "repeats": part.repeats,
        "warmup": part.warmup,
        "threads": part.threads,
        "time_budget": part.time_budget,
        "grad_scope": part.grad_scope,
    }
    status, result = _spawn(python, spec, part)
    if status != "ok":
        return {**row, "status": status, "error": result}
    return _with_times(row, result)


def measure_interleaved(
    cases: Sequence[Case], part: Part, length: int, causal: bool, mode: str, *, run: int = 0
) -> list[dict[str, Any]]:
    """Measure ``cases`` in one fresh process, step by step (see :func:`_interleaved`). One row per case."""
    rows = [_base_row(case, part, length, causal, mode, run) for case in cases]
    # one process runs them all: the interpreter an anchor needs (attnkit is importable there too)
    declared = {case.python for case in cases if case.python is not None}
    if len(declared) > 1:
        error = f"an interleaved cell runs in one interpreter, its cases name {sorted(declared)}"
        return [{**row, "status": "error", "error": error} for row in rows]
    python, missing = _interpreter(next(c for c in cases if c.python in declared or not declared))
    if missing:
        return [{**row, "status": "skipped", "error": missing} for row in rows]
    spec = {
        "targets": [
            {
                "label": case.label,
                "target": case.target,
                "kwargs": dict(case.kwargs),
                "backward": mode == "fwd+bwd" and case.autograd,
            }
            for case in cases
        ],
        "length": length,
        "causal": causal,
        "repeats": part.repeats,
        "warmup": part.warmup,
        "min_repeats": min(5, part.repeats),
        "threads": part.threads,
        "time_budget": part.time_budget,
        "grad_scope": part.grad_scope,
    }
    status, result = _spawn(python, spec, part)
    if status != "ok":
        return [{**row, "status": status, "error": result} for row in rows]
    reference = result.get(part.reference) if part.reference else None
    for case, row in zip(cases, rows):
        _with_times(row, result[case.label])
        row["peak_mb"] = None  # one process ran every case: its peak cannot be split between them
        if reference is not None and case.label != part.reference:
            ratios = [t / ref for t, ref in zip(result[case.label]["times"], reference["times"])]
            row["pair_ratios"] = {
                "vs": part.reference,
                "median": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
                "count": len(ratios),
            }
    return rows


def merge_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a case's measurements in one cell (one per round; the first failure ends them)."""
    ok = [r for r in results if r["status"] == "ok"]
    failed = {"failed_rounds": len(results) - len(ok)} if ok and len(ok) < len(results) else {}
    if len(ok) < 2:
        return {**ok[0], **failed} if ok else results[0]
    merged = {
        **ok[0],
        "median_s": statistics.median(r["median_s"] for r in ok),
        "round_medians_s": [r["median_s"] for r in ok],
        "peak_mb": max(r["peak_mb"] for r in ok),
        **failed,
    }
    if all("times" in r for r in ok):
        merged["times"] = [t for r in ok for t in r["times"]]
    else:
        merged.pop("times", None)
        merged["n_times"] = sum(r.get("n_times", len(r.get("times", []))) for r in ok)
    return merged


def measure_cell(
    cases: Sequence[Case], part: Part, length: int, causal: bool, mode: str, *, run: int = 0
) -> list[dict[str, Any]]:
    """Every case of one cell: interleaved in one process, or each in its own, in ``part.rounds`` rounds."""
    if part.interleaved:
        return measure_interleaved(cases, part, length, causal, mode, run=run)
    measured: dict[str, list[dict[str, Any]]] = {case.label: [] for case in cases}
    for r in range(part.rounds):
        for case in cases if r % 2 == 0 else cases[::-1]:
            done = measured[case.label]
            # a failed case, or one far too slow for a floor, keeps its first round
            if done and (done[0]["status"] != "ok" or done[0]["median_s"] > part.max_round_seconds):
                continue
            done.append(measure(case, part, length, causal, mode, run=run))
    return [merge_rounds(measured[case.label]) for case in cases]


def cells(part: Part) -> Iterator[tuple[str, bool, int]]:
    """``(mode, causal, length)`` of every cell, in the order they are measured."""
    for mode in part.modes:
        for causal in part.causal:
            for length in part.lengths:
                yield mode, causal, length


def run_part(
    part: Part, *, run: int = 0, report: Callable[[dict[str, Any]], None] | None = None
) -> Iterator[list[dict[str, Any]]]:
    """Measure every cell of ``part``; yields each cell's rows as soon as the cell is done.

    A case that errors, times out, runs out of memory or takes longer than
    ``part.max_seconds_per_step`` per step is not run at longer lengths in that (causal, mode).
    """
    cases = part.case_list()
    stopped: set[tuple[str, bool, str]] = set()
    for mode, causal, length in cells(part):
        cell = [c for c in cases if c.runs_in(causal) and (c.label, causal, mode) not in stopped]
        if not cell:
            continue
        rows = measure_cell(cell, part, length, causal, mode, run=run)
        for row in rows:
            if report:
                report(row)
            if row["status"] != "ok" or row["median_s"] > part.max_seconds_per_step:
                stopped.add((row["label"], causal, mode))
        yield rows


if __name__ == "__main__":
    main()
