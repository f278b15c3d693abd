"""Floors: the thresholds the issues set, read from ``benchmarks/floors.toml`` and judged on result rows.

Each ``[[floor]]`` entry of the file names a suite, its case(s), the cells (``lengths``,
``causal``, ``mode``, optionally ``part``), a metric, a comparison (``>=`` or ``<=``), a
threshold and the issue that set it; a list in ``case``/``lengths``/``causal`` stands for one
floor per combination. Metrics (``this`` is the case's row in the cell):

- ``speedup_vs_anchor``: the judged anchor's time / this time. The judged anchor is the fastest
  finished row, in the same part and cell, among the anchors the suite declares for the case
  that compute the same function (not declared unmatched).
- ``memory_vs_anchor``: this peak memory / the judged anchor's.
- ``speedup_vs_sdpa``: the SDPA row's time (same part and cell) / this time.
- ``paired_ratio``: the median over interleaved rounds of this time / the reference's time.
- ``time_growth``: this time / the same case's time at ``base_length`` (same causal and mode).
- ``peak_growth``: this peak memory / the same case's peak at ``base_length`` (at least 1 MB).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from benchmarks.suite import Suite

FLOORS = Path(__file__).resolve().parent / "floors.toml"
METRICS = ("speedup_vs_anchor", "memory_vs_anchor", "speedup_vs_sdpa", "paired_ratio", "time_growth", "peak_growth")
COMPARISONS = (">=", "<=")
_NEEDS_BASE = ("time_growth", "peak_growth")
_KEYS = {"suite", "case", "part", "lengths", "causal", "mode", "metric", "comparison", "threshold", "issue"}
_KEYS_OPTIONAL = {"part", "base_length", "note"}


class FloorFileError(ValueError):
    """A floor entry that cannot be read (names the entry and what to write instead)."""


@dataclass(frozen=True)
class Floor:
    """One judged threshold on one case in one cell."""

    issue: int
    suite: str
    case: str
    part: str | None
    length: int
    causal: bool
    mode: str
    metric: str
    comparison: str
    threshold: float
    base_length: int | None = None
    note: str = ""

    def describe(self) -> str:
        """The cell and metric in words, e.g. ``16K causal fwd+bwd: speed-up vs the anchor``."""
        cell = f"{_short(self.length)} {'causal' if self.causal else 'bidirectional'} {self.mode}"
        return f"{cell}{f' ({self.part})' if self.part else ''}: {_METRIC_WORDS[self.metric](self)}"

    def required(self) -> str:
        """The threshold as text, e.g. ``≥ 1.5``."""
        return f"{'≥' if self.comparison == '>=' else '≤'} {self.threshold:g}"

    def passes(self, value: float) -> bool:
        """Whether a measured ``value`` meets the floor."""
        return value >= self.threshold if self.comparison == ">=" else value <= self.threshold


_METRIC_WORDS = {
    "speedup_vs_anchor": lambda f: "speed-up vs the judged anchor",
    "memory_vs_anchor": lambda f: "peak memory / the judged anchor's",
    "speedup_vs_sdpa": lambda f: f"speed-up vs {'causal ' if f.causal else ''}SDPA",
    "paired_ratio": lambda f: "time / reference, median of interleaved pairs",
    "time_growth": lambda f: f"time / time at {_short(f.base_length)}",
    "peak_growth": lambda f: f"peak memory / peak at {_short(f.base_length)}",
}


def _short(length: int | None) -> str:
    if length is None:
        return "?"
    return f"{length // 1024}K" if length >= 1024 and length % 1024 == 0 else str(length)


def _listed(entry: Mapping[str, Any], key: str) -> list[Any]:
    value = entry[key]
    return list(value) if isinstance(value, list) else [value]


def _check_entry(i: int, entry: Mapping[str, Any]) -> None:
    where = f"floors.toml entry {i + 1} ({entry.get('suite', '?')}: {entry.get('case', '?')})"
    missing = sorted(_KEYS - _KEYS_OPTIONAL - set(entry))
    if missing:
        raise FloorFileError(f"{where} lacks {', '.join(missing)} (every floor names {', '.join(sorted(_KEYS))})")
    unknown = sorted(set(entry) - _KEYS - _KEYS_OPTIONAL)
    if unknown:
        raise FloorFileError(f"{where} has unknown keys {', '.join(unknown)}")
    if entry["metric"] not in METRICS:
        raise FloorFileError(f"{where}: metric must be one of {', '.join(METRICS)}, got {entry['metric']!r}")
    if entry["comparison"] not in COMPARISONS:
        raise FloorFileError(f"{where}: comparison must be '>=' or '<=', got {entry['comparison']!r}")
    if not isinstance(entry["threshold"], int | float) or isinstance(entry["threshold"], bool):
        raise FloorFileError(f"{where}: threshold must be a number, got {entry['threshold']!r}")
    if not isinstance(entry["issue"], int):
        raise FloorFileError(f"{where}: issue must be the number of the issue that set it, got {entry['issue']!r}")
    if not all(mode in ("fwd", "fwd+bwd") for mode in _listed(entry, "mode")):
        raise FloorFileError(f"{where}: mode must be 'fwd', 'fwd+bwd' or a list of them, got {entry['mode']!r}")
    if entry["metric"] in _NEEDS_BASE and not isinstance(entry.get("base_length"), int):
        raise FloorFileError(f"{where}: metric {entry['metric']} needs base_length = N (the length it grows from)")
    if not all(isinstance(n, int) and n > 0 for n in _listed(entry, "lengths")):
        raise FloorFileError(f"{where}: lengths must be positive integers, got {entry['lengths']!r}")
    if not all(isinstance(c, bool) for c in _listed(entry, "causal")):
        raise FloorFileError(f"{where}: causal must be true, false or a list of them, got {entry['causal']!r}")


def load_floors(path: Path = FLOORS) -> list[Floor]:
    """Every floor of the file, one per (case, length, causal, mode) of each entry."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise FloorFileError(f"{path} does not exist (the floors live in benchmarks/floors.toml)") from None
    except tomllib.TOMLDecodeError as err:
        raise FloorFileError(f"{path} is not valid TOML: {err}") from None
    unknown = set(data) - {"floor"}
    if unknown:
        raise FloorFileError(f"{path}: only [[floor]] tables are read, found {', '.join(sorted(unknown))}")
    floors = []
    for i, entry in enumerate(data.get("floor", [])):
        _check_entry(i, entry)
        for case, length, causal, mode in itertools.product(
            _listed(entry, "case"), _listed(entry, "lengths"), _listed(entry, "causal"), _listed(entry, "mode")
        ):
            floors.append(
                Floor(
                    issue=entry["issue"],
                    suite=entry["suite"],
                    case=case,
                    part=entry.get("part"),
                    length=length,
                    causal=causal,
                    mode=mode,
                    metric=entry["metric"],
                    comparison=entry["comparison"],
                    threshold=float(entry["threshold"]),
                    base_length=entry.get("base_length"),
                    note=entry.get("note", ""),
                )
            )
    return floors


