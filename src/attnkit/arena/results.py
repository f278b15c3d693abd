"""Assemble an arena run into the ``results.json`` document and its leaderboard.

Schema (``schema_version`` 2)::

    meta         machine, library versions, settings, threads, cores, wall time, cache use,
                 the context-free baseline of each quality task (majority class / unigram bits
                 per char) and what each flag kind means
    mechanisms   one record per mechanism: capabilities and the options each stage used
    efficiency   one row per (mechanism, length, causal, mode): median_ms, times_ms, peak_mb,
                 speedup_vs_full (> 1 = faster), speedup_spread ([min, max] of the per-round
                 ratios), speedup_rounds, round_speedups, speedup_method, memory_vs_full (peak
                 memory / exact attention's: < 1 = less), load_before / load_after (1-minute
                 load average around the cell), busy, flags (see attnkit.arena.flags), status
                 ok | error | stopped (with reason)
    fidelity     one row per (mechanism, input, causal): relative_error vs float64 exact
    quality      one row per (mechanism, task): metric, value, status ok | error | n/a
    stops        where and why each sweep stopped
    flags        noisy cells and impossible length curves, with a message each
    load_warning None, or the cells measured while the machine was busy (load average above
                 its core count) with a message naming them
    leaderboard  one summary row per mechanism (what the terminal table shows)

speedup_method says where a speed-up comes from: ``interleaved`` (the cell timed the
mechanism and exact attention in alternating rounds, reference_times_ms; the speed-up is
the median of the per-round ratios of exact attention's time to the mechanism's),
``separate cells`` (cells of an older protocol, or a hand-made run: exact attention's
median over the mechanism's, from their own cells) or ``self`` (exact attention's row).
Ratios are taken only between cells of the same settings on the same machine. Version 1
stored ``time_vs_full`` (the inverse ratio, < 1 = faster); :func:`load_results` upgrades
such a file. Keys added since (spreads, loads, load_warning) are absent from older files;
readers use ``.get``.
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
from attnkit.arena.efficiency import paired_speedups, usable_cores
from attnkit.arena.flags import FLAG_HELP, SUGGESTION, TIME_FLAGS, efficiency_flags
from attnkit.arena.quality import task_baseline
from attnkit.arena.runner import BASELINE, ArenaRun

SCHEMA_VERSION = 2

#: Quality metric per task and whether larger is better.
TASK_METRICS: dict[str, tuple[str, bool]] = {
    "mqar": ("accuracy", True),
    "listops": ("accuracy", True),
    "lm": ("bits_per_char", False),
}


def _baseline_cells(rows: list[dict[str, Any]]) -> dict[tuple[int, bool, str], dict[str, Any]]:
    return {
        (r["length"], r["causal"], r["mode"]): r for r in rows if r["mechanism"] == BASELINE and r["status"] == "ok"
    }


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    base = _baseline_cells(rows)
    for r in rows:
        r.update(speedup_vs_full=None, speedup_spread=None, speedup_rounds=None, speedup_method=None)
        r["memory_vs_full"] = None
        ref = base.get((r["length"], r["causal"], r["mode"]))
        if r["status"] != "ok":
            continue
        if r.get("reference_times_ms"):
            paired = paired_speedups(r["times_ms"], r["reference_times_ms"])
            r.update(
                speedup_vs_full=paired["median"],
                speedup_spread=[paired["min"], paired["max"]],
                speedup_rounds=paired["rounds"],
                round_speedups=paired["round_speedups"],
                speedup_method="interleaved",
            )
        elif ref is not None:
            r["speedup_vs_full"] = ref["median_ms"] / r["median_ms"]
            r["speedup_method"] = "self" if r["mechanism"] == BASELINE else "separate cells"
        if ref is not None and r.get("peak_mb") is not None and ref.get("peak_mb"):
            r["memory_vs_full"] = r["peak_mb"] / ref["peak_mb"]


def cell_load(row: dict[str, Any]) -> float | None:
    """The highest 1-minute load average recorded around an efficiency cell (None: not recorded)."""
    loads = [x for x in (row.get("load_before"), row.get("load_after")) if x is not None and x >= 0]
    return max(loads) if loads else None


def load_warning(rows: list[dict[str, Any]], cores: int) -> dict[str, Any] | None:
    """The busy-machine warning: efficiency cells measured while the load average exceeded ``cores``.

    A load average above the core count means runnable processes were waiting for a core,
    so a step could be descheduled mid-measurement. Each row gets ``"busy"`` (True, False,
    or None when no load was recorded).

    Returns:
        None when no cell was busy, else ``{"cores", "cells": [{"mechanism", "length",
        "causal", "mode", "load"}], "message"}``; ``cells`` holds every busy cell, the message
        names them (up to eight sweeps).
    """
    busy = []
    for r in rows:
        load = cell_load(r)
        r["busy"] = None if load is None else load > cores
        if r["busy"]:
            busy.append({k: r[k] for k in ("mechanism", "length", "causal", "mode")} | {"load": load})
    if not busy:
        return None
    measured = sum(1 for r in rows if r["busy"] is not None)
    low, high = min(c["load"] for c in busy), max(c["load"] for c in busy)
    loads = f"1-minute load average of {low:.2f}" + ("" if low == high else f"-{high:.2f}")
    if len(busy) == measured:
        where = f"every one of the {measured} efficiency cells was measured with a {loads}"
    else:
        where = f"{len(busy)} of {measured} efficiency cells were measured with a {loads} ({_name_cells(busy)})"
    message = (
        f"the machine was busy: {where}, above its {cores} cores. Their times include waits for a core; their "
        "speed-ups, timed side by side with exact attention, suffer less. Re-measure them on a quieter machine "
        "(--no-resume measures cached cells again)."
    )
    return {"cores": cores, "cells": busy, "message": message}


def _name_cells(cells: list[dict[str, Any]], most: int = 8) -> str:
    """``lsh causal fwd+bwd at 1K, 2K; full fwd at 512`` (the first ``most`` sweeps, then how many more)."""
    sweeps: dict[tuple[str, bool, str], list[int]] = {}
    for c in cells:
        sweeps.setdefault((c["mechanism"], c["causal"], c["mode"]), []).append(c["length"])
    named = [
        f"{name} {'causal ' if causal else ''}{mode} at {', '.join(length_label(n) for n in lengths)}"
        for (name, causal, mode), lengths in sweeps.items()
    ]
    more = f"; and {len(named) - most} more sweeps (results.json: load_warning)" if len(named) > most else ""
    return "; ".join(named[:most]) + more


def length_label(n: int) -> str:
    """A sequence length as the tables print it: ``2K`` for 2048, ``1000`` for 1000."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


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
    base = _baseline_cells(eff)
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
        row.update(_speed_columns(name, eff, ref_len, base))
        rows.append(row)
    return rows


