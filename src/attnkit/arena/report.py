"""Human-readable views of a results document: the terminal leaderboard and ``report.md``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attnkit.arena.config import FIDELITY_INPUTS
from attnkit.arena.results import TASK_METRICS

TASK_TITLES = {"mqar": "MQAR acc", "listops": "ListOps acc", "lm": "LM bpc"}
PLOTS = (
    ("efficiency.png", "Time and peak memory vs length (log-log)"),
    ("pareto.png", "Speed vs quality (Pareto front highlighted)"),
    ("patterns.png", "What each mechanism attends to"),
)


def _num(value: float | None, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def _length(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def format_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool = False, align: str = ""
) -> str:
    """Rows of strings as an aligned text table, or a markdown table.

    ``align`` has one letter per column, ``l`` or ``r``; by default the first column is
    left-aligned and the others (numbers) right-aligned.
    """
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(x.ljust(w) if a == "l" else x.rjust(w) for x, w, a in zip(cells, widths, align)).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def leaderboard_table(doc: dict[str, Any], *, markdown: bool = False) -> str:
    """The LRA-style table: mechanism x task, fidelity, speed and memory columns."""
    tasks = doc["meta"]["config"]["tasks"]
    board = doc["leaderboard"]
    ref = _length(board[0]["reference_length"]) if board else "-"
    header = ["mechanism", "family", *[TASK_TITLES[t] for t in tasks], "avg acc", "err", "err causal"]
    header += [f"speed @{ref}", f"peak MB @{ref}", "speed @longest", "max L"]
    rows = []
    for r in board:
        name = r["mechanism"] + ("" if r["exact"] else " ~")
        cells = [name, r["family"]]
        for t in tasks:
            value = r.get(t)
            cells.append(_num(value, ".3f") if TASK_METRICS[t][0] == "bits_per_char" else _num(value, ".1%"))
        cells += [_num(r["avg_accuracy"], ".1%"), _num(r["error"], ".3f"), _num(r["error_causal"], ".3f")]
        cells += [
            _num(r["speedup"], ".2f") + ("x" if r["speedup"] is not None else ""),
            _num(r["peak_mb"], ".0f"),
            "-"
            if r["longest_speedup"] is None
            else f"{r['longest_speedup']:.2f}x@{_length(r['longest_speedup_length'])}",
            _length(r["max_length"]),
        ]
        rows.append(cells)
    baselines = doc["meta"].get("quality_baselines") or {}
    if baselines:
        cells = ["(no context)", "baseline"]
        for t in tasks:
            value = baselines[t]["value"] if t in baselines else None
            cells.append(_num(value, ".3f") if TASK_METRICS[t][0] == "bits_per_char" else _num(value, ".1%"))
        rows.append(cells + ["-"] * (len(header) - len(cells)))
    return format_table(header, rows, markdown=markdown)


def legend(doc: dict[str, Any]) -> str:
    """What the leaderboard's columns mean."""
    cfg = doc["meta"]["config"]
    ref = doc["leaderboard"][0]["reference_length"] if doc["leaderboard"] else None
    return "\n".join(
        [
            "~ approximate mechanism. Accuracy: held-out query positions (MQAR), sequences (ListOps); "
            "LM: bits per character on held-out text (lower is better; '-' = no causal mode). "
            "(no context): what ignoring the sequence scores (majority class; unigram bits per char): "
            "a mechanism near it has not learned the task within the budget.",
            f"err: relative error vs float64 exact attention, self-attention over smooth hidden states "
            f"(L={cfg['fidelity_length']}; most attention mass near the diagonal); "
            "exact sparse mechanisms are compared with dense attention too.",
            f"speed: forward+backward speed-up over exact attention (full, SDPA) at L={ref}, the longest length "
            "every mechanism reached, and at the longest length both it and exact attention reached "
            f"(B={cfg['batch']}, H={cfg['heads']}, D={cfg['head_dim']}, fp32); peak MB: extra memory of one step; "
            "max L: longest length measured within the budget.",
        ]
    )


def _sweep_table(doc: dict[str, Any], causal: bool, mode: str, markdown: bool) -> str:
    lengths = doc["meta"]["config"]["lengths"]
    header = ["mechanism", *[_length(n) for n in lengths]]
    rows = []
    for mech in doc["mechanisms"]:
        cells = [r for r in doc["efficiency"] if r["mechanism"] == mech["name"] and r["causal"] == causal]
        cells = [r for r in cells if r["mode"] == mode]
        if not cells:
            continue
        by_len = {r["length"]: r for r in cells}
        line = [mech["name"]]
        for n in lengths:
            r = by_len.get(n)
            if r is None or r["status"] == "stopped":
                line.append("stop")
            elif r["status"] != "ok":
                line.append("error")
            else:
                ratio = f" ({r['time_vs_full']:.2f}x)" if r.get("time_vs_full") is not None else ""
                mem = f", {r['peak_mb']:.0f} MB" if r.get("peak_mb") is not None else ""
                line.append(f"{r['median_ms']:.1f} ms{ratio}{mem}")
        rows.append(line)
    return format_table(header, rows, markdown=markdown)


