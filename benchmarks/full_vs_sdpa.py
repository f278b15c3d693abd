"""Is the exact ``full`` path as fast as the SDPA call it wraps? (issue 3: "within 5% of SDPA at every length").

Two measurements, both written to ``benchmarks/results/full_vs_sdpa.{json,md,png}``:

1. The shared harness (:func:`benchmarks.harness.run_suite`): each implementation in its own fresh
   process, median of ``--repeats`` steps, peak memory. Comparable with every other suite, but the two
   rows of a cell run one after the other, so load from other processes on a shared machine shows up as
   a ratio away from 1.
2. A paired measurement: one fresh process per cell that alternates SDPA and ``full`` step by step
   (ABAB...) on the same inputs and reports the median of the per-pair ratios. Drift in background
   load hits both sides of every pair alike, which makes a 5% question answerable on a noisy machine.

Run (about 10 minutes up to 16K, 30 more for 32K)::

    ATTNKIT_BENCH_LOCK=/tmp/attnkit-quiet.lock .venv-bench/bin/python -m benchmarks.full_vs_sdpa --lengths 1024 2048 4096 8192 16384
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.harness import PYTHONPATH, RESULTS, ROOT, Case, markdown_table, quiet_machine, run_suite

CASES = [
    Case("sdpa", "benchmarks.common:sdpa", role="sdpa"),
    Case("attnkit full", "benchmarks.common:attnkit_mechanism", {"name": "full"}),
]


def _paired_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Alternate SDPA and ``full`` on one set of inputs; per-pair time ratios full / SDPA."""
    import torch

    from benchmarks.common import attnkit_mechanism, sdpa

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    length, causal, backward = spec["length"], spec["causal"], spec["mode"] == "fwd+bwd"
    runs: dict[str, Callable[[], torch.Tensor]] = {
        "sdpa": sdpa(length, causal),
        "full": attnkit_mechanism(length, causal, name="full"),
    }
    grad_ctx = torch.enable_grad if backward else torch.no_grad

    def step(name: str) -> float:
        start = time.perf_counter()
        with grad_ctx():
            out = runs[name]()
            if backward:
                out.backward(torch.ones_like(out))
        return time.perf_counter() - start

    for name in runs:  # warm-up
        step(name)
    times: dict[str, list[float]] = {"sdpa": [], "full": []}
    ratios = []
    deadline = time.perf_counter() + spec["time_budget"]
    for i in range(spec["pairs"]):
        # alternate which side goes first so a systematic first/second effect cancels
        order = ("sdpa", "full") if i % 2 == 0 else ("full", "sdpa")
        pair = {name: step(name) for name in order}
        for name, t in pair.items():
            times[name].append(t)
        ratios.append(pair["full"] / pair["sdpa"])
        if i >= 4 and time.perf_counter() > deadline:
            break
    return {
        "pairs": len(ratios),
        "sdpa_median_s": statistics.median(times["sdpa"]),
        "full_median_s": statistics.median(times["full"]),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def wrapper_overhead(*, length: int = 64, calls: int = 3000, threads: int = 2) -> dict[str, float]:
    """Per-call cost of ``full``'s validation and dispatch, in microseconds, measured in this process.

    At a tiny length SDPA itself takes a few microseconds, so the difference between the two
    medians is what ``full`` adds on top of the SDPA call it makes (forward, no grad).
    """
    import torch

    from benchmarks.common import attnkit_mechanism, sdpa

    torch.set_num_threads(threads)
    runs = {"sdpa": sdpa(length, False), "full": attnkit_mechanism(length, False, name="full")}
    samples: dict[str, list[float]] = {"sdpa": [], "full": []}
    with torch.no_grad():
        for i in range(calls):
            for name in ("sdpa", "full") if i % 2 == 0 else ("full", "sdpa"):
                start = time.perf_counter()
                runs[name]()
                samples[name].append(time.perf_counter() - start)
    sdpa_us = statistics.median(samples["sdpa"]) * 1e6
    full_us = statistics.median(samples["full"]) * 1e6
    return {"length": length, "calls": calls, "sdpa_us": sdpa_us, "full_us": full_us, "overhead_us": full_us - sdpa_us}


def paired(lengths: Sequence[int], *, pairs: int, threads: int = 2, time_budget: float = 90.0) -> list[dict[str, Any]]:
    """Run :func:`_paired_worker` in a fresh process for every (mode, causal, length) cell."""
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": PYTHONPATH}
    for mode in ("fwd", "fwd+bwd"):
        for causal in (False, True):
            for length in lengths:
                spec = {
                    "length": length,
                    "causal": causal,
                    "mode": mode,
                    "pairs": pairs,
                    "threads": threads,
                    "time_budget": time_budget,
                }
                cmd = [sys.executable, "-m", "benchmarks.full_vs_sdpa", "--paired-worker", json.dumps(spec)]
                with quiet_machine():
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
                row: dict[str, Any] = {"length": length, "causal": causal, "mode": mode}
                if proc.returncode != 0:
                    row["status"] = "error"
                    row["error"] = (proc.stderr.strip().splitlines() or ["killed"])[-1][:300]
                else:
                    row.update(status="ok", **json.loads(proc.stdout.strip().splitlines()[-1]))
                rows.append(row)
                print(
                    f"[paired] {mode:7s} causal={causal!s:5s} L={length:6d} {row.get('ratio_median', '-')}", flush=True
                )
    return rows


def paired_table(rows: Sequence[dict[str, Any]]) -> str:
    """Paired rows as markdown: median per-pair ratio full / SDPA with its range."""
    lines = [
        "| causal | mode | length | SDPA ms | full ms | full / SDPA (median of pairs) | min–max | pairs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["mode"], r["causal"], r["length"])):
        if r["status"] != "ok":
            lines.append(f"| {'yes' if r['causal'] else 'no'} | {r['mode']} | {r['length']} | - | - | - | - | error |")
            continue
        lines.append(
            f"| {'yes' if r['causal'] else 'no'} | {r['mode']} | {r['length']} | {r['sdpa_median_s'] * 1e3:.1f} "
            f"| {r['full_median_s'] * 1e3:.1f} | {r['ratio_median']:.3f} | {r['ratio_min']:.2f}–{r['ratio_max']:.2f} "
            f"| {r['pairs']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per harness measurement (after warm-up)")
    parser.add_argument("--pairs", type=int, default=9, help="SDPA/full pairs per paired cell")
    parser.add_argument("--skip-harness", action="store_true", help="keep the harness rows already in the results")
    parser.add_argument("--overhead-only", action="store_true", help="only re-measure the wrapper overhead")
    parser.add_argument("--paired-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.paired_worker:
        print(json.dumps(_paired_worker(json.loads(args.paired_worker))))
        return
    name = "full_vs_sdpa"
    if not args.skip_harness:
        run_suite(name, CASES, lengths=args.lengths, repeats=args.repeats)
    data = json.loads((RESULTS / f"{name}.json").read_text())
    with quiet_machine():  # a few seconds of µs-scale calls: any other process on the cores skews them
        data["wrapper_overhead"] = wrapper_overhead()
    print(f"[overhead] {data['wrapper_overhead']}", flush=True)
    if not args.overhead_only:
        # cells of other lengths measured before are kept, so one length can be re-measured alone
        fresh = paired(args.lengths, pairs=args.pairs)
        kept = [r for r in data.get("paired", []) if r["length"] not in args.lengths]
        data["paired"] = kept + fresh
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1))
    (RESULTS / f"{name}.md").write_text(report(data))


def report(data: dict[str, Any]) -> str:
    """The markdown file: the harness table, then the paired table and the wrapper overhead."""
    overhead = data["wrapper_overhead"]
    return (
        f"# full_vs_sdpa benchmark\n\n{json.dumps(data['meta'])}\n\n{markdown_table(data['rows'])}\n"
        "\n## Paired measurement\n\nOne fresh process per cell alternates SDPA and `full` on the same inputs; "
        "the ratio is the median over pairs of (full step time / SDPA step time). `error`: the cell did not "
        "complete (failed or was stopped); the json has the message.\n\n"
        + paired_table(data.get("paired", []))
        + f"\n\n## Wrapper overhead\n\nAt length {overhead['length']} (forward, no grad, median of "
        f"{overhead['calls']} alternating calls): SDPA {overhead['sdpa_us']:.1f} µs, `full` {overhead['full_us']:.1f} µs "
        f"per call, so `full` adds {overhead['overhead_us']:.1f} µs of validation and dispatch to each call.\n"
    )


if __name__ == "__main__":
    main()
