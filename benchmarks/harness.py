"""Shared benchmark harness: every measurement in a fresh subprocess, ratios from one run.

A *case* names a target function ``"module:function"`` that takes ``(length, causal,
**kwargs)`` and returns a zero-argument closure running one forward pass and returning
the output tensor (inputs created inside with ``requires_grad=True``). The harness times
the closure (forward, or forward + ``backward``), takes the median over repeats after
warm-up, and reads the peak resident memory the measurement added over the state after
setup (``ru_maxrss`` of the fresh process). Cases of one (length, causal, mode) cell run
back to back in the same invocation, so the ratios in the results compare like with like.

Protocol defaults (DEVELOPERS.md / REFERENCES.md): B=1, H=8, D=64, fp32, 2 threads.

Usage from a suite script::

    from benchmarks.harness import Case, run_suite
    cases = [Case("sdpa", "benchmarks.common:sdpa"), Case("attnkit sliding_window", "benchmarks.sparse:ours", {"window": 256})]
    run_suite("sparse", cases, lengths=[1024, 4096, 16384])
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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
#: Measurements import attnkit from the ``src`` next to these benchmarks, ahead of any installed
#: copy, so a checkout (e.g. a ``git worktree`` snapshot) measures its own code.
PYTHONPATH = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
#: Untimed steps before the timed ones. The first step pays for one-off work (lazy imports, kernel
#: selection); for a few more, glibc's allocator is still raising its mmap threshold, so each step
#: maps fresh memory and pays first-touch page faults (BigBird + projections at 16K: 2769, 1992, 1766,
#: then 1720-1840 ms per step; HF BigBird 4.57 at 4K: 978, 864, 765, then 640-800). Three untimed
#: steps measure the steady state a training run sees.
WARMUP = 3


@dataclass(frozen=True)
class Case:
    """One implementation to measure.

    Attributes:
        label: row label in tables and plots, e.g. ``"attnkit sliding_window"``.
        target: ``"module:function"`` building the closure.
        kwargs: extra keyword arguments for the target.
        role: ``"attnkit"``, ``"sdpa"`` (the baseline ratios are taken against) or ``"anchor"``.
        causal_only: run only in causal cells; ``bidirectional_only`` likewise.
        python: interpreter to run it with (anchors may live in another venv); default this one.
    """

    label: str
    target: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    role: str = "attnkit"
    causal_only: bool = False
    bidirectional_only: bool = False
    python: str | None = None


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    module_name, fn_name = spec["target"].split(":")
    sys.path.insert(0, str(ROOT))
    fn = getattr(importlib.import_module(module_name), fn_name)
    torch.manual_seed(0)
    run = fn(spec["length"], spec["causal"], **spec["kwargs"])
    backward = spec["mode"] == "fwd+bwd"
    grad_ctx = torch.enable_grad if backward else torch.no_grad
    baseline = _maxrss_mb()

    def step() -> float:
        start = time.perf_counter()
        with grad_ctx():
            out = run()
            if backward:
                out.backward(torch.ones_like(out))
        return time.perf_counter() - start

    # Warm up, but stop once the warm-up has taken a quarter of the time budget (steps
    # that long are far from any floor, and the allocator's settling is small next to them).
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
    return {"times": times, "median_s": statistics.median(times), "peak_mb": max(0.0, _maxrss_mb() - baseline)}


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


def measure(
    case: Case,
    length: int,
    causal: bool,
    mode: str,
    *,
    repeats: int = 5,
    warmup: int = WARMUP,
    threads: int = 2,
    timeout: float = 600.0,
    time_budget: float = 120.0,
) -> dict[str, Any]:
    """Measure ``case`` in a fresh subprocess. Returns a result row (``status`` ok/error/timeout)."""
    spec = {
        "target": case.target,
        "kwargs": case.kwargs,
        "length": length,
        "causal": causal,
        "mode": mode,
        "repeats": repeats,
        "warmup": warmup,
        "threads": threads,
        "time_budget": time_budget,
    }
    row: dict[str, Any] = {"label": case.label, "role": case.role, "length": length, "causal": causal, "mode": mode}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": PYTHONPATH}
    cmd = [case.python or sys.executable, "-m", "benchmarks.harness", "--worker", json.dumps(spec)]
    try:
        with quiet_machine():
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**row, "status": "timeout"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["killed"]
        status = "oom" if proc.returncode in (-9, 137) else "error"
        return {**row, "status": status, "error": tail[0][:300]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**row, "status": "ok", **result}


def add_rounds_argument(parser: argparse.ArgumentParser) -> None:
    """The suites' ``--rounds N`` and ``--warmup N`` options (see :func:`run_suite`)."""
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure the cases of each cell round-robin this many times (median of rounds)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=WARMUP,
        help=f"untimed steps per measurement before the timed ones (default {WARMUP}: the allocator settles)",
    )


