"""The advisor: which mechanism fits a length, a mode and an error/memory budget here?

Two halves. :func:`decide` is pure logic over measured facts (:class:`Candidate`), so
it is tested on synthetic numbers: capabilities filter first (causal, incremental
decoding), then the measured error and peak memory against the user's limits, and the
fastest survivor wins. Every other mechanism gets the reason it lost. When nothing
survives, the closest options say how far each limit would have to move.

:func:`measure_candidates` produces the facts on this machine, through the arena's cell
cache: a previous ``attnkit arena`` run with the same shapes answers most questions
without a new measurement. Lengths beyond the time or memory budget are not run; their
time and memory are projected from the measured lengths and labelled as such.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

import attnkit
from attnkit.arena.cells import CellCache, machine_fingerprint
from attnkit.arena.config import HEADLINE_INPUT, ArenaConfig
from attnkit.arena.efficiency import project, thread_count
from attnkit.arena.fidelity import fidelity_params
from attnkit.arena.flags import efficiency_flags
from attnkit.arena.quality import fidelity_options
from attnkit.arena.runner import CellRunner, build_seeded, efficiency_sweep, fidelity_cell
from attnkit.core.errors import check_positive_float, check_positive_int


@dataclass(frozen=True)
class Constraints:
    """What the user asked for.

    Attributes:
        length: sequence length.
        causal: needs causal attention.
        max_error: largest acceptable relative error vs exact attention (None = any).
        memory_gb: largest acceptable peak memory of one step in GB (None = any).
        decode: needs incremental (token-by-token) decoding.
        training: rank by forward+backward time (else forward only).
    """

    length: int
    causal: bool = False
    max_error: float | None = None
    memory_gb: float | None = None
    decode: bool = False
    training: bool = True

    def __post_init__(self) -> None:
        check_positive_int("length", self.length, example=4096)
        if self.max_error is not None:
            check_positive_float("max_error", self.max_error)
        if self.memory_gb is not None:
            check_positive_float("memory_gb", self.memory_gb)

    @property
    def mode(self) -> str:
        """The efficiency mode that matters: ``"fwd+bwd"`` for training, ``"fwd"`` otherwise."""
        return "fwd+bwd" if self.training else "fwd"


@dataclass
class Candidate:
    """Measured facts about one mechanism at the requested length.

    Attributes:
        name: mechanism name.
        causal: has a causal mode.
        decoding: its decoding kind, or None.
        exact: exact (under its pattern) or approximate.
        time_ms: step time at the length (None = unknown).
        peak_mb: peak extra memory of one step (None = unknown).
        error: relative error vs exact attention (None = unknown).
        source: how time/memory were obtained: ``"measured"``, ``"cached"`` or
            ``"projected from L=..."``, followed by ``", flagged: <kinds>"`` when a cell
            behind them is flagged (noisy repeats, an impossible length curve).
        note: why a value is unknown.
    """

    name: str
    causal: bool
    decoding: str | None
    exact: bool
    time_ms: float | None = None
    peak_mb: float | None = None
    error: float | None = None
    source: str = "measured"
    note: str = ""


@dataclass
class Verdict:
    """One row of the advice table."""

    candidate: Candidate
    eligible: bool
    reasons: list[str] = field(default_factory=list)
    #: how far each numeric limit is missed, ``{"max_error": needed, "memory_gb": needed}``
    needs: dict[str, float] = field(default_factory=dict)


@dataclass
class Advice:
    """The recommendation and the table of why the others lost.

    Attributes:
        constraints: the question.
        recommended: the winning mechanism's name, or None when nothing qualifies.
        verdicts: one per mechanism, winner first, then by time.
        closest: when nothing qualifies, ``(name, what to relax)`` pairs, best first.
    """

    constraints: Constraints
    recommended: str | None
    verdicts: list[Verdict]
    closest: list[tuple[str, str]] = field(default_factory=list)


def decide(constraints: Constraints, candidates: list[Candidate]) -> Advice:
    """Pick the fastest candidate that satisfies every constraint; explain every loss."""
    verdicts = [_judge(constraints, c) for c in candidates]
    eligible = sorted((v for v in verdicts if v.eligible), key=lambda v: v.candidate.time_ms or float("inf"))
    winner = eligible[0] if eligible else None
    if winner is not None:
        best = winner.candidate.time_ms or float("inf")
        winner.reasons = [f"fastest that meets every constraint ({winner.candidate.source})"]
        for v in eligible[1:]:
            t = v.candidate.time_ms or float("inf")
            # a speed-up, as everywhere in the arena: > 1 = the winner is faster
            v.reasons = [f"meets the constraints, but {winner.candidate.name} is {t / best:.2f}x faster"]
    rest = sorted((v for v in verdicts if not v.eligible), key=lambda v: (len(v.reasons), v.candidate.time_ms or 1e30))
    advice = Advice(constraints, winner.candidate.name if winner else None, [*eligible, *rest])
    if winner is None:
        advice.closest = _closest(constraints, rest)
    return advice


def _judge(c: Constraints, cand: Candidate) -> Verdict:
    v = Verdict(cand, eligible=False)
    if c.causal and not cand.causal:
        v.reasons.append("no causal mode")
    if c.decode and cand.decoding is None:
        v.reasons.append("no incremental decoding state")
    if v.reasons:  # a missing capability settles it; its numbers were not even measured
        return v
    if c.max_error is not None:
        if cand.error is None:
            v.reasons.append(f"error unknown ({cand.note or 'fidelity not measured'})")
        elif cand.error > c.max_error:
            v.reasons.append(f"error {cand.error:.3g} > max {c.max_error:g}")
            v.needs["max_error"] = cand.error
    if cand.time_ms is None:
        v.reasons.append(f"could not run at length {c.length}" + (f": {cand.note}" if cand.note else ""))
    if c.memory_gb is not None and cand.peak_mb is not None and cand.peak_mb > c.memory_gb * 1024:
        v.reasons.append(f"needs {cand.peak_mb / 1024:.2f} GB > {c.memory_gb:g} GB")
        v.needs["memory_gb"] = cand.peak_mb / 1024
    v.eligible = not v.reasons
    return v


def _closest(c: Constraints, rejected: list[Verdict]) -> list[tuple[str, str]]:
    """Mechanisms that fail only numeric limits, ordered by how far (relatively) the limits must move."""
    limits = {"max_error": c.max_error, "memory_gb": c.memory_gb}
    options = []
    for v in rejected:
        if len(v.needs) != len(v.reasons):  # also fails a capability or could not run
            continue
        relax = []
        for limit, needed in v.needs.items():
            flag = "--max-error" if limit == "max_error" else "--memory-gb"
            relax.append(f"{flag} {needed * 1.05:.3g}")  # 5% head-room over the measured value
        cost = max(needed / (limits[limit] or 1.0) for limit, needed in v.needs.items())
        options.append((len(v.needs), cost, v.candidate.name, "relax " + " and ".join(relax)))
    options.sort()
    return [(name, text) for _, _, name, text in options[:3]]


# -- measuring ----------------------------------------------------------------------------
def advisor_config(constraints: Constraints, base: ArenaConfig | None = None) -> ArenaConfig:
    """The arena settings the advisor measures with: ``base`` (the default preset) with its
    lengths below ``length`` (cached by an arena run, or cheap) and then ``length`` itself.

    The shorter lengths feed the budget projection: a mechanism projected past the step or
    memory budget at ``length`` is not run there, its numbers are extrapolated instead.
    """
    base = base or ArenaConfig.preset("default")
    return base.with_(lengths=(*(n for n in base.lengths if n < constraints.length), constraints.length))


def measure_candidates(
    constraints: Constraints,
    *,
    cache_dir: Path | str = "arena-report",
    config: ArenaConfig | None = None,
    mechanisms: list[str] | None = None,
    progress: bool = True,
) -> list[Candidate]:
    """Facts for every mechanism (or ``mechanisms``) at ``constraints.length`` on this machine.

    Mechanisms that fail a capability are not measured (their verdict needs no numbers).
    Cells run on ``config.threads`` CPU threads, as the arena run being reused did.
    """
    cfg = advisor_config(constraints, config)
    names = mechanisms or attnkit.list_attention()
    cache = CellCache(Path(cache_dir))
    candidates = []
    with (
        thread_count(cfg.threads),
        tqdm(total=len(names), desc="advise", unit="mechanism", disable=not progress) as bar,
    ):
        cells = CellRunner(cache, machine_fingerprint(cfg.device), tqdm(disable=True))
        for name in names:
            bar.set_postfix_str(name)
            candidates.append(_measure_one(name, constraints, cfg, cells))
            bar.update(1)
    return candidates


def _measure_one(name: str, c: Constraints, cfg: ArenaConfig, cells: CellRunner) -> Candidate:
    spec = attnkit.get_spec(name)
    caps = spec.capabilities
    cand = Candidate(name, caps.causal, caps.decoding, caps.exact)
    if (c.causal and not caps.causal) or (c.decode and caps.decoding is None):
        return cand
    options = spec.benchmark_options
    fid_options = fidelity_options(name, cfg)
    fid = cells.get(
        "fidelity",
        name,
        fid_options,
        fidelity_params(cfg, HEADLINE_INPUT, c.causal),
        partial(fidelity_cell, name, fid_options, cfg, HEADLINE_INPUT, c.causal),
        machine_bound=False,
    )
    if fid["status"] == "ok":
        cand.error = fid["relative_error"]
    else:
        cand.note = fid.get("error", "")
    module = build_seeded(name, options, cfg.seed)
    rows = efficiency_sweep(cfg, name, c.causal, c.mode, cells, module)
    efficiency_flags(rows)  # marks each row's "flags": a noisy cell or an impossible curve
    last = rows[-1]
    if last["status"] == "ok":
        cand.time_ms, cand.peak_mb = last["median_ms"], last.get("peak_mb")
        cand.source = ("cached" if last.get("cached") else "measured") + _flagged(last)
        return cand
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        cand.note = last.get("error") or last.get("reason", "")
        return cand
    cand.time_ms = project([(r["length"], r["median_ms"]) for r in ok], c.length)
    cand.peak_mb = project([(r["length"], r["peak_mb"]) for r in ok], c.length, high=2.0)
    cand.source = f"projected from L={ok[-1]['length']}" + _flagged(*ok[-2:])
    cand.note = last.get("reason", "")
    return cand


def _flagged(*rows: dict[str, Any]) -> str:
    """``", flagged: noisy"`` when a row behind a number is flagged (see :mod:`attnkit.arena.flags`), else ``""``."""
    kinds = sorted({kind for r in rows for kind in r.get("flags", [])})
    return f", flagged: {', '.join(kinds)}" if kinds else ""
