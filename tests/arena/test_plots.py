"""The figures: one look per mechanism across figures, Pareto labels apart, the reference lines, a
quality axis that starts at a sensible floor. Figures are inspected as they are saved."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import matplotlib.colors as mcolors
import pytest
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Annotation, Text
from matplotlib.transforms import Bbox

import attnkit
from attnkit.arena import plots

TASKS = ("mqar", "listops", "lm")
BASELINES = {"mqar": 0.074, "listops": 0.188, "lm": 4.72}


def crowded_doc() -> dict[str, Any]:
    """Every registered mechanism, most of them in two tight clusters (as in a real run: many
    mechanisms at chance on MQAR, all within a few points on ListOps and LM)."""
    names = attnkit.list_attention()
    rows = []
    for i, name in enumerate(names):
        speedup = 1.0 if name == "full" else 4.0 + 0.15 * i  # 4.0-6.0x: a dense band
        quality = {
            "mqar": 0.97 if name == "full" else 0.049 + 0.001 * (i % 3),
            "listops": 0.38 + 0.004 * (i % 4),
            "lm": 3.36 + 0.005 * (i % 5),
        }
        # "speedup" is the previous schema's key, so this test also runs against the old figures
        rows.append({"mechanism": name, "reference_length": 8192, "speedup_vs_full": speedup, "speedup": speedup})
        rows[-1].update(quality)
    mechanisms = [{"name": n, "exact": attnkit.attention_capabilities(n).exact} for n in names]
    efficiency = [
        {"mechanism": n, "length": length, "causal": False, "mode": "fwd+bwd", "status": "ok", "median_ms": ms}
        | {"peak_mb": 10.0 * length / 1024, "flags": []}
        for n, row in zip(names, rows)
        for length, ms in ((1024, 100.0 / row["speedup_vs_full"]), (2048, 400.0 / row["speedup_vs_full"]))
    ]
    baselines = {t: {"metric": "x", "value": v, "what": "majority class"} for t, v in BASELINES.items()}
    meta = {"config": {"tasks": list(TASKS), "batch": 1, "heads": 8, "head_dim": 64}, "device": "cpu", "threads": 2}
    meta["quality_baselines"] = baselines
    return {"meta": meta, "mechanisms": mechanisms, "leaderboard": rows, "efficiency": efficiency, "quality": [{}]}


@pytest.fixture
def saved(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """Every figure the arena saves, kept for inspection."""
    figures: list[Figure] = []
    original = Figure.savefig

    def keep(self: Figure, *args: Any, **kwargs: Any) -> None:
        figures.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def text_box(text: Text) -> Bbox:
    renderer = text.figure.canvas.get_renderer()  # type: ignore[union-attr]
    if isinstance(text, Annotation):
        text.update_positions(renderer)
    return Text.get_window_extent(text, renderer)  # the text alone, not a leader line


def overlap(a: Bbox, b: Bbox) -> float:
    width, height = min(a.x1, b.x1) - max(a.x0, b.x0), min(a.y1, b.y1) - max(a.y0, b.y0)
    return width * height if width > 0 and height > 0 else 0.0


def panel_labels(ax: Axes) -> list[Text]:
    names = set(attnkit.list_attention())
    return [t for t in ax.texts if t.get_text() in names]


def test_pareto_labels_do_not_overlap_and_stay_inside(tmp_path: Path, saved: list[Figure]) -> None:
    plots.plot_pareto(crowded_doc(), tmp_path / "pareto.png")
    (fig,) = saved
    FigureCanvasAgg(fig)  # closing the figure detached its canvas
    fig.canvas.draw()
    for ax in fig.axes[: len(TASKS)]:
        labels = panel_labels(ax)
        assert sorted(t.get_text() for t in labels) == sorted(attnkit.list_attention())
        boxes = {t.get_text(): text_box(t) for t in labels}
        for (a, box_a), (b, box_b) in itertools.combinations(boxes.items(), 2):
            assert overlap(box_a, box_b) == 0.0, (ax.get_title(), a, b)
        frame = ax.get_window_extent()
        for name, box in boxes.items():
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, name


def horizontal_lines(ax: Axes) -> list[float]:
    return [float(line.get_ydata()[0]) for line in ax.get_lines() if len(set(line.get_ydata())) == 1]  # type: ignore[arg-type]


def test_pareto_draws_the_baselines_and_a_sensible_quality_axis(tmp_path: Path, saved: list[Figure]) -> None:
    doc = crowded_doc()
    plots.plot_pareto(doc, tmp_path / "pareto.png")
    (fig,) = saved
    full = next(r for r in doc["leaderboard"] if r["mechanism"] == "full")
    for ax, task in zip(fig.axes, TASKS):
        lines = horizontal_lines(ax)
        assert BASELINES[task] in lines, (task, "no-context baseline")
        assert full[task] in lines, (task, "exact attention")
        low, high = ax.get_ylim()
        if task == "lm":
            assert low <= 3.36 and high >= BASELINES["lm"]  # every value and the baseline
        else:
            assert low <= 0.0 and high >= 1.0  # accuracy on its whole range, not zoomed into noise


def test_each_mechanism_has_its_own_look_in_every_figure_and_every_run(tmp_path: Path, saved: list[Figure]) -> None:
    names = attnkit.list_attention()
    doc = crowded_doc()
    styles = plots._styles(doc)
    looks = {(mcolors.to_hex(s["color"]), s["marker"], s["linestyle"]) for s in styles.values()}
    assert len(looks) == len(names)
    # a run over a subset draws each mechanism exactly as the run over all of them
    subset = {**doc, "mechanisms": [m for m in doc["mechanisms"] if m["name"] in ("full", "performer", "nystrom")]}
    assert plots._styles(subset) == {n: styles[n] for n in ("full", "performer", "nystrom")}

    plots.plot_efficiency(doc, tmp_path / "efficiency.png")
    plots.plot_pareto(doc, tmp_path / "pareto.png")
    efficiency, pareto = saved
    for name in names:
        (line,) = [x for x in efficiency.axes[0].get_lines() if x.get_label() == name]
        (points,) = [c for ax in pareto.axes[:1] for c in ax.collections if c.get_gid() == name]
        colour = mcolors.to_hex(points.get_facecolor()[0])
        assert (mcolors.to_hex(line.get_color()), line.get_marker()) == (colour, styles[name]["marker"]), name