def _merge_rounds(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a case's measurements in one cell (one per round; the first failure ends them)."""
    ok = [r for r in results if r["status"] == "ok"]
    failed = {"failed_rounds": len(results) - len(ok)} if ok and len(ok) < len(results) else {}
    if len(ok) < 2:
        return {**ok[0], **failed} if ok else results[0]
    return {
        **ok[0],
        "median_s": statistics.median(r["median_s"] for r in ok),
        "round_medians_s": [r["median_s"] for r in ok],
        "times": [t for r in ok for t in r["times"]],
        "peak_mb": max(r["peak_mb"] for r in ok),
        **failed,
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Add ``vs_sdpa`` (time / SDPA time in the same cell) and ``vs_anchor`` (time / fastest anchor)."""
    cells: dict[tuple[int, bool, str], list[dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["length"], r["causal"], r["mode"]), []).append(r)
    for cell in cells.values():
        ok = [r for r in cell if r["status"] == "ok"]
        sdpa = [r["median_s"] for r in ok if r["role"] == "sdpa"]
        anchors = [r["median_s"] for r in ok if r["role"] == "anchor"]
        for r in ok:
            if sdpa:
                r["vs_sdpa"] = r["median_s"] / sdpa[0]
            if anchors and r["role"] == "attnkit":
                r["vs_anchor"] = r["median_s"] / min(anchors)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a markdown table: time (ms), ratio to SDPA, ratio to the fastest anchor, peak MB."""
    lines = [
        "| impl | causal | mode | length | time ms | vs SDPA | vs fastest anchor | peak MB | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["mode"], r["causal"], r["length"], r["label"])):
        ok = r["status"] == "ok"
        lines.append(
            "| {label} | {causal} | {mode} | {length} | {t} | {s} | {a} | {m} | {st} |".format(
                label=r["label"],
                causal="yes" if r["causal"] else "no",
                mode=r["mode"],
                length=r["length"],
                t=f"{r['median_s'] * 1e3:.1f}" if ok else "-",
                s=f"{r['vs_sdpa']:.2f}" if "vs_sdpa" in r else "-",
                a=f"{r['vs_anchor']:.2f}" if "vs_anchor" in r else "-",
                m=f"{r['peak_mb']:.0f}" if ok else "-",
                st=r["status"],
            )
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Log-log time and memory vs length per implementation (fwd+bwd where measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows})
    mode = "fwd+bwd" if "fwd+bwd" in modes else modes[0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["mode"] == mode and r["status"] == "ok":
            series.setdefault(f"{r['label']}{' (causal)' if r['causal'] else ''}", []).append(r)
    for label, pts in sorted(series.items()):
        pts.sort(key=lambda r: r["length"])
        xs = [r["length"] for r in pts]
        style = "--" if any(r["role"] != "attnkit" for r in pts) else "-"
        axes[0].plot(xs, [r["median_s"] * 1e3 for r in pts], style, marker="o", label=label)
        axes[1].plot(xs, [max(r["peak_mb"], 1.0) for r in pts], style, marker="o", label=label)
    for ax, ylabel in zip(axes, ["time per step, ms (median)", "peak extra memory, MB"]):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title(f"{title}: {mode} time")
    axes[1].set_title(f"{title}: {mode} peak memory")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_suite(
    name: str,
    cases: Sequence[Case],
    *,
    lengths: Sequence[int],
    causal_values: Sequence[bool] = (False, True),
    modes: Sequence[str] = ("fwd", "fwd+bwd"),
    repeats: int = 5,
    warmup: int = WARMUP,
    threads: int = 2,
    timeout: float = 600.0,
    max_seconds_per_step: float = 60.0,
    rounds: int = 1,
    max_round_seconds: float = 10.0,
    out_dir: Path = RESULTS,
) -> list[dict[str, Any]]:
    """Measure every case in every cell; write ``<name>.json``, ``<name>.md`` and ``<name>.png``.

    A case that errors, times out, runs out of memory or takes longer than
    ``max_seconds_per_step`` per step is not run at longer lengths in that (causal, mode).

    With ``rounds > 1`` the cases of a cell are measured round-robin, ``rounds`` times (the
    order reversed every other round), and a row's time is the median of its per-round
    medians (``round_medians_s``), its peak memory the largest: a slow phase of a shared
    machine that outlasts one measurement then hits every case of the cell rather than one.
    A case whose first round took more than ``max_round_seconds`` per step keeps that one
    round (its ratios are far from any floor and more rounds would take minutes).
    """
    import platform

    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    stopped: set[tuple[str, bool, str]] = set()
    for mode in modes:
        for causal in causal_values:
            for length in lengths:
                cell = [
                    case
                    for case in cases
                    if not ((case.causal_only and not causal) or (case.bidirectional_only and causal))
                    and (case.label, causal, mode) not in stopped
                ]
                measured: dict[str, list[dict[str, Any]]] = {case.label: [] for case in cell}
                for r in range(rounds):
                    for case in cell if r % 2 == 0 else cell[::-1]:
                        done = measured[case.label]
                        if done and (done[0]["status"] != "ok" or done[0]["median_s"] > max_round_seconds):
                            continue
                        done.append(
                            measure(
                                case,
                                length,
                                causal,
                                mode,
                                repeats=repeats,
                                warmup=warmup,
                                threads=threads,
                                timeout=timeout,
                            )
                        )
                for case in cell:
                    key = (case.label, causal, mode)
                    row = _merge_rounds(measured[case.label])
                    rows.append(row)
                    shown = (
                        f"{row['median_s'] * 1e3:9.1f} ms {row['peak_mb']:7.0f} MB"
                        if row["status"] == "ok"
                        else row["status"]
                    )
                    print(f"[{name}] {mode:7s} causal={causal!s:5s} L={length:6d} {case.label:38s} {shown}", flush=True)
                    if row["status"] != "ok" or row["median_s"] > max_seconds_per_step:
                        stopped.add(key)
    add_ratios(rows)
    meta = {
        "suite": name,
        "torch": torch.__version__,
        "threads": threads,
        "repeats": repeats,
        "warmup": warmup,
        "rounds": rounds,
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "protocol": "B=1, H=8, D=64, fp32; median of repeats after warm-up; each measurement in a fresh process",
        "date": time.strftime("%Y-%m-%d"),
    }
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out_dir / f"{name}.md").write_text(f"# {name} benchmark\n\n{json.dumps(meta)}\n\n{markdown_table(rows)}\n")
    plot(rows, out_dir / f"{name}.png", name)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="benchmark worker (internal)")
    parser.add_argument("--worker", required=True, help="JSON measurement spec")
    args = parser.parse_args(argv)
    print(json.dumps(_worker(json.loads(args.worker))))


if __name__ == "__main__":
    main()