def _speed_columns(
    name: str, eff: list[dict[str, Any]], ref_len: int | None, base: dict[tuple[int, bool, str], dict[str, Any]]
) -> dict[str, Any]:
    """The leaderboard's efficiency columns of ``name`` (bidirectional fwd+bwd), with the flags behind them."""
    sweep = [r for r in eff if r["mechanism"] == name and not r["causal"] and r["mode"] == "fwd+bwd"]
    cell = next((r for r in sweep if r["length"] == ref_len and r["status"] == "ok"), None)
    shared = [r for r in sweep if r.get("speedup_vs_full")]
    longest = max(shared, key=lambda r: r["length"]) if shared else None  # the longest length shared with full
    reached = [r["length"] for r in sweep if r["status"] == "ok"]
    return {
        "reference_length": ref_len,
        "time_ms": cell["median_ms"] if cell else None,
        "speedup_vs_full": cell.get("speedup_vs_full") if cell else None,
        "speedup_vs_full_spread": cell.get("speedup_spread") if cell else None,
        "speedup_vs_full_rounds": cell.get("speedup_rounds") if cell else None,
        "peak_mb": cell.get("peak_mb") if cell else None,
        "memory_vs_full": cell.get("memory_vs_full") if cell else None,
        "speedup_vs_full_longest": longest["speedup_vs_full"] if longest else None,
        "speedup_vs_full_longest_spread": longest.get("speedup_spread") if longest else None,
        "speedup_vs_full_longest_rounds": longest.get("speedup_rounds") if longest else None,
        "longest_shared_length": longest["length"] if longest else None,
        "max_length": max(reached) if reached else None,
        "flags": {
            "speedup_vs_full": _time_flags(cell, base),
            "peak_mb": [f for f in cell.get("flags", []) if f not in TIME_FLAGS] if cell else [],
            "speedup_vs_full_longest": _time_flags(longest, base),
        },
    }


