"""Flags on efficiency cells whose numbers cannot be trusted as they stand.

A timing on a shared machine can be inflated by other processes, a slow phase of a VM or
oversubscribed threads; the arena cannot tell a stall from a real cost, but some numbers
are impossible or self-contradictory, and those it flags (pure logic over the rows, so it
is tested on synthetic timings):

- ``noisy``: a cell's timed repeats disagree: the slowest took more than
  :data:`NOISY_RATIO` times the fastest (a quiet machine repeats within ±10-20%). The
  median of such a cell depends on which repeats a stall hit. Cells with one repeat
  cannot be judged.
- ``time_falls``: within one sweep (mechanism, causal, mode), a shorter length took more
  than :data:`FALL_RATIO` times as long as a longer one. Every mechanism here does more
  work on a longer input, so beyond noise this is impossible; the shorter cell, the one
  flagged, was most likely slowed down (Sinkhorn fwd measured 164 ms at 1K, 85 ms at 8K).
- ``time_jumps``: between consecutive lengths, time grew faster than
  ``L**JUMP_EXPONENT``. No mechanism here is worse than quadratic, and cache effects add
  well under one more power; the longer cell is flagged (linear attention measured
  10.5 ms at 1K, then 510 ms at 2K).
- ``memory_falls``: a shorter length's peak memory exceeds a longer one's by more than
  :data:`FALL_RATIO` times and :data:`MEMORY_SLACK_MB` (a step's own buffers all grow
  with the length, so a one-time allocation was charged to the shorter cell).

Each flag carries a one-line message with the numbers; :data:`FLAG_HELP` explains each
kind and :data:`SUGGESTION` says what to do.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Any

#: A cell is noisy when its slowest timed repeat took more than this many times its fastest.
NOISY_RATIO = 1.5
#: A curve falls when a shorter length's value exceeds a longer length's by more than this factor.
FALL_RATIO = 1.25
#: A curve jumps when time grows faster than ``length ** JUMP_EXPONENT`` between consecutive lengths.
JUMP_EXPONENT = 3.0
#: Peak-memory differences below this many MB are measurement granularity, never flagged.
MEMORY_SLACK_MB = 2.0

#: Flags that make a cell's time doubtful (and so every speed-up computed from it).
TIME_FLAGS = ("noisy", "time_falls", "time_jumps")

FLAG_HELP: dict[str, str] = {
    "noisy": f"the timed repeats of a cell disagree (slowest > {NOISY_RATIO:g}x the fastest): the median "
    "depends on which repeats a stall hit",
    "time_falls": f"a shorter length took more than {FALL_RATIO:g}x as long as a longer one: impossible beyond "
    "noise, the shorter cell was slowed down",
    "time_jumps": f"time grew faster than L^{JUMP_EXPONENT:g} between consecutive lengths (no mechanism here is "
    "worse than quadratic): the longer cell was slowed down",
    "memory_falls": f"a shorter length's peak memory exceeds a longer one's (by more than {FALL_RATIO:g}x and "
    f"{MEMORY_SLACK_MB:g} MB): a one-time allocation was charged to the shorter cell",
}

SUGGESTION = (
    "re-run with more repeats (--repeats 5), on fewer threads (--threads 1) or on a quieter machine; "
    "add --no-resume to measure cached cells again"
)


def _length(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def repeat_spread(times_ms: list[float]) -> float | None:
    """Slowest over fastest timed repeat, or None with fewer than two repeats."""
    if len(times_ms) < 2 or min(times_ms) <= 0:
        return None
    return max(times_ms) / min(times_ms)


def falling_points(points: list[tuple[int, float]], *, ratio: float, slack: float = 0.0) -> list[tuple[int, int]]:
    """``(shorter, longer)`` length pairs where the value falls.

    A pair falls when ``v_short > ratio * v_long`` and ``v_short - v_long > slack``; each
    shorter length is paired with the longer length of the smallest value (the clearest
    contradiction). ``points`` are ``(length, value)`` in any order.
    """
    pts = sorted(points)
    pairs = []
    for i, (length, value) in enumerate(pts[:-1]):
        later_length, later_value = min(pts[i + 1 :], key=lambda p: (p[1], p[0]))
        if value > ratio * later_value and value - later_value > slack:
            pairs.append((length, later_length))
    return pairs


def jumping_points(points: list[tuple[int, float]], *, exponent: float) -> list[tuple[int, int]]:
    """Consecutive ``(shorter, longer)`` length pairs where ``v_long / v_short > (L_long / L_short) ** exponent``."""
    pts = sorted(points)
    return [
        (a, b)
        for (a, va), (b, vb) in itertools.pairwise(pts)
        if va > 0 and vb > 0 and math.log(vb / va) > exponent * math.log(b / a)
    ]


def _sweeps(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, bool, str], list[dict[str, Any]]]:
    sweeps: dict[tuple[str, bool, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "ok":
            sweeps.setdefault((r["mechanism"], r["causal"], r["mode"]), []).append(r)
    return sweeps


def _sweep_flags(sweep: tuple[str, bool, str], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The flags of one sweep's ok rows: ``{"kind", "lengths" (the flagged cells), "message"}``."""
    by_length = {r["length"]: r for r in rows}
    times = [(r["length"], r["median_ms"]) for r in rows]
    found = []

    noisy = [(r["length"], repeat_spread(r.get("times_ms") or [])) for r in rows]
    noisy = [(n, s) for n, s in noisy if s is not None and s > NOISY_RATIO]
    if noisy:
        where = ", ".join(f"{s:.1f}x at {_length(n)}" for n, s in noisy)
        found.append(("noisy", [n for n, _ in noisy], f"slowest/fastest repeat {where}"))

    falls = falling_points(times, ratio=FALL_RATIO)
    if falls:
        where = ", ".join(f"{by_length[a]['median_ms']:.1f} ms at {_length(a)}" for a, _ in falls)
        ends = sorted({b for _, b in falls})
        at = ", ".join(f"{by_length[b]['median_ms']:.1f} ms at {_length(b)}" for b in ends)
        found.append(("time_falls", [a for a, _ in falls], f"time falls as length grows: {where} but {at}"))

    jumps = jumping_points(times, exponent=JUMP_EXPONENT)
    if jumps:
        where = "; ".join(
            f"{by_length[a]['median_ms']:.1f} ms at {_length(a)} -> {by_length[b]['median_ms']:.1f} ms at {_length(b)}"
            for a, b in jumps
        )
        found.append(("time_jumps", [b for _, b in jumps], f"time jumps: {where}"))

    memory = [(r["length"], r["peak_mb"]) for r in rows if r.get("peak_mb") is not None]
    drops = falling_points(memory, ratio=FALL_RATIO, slack=MEMORY_SLACK_MB)
    if drops:
        where = ", ".join(
            f"{by_length[a]['peak_mb']:.0f} MB at {_length(a)} > {by_length[b]['peak_mb']:.0f} MB at {_length(b)}"
            for a, b in drops
        )
        found.append(("memory_falls", [a for a, _ in drops], f"peak memory falls as length grows: {where}"))

    name, causal, mode = sweep
    return [
        {"kind": kind, "mechanism": name, "causal": causal, "mode": mode, "lengths": lengths, "message": message}
        for kind, lengths, message in found
    ]


def efficiency_flags(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flag noisy cells and impossible length curves; each row gets ``"flags"`` (its kinds, possibly empty).

    Args:
        rows: efficiency rows (``mechanism``, ``length``, ``causal``, ``mode``, ``status``;
            ok rows also ``median_ms``, ``times_ms``, ``peak_mb``); annotated in place.

    Returns:
        One record per (sweep, kind): ``{"kind", "mechanism", "causal", "mode", "lengths",
        "message"}``, where ``lengths`` are the flagged cells.
    """
    flags = [f for sweep, ok in _sweeps(rows).items() for f in _sweep_flags(sweep, ok)]
    marked: dict[tuple[str, bool, str, int], list[str]] = {}
    for f in flags:
        for n in f["lengths"]:
            marked.setdefault((f["mechanism"], f["causal"], f["mode"], n), []).append(f["kind"])
    for r in rows:
        r["flags"] = marked.get((r["mechanism"], r["causal"], r["mode"], r["length"]), [])
    return flags
