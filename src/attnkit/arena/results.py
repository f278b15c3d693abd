"""Assemble an arena run into the ``results.json`` document and its leaderboard.

Schema (``schema_version`` 1)::

    meta         machine, library versions, settings, wall time, cache use, and the context-free
                 baseline of each quality task (majority class / unigram bits per char)
    mechanisms   one record per mechanism: capabilities and the options each stage used
    efficiency   one row per (mechanism, length, causal, mode): median_ms, times_ms, peak_mb,
                 time_vs_full / memory_vs_full (ratios to exact attention in the same cell),
                 status ok | error | stopped (with reason)
    fidelity     one row per (mechanism, input, causal): relative_error vs float64 exact
    quality      one row per (mechanism, task): metric, value, status ok | error | n/a
    stops        where and why each sweep stopped
    leaderboard  one summary row per mechanism (what the terminal table shows)

Ratios are taken only between cells of the same settings on the same machine.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

import attnkit
from attnkit.arena.config import HEADLINE_INPUT
from attnkit.arena.quality import task_baseline
from attnkit.arena.runner import BASELINE, ArenaRun

SCHEMA_VERSION = 1

#: Quality metric per task and whether larger is better.
TASK_METRICS: dict[str, tuple[str, bool]] = {
    "mqar": ("accuracy", True),
    "listops": ("accuracy", True),
    "lm": ("bits_per_char", False),
}


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    base = {
        (r["length"], r["causal"], r["mode"]): r for r in rows if r["mechanism"] == BASELINE and r["status"] == "ok"
    }
    for r in rows:
        r["time_vs_full"] = r["memory_vs_full"] = None
        ref = base.get((r["length"], r["causal"], r["mode"]))
        if r["status"] != "ok" or ref is None:
            continue
        r["time_vs_full"] = r["median_ms"] / ref["median_ms"]
        if r.get("peak_mb") is not None and ref.get("peak_mb"):
            r["memory_vs_full"] = r["peak_mb"] / ref["peak_mb"]


def _stops(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[tuple[str, bool, str], dict[str, Any]] = {}
    for r in rows:
        sweep = (r["mechanism"], r["causal"], r["mode"])
        if r["status"] == "stopped" and sweep not in seen:
            seen[sweep] = {
                "mechanism": r["mechanism"],
                "causal": r["causal"],
                "mode": r["mode"],
                "at_length": r["length"],
                "reason": r["reason"],
            }
    return list(seen.values())


def _mechanism_record(name: str) -> dict[str, Any]:
    spec = attnkit.get_spec(name)
    return {
        "name": name,
        **spec.capabilities.as_dict(),
        "benchmark_options": spec.benchmark_options,
        "small_options": spec.small_options,
    }


def reference_length(efficiency: list[dict[str, Any]], causal: bool = False, mode: str = "fwd+bwd") -> int | None:
    """The length the leaderboard compares speed at: the longest one every mechanism reached.

    Comparing speed-ups at different lengths would mix apples and pears, so this is the
    longest length at which every mechanism (and the exact baseline) has a measurement;
    when there is none, the length with the most measured mechanisms (the longer on ties).
    """
    rows = [r for r in efficiency if r["causal"] == causal and r["mode"] == mode]
    names = {r["mechanism"] for r in rows}
    ok_at: dict[int, set[str]] = {}
    for r in rows:
        if r["status"] == "ok":
            ok_at.setdefault(r["length"], set()).add(r["mechanism"])
    with_baseline = {n: ok for n, ok in ok_at.items() if BASELINE in ok}
    if not with_baseline:
        return None
    everyone = [n for n, ok in with_baseline.items() if ok == names]
    if everyone:
        return max(everyone)
    return max(with_baseline, key=lambda n: (len(with_baseline[n]), n))


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for r in rows:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def leaderboard(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One summary row per mechanism from a results document."""
    eff, fid, qual = doc["efficiency"], doc["fidelity"], doc["quality"]
    ref_len = reference_length(eff)
    rows = []
    for mech in doc["mechanisms"]:
        name = mech["name"]
        row: dict[str, Any] = {"mechanism": name, "family": mech["family"], "exact": mech["exact"]}
        for task in doc["meta"]["config"]["tasks"]:
            cell = _find(qual, mechanism=name, task=task)
            row[task] = cell["value"] if cell and cell["status"] == "ok" else None
        accs = [row[t] for t in ("mqar", "listops") if row.get(t) is not None]
        row["avg_accuracy"] = sum(accs) / len(accs) if accs else None
        for causal in (False, True):
            cell = _find(fid, mechanism=name, input=HEADLINE_INPUT, causal=causal)
            row["error_causal" if causal else "error"] = (
                cell["relative_error"] if cell and cell["status"] == "ok" else None
            )
        cell = _find(eff, mechanism=name, length=ref_len, causal=False, mode="fwd+bwd") if ref_len else None
        ok = cell is not None and cell["status"] == "ok"
        row["reference_length"] = ref_len
        row["time_ms"] = cell["median_ms"] if ok and cell else None
        row["speedup"] = 1.0 / cell["time_vs_full"] if ok and cell and cell.get("time_vs_full") else None
        row["peak_mb"] = cell.get("peak_mb") if ok and cell else None
        row["memory_vs_full"] = cell.get("memory_vs_full") if ok and cell else None
        ratios = [
            (1.0 / r["time_vs_full"], r["length"])
            for r in eff
            if r["mechanism"] == name and not r["causal"] and r["mode"] == "fwd+bwd" and r.get("time_vs_full")
        ]
        best = max(ratios, key=lambda x: x[1]) if ratios else (None, None)  # at the longest shared length
        row["longest_speedup"], row["longest_speedup_length"] = best
        reached = [
            r["length"]
            for r in eff
            if r["mechanism"] == name and r["status"] == "ok" and not r["causal"] and r["mode"] == "fwd+bwd"
        ]
        row["max_length"] = max(reached) if reached else None
        rows.append(row)
    return rows


