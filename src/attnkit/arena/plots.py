"""The report's PNG figures: efficiency curves, the speed-quality Pareto chart, patterns.

Every mechanism keeps one (colour, marker, line style) across figures and across runs:
its position in the registry picks a colour among ten a reader can tell apart and a
marker among seven (ten and seven share no factor, so no two of the first 70 mechanisms
look alike); exact mechanisms are drawn solid and approximate ones dashed; the exact
baseline is the thick black line. The Pareto chart labels each point without overlap
(labels are moved up, down or to the left of a crowded spot, with a leader line), draws
each task's no-context baseline and exact attention's score as horizontal lines, and
shows accuracy on its whole 0-100% range.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.text import Annotation, Text
from matplotlib.ticker import FuncFormatter, PercentFormatter
from matplotlib.transforms import Bbox

import attnkit
from attnkit.arena.patterns import PATTERN_LENGTH, PatternPicture, attention_picture, exact_weights
from attnkit.arena.report import SPEEDUP_LABEL
from attnkit.arena.results import TASK_METRICS
from attnkit.arena.runner import BASELINE

#: matplotlib's "tab10" hues (10 colours that stay apart, unlike tab20's light/dark pairs).
COLOURS = tuple(plt.get_cmap("tab10").colors)  # type: ignore[attr-defined]
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def mechanism_style(name: str, exact: bool, order: list[str]) -> dict[str, Any]:
    """The (colour, marker, line style) of ``name``: fixed by its position in ``order``."""
    if name == BASELINE:
        return {"color": "black", "linewidth": 2.6, "marker": "o", "linestyle": "-"}
    i = order.index(name) if name in order else len(order)
    return {
        "color": COLOURS[i % len(COLOURS)],
        "linewidth": 1.4,
        "marker": MARKERS[i % len(MARKERS)],
        "linestyle": "-" if exact else "--",
    }


def _styles(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Styles of the document's mechanisms, ordered by the registry (then by name), so a run
    over a subset draws each mechanism as the full run does."""
    registered = [n for n in attnkit.list_attention() if n != BASELINE]
    extra = sorted(m["name"] for m in doc["mechanisms"] if m["name"] not in registered and m["name"] != BASELINE)
    order = registered + extra
    return {m["name"]: mechanism_style(m["name"], m["exact"], order) for m in doc["mechanisms"]}


def _plain(value: float, minor: bool = False) -> str:
    """A log-axis tick as a plain number (``200``, ``0.5``); minor ticks only at 2x and 5x a power of ten."""
    if value <= 0:
        return ""
    leading = round(value / 10 ** math.floor(math.log10(value) + 1e-9), 6)
    return "" if minor and leading not in (2.0, 5.0) else f"{value:g}"


def _length_tick(value: float, _: int) -> str:
    n = round(value)
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _log_axes(ax: Axes, ylabel: str, title: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(_length_tick))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _plain(v)))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: _plain(v, minor=True)))
    ax.set_xlabel("sequence length")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.25)


def _flagged(ax: Axes, points: list[tuple[int, float]]) -> None:
    """Ring flagged cells (noisy or an impossible curve) in red."""
    if points:
        xs, ys = zip(*points)
        ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="red", linewidths=1.3, zorder=4, label="flagged cell")