def _time_flags(cell: dict[str, Any] | None, base: dict[tuple[int, bool, str], dict[str, Any]]) -> list[str]:
    """Time flags of ``cell``, and of the exact-attention cell its speed-up divides by when it
    came from separate cells (an interleaved speed-up divides by steps taken within ``cell``)."""
    if cell is None:
        return []
    interleaved = cell.get("speedup_method") == "interleaved"
    ref = {} if interleaved else base.get((cell["length"], cell["causal"], cell["mode"])) or {}
    kinds = [*cell.get("flags", []), *ref.get("flags", [])]
    return sorted({f for f in kinds if f in TIME_FLAGS})


def assemble(run: ArenaRun) -> dict[str, Any]:
    """The ``results.json`` document of ``run``."""
    efficiency = [dict(r) for r in run.efficiency]
    _add_ratios(efficiency)
    flags = efficiency_flags(efficiency)
    cores = run.cores or usable_cores()
    warning = load_warning(efficiency, cores)
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
            "threads": run.threads or torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_average": run.load_average,
            "cpu_count": os.cpu_count(),
            "cores": cores,
            "config": cfg.as_dict(),
            "seconds": round(run.seconds, 1),
            "cells_reused": run.cache_hits,
            "cells_measured": run.cache_misses,
            "baseline": BASELINE,
            "quality_baselines": {task: task_baseline(task, cfg) for task in cfg.tasks} if run.quality else {},
            "flag_help": {**FLAG_HELP, "what to do": SUGGESTION},
        },
        "mechanisms": [_mechanism_record(n) for n in run.mechanisms],
        "efficiency": efficiency,
        "fidelity": [dict(r) for r in run.fidelity],
        "quality": [dict(r) for r in run.quality],
        "stops": _stops(efficiency),
        "flags": flags,
        "load_warning": warning,
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
    """Read a ``results.json`` (a file, or the report folder holding one); older schemas are upgraded.

    Raises:
        FileNotFoundError: no results there (run ``attnkit arena`` first).
        ValueError: a document of an unknown schema version.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"no arena results at {path}; run 'attnkit arena --out {path.parent}' first")
    doc: dict[str, Any] = json.loads(path.read_text())
    version = doc.get("schema_version")
    if version == 1:
        return upgrade_v1(doc)
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{path} has schema version {version!r}, this attnkit reads 1 and {SCHEMA_VERSION}; "
            f"run 'attnkit arena --out {path.parent}' again to measure with this version"
        )
    return doc


def upgrade_v1(doc: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 document in schema 2: ``time_vs_full`` (< 1 = faster) becomes ``speedup_vs_full``
    (> 1 = faster), flags are computed and the leaderboard is rebuilt. Modifies and returns ``doc``."""
    for r in doc["efficiency"]:
        ratio = r.pop("time_vs_full", None)
        r["speedup_vs_full"] = 1.0 / ratio if ratio else None
    doc["flags"] = efficiency_flags(doc["efficiency"])
    doc["meta"]["flag_help"] = {**FLAG_HELP, "what to do": SUGGESTION}
    doc["meta"]["upgraded_from_schema"] = 1
    doc["schema_version"] = SCHEMA_VERSION
    doc["leaderboard"] = leaderboard(doc)
    return doc