def assemble(run: ArenaRun) -> dict[str, Any]:
    """The ``results.json`` document of ``run``."""
    efficiency = [dict(r) for r in run.efficiency]
    _add_ratios(efficiency)
    cfg = run.config
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "meta": {
            "attnkit": attnkit.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "device": cfg.device,
            "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average": run.load_average,
            "cpu_count": os.cpu_count(),
            "config": cfg.as_dict(),
            "seconds": round(run.seconds, 1),
            "cells_reused": run.cache_hits,
            "cells_measured": run.cache_misses,
            "baseline": BASELINE,
            "quality_baselines": {task: task_baseline(task, cfg) for task in cfg.tasks} if run.quality else {},
        },
        "mechanisms": [_mechanism_record(n) for n in run.mechanisms],
        "efficiency": efficiency,
        "fidelity": [dict(r) for r in run.fidelity],
        "quality": [dict(r) for r in run.quality],
        "stops": _stops(efficiency),
    }
    doc = json.loads(json.dumps(doc, default=repr))  # exactly what results.json will hold
    doc["leaderboard"] = leaderboard(doc)
    return doc


def write_results(doc: dict[str, Any], out_dir: Path | str) -> Path:
    """Write ``results.json`` under ``out_dir``; returns its path."""
    path = Path(out_dir) / "results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=repr))
    return path


def load_results(path: Path | str) -> dict[str, Any]:
    """Read a ``results.json`` (a file, or the report folder holding one).

    Raises:
        FileNotFoundError: no results there (run ``attnkit arena`` first).
        ValueError: a document of another schema version.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"no arena results at {path}; run 'attnkit arena --out {path.parent}' first")
    doc: dict[str, Any] = json.loads(path.read_text())
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"{path} has schema version {doc.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    return doc
