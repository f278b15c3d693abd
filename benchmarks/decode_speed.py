"""Decoding speed vs context length: full KV cache, rolling window cache, recurrent state.

A language model is prefilled with a context of ``L`` tokens through its cache (setup, not
timed); then the time of ``--steps`` single-token decoding steps is measured, in a fresh
process per cell (``benchmarks.harness.measure``), and reported as tokens per second.
A full KV cache attends over all ``L`` keys at every step, so its speed falls as ``L``
grows; a window cache (sliding window) and a recurrent state (linear attention,
Performer) do a fixed amount of work per token, so their rows should stay flat.

Mechanisms are chosen from the registry by declared decoding kind: ``full`` (the KV-cache
baseline) plus every registered mechanism whose ``decoding`` is ``window_cache`` or
``recurrent``, each with its ``benchmark_options``. Run::

    ATTNKIT_BENCH_LOCK=/tmp/attnkit-quiet.lock python -m benchmarks.decode_speed

Writes ``benchmarks/results/decode_speed.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.harness import RESULTS, Case, measure


def decoding_mechanisms() -> list[str]:
    """``full`` plus every registered mechanism with a window cache or a recurrent state."""
    import attnkit

    names = ["full"]
    for name in attnkit.list_attention():
        kind = attnkit.attention_capabilities(name).decoding
        if kind in ("window_cache", "recurrent") and attnkit.attention_capabilities(name).causal:
            names.append(name)
    return names


def decode_steps(
    length: int, causal: bool, *, name: str, steps: int, dim: int, depth: int, prefill_chunk: int
) -> Callable[[], torch.Tensor]:
    """Prefill ``length`` tokens, return a closure decoding ``steps`` tokens one at a time (harness target)."""
    import attnkit

    spec = attnkit.get_spec(name)
    cfg = attnkit.TransformerConfig(
        vocab_size=256,
        dim=dim,
        depth=depth,
        heads=dim // 64,
        attention=name,
        attention_options=spec.benchmark_options,
        position="rotary",
        max_len=length + 4096,
    )
    model = attnkit.LanguageModel(cfg).eval()
    cache = model.new_cache()
    context = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for start in range(0, length, prefill_chunk):
            logits = model(context[:, start : start + prefill_chunk], cache=cache)
    state = {"token": logits[:, -1:].argmax(-1)}

    def run() -> torch.Tensor:
        token = state["token"]
        for _ in range(steps):
            logits = model(token, cache=cache)
            token = logits[:, -1:].argmax(-1)
        state["token"] = token
        return logits

    return run


def markdown(rows: list[dict[str, Any]], lengths: list[int], steps: int) -> str:
    labels = list(dict.fromkeys(r["label"] for r in rows))
    by = {(r["label"], r["length"]): r for r in rows}

    def cell(label: str, length: int) -> str:
        r = by.get((label, length))
        if r is None:
            return "-"
        return f"{steps / r['median_s']:.0f}" if r["status"] == "ok" else r["status"]

    head = "| mechanism (decoding state) | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |"
    lines = [head, "|---|" + "---|" * len(lengths)]
    lines += [f"| {label} | " + " | ".join(cell(label, n) for n in lengths) + " |" for label in labels]
    return "Tokens per second (batch 1, one token per step):\n\n" + "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Any, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label in dict.fromkeys(r["label"] for r in rows):
        pts = sorted((r["length"], steps / r["median_s"]) for r in rows if r["label"] == label and r["status"] == "ok")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens in the cache)")
    ax.set_ylabel("tokens / second")
    ax.set_title("Decoding speed vs context")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    import attnkit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--mechanisms", nargs="+", default=None, help="default: full + window/recurrent mechanisms")
    parser.add_argument("--steps", type=int, default=32, help="decoding steps per timed repeat")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--prefill-chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    names = args.mechanisms or decoding_mechanisms()
    meta = {
        "suite": "decode_speed",
        "torch": torch.__version__,
        "protocol": f"LanguageModel dim={args.dim} heads={args.dim // 64} depth={args.depth} rotary, batch 1, fp32, "
        f"2 threads; context prefilled through the cache in chunks of {args.prefill_chunk}; median time of "
        f"{args.steps} one-token steps over {args.repeats} repeats; fresh process per cell",
        "options": {n: attnkit.get_spec(n).benchmark_options for n in names},
        "date": time.strftime("%Y-%m-%d"),
    }
    rows: list[dict[str, Any]] = []
    # Contexts outermost, so an interrupted run still compares every mechanism at the shorter ones;
    # the result files are rewritten after every cell.
    for length in args.lengths:
        for name in names:
            label = f"{name} ({attnkit.attention_capabilities(name).decoding})"
            kwargs = {
                "name": name,
                "steps": args.steps,
                "dim": args.dim,
                "depth": args.depth,
                "prefill_chunk": args.prefill_chunk,
            }
            case = Case(label, "benchmarks.decode_speed:decode_steps", kwargs)
            row = measure(case, length, True, "fwd", repeats=args.repeats, warmup=1, timeout=900)
            rows.append(row)
            ok = row["status"] == "ok"
            shown = f"{args.steps / row['median_s']:8.1f} tok/s" if ok else row.get("error", row["status"])
            print(f"[decode_speed] {label:32s} L={length:6d} {shown}", flush=True)
            write_results(meta, rows, args.lengths, args.steps)
    print(markdown(rows, args.lengths, args.steps))


def write_results(meta: dict[str, Any], rows: list[dict[str, Any]], lengths: list[int], steps: int) -> None:
    """Write ``decode_speed.{json,md,png}`` for the rows measured so far."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "decode_speed.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(rows, lengths, steps)
    (RESULTS / "decode_speed.md").write_text(f"# decode_speed benchmark\n\n{json.dumps(meta)}\n\n{table}\n")
    plot(rows, RESULTS / "decode_speed.png", steps)


if __name__ == "__main__":
    main()
