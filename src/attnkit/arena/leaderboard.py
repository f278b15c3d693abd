"""The quality suite's leaderboard: the facts file (``results.json``), ``report.md`` and a PNG.

``results.json`` is the compact, machine-readable record the advisor reads::

    {"suite": "quality",
     "meta": {"commit", "torch", "date", "machine", "load", "wall_s", ...},
     "tasks": {TASK: {"metric": "accuracy" | "bpc", "higher_is_better": bool, "baseline": float,
                      "length": int,
                      "mechanisms": {MECH: {"mean", "spread", "seeds": [...], "state_bytes", "step_ms"}}}}}

``TASK`` is a suite task (``mqar``, ``listops``, ...) or an MQAR sweep cell
(``mqar@pairs=32,length=128``). ``spread`` is half the range of the seeds' values (with two
seeds, half their difference). ``step_ms`` is the median training step's wall time on the machine
that trained the cell, under whatever load it had (see ``meta.load``): for comparison
within one run only. Cells that failed, or mechanisms that cannot sit a task (no causal
mode for ``char_lm``), are absent from the task's ``mechanisms`` and listed in
``meta.failures`` / ``meta.not_applicable`` with the reason.
"""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path
from typing import Any

from attnkit.arena.runner import BASELINE
from attnkit.arena.suite import BASELINE_ROW, SuiteRun, quality_task

#: The metric names of the facts file.
METRIC_NAMES = {"accuracy": "accuracy", "bits_per_char": "bpc"}


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range of ``values`` (the spread the leaderboard prints after ``±``).

    Raises:
        ValueError: no values.
    """
    if not values:
        raise ValueError("mean_and_spread needs at least one value")
    return sum(values) / len(values), (max(values) - min(values)) / 2


def aggregate(run: SuiteRun, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The facts file of a suite run (the schema in the module docstring).

    Args:
        run: the rows of :func:`attnkit.arena.suite.run_suite`.
        meta: extra ``meta`` fields (default: :func:`run_meta` of ``run``).
    """
    tasks: dict[str, Any] = {}
    failures = []
    for budget in run.config.budgets:
        rows = [r for r in run.rows if r["task"] == budget.key]
        baselines = [r["value"] for r in rows if r["mechanism"] == BASELINE_ROW and r["status"] == "ok"]
        metric = quality_task(budget).metric
        entry: dict[str, Any] = {
            "metric": METRIC_NAMES[metric],
            "higher_is_better": metric == "accuracy",
            "baseline": mean_and_spread(baselines)[0] if baselines else None,
            "length": quality_task(budget).length,
            "mechanisms": {},
        }
        for name in dict.fromkeys(r["mechanism"] for r in rows if r["mechanism"] != BASELINE_ROW):
            mine = sorted((r for r in rows if r["mechanism"] == name), key=lambda r: r["seed"])
            bad = [r for r in mine if r["status"] != "ok"]
            if bad:
                failures += [
                    {"task": budget.key, "mechanism": name, "seed": r["seed"], "error": r.get("error")} for r in bad
                ]
                continue
            mean, spread = mean_and_spread([r["value"] for r in mine])
            entry["mechanisms"][name] = {
                "mean": mean,
                "spread": spread,
                "seeds": [r["value"] for r in mine],
                "state_bytes": run.state_bytes.get(budget.key, {}).get(name),
                "step_ms": round(sum(r["step_ms"] for r in mine) / len(mine), 2),
            }
        tasks[budget.key] = entry
    info = run_meta(run) if meta is None else meta
    info = {**info, "failures": failures, "not_applicable": run.skipped, "unlearned": unlearned_tasks(tasks)}
    return {"suite": "quality", "meta": info, "tasks": tasks}