def plot_efficiency(doc: dict[str, Any], path: Path) -> None:
    """Time and peak memory vs length, log-log; rows = bidirectional / causal, fwd+bwd."""
    styles = _styles(doc)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), squeeze=False)
    cfg = doc["meta"]["config"]
    for row, causal in enumerate((False, True)):
        flagged_time: list[tuple[int, float]] = []
        flagged_memory: list[tuple[int, float]] = []
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
            flagged_time += [(r["length"], r["median_ms"]) for r in pts if set(r.get("flags", [])) - {"memory_falls"}]
            flagged_memory += [
                (r["length"], r["peak_mb"]) for r in pts if "memory_falls" in r.get("flags", []) and r.get("peak_mb")
            ]
        _flagged(axes[row][0], flagged_time)
        _flagged(axes[row][1], flagged_memory)
        mode = "causal" if causal else "bidirectional"
        _log_axes(axes[row][0], "fwd+bwd time per step, ms (median)", f"time, {mode}")
        _log_axes(axes[row][1], "peak extra memory of one step, MB", f"peak memory, {mode}")
    by_label: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            by_label.setdefault(label, handle)
    fig.legend(
        list(by_label.values()),
        list(by_label.keys()),
        loc="center left",
        bbox_to_anchor=(0.83, 0.5),
        fontsize=8,
        title="mechanism (dashed = approximate)",
    )
    fig.suptitle(
        f"attnkit arena: forward+backward, B={cfg['batch']}, H={cfg['heads']}, D={cfg['head_dim']}, fp32, "
        f"{doc['meta']['device']}, {doc['meta']['threads']} thread{'' if doc['meta']['threads'] == 1 else 's'}",
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


#: Smallest y range shown for bits per char: differences below it are within run-to-run
#: noise of a short training budget and should not fill the panel.
MIN_BPC_SPAN = 0.5


def quality_limits(metric: str, values: list[float]) -> tuple[float, float]:
    """The y range of a quality panel: 0-100% for accuracy; for bits per char every value
    (the no-context baseline included) with a margin, at least :data:`MIN_BPC_SPAN` tall."""
    if metric == "accuracy":
        return 0.0, 1.02
    low, high = min(values), max(values)
    pad = max(MIN_BPC_SPAN - (high - low), 0.0) / 2 + 0.08 * (high - low)
    return max(0.0, low - pad), high + pad


#: Label slots around a point, ``(dx, dy, horizontal alignment)`` in points, nearest first:
#: right or left of it, then stepped up and down (also centred above and below).
_STEP = 9
_OFFSETS = sorted(
    [(7, 0, "left"), (-7, 0, "right")]
    + [(dx, sign * k * _STEP, ha) for k in range(1, 13) for sign in (1, -1) for dx, ha in ((7, "left"), (-7, "right"))]
    + [(0, sign * (k * _STEP + 2), "center") for k in range(1, 13) for sign in (1, -1)],
    key=lambda o: (abs(o[1]), o[0] == 0),
)


def _marker_box(ax: Axes, x: float, y: float, radius_px: float) -> Bbox:
    cx, cy = ax.transData.transform((x, y))
    return Bbox.from_extents(cx - radius_px, cy - radius_px, cx + radius_px, cy + radius_px)


def _text_box(label: Annotation, renderer: Any) -> Bbox:
    """The box of a label's text alone, padded by 1.5 pixels (an annotation's own extent also spans its leader line)."""
    label.update_positions(renderer)  # places the text at its offset (Text's extent alone does not)
    return Text.get_window_extent(label, renderer).padded(1.5)  # a hair of space between neighbours


def place_labels(ax: Axes, points: list[tuple[str, float, float]], *, fontsize: float = 7) -> list[Annotation]:
    """Label each ``(name, x, y)`` point of ``ax`` so no two labels, and no label and marker, overlap.

    Greedy, top to bottom: each label takes the nearest slot of :data:`_OFFSETS` that is
    free and inside the axes; a label moved off its point's level gets a thin leader line.
    When no slot is free (a very crowded panel) the one with the least overlap is taken.
    Call after the axes' limits and the figure's layout are final: offsets are in points,
    positions in data.
    """
    fig = ax.figure
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    radius = 4.5 * fig.dpi / 72  # a marker of size 60 (points^2) is about 8 points wide
    taken = [_marker_box(ax, x, y, radius) for _, x, y in points]
    frame = ax.get_window_extent(renderer)
    labels = []
    for name, x, y in sorted(points, key=lambda p: (-p[2], p[1], p[0])):
        best: tuple[float, Annotation] | None = None
        for dx, dy, ha in _OFFSETS:
            label = ax.annotate(
                name,
                (x, y),
                xytext=(dx, dy),
                textcoords="offset points",
                fontsize=fontsize,
                ha=ha,
                va="center",
                arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5, "shrinkA": 1, "shrinkB": 4} if dy else None,
            )
            box = _text_box(label, renderer)
            clash = sum(_overlap(box, other) for other in taken)
            outside = box.x0 < frame.x0 or box.x1 > frame.x1 or box.y0 < frame.y0 or box.y1 > frame.y1
            cost = clash + (box.width * box.height if outside else 0.0)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, label)
            else:
                label.remove()
            if cost == 0:
                break
        assert best is not None  # _OFFSETS is not empty
        taken.append(_text_box(best[1], renderer))
        labels.append(best[1])
    return labels


