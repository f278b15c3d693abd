"""The report's PNG figures: efficiency curves, the speed-quality Pareto chart, patterns.

Every mechanism keeps one colour and marker across figures; exact mechanisms are drawn
solid and approximate ones dashed; the exact baseline is the thick black line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from attnkit.arena.patterns import PATTERN_LENGTH, PatternPicture, attention_picture, exact_weights
from attnkit.arena.results import TASK_METRICS
from attnkit.arena.runner import BASELINE

MARKERS = "osD^v<>pPXh*"


def _styles(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    cmap = plt.get_cmap("tab20")
    styles = {}
    for i, mech in enumerate(doc["mechanisms"]):
        name = mech["name"]
        if name == BASELINE:
            styles[name] = {"color": "black", "linewidth": 2.6, "marker": "o", "linestyle": "-"}
        else:
            styles[name] = {
                "color": cmap(i % 20),
                "linewidth": 1.4,
                "marker": MARKERS[i % len(MARKERS)],
                "linestyle": "-" if mech["exact"] else "--",
            }
    return styles


def _log_axes(ax: Axes, ylabel: str, title: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)


def plot_efficiency(doc: dict[str, Any], path: Path) -> None:
    """Time and peak memory vs length, log-log; rows = bidirectional / causal, fwd+bwd."""
    styles = _styles(doc)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), squeeze=False)
    cfg = doc["meta"]["config"]
    for row, causal in enumerate((False, True)):
        for mech in doc["mechanisms"]:
            name = mech["name"]
            pts = [
                r
                for r in doc["efficiency"]
                if r["mechanism"] == name and r["causal"] == causal and r["mode"] == "fwd+bwd" and r["status"] == "ok"
            ]
            if not pts:
                continue
            pts.sort(key=lambda r: r["length"])
            xs = [r["length"] for r in pts]
            axes[row][0].plot(xs, [r["median_ms"] for r in pts], label=name, markersize=5, **styles[name])
            mem = [(r["length"], r["peak_mb"]) for r in pts if r.get("peak_mb")]
            if mem:
                axes[row][1].plot(*zip(*mem), label=name, markersize=5, **styles[name])
        mode = "causal" if causal else "bidirectional"
        _log_axes(axes[row][0], "fwd+bwd time per step, ms (median)", f"time, {mode}")
        _log_axes(axes[row][1], "peak extra memory of one step, MB", f"peak memory, {mode}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="center left",
        bbox_to_anchor=(0.83, 0.5),
        fontsize=8,
        title="mechanism (dashed = approximate)",
    )
    fig.suptitle(
        f"attnkit arena: forward+backward, B={cfg['batch']}, H={cfg['heads']}, D={cfg['head_dim']}, fp32, "
        f"{doc['meta']['device']}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 0.82, 0.96))
    fig.savefig(path, dpi=100, bbox_inches="tight")  # keeps the legend outside the axes in the picture
    plt.close(fig)


def pareto_front(points: list[tuple[float, float]], *, higher_is_better: bool) -> list[tuple[float, float]]:
    """Points no other point beats on both speed (x, higher better) and quality (y), sorted by x."""

    def better(a: float, b: float) -> bool:
        return a >= b if higher_is_better else a <= b

    front = [p for p in points if not any(o != p and o[0] >= p[0] and better(o[1], p[1]) for o in points)]
    return sorted(set(front))


#: Smallest y range shown per metric: differences below it are within run-to-run noise of a
#: short training budget and should not fill the panel.
MIN_QUALITY_SPAN = {"accuracy": 0.1, "bits_per_char": 0.2}


def _min_span(ax: Axes, values: list[float], span: float) -> None:
    low, high = min(values), max(values)
    if high - low < span:
        middle = (low + high) / 2
        ax.set_ylim(middle - 0.6 * span, middle + 0.6 * span)


def plot_pareto(doc: dict[str, Any], path: Path) -> None:
    """One panel per task: quality vs forward+backward speed-up over exact attention."""
    styles = _styles(doc)
    tasks = doc["meta"]["config"]["tasks"]
    board = {r["mechanism"]: r for r in doc["leaderboard"]}
    ref = next(iter(board.values()))["reference_length"] if board else None
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric, higher = TASK_METRICS[task]
        pts = []
        for name, row in board.items():
            if row.get(task) is None or row["speedup"] is None:
                continue
            x, y = row["speedup"], row[task]
            pts.append((x, y))
            style = styles[name]
            ax.scatter([x], [y], color=style["color"], marker=style["marker"], s=60, zorder=3, label=name)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        front = pareto_front(pts, higher_is_better=higher)
        if front:
            ax.plot(*zip(*front), color="grey", linewidth=1, linestyle=":", zorder=2, label="Pareto front")
        if pts:
            _min_span(ax, [y for _, y in pts], MIN_QUALITY_SPAN[metric])
        ax.set_xscale("log", base=2)
        ax.axvline(1.0, color="black", linewidth=0.6, alpha=0.4)
        ax.set_xlabel(f"fwd+bwd speed-up over exact attention at L={ref} (log)")
        ax.set_ylabel(metric.replace("_", " ") + (" (higher is better)" if higher else " (lower is better)"))
        ax.set_title(task, fontsize=10)
        ax.grid(True, alpha=0.25)
    fig.suptitle("speed vs quality: up and right is better for accuracy, down and right for bits per char", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pattern_panels(doc: dict[str, Any]) -> list[tuple[str, bool, PatternPicture | str]]:
    """(label, causal, picture or the reason there is none) for the reference and every mechanism."""
    panels: list[tuple[str, bool, PatternPicture | str]] = [
        ("exact softmax", causal, exact_weights(causal=causal)) for causal in (False, True)
    ]
    for mech in doc["mechanisms"]:
        for causal in (False, True):
            if causal and not mech["causal"]:
                panels.append((mech["name"], causal, "no causal mode"))
                continue
            try:
                panels.append((mech["name"], causal, attention_picture(mech["name"], causal=causal)))
            except (RuntimeError, ValueError, TypeError) as err:
                panels.append((mech["name"], causal, str(err)[:60]))
    return panels


def plot_patterns(doc: dict[str, Any], path: Path) -> None:
    """A grid with each mechanism's pattern (exact) or effective weights (approximate), both modes."""
    panels = _pattern_panels(doc)
    per_row = 8  # 4 mechanisms x (bidirectional, causal)
    nrows = -(-len(panels) // per_row)
    fig, axes = plt.subplots(nrows, per_row, figsize=(2.0 * per_row, 2.45 * nrows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (label, causal, pic) in zip(axes.flat, panels):
        mode = "causal" if causal else "bidir"
        if isinstance(pic, str):
            ax.text(0.5, 0.5, f"{label} ({mode})\n{pic}", ha="center", va="center", fontsize=7, wrap=True)
            continue
        matrix = pic.matrix / pic.matrix.amax(dim=-1, keepdim=True).clamp(min=1e-12)  # per-row scale
        cmap = {"pattern": "Blues", "reference weights": "Greens"}.get(pic.kind, "magma_r")
        ax.imshow(matrix.numpy(), cmap=cmap, vmin=0, vmax=1)
        ax.set_title(f"{label} · {mode}\n{pic.kind}", fontsize=7.5)
        ax.axis("on")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"What each mechanism attends to: rows = queries, columns = keys ({PATTERN_LENGTH} tokens of self-attention over smooth states, "
        "small_options), each row scaled to its maximum.\ngreen = exact softmax weights (the target); blue = declared "
        "pattern of exact mechanisms; dark red = weights read off approximate ones with identity values",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (2.45 * nrows + 0.6)), h_pad=1.2)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(doc: dict[str, Any], out_dir: Path | str) -> list[Path]:
    """Write ``efficiency.png``, ``pareto.png`` (when quality was measured) and ``patterns.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if doc["efficiency"]:
        plot_efficiency(doc, out / "efficiency.png")
        written.append(out / "efficiency.png")
    if doc["quality"] and doc["efficiency"]:
        plot_pareto(doc, out / "pareto.png")
        written.append(out / "pareto.png")
    plot_patterns(doc, out / "patterns.png")
    written.append(out / "patterns.png")
    return written
