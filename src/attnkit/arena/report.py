"""Human-readable views of a results document: the terminal leaderboard and ``report.md``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attnkit.arena.config import FIDELITY_INPUTS
from attnkit.arena.flags import TIME_FLAGS
from attnkit.arena.results import TASK_METRICS, length_label

TASK_TITLES = {"mqar": "MQAR acc", "listops": "ListOps acc", "lm": "LM bpc"}
PLOTS = (
    ("efficiency.png", "Time and peak memory vs length (log-log)"),
    ("pareto.png", "Speed vs quality (Pareto front highlighted)"),
    ("patterns.png", "What each mechanism attends to"),
)


def _num(value: float | None, fmt: str, missing: str = "-") -> str:
    return missing if value is None else format(value, fmt)


def _length(n: int | None) -> str:
    return "-" if n is None else length_label(n)


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


#: Appended to a number whose measurement is flagged (see :mod:`attnkit.arena.flags`).
FLAG_MARK = "?"
SPEEDUP_LABEL = "speed-up vs full (>1 = faster)"
SPREAD_NOTE = (
    "Each speed-up is timed side by side: the mechanism's step and exact attention's alternate in rounds "
    "(order reversed every other round), the number is the median of the per-round ratios and (a-b) their "
    "min-max ('1 round': a step outlasted the cell's time), so load that hits a round slows both sides."
)
#: What the speed-ups of a results file measured before interleaving (older cells, hand-made runs) mean.
SEPARATE_NOTE = "Speed-ups divide medians from separate cells, measured back to back (no spread)."


def _speedup_note(doc: dict[str, Any]) -> str:
    interleaved = any(r.get("speedup_method") == "interleaved" for r in doc["efficiency"])
    return SPREAD_NOTE if interleaved else SEPARATE_NOTE


def _speedup(
    value: float | None, flags: Sequence[str] = (), spread: Sequence[float] | None = None, rounds: int | None = None
) -> str:
    """A speed-up over exact attention as ``2.50x`` (> 1 = faster), marked when flagged, with the
    min-max of its per-round ratios when it was timed in rounds: ``2.50x (2.31-2.64)``, or
    ``2.50x (1 round)`` when a single round (a step longer than the cell's time) has no spread."""
    if value is None:
        return "-"
    text = f"{value:.2f}x" + (FLAG_MARK if flags else "")
    if spread is None:
        return text
    return f"{text} (1 round)" if rounds == 1 else f"{text} ({spread[0]:.2f}-{spread[1]:.2f})"


def leaderboard_table(doc: dict[str, Any], *, markdown: bool = False) -> str:
    """The LRA-style table: mechanism x task, fidelity, speed and memory columns."""
    tasks = doc["meta"]["config"]["tasks"]
    board = doc["leaderboard"]
    ref = _length(board[0]["reference_length"]) if board else "-"
    header = ["mechanism", "family", *[TASK_TITLES[t] for t in tasks], "avg acc", "err", "err causal"]
    header += [f"speed-up vs full @{ref} (>1 = faster)", f"peak MB @{ref}", "speed-up vs full @longest", "max L"]
    rows = []
    for r in board:
        name = r["mechanism"] + ("" if r["exact"] else " ~")
        cells = [name, r["family"]]
        for t in tasks:
            value = r.get(t)
            cells.append(_num(value, ".3f") if TASK_METRICS[t][0] == "bits_per_char" else _num(value, ".1%"))
        cells += [_num(r["avg_accuracy"], ".1%"), _num(r["error"], ".3f"), _num(r["error_causal"], ".3f")]
        flags = r.get("flags", {})
        longest = _speedup(
            r["speedup_vs_full_longest"],
            flags.get("speedup_vs_full_longest", ()),
            r.get("speedup_vs_full_longest_spread"),
            r.get("speedup_vs_full_longest_rounds"),
        )
        headline = _speedup(
            r["speedup_vs_full"],
            flags.get("speedup_vs_full", ()),
            r.get("speedup_vs_full_spread"),
            r.get("speedup_vs_full_rounds"),
        )
        cells += [
            headline,
            _num(r["peak_mb"], ".0f") + (FLAG_MARK if flags.get("peak_mb") else ""),
            longest if r["speedup_vs_full_longest"] is None else f"{longest} @{_length(r['longest_shared_length'])}",
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
    lines = [
        "~ approximate mechanism. Accuracy: held-out query positions (MQAR), sequences (ListOps); "
        "LM: bits per character on held-out text (lower is better; '-' = no causal mode). "
        "(no context): what ignoring the sequence scores (majority class; unigram bits per char): "
        "a mechanism near it has not learned the task within the budget.",
        f"err: relative error vs float64 exact attention, self-attention over smooth hidden states "
        f"(L={cfg['fidelity_length']}; most attention mass near the diagonal); "
        "exact sparse mechanisms are compared with dense attention too.",
        f"{SPEEDUP_LABEL}: forward+backward time of exact attention (full, SDPA) / time of the mechanism, "
        f"at L={ref} (the longest length every mechanism reached) and at the longest length both it and exact "
        f"attention reached (B={cfg['batch']}, H={cfg['heads']}, D={cfg['head_dim']}, fp32). {_speedup_note(doc)} "
        "peak MB: extra memory of one step; max L: longest length measured within the budget.",
    ]
    if doc.get("flags"):
        lines.append(
            f"{FLAG_MARK} = a measurement behind the number is flagged (noisy repeats or an impossible length "
            "curve; each flag is explained under Flags in report.md)."
        )
    return "\n".join(lines)


def _sweep_cell(r: dict[str, Any] | None) -> str:
    if r is None or r["status"] == "stopped":
        return "stop"
    if r["status"] != "ok":
        return "error"
    flags = set(r.get("flags", []))
    time_mark = FLAG_MARK if flags & set(TIME_FLAGS) else ""
    parts = [f"{r['median_ms']:.1f} ms{time_mark}"]
    if r.get("speedup_vs_full") is not None:
        parts.append(_speedup(r["speedup_vs_full"], spread=r.get("speedup_spread"), rounds=r.get("speedup_rounds")))
    if r.get("peak_mb") is not None:
        parts.append(f"{r['peak_mb']:.0f} MB" + (FLAG_MARK if flags - set(TIME_FLAGS) else ""))
    return " · ".join(parts)


def _sweep_table(doc: dict[str, Any], causal: bool, mode: str, markdown: bool) -> str:
    lengths = doc["meta"]["config"]["lengths"]
    header = ["mechanism", *[_length(n) for n in lengths]]
    rows = []
    for mech in doc["mechanisms"]:
        cells = [r for r in doc["efficiency"] if r["mechanism"] == mech["name"] and r["causal"] == causal]
        by_len = {r["length"]: r for r in cells if r["mode"] == mode}
        if by_len:
            rows.append([mech["name"], *(_sweep_cell(by_len.get(n)) for n in lengths)])
    return format_table(header, rows, markdown=markdown)


def flag_lines(doc: dict[str, Any]) -> list[str]:
    """One line per flag (mechanism, mode, what is wrong, with the numbers)."""
    lines = []
    for f in doc.get("flags", []):
        mode = ("causal " if f["causal"] else "") + f["mode"]
        lines.append(f"{f['mechanism']} {mode}: {f['kind']}: {f['message']}")
    return lines


def _flags_section(doc: dict[str, Any]) -> list[str]:
    flags = doc.get("flags", [])
    if not flags:
        return ["No cell flagged: every cell's repeats agree and no length curve falls or jumps.", ""]
    help_ = doc["meta"].get("flag_help") or {}
    kinds = sorted({f["kind"] for f in flags})
    parts = [f"Cells marked {FLAG_MARK} in the tables. What each flag means:", ""]
    parts += [f"- `{k}`: {help_.get(k, '')}" for k in kinds]
    parts += ["", f"What to do: {help_.get('what to do', '')}.", ""]
    parts += [f"- {line}" for line in flag_lines(doc)]
    return [*parts, ""]


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
    if cfg.get("threads") is not None:
        parts.append(f"--threads {cfg['threads']}")
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
        f"{' -> '.join(str(x) for x in meta.get('load_average', []))} on {meta.get('cores', meta.get('cpu_count'))} "
        "cores (other processes on the machine slow every timing)",
        "",
        *_load_warning_lines(doc),
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
        f"Median of up to {cfg['repeats']} timed steps after a warm-up on {meta['threads']} threads, within "
        f"{cfg['cell_seconds']:g} s per cell; {SPEEDUP_LABEL} = time of exact attention / time of the mechanism. "
        f"{_speedup_note(doc)} Exact attention's own cells are timed alone. Peak extra memory of one step in MB. "
        f"{FLAG_MARK} = flagged (see Flags). 'stop' = the sweep hit its budget (see below)."
    )
    for mode in ("fwd+bwd", "fwd"):
        for causal in (False, True):
            parts += ["", f"### {mode}, {'causal' if causal else 'bidirectional'}", ""]
            parts += [f"Each cell: median time · {SPEEDUP_LABEL} (min-max over rounds) · peak MB.", ""]
            parts.append(_sweep_table(doc, causal, mode, markdown=True))
    parts += ["", "## Flags", ""]
    parts += _flags_section(doc)
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


def _load_warning_lines(doc: dict[str, Any]) -> list[str]:
    """``WARNING: the machine was busy ...`` and a blank line, or nothing when it was not."""
    warning = doc.get("load_warning")
    return [f"WARNING: {warning['message']}", ""] if warning else []


def terminal_summary(doc: dict[str, Any]) -> str:
    """The leaderboard, its legend, where the sweeps stopped, what was flagged and whether the
    machine was busy, for the terminal."""
    lines = [leaderboard_table(doc), "", legend(doc)]
    stops = [s for s in doc["stops"] if not s["causal"] and s["mode"] == "fwd+bwd"]
    if stops:
        lines.append("")
        lines += [f"budget: {s['mechanism']} stopped at L={s['at_length']}: {s['reason']}" for s in stops]
    flags = flag_lines(doc)
    if flags:
        lines += ["", f"flagged ({len(flags)}; what each kind means: report.md, Flags):"]
        lines += [f"  {line}" for line in flags]
        lines.append(f"  what to do: {(doc['meta'].get('flag_help') or {}).get('what to do', '')}")
    warning = _load_warning_lines(doc)
    if warning:
        lines += ["", *warning[:-1]]
    return "\n".join(lines)