# ---------------------------------------------------------------------------------------------
# Comparisons between rows (shared with the renderer)
# ---------------------------------------------------------------------------------------------


def same_cell(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two rows were measured in the same part and cell."""
    return all(a[k] == b[k] for k in ("part", "length", "causal", "mode"))


def anchors_of(
    suite: Suite, row: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]
) -> list[tuple[dict[str, Any], str | None]]:
    """The finished rows of ``row``'s declared anchors in its cell, each with why it is not matched (or ``None``)."""
    declared = suite.anchors.get(row["label"], ())
    found = []
    for other in rows:
        if other["label"] in declared and other["status"] == "ok" and same_cell(row, other):
            reason = suite.why_unmatched(other["label"], row["causal"]) or suite.why_unmatched(
                row["label"], row["causal"]
            )
            found.append((dict(other), reason))
    return sorted(found, key=lambda pair: declared.index(pair[0]["label"]))


def judged_anchor(suite: Suite, row: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The fastest of ``row``'s anchors computing the same function, in its cell (``None``: none finished)."""
    matched = [other for other, reason in anchors_of(suite, row, rows) if reason is None]
    return min(matched, key=lambda r: r["median_s"]) if matched else None


def sdpa_of(row: Mapping[str, Any], rows: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The finished SDPA row of ``row``'s part and cell."""
    for other in rows:
        if other["role"] == "sdpa" and other["status"] == "ok" and same_cell(row, other):
            return dict(other)
    return None


def at_length(row: Mapping[str, Any], length: int, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The same case's finished row at ``length`` (same causal and mode; its own part first)."""
    candidates = [
        r
        for r in rows
        if r["label"] == row["label"]
        and r["length"] == length
        and r["causal"] == row["causal"]
        and r["mode"] == row["mode"]
        and r["status"] == "ok"
    ]
    candidates.sort(key=lambda r: r["part"] != row["part"])
    return dict(candidates[0]) if candidates else None


def memory_ratio(ours: Mapping[str, Any], other: Mapping[str, Any]) -> float | None:
    """``ours`` peak memory over ``other``'s (1 when both added nothing; ``None`` when unrecorded)."""
    a, b = ours.get("peak_mb"), other.get("peak_mb")
    if a is None or b is None:
        return None
    if b == 0:
        return 1.0 if a == 0 else math.inf
    return a / b


# ---------------------------------------------------------------------------------------------
# Judging
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """A floor judged on a result file.

    Attributes:
        floor: the floor.
        status: ``"met"``, ``"not met"`` or ``"not measured"`` (no row, or the other side of
            the ratio did not finish: never counted as met).
        value: the measured metric.
        against: the row it was compared with (the judged anchor's label, ``sdpa``, ...).
        detail: the times or sizes behind the value, or why there is none.
    """

    floor: Floor
    status: str
    value: float | None = None
    against: str | None = None
    detail: str = ""


def _find(floor: Floor, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    for r in rows:
        if (
            r["label"] == floor.case
            and r["length"] == floor.length
            and r["causal"] == floor.causal
            and r["mode"] == floor.mode
            and (floor.part is None or r["part"] == floor.part)
        ):
            return dict(r)
    return None


def _ms(row: Mapping[str, Any]) -> str:
    return f"{row['median_s'] * 1e3:.1f} ms"


def _measure(
    floor: Floor, row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], suite: Suite
) -> tuple[float | None, str | None, str]:
    """``(value, against, detail)`` of the floor's metric on ``row``."""
    metric = floor.metric
    if metric in ("speedup_vs_anchor", "memory_vs_anchor"):
        other = judged_anchor(suite, row, rows)
        if other is None:
            return None, None, "no anchor computing the same function finished in this cell"
        if metric == "speedup_vs_anchor":
            return other["median_s"] / row["median_s"], other["label"], f"{_ms(row)} vs {_ms(other)}"
        ratio = memory_ratio(row, other)
        return ratio, other["label"], f"{row.get('peak_mb', 0):.0f} vs {other.get('peak_mb', 0):.0f} MB"
    if metric == "speedup_vs_sdpa":
        other = sdpa_of(row, rows)
        if other is None:
            return None, None, "SDPA did not finish in this cell"
        return other["median_s"] / row["median_s"], other["label"], f"{_ms(row)} vs {_ms(other)}"
    if metric == "paired_ratio":
        ratios = row.get("pair_ratios")
        if not ratios:
            return None, None, "the row has no interleaved pairs"
        return ratios["median"], ratios["vs"], f"{ratios['min']:.2f}–{ratios['max']:.2f} over {ratios['count']} pairs"
    assert floor.base_length is not None  # checked when the file was read
    base = at_length(row, floor.base_length, rows)
    if base is None:
        return None, None, f"no finished row at {floor.base_length}"
    against = f"{row['label']} at {_short(floor.base_length)}"
    if metric == "time_growth":
        return row["median_s"] / base["median_s"], against, f"{_ms(row)} vs {_ms(base)}"
    if row.get("peak_mb") is None or base.get("peak_mb") is None:
        return None, None, "peak memory was not recorded"
    return row["peak_mb"] / max(base["peak_mb"], 1.0), against, f"{row['peak_mb']:.0f} vs {base['peak_mb']:.0f} MB"


def judge(floor: Floor, rows: Sequence[Mapping[str, Any]], suite: Suite) -> Verdict:
    """Judge one floor on a result file's rows."""
    row = _find(floor, rows)
    if row is None:
        return Verdict(floor, "not measured", detail="no row for this case and cell")
    if row["status"] != "ok":
        return Verdict(floor, "not measured", detail=f"the row's status is {row['status']}")
    value, against, detail = _measure(floor, row, rows, suite)
    if value is None:
        return Verdict(floor, "not measured", against=against, detail=detail)
    return Verdict(floor, "met" if floor.passes(value) else "not met", value, against, detail)


def judge_suite(
    suite: Suite, rows: Sequence[Mapping[str, Any]], floors: Sequence[Floor] | None = None
) -> list[Verdict]:
    """Every floor of ``suite`` judged on ``rows``."""
    floors = load_floors() if floors is None else floors
    return [judge(f, rows, suite) for f in floors if f.suite == suite.name]
