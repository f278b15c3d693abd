"""Run a suite: measure its cells through the harness, record the run, write and render the results."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks import render, schema
from benchmarks.harness import cells, run_part
from benchmarks.suite import Part, Suite


class SelectionError(ValueError):
    """A ``--parts``/``--cases`` selection that matches nothing (says what exists)."""


def select(
    suite: Suite,
    *,
    parts: Sequence[str] | None = None,
    cases: Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> list[Part]:
    """The parts to measure: named ones (default all), cases whose label contains one of ``cases``.

    ``overrides`` replace part settings (``repeats``, ``warmup``, ``rounds``, ``lengths``, ``timeout``);
    ``modes`` and ``causal`` keep only those of a part's cells (a part left without cells is dropped).
    """
    overrides = dict(overrides or {})
    only: dict[str, Any] = {key: overrides.pop(key, None) for key in ("modes", "causal")}
    chosen = list(suite.parts)
    if parts:
        unknown = [p for p in parts if p not in {part.name for part in suite.parts}]
        if unknown:
            raise SelectionError(
                f"suite {suite.name} has no part {', '.join(unknown)} (parts: {', '.join(p.name for p in suite.parts)})"
            )
        chosen = [p for p in chosen if p.name in parts]
    selected = []
    for part in chosen:
        if cases and part.compute is None:
            kept = tuple(c for c in part.case_list() if any(text in c.label for text in cases))
            if not kept:
                continue
            part = dataclasses.replace(part, cases=kept)
        elif cases:  # a computed part has no cases to pick from
            continue
        if only["modes"] is not None:
            part = dataclasses.replace(part, modes=tuple(m for m in part.modes if m in only["modes"]))
        if only["causal"] is not None:
            part = dataclasses.replace(part, causal=tuple(c for c in part.causal if c in only["causal"]))
        if part.compute is None and not (part.modes and part.causal):
            continue
        part = dataclasses.replace(part, **{k: v for k, v in overrides.items() if v is not None})
        selected.append(part)
    if not selected:
        labels = sorted(suite.labels())
        raise SelectionError(
            f"the selection (cases {cases or 'all'}, modes {only['modes'] or 'all'}, causal {only['causal'] or 'both'}) "
            f"leaves nothing to measure in suite {suite.name} (case labels: {', '.join(labels)})"
        )
    return selected


def _planned(part: Part) -> int:
    """Rows a part measures at most (cases × cells; fewer when a slow or failed case stops)."""
    if part.compute is not None:
        return 0
    return sum(sum(case.runs_in(causal) for case in part.case_list()) for _, causal, _ in cells(part))


def _replace(rows: list[dict[str, Any]], new: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with every row of the same part, label and cell as one of ``new`` replaced by it."""
    fresh = {schema.row_key(r): r for r in new}
    merged = [fresh.pop(schema.row_key(r), r) for r in rows]
    return merged + [r for r in new if schema.row_key(r) in fresh]


def _derive(suite: Suite, rows: list[dict[str, Any]], cell: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with the suite's computed rows of ``cell``'s cell recomputed from its measured rows.

    A computed row needs every input row in the file (a failed one gives it ``status: error``); when
    ``--cases`` left an input out, the cell's computed rows are not made, and the run says so.
    """
    if suite.derive is None or not cell:
        return rows
    first = cell[0]
    key = (first["part"], first["length"], first["causal"], first["mode"])
    same = [
        r
        for r in rows
        if (r["part"], r["length"], r["causal"], r["mode"]) == key and r["role"] not in ("bound", "derived")
    ]
    try:
        derived = suite.derive(same, rows)
    except KeyError as missing:
        print(f"[{suite.name}] no computed rows for this cell: {missing} was not measured", flush=True)
        return rows
    return _replace(rows, derived)


def _progress(suite: Suite, total: int) -> Any:
    done = 0

    def report(row: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        if row["status"] == "ok":
            peak = row.get("peak_mb")
            shown = f"{row['median_s'] * 1e3:10.2f} ms" + (f" {peak:7.0f} MB" if peak is not None else "")
        else:
            shown = f"{row['status']}: {row.get('error', '')}"
        print(
            f"[{suite.name} {done}/{total}] {row['part']} {row['mode']:7s} causal={row['causal']!s:5s} "
            f"L={row['length']:6d} {row['label']:44s} {shown}",
            flush=True,
        )

    return report


def run(
    suite: Suite,
    parts: Sequence[Part],
    *,
    out_dir: Path = schema.RESULTS,
    merge: bool = False,
    command: str = "",
    with_plot: bool = True,
) -> dict[str, Any]:
    """Measure ``parts`` of ``suite`` and write ``out_dir/SUITE.{json,md,png}``.

    The JSON is rewritten after every cell, so an interrupted run keeps what it measured. With
    ``merge``, the rows measured now replace the same rows of the existing file and every other
    row is kept with the run it came from.
    """
    path = schema.result_path(suite.name, out_dir)
    old = schema.load(path) if merge and path.exists() else None
    runs = list(old["meta"]["runs"]) if old else []
    rows: list[dict[str, Any]] = list(old["rows"]) if old else []
    notes = list(old["meta"].get("notes", [])) if old else []
    selection = {
        "parts": [p.name for p in parts],
        "cases": {p.name: [c.label for c in p.case_list()] for p in parts if p.compute is None},
    }
    current = schema.new_run({p.name: p.protocol() for p in parts}, command=command, selection=selection)
    runs.append(current)
    index = len(runs) - 1
    report = _progress(suite, sum(_planned(p) for p in parts))

    def save() -> None:
        schema.save(schema.result(suite.name, runs, rows, notes), path)

    try:
        for part in parts:
            if part.compute is not None:
                computed = [{**r, "part": part.name, "run": index} for r in part.compute()]
                rows = _replace(rows, computed)
                save()
                continue
            for cell in run_part(part, run=index, report=report):
                rows = _derive(suite, _replace(rows, cell), cell)
                save()
    except KeyboardInterrupt:
        current["note"] = (current.get("note", "") + "; " if current.get("note") else "") + "interrupted"
        raise
    finally:
        # a run that measured nothing leaves the existing files alone
        if any(r["run"] == index for r in rows):
            schema.finish_run(current)
            save()
            render.render(schema.result(suite.name, runs, rows, notes), suite, out_dir, with_plot=with_plot)
    return schema.result(suite.name, runs, rows, notes)
