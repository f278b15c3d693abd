"""The one result schema of every suite, and the facts a run records about itself.

A result file ``benchmarks/results/SUITE.json`` is::

    {"schema": "attnkit-bench/1",
     "meta": {"suite": "kernel", "runs": [RUN, ...], "notes": ["...", ...]},
     "rows": [ROW, ...]}

``RUN`` says where and how rows were measured: ``commit`` (hex, or ``"unknown"``), ``dirty``
(whether ``src/`` or ``benchmarks/`` had uncommitted changes; ``"unknown"``), ``torch``,
``date`` (ISO 8601, UTC), ``machine`` (``cpu`` model, physical ``cores``, logical ``threads``,
``platform``), ``load`` (1/5/15-minute load averages at ``start`` and ``end``), ``protocol``
(each part's settings), and optionally ``command``, ``selection``, ``finished``, ``note``,
``source`` (how a converted file's facts were found). A file holds several runs when some of
its rows were re-measured (``python -m benchmarks run SUITE --cases ... --merge``).

``ROW`` is one measured (or derived) result; see :data:`ROW_FIELDS`. Every row names its run.
Ratios are not stored: the renderer computes them from the times, so they cannot disagree.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.suite import MODES, ROLES

SCHEMA = "attnkit-bench/1"
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
UNKNOWN = "unknown"
STATUSES = ("ok", "error", "timeout", "oom", "skipped")

#: Row fields: name -> (types, required). ``causal`` is ``None`` only for computed rows that
#: aggregate both (``hashing_error``).
ROW_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "label": ((str,), True),
    "role": ((str,), True),
    "part": ((str,), True),
    "length": ((int,), True),
    "causal": ((bool, type(None)), True),
    "mode": ((str,), True),
    "status": ((str,), True),
    "run": ((int,), True),
    "median_s": ((float, int), False),
    "times": ((list,), False),
    "n_times": ((int,), False),
    "round_medians_s": ((list,), False),
    "peak_mb": ((float, int, type(None)), False),
    "failed_rounds": ((int,), False),
    "pair_ratios": ((dict,), False),
    "params": ((dict,), False),
    "info": ((dict,), False),
    "autograd": ((bool,), False),
    "derived_from": ((str,), False),
    "error": ((str,), False),
}
RUN_FIELDS = ("commit", "dirty", "torch", "date", "machine", "load", "protocol")
RUN_OPTIONAL = ("command", "selection", "finished", "note", "source")
MACHINE_FIELDS = ("cpu", "cores", "threads", "platform")
_COMMIT = re.compile(r"^[0-9a-f]{7,40}$")


# ---------------------------------------------------------------------------------------------
# What a run records about itself
# ---------------------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def source_state() -> tuple[str, bool | str, list[str]]:
    """``(commit, dirty, changed paths)`` of the code the workers import (``src/``, ``benchmarks/``).

    Result files are left out of ``dirty`` (a run writes them). Outside a git checkout (a copied
    snapshot) both are ``"unknown"``.
    """
    head = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--", "src", "benchmarks", ":(exclude)benchmarks/results")
    if head is None or status is None:
        return UNKNOWN, UNKNOWN, []
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    return head.strip(), bool(changed), changed


def machine() -> dict[str, Any]:
    """CPU model, physical cores, logical threads and platform of this machine."""
    cpu, cores = UNKNOWN, None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    models = re.findall(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    if models:
        cpu = models[0].strip()
    # physical cores: distinct (package, core) pairs, one per processor block; a VM may list neither
    pairs = set()
    for block in text.split("\n\n"):
        package = re.search(r"^physical id\s*:\s*(\d+)", block, re.MULTILINE)
        core = re.search(r"^core id\s*:\s*(\d+)", block, re.MULTILINE)
        if package and core:
            pairs.add((package.group(1), core.group(1)))
    if pairs:
        cores = len(pairs)
    return {
        "cpu": cpu or platform.processor() or UNKNOWN,
        "cores": cores if cores is not None else UNKNOWN,
        "threads": os.cpu_count() or UNKNOWN,
        "platform": platform.platform(),
    }


def load_average() -> list[float] | str:
    """The 1, 5 and 15-minute load averages (``"unknown"`` where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return UNKNOWN


def utc_now() -> str:
    """The time now, ISO 8601 in UTC to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def new_run(protocol: Mapping[str, Any], *, command: str, selection: Mapping[str, Any]) -> dict[str, Any]:
    """The meta of a run starting now (``load.end`` and ``finished`` are set by :func:`finish_run`)."""
    import torch

    commit, dirty, changed = source_state()
    run: dict[str, Any] = {
        "commit": commit,
        "dirty": dirty,
        "torch": torch.__version__,
        "date": utc_now(),
        "machine": machine(),
        "load": {"start": load_average(), "end": UNKNOWN},
        "protocol": dict(protocol),
        "command": command,
        "selection": dict(selection),
    }
    if changed:
        run["note"] = "uncommitted changes in: " + ", ".join(changed[:20]) + (" ..." if len(changed) > 20 else "")
    return run


def finish_run(run: dict[str, Any]) -> None:
    """Record the load average and the time at the end of a run."""
    run["load"]["end"] = load_average()
    run["finished"] = utc_now()


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_run(i: int, run: Any) -> list[str]:
    where = f"meta.runs[{i}]"
    if not isinstance(run, dict):
        return [f"{where} must be an object"]
    problems = [f"{where} lacks {key!r}" for key in RUN_FIELDS if key not in run]
    problems += [f"{where} has unknown field {key!r}" for key in run if key not in RUN_FIELDS + RUN_OPTIONAL]
    commit = run.get("commit")
    if "commit" in run and not (commit == UNKNOWN or (isinstance(commit, str) and _COMMIT.match(commit))):
        problems.append(f"{where}.commit must be a hex commit or 'unknown', got {commit!r}")
    if "dirty" in run and run["dirty"] not in (True, False, UNKNOWN):
        problems.append(f"{where}.dirty must be true, false or 'unknown', got {run['dirty']!r}")
    if "torch" in run and not isinstance(run["torch"], str):
        problems.append(f"{where}.torch must be a string")
    if "date" in run and not (isinstance(run["date"], str) and re.match(r"^\d{4}-\d{2}-\d{2}", run["date"])):
        problems.append(f"{where}.date must start with an ISO date (YYYY-MM-DD), got {run.get('date')!r}")
    machine_ = run.get("machine")
    if "machine" in run:
        if not isinstance(machine_, dict):
            problems.append(f"{where}.machine must be an object")
        else:
            problems += [f"{where}.machine lacks {key!r}" for key in MACHINE_FIELDS if key not in machine_]
            for key in ("cores", "threads"):
                value = machine_.get(key, UNKNOWN)
                if value != UNKNOWN and not (isinstance(value, int) and value > 0):
                    problems.append(f"{where}.machine.{key} must be a positive integer or 'unknown', got {value!r}")
    load = run.get("load")
    if "load" in run:
        if not isinstance(load, dict) or set(load) != {"start", "end"}:
            problems.append(f"{where}.load must be an object with 'start' and 'end'")
        else:
            for key, value in load.items():
                ok = value == UNKNOWN or (isinstance(value, list) and len(value) == 3 and all(map(_is_number, value)))
                if not ok:
                    problems.append(f"{where}.load.{key} must be three load averages or 'unknown', got {value!r}")
    if "protocol" in run and not isinstance(run["protocol"], dict):
        problems.append(f"{where}.protocol must be an object (settings per part)")
    return problems


def _check_row(i: int, row: Any, runs: int) -> list[str]:
    where = f"rows[{i}]"
    if not isinstance(row, dict):
        return [f"{where} must be an object"]
    problems = []
    for key, (types, required) in ROW_FIELDS.items():
        if key not in row:
            if required:
                problems.append(f"{where} lacks {key!r}")
            continue
        value = row[key]
        # bool is an int in Python: only fields typed bool may hold one
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = "/".join(t.__name__ for t in types)
            problems.append(f"{where}.{key} must be {names}, got {value!r}")
    problems += [f"{where} has unknown field {key!r}" for key in row if key not in ROW_FIELDS]
    if problems:
        return problems
    if row["role"] not in ROLES:
        problems.append(f"{where}.role must be one of {ROLES}, got {row['role']!r}")
    if row["mode"] not in MODES:
        problems.append(f"{where}.mode must be one of {MODES}, got {row['mode']!r}")
    if row["status"] not in STATUSES:
        problems.append(f"{where}.status must be one of {STATUSES}, got {row['status']!r}")
    if not 0 <= row["run"] < runs:
        problems.append(f"{where}.run must index meta.runs (0..{runs - 1}), got {row['run']}")
    if row["length"] < 0:
        problems.append(f"{where}.length must be >= 0, got {row['length']}")
    timed = row["role"] not in ("bound", "derived")
    if row["status"] == "ok":
        if "median_s" in row and not (_is_number(row["median_s"]) and (row["median_s"] > 0 or not timed)):
            problems.append(f"{where}.median_s must be a positive number, got {row['median_s']!r}")
        if "median_s" not in row and "info" not in row:
            problems.append(f"{where} is ok but has neither median_s nor info")
    elif "error" not in row and row["status"] != "timeout":
        problems.append(f"{where} has status {row['status']!r} but no 'error' message")
    for key in ("times", "round_medians_s"):
        if key in row and not all(_is_number(t) and t >= 0 for t in row[key]):
            problems.append(f"{where}.{key} must hold non-negative numbers")
    if row.get("peak_mb") is not None and not _is_number(row["peak_mb"]):
        problems.append(f"{where}.peak_mb must be a number or null")
    if "pair_ratios" in row:
        ratios = row["pair_ratios"]
        if set(ratios) != {"vs", "median", "min", "max", "count"} or not all(
            _is_number(ratios[k]) for k in ("median", "min", "max", "count")
        ):
            problems.append(f"{where}.pair_ratios must have vs, median, min, max and count")
    return problems


def validate(data: Any) -> list[str]:
    """Every way ``data`` departs from the schema (empty: it is a valid result file)."""
    if not isinstance(data, dict):
        return ["a result file must be a JSON object"]
    problems = [f"unknown top-level field {key!r}" for key in data if key not in ("schema", "meta", "rows")]
    if data.get("schema") != SCHEMA:
        problems.append(f"'schema' must be {SCHEMA!r}, got {data.get('schema')!r}")
    meta = data.get("meta")
    if not isinstance(meta, dict):
        return [*problems, "'meta' must be an object"]
    problems += [f"meta has unknown field {key!r}" for key in meta if key not in ("suite", "runs", "notes")]
    if not isinstance(meta.get("suite"), str):
        problems.append("meta.suite must name the suite")
    runs = meta.get("runs")
    if not isinstance(runs, list) or not runs:
        return [*problems, "meta.runs must be a non-empty list"]
    for i, run in enumerate(runs):
        problems += _check_run(i, run)
    notes = meta.get("notes", [])
    if not (isinstance(notes, list) and all(isinstance(n, str) for n in notes)):
        problems.append("meta.notes must be a list of strings")
    rows = data.get("rows")
    if not isinstance(rows, list):
        return [*problems, "'rows' must be a list"]
    keys: set[tuple[Any, ...]] = set()
    for i, row in enumerate(rows):
        found = _check_row(i, row, len(runs))
        problems += found
        if not found:
            key = row_key(row)
            if key in keys:
                problems.append(f"rows[{i}] repeats {key} (one row per part, label and cell)")
            keys.add(key)
    return problems


def row_key(row: Mapping[str, Any]) -> tuple[Any, ...]:
    """What identifies a row: its part, label and cell."""
    return row["part"], row["label"], row["length"], row["causal"], row["mode"]


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


class ResultFileError(ValueError):
    """A result file that is missing, not JSON, or not in the schema."""


def result_path(suite: str, out_dir: Path = RESULTS) -> Path:
    """Where a suite's JSON results live."""
    return out_dir / f"{suite}.json"


def load(path: Path) -> dict[str, Any]:
    """Read and validate a result file; :class:`ResultFileError` says what is wrong."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultFileError(f"{path} does not exist (run the suite: python -m benchmarks run NAME)") from None
    except json.JSONDecodeError as err:
        raise ResultFileError(f"{path} is not JSON: {err}") from None
    problems = validate(data)
    if problems:
        shown = "\n  ".join(problems[:20])
        raise ResultFileError(f"{path} is not a valid result file ({len(problems)} problems):\n  {shown}")
    return data


def save(data: Mapping[str, Any], path: Path) -> None:
    """Validate and write a result file (a failed check writes nothing)."""
    problems = validate(data)
    if problems:
        raise ResultFileError("refusing to write an invalid result file:\n  " + "\n  ".join(problems[:20]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)


def result(
    suite: str, runs: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], notes: Sequence[str] = ()
) -> dict[str, Any]:
    """A result file's content."""
    meta: dict[str, Any] = {"suite": suite, "runs": list(runs)}
    if notes:
        meta["notes"] = list(notes)
    return {"schema": SCHEMA, "meta": meta, "rows": list(rows)}