def unlearned_tasks(tasks: dict[str, Any]) -> list[str]:
    """Tasks on which exact attention does not beat the no-context baseline by more than its seeds' spread.

    Such a column ranks nothing (the budget is too small for the task, not a verdict on any
    mechanism); the report says so above the table.
    """
    out = []
    for key, task in tasks.items():
        exact = task["mechanisms"].get(BASELINE)
        if exact is None or task["baseline"] is None:
            continue
        margin = (exact["mean"] - task["baseline"]) * (1 if task["higher_is_better"] else -1)
        if margin <= exact["spread"]:
            out.append(key)
    return out


def run_meta(run: SuiteRun) -> dict[str, Any]:
    """Where, when and on what code the suite ran, and how long it took."""
    from attnkit.compress.report import machine

    where = machine()
    return {
        "commit": where["commit"],
        "torch": where["torch"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.platform()}; {platform.processor() or platform.machine()}; {where['cpu_count']} cores",
        "load": run.load_average,
        "wall_s": run.wall_s,
        "workers": run.config.workers,
        "threads_per_worker": 1,
        "seeds": list(run.config.seeds),
        "full": run.config.full,
        "spread": "half the range of the seeds' values",
        "step_ms": "the median training step's wall time on this (possibly loaded) machine, mean over the seeds",
        "cells_trained": run.cells_trained,
        "cells_reused": run.cells_reused,
        "budgets": {b.key: b.as_dict() for b in run.config.budgets},
    }


def average(doc: dict[str, Any], name: str) -> float | None:
    """A mechanism's mean accuracy over the headline accuracy tasks (LRA's "Avg"); None if it missed one."""
    values = []
    for key, task in doc["tasks"].items():
        if "@" in key or task["metric"] != "accuracy":
            continue
        if name not in task["mechanisms"]:
            return None
        values.append(task["mechanisms"][name]["mean"])
    return sum(values) / len(values) if values else None


def mechanism_order(doc: dict[str, Any]) -> list[str]:
    """Mechanisms by average (best first; exact ``full`` wherever it lands, no average last)."""
    names = list(dict.fromkeys(n for t in doc["tasks"].values() for n in t["mechanisms"]))
    return sorted(names, key=lambda n: (average(doc, n) is None, -(average(doc, n) or 0.0)))


def _cell(task: dict[str, Any], name: str) -> str:
    found = task["mechanisms"].get(name)
    if found is None:
        return "–"
    scale, digits = (100, 1) if task["metric"] == "accuracy" else (1, 3)
    return f"{scale * found['mean']:.{digits}f} ± {scale * found['spread']:.{digits}f}"