def _fidelity_table(doc: dict[str, Any]) -> str:
    header = ["mechanism", *(f"{kind}{suffix}" for kind in FIDELITY_INPUTS for suffix in ("", " causal"))]
    rows = []
    for mech in doc["mechanisms"]:
        line = [mech["name"]]
        for input_kind in FIDELITY_INPUTS:
            for causal in (False, True):
                r = next(
                    (
                        x
                        for x in doc["fidelity"]
                        if x["mechanism"] == mech["name"] and x["input"] == input_kind and x["causal"] == causal
                    ),
                    None,
                )
                line.append("-" if r is None else f"{r['relative_error']:.4f}" if r["status"] == "ok" else "error")
        rows.append(line)
    return format_table(header, rows, markdown=True)


def _quality_table(doc: dict[str, Any]) -> str:
    header = ["mechanism", "task", "metric", "value", "train s", "status"]
    rows = []
    for r in doc["quality"]:
        value = r.get("value")
        rows.append(
            [
                r["mechanism"],
                r["task"],
                r.get("metric", "-"),
                "-" if value is None else f"{value:.4f}",
                _num(r.get("train_seconds"), ".1f"),
                r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason') or r.get('error', '')}",
            ]
        )
    return format_table(header, rows, markdown=True)


def _problems(doc: dict[str, Any]) -> list[str]:
    lines = []
    for s in doc["stops"]:
        mode = ("causal " if s["causal"] else "") + s["mode"]
        lines.append(f"- `{s['mechanism']}` {mode}: stopped at L={s['at_length']}: {s['reason']}")
    for kind in ("efficiency", "fidelity", "quality"):
        for r in doc[kind]:
            if r["status"] == "error":
                lines.append(f"- `{r['mechanism']}` {kind} error: {r.get('error', '')}")
    return lines


def reproduce_command(cfg: dict[str, Any]) -> str:
    """The ``attnkit arena`` command line for a preset (settings beyond it live in results.json)."""
    parts = ["attnkit arena"]
    if cfg["preset_name"] != "default":
        parts.append(f"--{cfg['preset_name']}")
    if cfg["mechanisms"]:
        parts.append("--mechanisms " + ",".join(cfg["mechanisms"]))
    if cfg["device"] != "cpu":
        parts.append(f"--device {cfg['device']}")
    return " ".join(parts)


def write_report(doc: dict[str, Any], out_dir: Path | str) -> Path:
    """Write ``report.md`` (leaderboard, plots, every table, stops and errors); returns its path."""
    meta, cfg = doc["meta"], doc["meta"]["config"]
    parts = [
        "# attnkit arena report",
        "",
        f"{meta['date']} · {meta['device']} ({meta['processor']}, {meta['threads']} threads) · torch {meta['torch']} · "
        f"attnkit {meta['attnkit']} · preset `{cfg['preset_name']}` · {meta['seconds']:.0f} s "
        f"({meta['cells_measured']} cells measured, {meta['cells_reused']} reused) · load average "
        f"{' -> '.join(str(x) for x in meta.get('load_average', []))} on {meta.get('cpu_count')} cores "
        "(other processes on the machine slow every timing; ratios within a cell are measured back to back)",
        "",
        f"Reproduce with `{reproduce_command(cfg)}` (every setting is in `results.json` under `meta.config`; "
        "cells cached in the output folder are reused, so a rerun only measures what is missing).",
        "",
        "## Leaderboard",
        "",
        leaderboard_table(doc, markdown=True),
        "",
        legend(doc).replace("\n", "\n\n"),
        "",
    ]
    for file, title in PLOTS:
        if (Path(out_dir) / file).exists():
            parts += [f"## {title}", "", f"![{title}]({file})", ""]
    parts += ["## Efficiency", ""]
    parts.append(
        f"Median of up to {cfg['repeats']} timed steps after a warm-up; (ratio to exact attention in the same cell); "
        "peak extra memory of one step. 'stop' = the sweep hit its budget (see below)."
    )
    for mode in ("fwd+bwd", "fwd"):
        for causal in (False, True):
            parts += ["", f"### {mode}, {'causal' if causal else 'bidirectional'}", ""]
            parts.append(_sweep_table(doc, causal, mode, markdown=True))
    parts += [
        "",
        "## Fidelity",
        "",
        "Relative Frobenius error vs float64 exact softmax attention at the efficiency settings. Inputs: "
        "`self` = self-attention over smooth hidden states (queries and keys project the same states, most "
        "mass near the diagonal; the leaderboard's err), `local` = independent smooth queries and keys (mass "
        "lands anywhere), `iid` = Gaussian noise (diffuse attention).",
        "",
    ]
    parts.append(_fidelity_table(doc))
    parts += ["", "## Quality", ""]
    parts.append(
        f"Each cell trains a {cfg['model_depth']}-layer, width-{cfg['model_dim']} model for {cfg['train_steps']} "
        f"steps (batch {cfg['batch_size']}, length {cfg['task_length']}, seed {cfg['seed']}), mechanisms at their "
        "small_options so the approximation bites at this length."
    )
    parts += ["", _quality_table(doc), "", "## Stops and errors", ""]
    parts += _problems(doc) or ["None."]
    path = Path(out_dir) / "report.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def terminal_summary(doc: dict[str, Any]) -> str:
    """The leaderboard, its legend and where the sweeps stopped, for the terminal."""
    lines = [leaderboard_table(doc), "", legend(doc)]
    stops = [s for s in doc["stops"] if not s["causal"] and s["mode"] == "fwd+bwd"]
    if stops:
        lines.append("")
        lines += [f"budget: {s['mechanism']} stopped at L={s['at_length']}: {s['reason']}" for s in stops]
    return "\n".join(lines)
