"""Per-token decoding cost vs context length: the recurrent state of ``linear`` and ``performer``.

A recurrent state holds ``Σ φ(k) [v, 1]ᵀ`` (O(F·D) per head), so one decoding step costs the
same after 1K or 64K tokens; a KV cache (``full``) grows with the context, shown for contrast.
Protocol: B=1, H=8, D=64, fp32, 1 thread by default (a one-token step is a handful of tiny
operations: a second thread only adds synchronisation, and on a shared machine makes the
timings swing by orders of magnitude); for each (mechanism, context) a fresh process
prefills the context (chunked, not timed; the KV cache is filled directly), then times
``--steps`` single-token ``decode`` calls and reports the median.

Run (a few minutes)::

    ATTNKIT_BENCH_LOCK=/tmp/attnkit-quiet.lock .venv/bin/python -m benchmarks.decode_recurrent

Writes ``benchmarks/results/decode_recurrent.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks.harness import PYTHONPATH, RESULTS, ROOT, quiet_machine

MECHANISMS: dict[str, dict[str, Any]] = {
    "linear": {},
    "performer": {"nb_features": 256},
    "full": {},
}


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    import attnkit
    from attnkit.core.base import KVState

    torch.set_num_threads(spec["threads"])
    g = torch.Generator().manual_seed(0)
    b, h, d, context = 1, 8, 64, spec["context"]
    module = attnkit.build_attention(spec["name"], **spec["options"]).eval()
    state = module.new_state()
    with torch.no_grad():
        if isinstance(state, KVState):  # a KV cache needs no attention to be filled
            state.append(torch.randn(b, h, context, d, generator=g), torch.randn(b, h, context, d, generator=g), None)
        else:
            for lo in range(0, context, 8192):  # prefill in pieces through the chunked core
                n = min(8192, context - lo)
                q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
                module.decode(q, k, v, state)
        steps = [tuple(torch.randn(b, h, 1, d, generator=g) for _ in range(3)) for _ in range(spec["steps"] + 5)]
        times = []
        for i, (q, k, v) in enumerate(steps):
            start = time.perf_counter()
            module.decode(q, k, v, state)
            if i >= 5:  # warm-up
                times.append(time.perf_counter() - start)
    state_numel = state.kv.numel() if hasattr(state, "kv") else 2 * state.keys.numel()
    return {"median_s": statistics.median(times), "state_floats": state_numel}


def measure(name: str, context: int, steps: int, threads: int) -> dict[str, Any]:
    """One fresh process per (mechanism, context)."""
    spec = {"name": name, "options": MECHANISMS[name], "context": context, "steps": steps, "threads": threads}
    # this tree's src first (as in the harness): a snapshot must not measure the installed checkout
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": PYTHONPATH}
    cmd = [sys.executable, "-m", "benchmarks.decode_recurrent", "--worker", json.dumps(spec)]
    with quiet_machine():  # the exclusive $ATTNKIT_BENCH_LOCK around each measurement, as in the harness
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    row: dict[str, Any] = {"mechanism": name, "context": context}
    if proc.returncode != 0:
        return {**row, "status": "error", "error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:300]}
    return {**row, "status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return
    rows = []
    for name in MECHANISMS:
        for context in args.contexts:
            row = measure(name, context, args.steps, args.threads)
            rows.append(row)
            shown = f"{row['median_s'] * 1e6:9.1f} us/token" if row["status"] == "ok" else row["status"]
            print(f"[decode_recurrent] {name:10s} context={context:6d} {shown}", flush=True)
    lines = [
        "| mechanism | context | us per token | vs context 1K | state floats | status |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next((x for x in rows if x["mechanism"] == r["mechanism"] and x["context"] == min(args.contexts)), None)
        if r["status"] == "ok" and base is not None and base["status"] == "ok":
            r["vs_shortest"] = r["median_s"] / base["median_s"]
        lines.append(
            f"| {r['mechanism']} | {r['context']} | {r['median_s'] * 1e6:.1f} | {r.get('vs_shortest', float('nan')):.2f} | "
            f"{r.get('state_floats', '-')} | {r['status']} |"
            if r["status"] == "ok"
            else f"| {r['mechanism']} | {r['context']} | - | - | - | {r['status']} |"
        )
    meta = {
        "protocol": "B=1, H=8, D=64, fp32, single-token decode steps after a prefilled context",
        "threads": args.threads,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "decode_recurrent.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = "\n".join(lines)
    (RESULTS / "decode_recurrent.md").write_text(f"# decode_recurrent benchmark\n\n{json.dumps(meta)}\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