def _bytes(value: int | None) -> str:
    if value is None:
        return "recompute"
    for unit, size in (("MB", 2**20), ("KB", 2**10)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def render_markdown(doc: dict[str, Any]) -> str:
    """``report.md``: the LRA-style table, the MQAR sweep with state sizes, and per-task step times."""
    meta = doc["meta"]
    heads = [k for k in doc["tasks"] if "@" not in k]
    sweep = [k for k in doc["tasks"] if k.startswith("mqar")]
    order = mechanism_order(doc)
    lines = [
        "# attnkit quality suite",
        "",
        f"{len(order)} mechanisms, seeds {meta.get('seeds')}, commit {meta.get('commit')}, torch {meta.get('torch')}, "
        f"{meta.get('date')}, {meta.get('machine')}; wall time {meta.get('wall_s', 0) / 60:.1f} min "
        f"({meta.get('workers')} one-thread workers; load average {meta.get('load')}).",
        "",
        "Accuracy in % (bits per character for char_lm, lower is better), mean ± half the range over the seeds. "
        "Avg: mean accuracy over the accuracy tasks (as LRA's Avg). State: the decoding state per sequence at the "
        "headline MQAR length, over the model's layers ('recompute': no decoding state). Step: the median training "
        "step's wall time on the headline MQAR task, on this machine under its load (compare within this run only).",
        "",
    ]
    if meta.get("unlearned"):
        lines += [
            f"**Not learned within the budget:** exact attention does not beat the no-context baseline by more than "
            f"its seeds' spread on {', '.join(meta['unlearned'])}; those columns rank nothing.",
            "",
        ]
    mqar = doc["tasks"].get("mqar")
    columns = [*heads, "Avg", "state", "step ms"]
    lines += ["| mechanism | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    baseline_cells = [_baseline(doc["tasks"][k]) for k in heads]
    lines.append("| *no-context baseline* | " + " | ".join(baseline_cells) + " | | | |")
    for name in order:
        label = f"**{name}** (exact)" if name == BASELINE else name
        avg = average(doc, name)
        mine = mqar["mechanisms"].get(name) if mqar else None
        cells = [_cell(doc["tasks"][k], name) for k in heads]
        cells += ["–" if avg is None else f"{100 * avg:.1f}"]
        cells += [
            "–" if mine is None else _bytes(mine["state_bytes"]),
            "–" if mine is None else f"{mine['step_ms']:.0f}",
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if len(sweep) > 1:
        lines += ["", "## MQAR: recall vs decoding state (Zoology)", ""]
        lines += [
            "| mechanism | " + " | ".join(f"{k} acc / state" for k in sweep) + " |",
            "|---" * (len(sweep) + 1) + "|",
        ]
        for name in order:
            cells = []
            for key in sweep:
                found = doc["tasks"][key]["mechanisms"].get(name)
                cells.append(
                    "–" if found is None else f"{_cell(doc['tasks'][key], name)} / {_bytes(found['state_bytes'])}"
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Training step time per task (ms, loaded-machine wall time)", ""]
    lines += ["| mechanism | " + " | ".join(doc["tasks"]) + " |", "|---" * (len(doc["tasks"]) + 1) + "|"]
    for name in order:
        cells = [
            f"{t['mechanisms'][name]['step_ms']:.0f}" if name in t["mechanisms"] else "–" for t in doc["tasks"].values()
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    problems = meta.get("failures", []) + meta.get("not_applicable", [])
    if problems:
        lines += ["", "## Not in the table", ""]
        lines += [f"- {p['mechanism']} on {p['task']}: {p.get('error') or p.get('reason')}" for p in problems]
    return "\n".join(lines) + "\n"


def _baseline(task: dict[str, Any]) -> str:
    if task["baseline"] is None:
        return "–"
    return f"{100 * task['baseline']:.1f}" if task["metric"] == "accuracy" else f"{task['baseline']:.3f}"


def plot_leaderboard(doc: dict[str, Any], path: Path) -> None:
    """A PNG: MQAR accuracy against decoding-state bytes (Zoology's axes), one point per mechanism and sweep cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for key, task in doc["tasks"].items():
        if not key.startswith("mqar"):
            continue
        points = [(m["state_bytes"], 100 * m["mean"], n) for n, m in task["mechanisms"].items() if m["state_bytes"]]
        if not points:
            continue
        axes.scatter([p[0] for p in points], [p[1] for p in points], label=key, alpha=0.8)
        if key == "mqar":
            for x, y, name in points:
                axes.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes.set_xscale("log")
    axes.set_xlabel("decoding state per sequence (bytes, all layers)")
    axes.set_ylabel("MQAR accuracy (%)")
    axes.set_ylim(0, 102)
    axes.set_title("Recall vs state (mechanisms without a decoding state are not drawn)")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_leaderboard(doc: dict[str, Any], out_dir: Path | str, *, plots: bool = True) -> list[Path]:
    """Write ``results.json``, ``report.md`` and (``plots``) ``quality_vs_state.png`` to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "report.md"]
    paths[0].write_text(json.dumps(doc, indent=1) + "\n")
    paths[1].write_text(render_markdown(doc))
    if plots:
        paths.append(out / "quality_vs_state.png")
        plot_leaderboard(doc, paths[-1])
    return paths
