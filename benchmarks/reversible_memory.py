"""Training peak memory vs depth: plain residual layers vs reversible ones (and checkpointing).

One training step (forward + backward of a language model's logits) per measurement, each
in a fresh process (``benchmarks.harness.measure``); peak memory is the resident-set peak
the step added over the state after building the model, so parameters are excluded and
what remains is activations plus parameter gradients (listed separately: they grow with
depth whatever the layers). Reversible layers should stay flat apart from those gradients:
only the last layer's two streams are kept, the rest are rebuilt in backward.

glibc raises its mmap threshold after big blocks are freed, so freed activations linger in
the heap and the resident peak drifts upward with every layer recomputed in backward
(allocator fragmentation, not live tensors). The workers therefore run with
``MALLOC_MMAP_THRESHOLD_=131072`` (fixed at glibc's default), which makes the resident peak
track live tensors; set the variable yourself to measure something else.

Run (about 5 minutes on 2 idle cores)::

    ATTNKIT_BENCH_LOCK=/tmp/attnkit-quiet.lock python -m benchmarks.reversible_memory

Writes ``benchmarks/results/reversible_memory.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.harness import RESULTS, Case, measure

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "checkpointing": {"checkpointing": True},
    "reversible": {"reversible": True},
    "reversible + ff_chunks=4": {"reversible": True, "ff_chunks": 4},
}


def training_step(
    length: int, causal: bool, *, depth: int, batch: int, dim: int, **changes: Any
) -> Callable[[], torch.Tensor]:
    """A closure running one forward of a ``depth``-layer LM on ``(batch, length)`` tokens (harness target)."""
    import attnkit

    cfg = attnkit.TransformerConfig(vocab_size=256, dim=dim, depth=depth, heads=dim // 64, max_len=length, **changes)
    model = attnkit.LanguageModel(cfg).train()
    ids = torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(0))

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        return model(ids)

    return step


def gradient_mb(depth: int, dim: int) -> float:
    """Size of the fp32 parameter gradients of the benchmarked model (what any training step keeps)."""
    import attnkit

    cfg = attnkit.TransformerConfig(vocab_size=256, dim=dim, depth=depth, heads=dim // 64)
    return attnkit.LanguageModel(cfg).num_parameters() * 4 / 2**20


def markdown(rows: list[dict[str, Any]], depths: list[int]) -> str:
    labels = list(dict.fromkeys(r["label"] for r in rows))
    by = {(r["label"], r["depth"]): r for r in rows}

    def cell(label: str, depth: int, key: str, fmt: str) -> str:
        r = by.get((label, depth))
        return fmt.format(r[key]) if r and r["status"] == "ok" else (r["status"] if r else "-")

    head = "| variant | " + " | ".join(f"depth {d}" for d in depths) + " |"
    rule = "|---|" + "---|" * len(depths)
    mem = [head, rule] + [
        f"| {label} | " + " | ".join(cell(label, d, "peak_mb", "{:.0f} MB") for d in depths) + " |" for label in labels
    ]
    mem.append(
        "| (of which parameter gradients) | "
        + " | ".join(cell(labels[0], d, "grad_mb", "{:.0f} MB") for d in depths)
        + " |"
    )
    times = [head, rule] + [
        f"| {label} | " + " | ".join(cell(label, d, "median_s", "{:.2f} s") for d in depths) + " |" for label in labels
    ]
    return (
        "Peak training memory (activations + gradients):\n\n" + "\n".join(mem) + "\n\nStep time:\n\n" + "\n".join(times)
    )


def plot(rows: list[dict[str, Any]], path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label in dict.fromkeys(r["label"] for r in rows):
        pts = sorted((r["depth"], r["peak_mb"]) for r in rows if r["label"] == label and r["status"] == "ok")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("layers")
    ax.set_ylabel("peak training memory added by one step, MB")
    ax.set_title("Training memory vs depth")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # inherited by the measurement workers
    rows: list[dict[str, Any]] = []
    for label, changes in VARIANTS.items():
        for depth in args.depths:
            case = Case(
                label,
                "benchmarks.reversible_memory:training_step",
                {"depth": depth, "batch": args.batch, "dim": args.dim, **changes},
            )
            row = measure(case, args.length, True, "fwd+bwd", repeats=args.repeats, warmup=1)
            row["depth"] = depth
            row["grad_mb"] = gradient_mb(depth, args.dim)
            rows.append(row)
            shown = f"{row['peak_mb']:7.0f} MB {row['median_s']:6.2f} s" if row["status"] == "ok" else row["status"]
            print(f"[reversible_memory] {label:26s} depth={depth:3d} {shown}", flush=True)
    meta = {
        "suite": "reversible_memory",
        "torch": torch.__version__,
        "protocol": f"LanguageModel dim={args.dim} heads={args.dim // 64} vocab=256, batch {args.batch} x "
        f"{args.length} tokens, fp32, 2 threads, one forward+backward per step, fresh process per cell",
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "reversible_memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (RESULTS / "reversible_memory.md").write_text(
        f"# reversible_memory benchmark\n\n{json.dumps(meta)}\n\n{markdown(rows, args.depths)}\n"
    )
    plot(rows, RESULTS / "reversible_memory.png")
    print(markdown(rows, args.depths))


if __name__ == "__main__":
    main()