def _overlap(a: Bbox, b: Bbox) -> float:
    """Area shared by two display boxes (0 when apart)."""
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return width * height if width > 0 and height > 0 else 0.0


def pareto_figure(doc: dict[str, Any]) -> Figure:
    """One panel per task: quality vs forward+backward speed-up over exact attention, labelled."""
    styles = _styles(doc)
    tasks = doc["meta"]["config"]["tasks"]
    board = {r["mechanism"]: r for r in doc["leaderboard"]}
    ref = next(iter(board.values()))["reference_length"] if board else None
    baselines = doc["meta"].get("quality_baselines") or {}
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.6 * len(tasks), 5.4), squeeze=False)
    panels = []
    for ax, task in zip(axes[0], tasks):
        metric, higher = TASK_METRICS[task]
        pts = [(n, r["speedup_vs_full"], r[task]) for n, r in board.items() if r.get(task) is not None]
        pts = [p for p in pts if p[1] is not None]
        for name, x, y in pts:
            style = styles[name]
            ax.scatter([x], [y], color=style["color"], marker=style["marker"], s=60, zorder=3, gid=name)
        front = pareto_front([(x, y) for _, x, y in pts], higher_is_better=higher)
        if front:
            ax.plot(*zip(*front), color="grey", linewidth=1, linestyle=":", zorder=2, label="Pareto front")
        shown = [y for _, _, y in pts]
        exact = board.get(BASELINE, {}).get(task)
        if exact is not None:
            ax.axhline(exact, color="black", linewidth=0.9, linestyle="--", zorder=1, label="exact attention (full)")
        baseline = baselines.get(task)
        if baseline is not None:
            what = baseline.get("what", "no context")
            ax.axhline(baseline["value"], color="tab:red", linewidth=1.2, zorder=1, label=f"no context ({what})")
            shown.append(baseline["value"])
        ax.set_ylim(*quality_limits(metric, shown or [0.0]))
        if metric == "accuracy":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        xs = [x for _, x, _ in pts] + [1.0]
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(xs) / 1.4, max(xs) * 2.2)  # room right of the fastest point for its label
        ax.axvline(1.0, color="black", linewidth=0.6, alpha=0.4)
        ax.set_xlabel(f"fwd+bwd {SPEEDUP_LABEL} at L={ref}, log scale")
        ax.set_ylabel(metric.replace("_", " ") + (" (higher is better)" if higher else " (lower is better)"))
        ax.set_title(task, fontsize=10)
        ax.grid(True, alpha=0.25)
        panels.append((ax, pts))
    lines: dict[str, Any] = {}  # one legend for the reference lines, below the panels (never over a label)
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            lines.setdefault(label, handle)
    whats = [label for label in lines if label.startswith("no context (")]
    if len(whats) > 1:  # one entry: "no context (majority class / unigram model)"
        handle = lines[whats[0]]
        for label in whats:
            del lines[label]
        lines["no context (" + " / ".join(w[len("no context (") : -1] for w in whats) + ")"] = handle
    if lines:
        fig.legend(list(lines.values()), list(lines.keys()), loc="lower center", ncol=len(lines), fontsize=8)
    fig.suptitle("speed vs quality: up and right is better for accuracy, down and right for bits per char", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    for ax, pts in panels:  # after the layout: label positions depend on the final axes size
        place_labels(ax, pts)
    return fig


def plot_pareto(doc: dict[str, Any], path: Path) -> None:
    """Write :func:`pareto_figure` to ``path``."""
    fig = pareto_figure(doc)
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
