"""The one renderer: a result file (JSON) -> its markdown tables and its plot.

``python -m benchmarks render [SUITE ...]`` rewrites ``results/SUITE.md`` (and ``SUITE.png``)
from ``results/SUITE.json``. The markdown holds, in order: the suite's description, its floors
from ``benchmarks/floors.toml`` marked met / not met, each row against each of its declared
anchors, the rows of every part, and the runs the rows come from (commit, torch, machine, load,
protocol) with the file's notes. Every ratio is computed here from the stored times.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks import floors as floors_mod
from benchmarks.floors import Floor, Verdict, anchors_of, judged_anchor, memory_ratio, sdpa_of
from benchmarks.suite import Column, Part, Suite

Row = Mapping[str, Any]


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.1f}" if abs(ms) >= 1 else f"{ms:.4g}"


def _yes(flag: bool | None) -> str:
    return "both" if flag is None else ("yes" if flag else "no")


def _table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cells) + " |" for cells in lines]
    return "\n".join(out)


def _order(suite: Suite) -> dict[str, int]:
    """Declared position of every label (rows are listed in the order the suite declares them)."""
    order: dict[str, int] = {}
    for part in suite.parts:
        for case in part.case_list():
            order.setdefault(case.label, len(order))
    return order


def _sorted(rows: Sequence[Row], suite: Suite) -> list[Row]:
    """Rows by cell, then measured rows in declared order, then computed rows in the order they were made."""
    order = _order(suite)
    position = {id(r): i for i, r in enumerate(rows)}
    return sorted(
        rows,
        key=lambda r: (
            r["mode"],
            r["causal"] is True,
            r["length"],
            r["role"] in ("bound", "derived"),
            order.get(r["label"], len(order) + position[id(r)]),
        ),
    )


def x_value(row: Row, field: str) -> Any:
    """The row's value of a part's ``x``/``series`` field: a row field or a case keyword."""
    return row[field] if field in row else row.get("params", {}).get(field)


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def shown_value(value: float, floor: Floor) -> str:
    """``value`` with two decimals, or as many more as it takes to show which side of the threshold it is on."""
    for digits in range(2, 7):
        text = f"{value:.{digits}f}"
        if floor.passes(float(text)) == floor.passes(value):
            return text
    return repr(value)


def floors_section(verdicts: Sequence[Verdict]) -> str:
    """The floors of the suite, each marked met / not met / not measured."""
    if not verdicts:
        return ""
    lines = []
    for v in verdicts:
        f = v.floor
        lines.append(
            [
                str(f.issue),
                f.case,
                f.describe(),
                "-" if v.value is None else shown_value(v.value, f),
                v.against or "-",
                f.required(),
                f"**{v.status}**" if v.status != "met" else "met",
                v.detail,
            ]
        )
    met = sum(v.status == "met" for v in verdicts)
    header = ["issue", "case", "floor", "measured", "against", "required", "result", "detail"]
    return (
        f"## Floors ({met} of {len(verdicts)} met)\n\nThresholds from `benchmarks/floors.toml`; a ratio whose other "
        "side did not finish is *not measured*, never met.\n\n" + _table(header, lines)
    )


def anchors_section(suite: Suite, rows: Sequence[Row]) -> str:
    """Every row with declared anchors against each of them, the judged one marked."""
    lines = []
    for row in _sorted(rows, suite):
        if row["status"] != "ok" or row["label"] not in suite.anchors:
            continue
        judged = judged_anchor(suite, row, rows)
        found = anchors_of(suite, row, rows)
        if not found:
            lines.append(
                [
                    row["label"],
                    _yes(row["causal"]),
                    row["mode"],
                    str(row["length"]),
                    _ms(row["median_s"]),
                    "-",
                    "-",
                    "-",
                    "-",
                    "no anchor finished",
                ]
            )
        for other, reason in found:
            ratio = memory_ratio(row, other)
            mark = (
                "not matched: " + reason
                if reason
                else ("yes" if judged and other["label"] == judged["label"] else "no (slower)")
            )
            lines.append(
                [
                    row["label"],
                    _yes(row["causal"]),
                    row["mode"],
                    str(row["length"]),
                    _ms(row["median_s"]),
                    other["label"],
                    _ms(other["median_s"]),
                    f"{other['median_s'] / row['median_s']:.2f}x",
                    "-" if ratio is None else f"{row['peak_mb']:.0f} / {other['peak_mb']:.0f}",
                    mark,
                ]
            )
    if not lines:
        return ""
    header = [
        "case",
        "causal",
        "mode",
        "length",
        "ms",
        "anchor",
        "anchor ms",
        "speed-up",
        "peak MB / anchor's",
        "judged",
    ]
    return (
        "## Against each anchor\n\nSpeed-up = anchor time / this time. The judged anchor is the fastest of those computing "
        "the same function in the same cell; the others are shown.\n\n" + _table(header, lines)
    )


def _status(row: Row) -> str:
    if row["status"] == "ok":
        return f"ok ({row['failed_rounds']} rounds failed)" if row.get("failed_rounds") else "ok"
    error = row.get("error", "")
    return f"{row['status']}: {error[:120]}" if error else row["status"]


def rows_table(part: Part, rows: Sequence[Row], suite: Suite) -> str:
    """A part's rows: time, ratio to SDPA, peak memory, declared columns, status (and run, when several)."""
    timed = any("median_s" in r for r in rows)
    with_sdpa = any(r["role"] == "sdpa" for r in rows)
    with_peak = any(r.get("peak_mb") is not None for r in rows)
    with_rounds = any("round_medians_s" in r for r in rows)
    with_pairs = any("pair_ratios" in r for r in rows)
    x_field = part.x if part.x != "length" else None
    header = ["case", "causal", "mode", "length"] + ([x_field] if x_field else [])
    columns: list[tuple[str, Callable[[Row], str]]] = []
    if timed:
        columns.append(("time ms", lambda r: _ms(r["median_s"]) if "median_s" in r else "-"))
    if with_sdpa:
        columns.append(("vs SDPA", lambda r: _vs_sdpa(r, rows)))
    if with_pairs:
        columns.append(("paired ratio (min–max)", _pairs))
    if with_peak:
        columns.append(("peak MB", lambda r: "-" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}"))
    if with_rounds:
        columns.append(("round medians ms", lambda r: ", ".join(_ms(t) for t in r.get("round_medians_s", [])) or "-"))
    for column in part.columns:
        columns.append((column.header, column.render))
    header += [name for name, _ in columns] + ["status"]
    several_runs = len({r["run"] for r in rows}) > 1
    if several_runs:
        header.append("run")
    lines = []
    for r in _sorted(rows, suite):
        cells = [r["label"], _yes(r["causal"]), r["mode"], str(r["length"])]
        if x_field:
            cells.append(str(x_value(r, x_field)))
        cells += [fn(r) for _, fn in columns] + [_status(r)]
        if several_runs:
            cells.append(str(r["run"]))
        lines.append(cells)
    derived = dict.fromkeys((r["label"], r["derived_from"]) for r in rows if "derived_from" in r)
    text = _table(header, lines)
    if derived:
        text += "\n\nComputed rows: " + "; ".join(f"*{label}* = {how}" for label, how in derived) + "."
    return text


def _vs_sdpa(row: Row, rows: Sequence[Row]) -> str:
    if row["status"] != "ok" or "median_s" not in row or row["role"] in ("bound", "derived"):
        return "-"
    sdpa = sdpa_of(row, rows)
    return f"{row['median_s'] / sdpa['median_s']:.2f}" if sdpa else "-"


def _pairs(row: Row) -> str:
    p = row.get("pair_ratios")
    return f"{p['median']:.3f} ({p['min']:.2f}–{p['max']:.2f}, {p['count']} vs {p['vs']})" if p else "-"


def pivot_table(part: Part, rows: Sequence[Row], value: Column) -> str:
    """``value`` of each series (lines) at each x (columns), in the part's main mode."""
    mode = _main_mode(rows)
    rows = [r for r in rows if r["mode"] == mode and r["role"] not in ("bound", "derived")]
    series = list(dict.fromkeys(str(x_value(r, part.series)) for r in rows))
    xs = sorted({x_value(r, part.x) for r in rows})
    cell = {(str(x_value(r, part.series)), x_value(r, part.x)): r for r in rows}
    lines = []
    for s in series:
        found = [cell.get((s, x)) for x in xs]
        lines.append(
            [s] + [("-" if r is None else value.render(r) if r["status"] == "ok" else r["status"]) for r in found]
        )
    return f"{value.header} ({mode}):\n\n" + _table([part.series] + [str(x) for x in xs], lines)


def _main_mode(rows: Sequence[Row]) -> str:
    modes = {r["mode"] for r in rows}
    return "fwd+bwd" if "fwd+bwd" in modes else sorted(modes)[0]


def _load(value: Any) -> str:
    return value if isinstance(value, str) else f"{value[0]:.2f}"


def runs_section(meta: Mapping[str, Any], rows: Sequence[Row]) -> str:
    """Where and how the rows were measured: one entry per run, then the file's notes."""
    out = ["## Runs", ""]
    for i, run in enumerate(meta["runs"]):
        count = sum(r["run"] == i for r in rows)
        m = run["machine"]
        dirty = {True: " (uncommitted changes)", False: "", "unknown": " (clean or not: unknown)"}[run["dirty"]]
        commit = run["commit"] if run["commit"] == "unknown" else f"`{run['commit'][:12]}`"
        out.append(
            f"- **run {i}** ({count} rows): commit {commit}{dirty}; {run['date']}"
            + (f" to {run['finished']}" if run.get("finished") else "")
            + f"; torch {run['torch']}; CPU {m['cpu']}, {m['cores']} cores, {m['threads']} threads ({m['platform']}); "
            + f"load average (1 min) {_load(run['load']['start'])} at start, {_load(run['load']['end'])} at end"
        )
        if run.get("command"):
            out.append(f"  - command: `{run['command']}`")
        if run.get("selection"):
            out.append(f"  - measured: {json.dumps(run['selection'], ensure_ascii=False)}")
        out.append(f"  - protocol: {json.dumps(run['protocol'], ensure_ascii=False)}")
        for key in ("note", "source"):
            if run.get(key):
                text = run[key] if isinstance(run[key], str) else json.dumps(run[key], ensure_ascii=False)
                out.append(f"  - {key}: {text}")
    if meta.get("notes"):
        out += ["", "## Notes", ""] + [f"- {note}" for note in meta["notes"]]
    return "\n".join(out)


def markdown(data: Mapping[str, Any], suite: Suite, verdicts: Sequence[Verdict]) -> str:
    """The whole results file for ``data``."""
    rows = data["rows"]
    sections = [f"# {suite.name}: {suite.title}", suite.description.strip()]
    if suite.plot:
        sections.append(f"![{suite.name}: time and peak memory]({suite.name}.png)")
    sections += [floors_section(verdicts), anchors_section(suite, rows)]
    parts = list(dict.fromkeys(r["part"] for r in rows))
    for name in parts:
        part_rows = [r for r in rows if r["part"] == name]
        try:
            part = suite.part(name)
        except KeyError:  # a part the suite no longer declares: shown with the defaults
            part = Part(name, (), ())
        title = "## Rows" if len(parts) == 1 else f"## Rows: part `{name}`"
        sections.append(f"{title}\n\n{rows_table(part, part_rows, suite)}")
        if suite.plot_value is not None:
            sections.append(pivot_table(part, part_rows, suite.plot_value))
        elif part.x != "length":
            for value in _x_pivots(part_rows):
                sections.append(pivot_table(part, part_rows, value))
    sections.append(runs_section(data["meta"], rows))
    return "\n\n".join(s for s in sections if s) + "\n"


def _x_pivots(rows: Sequence[Row]) -> list[Column]:
    pivots = [Column("time per step, s", lambda r: r["median_s"], "{:.2f}")]
    if any(r.get("peak_mb") is not None for r in rows):
        pivots.insert(0, Column("peak memory added by a step, MB", lambda r: r["peak_mb"], "{:.0f}"))
    return pivots


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------


def plot(data: Mapping[str, Any], suite: Suite, path: Path) -> None:
    """Time (or the suite's ``plot_value``) and peak memory against the x field, log-log, one line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [
        r for r in data["rows"] if r["status"] == "ok" and "median_s" in r and r["role"] not in ("bound", "derived")
    ]
    mode = _main_mode(rows)
    parts = {p.name: p for p in suite.parts}
    series: dict[str, dict[Any, Row]] = {}
    x_name = "length"
    for r in rows:
        if r["mode"] != mode:
            continue
        part = parts.get(r["part"], suite.parts[0])
        x_name = part.x
        name = f"{x_value(r, part.series)}{' (causal)' if r['causal'] else ''}"
        series.setdefault(name, {}).setdefault(x_value(r, part.x), r)  # first part wins a shared point
    with_memory = any(r.get("peak_mb") for r in rows)
    fig, axes = plt.subplots(1, 2 if with_memory else 1, figsize=(12 if with_memory else 6.5, 4.8), squeeze=False)
    value = suite.plot_value
    ylabel = value.header if value else "time per step, ms (median)"
    for name, points in sorted(series.items()):
        xs = sorted(points)
        style = "-" if all(points[x]["role"] == "attnkit" for x in xs) else "--"
        ys = [value.value(points[x]) if value else points[x]["median_s"] * 1e3 for x in xs]
        axes[0][0].plot(xs, ys, style, marker="o", label=name)
        if with_memory:
            axes[0][1].plot(xs, [max(points[x].get("peak_mb") or 0.0, 1.0) for x in xs], style, marker="o", label=name)
    panels = [(axes[0][0], ylabel, "time" if value is None else value.header)]
    if with_memory:
        panels.append((axes[0][1], "peak extra memory, MB", "peak memory"))
    for ax, label, what in panels:
        if x_name == "length":
            ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length" if x_name == "length" else x_name)
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(f"{suite.name}: {mode} {what}")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(data: Mapping[str, Any], suite: Suite, out_dir: Path, *, with_plot: bool = True) -> list[Path]:
    """Write ``SUITE.md`` (and ``SUITE.png``) for ``data`` into ``out_dir``; returns the paths written."""
    verdicts = floors_mod.judge_suite(suite, data["rows"])
    md = out_dir / f"{suite.name}.md"
    md.write_text(markdown(data, suite, verdicts))
    written = [md]
    if with_plot and suite.plot and any(r["status"] == "ok" and "median_s" in r for r in data["rows"]):
        png = out_dir / f"{suite.name}.png"
        plot(data, suite, png)
        written.append(png)
    return written
