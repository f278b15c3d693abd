"""The advisor: which mechanism fits a task, a length, a mode and an error/speed/memory budget here?

Two halves. :func:`decide` is pure logic over measured facts (:class:`Candidate`, and
optionally a task's measured quality, :class:`~attnkit.arena.task_facts.TaskFacts`), so it
is tested on synthetic numbers: capabilities filter first (causal, incremental decoding),
then the measured error, speed-up over exact attention and peak memory against the user's
limits, then task quality against exact attention's and the no-context baseline. Without a
task the fastest survivor wins; with one, survivors are ranked by quality (figures whose
``mean ± spread`` overlap count as a tie) and ties go to the fastest, when it is at least
:data:`SPEED_MARGIN` times faster than the best-scoring one. Every other mechanism
gets the reasons it lost, each in one category of :data:`CATEGORIES`. When nothing survives,
the closest options say how far each numeric limit would have to move.

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
from attnkit.arena.efficiency import paired_speedups, project, thread_count
from attnkit.arena.fidelity import fidelity_params
from attnkit.arena.flags import efficiency_flags
from attnkit.arena.quality import fidelity_options
from attnkit.arena.runner import CellRunner, build_seeded, efficiency_sweep, fidelity_cell
from attnkit.arena.task_facts import REFERENCE, QualityFigure, TaskFacts
from attnkit.core.errors import check_non_negative_float, check_positive_float, check_positive_int

#: Why a mechanism can be rejected: a missing capability (``causal``, ``decode``), approximation
#: error over ``max_error`` or a failure to run (``error``), a speed-up under ``min_speedup``
#: (``speed``), peak memory over ``memory_gb`` (``memory``), or task quality (``quality``).
CATEGORIES: tuple[str, ...] = ("causal", "decode", "error", "speed", "memory", "quality")


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
        min_speedup: smallest acceptable speed-up over exact attention at ``length`` (None = any).
        quality_tolerance: with a task, how far below exact attention a mechanism's score may be:
            accuracy points as a fraction (0.05 = 5 points) or, for bits per character, a
            relative excess (0.05 = 5% more bits).
        baseline_margin: with a task, how far a score must beat the no-context baseline, in
            the same units as ``quality_tolerance`` (a model at the baseline learned nothing).
    """

    length: int
    causal: bool = False
    max_error: float | None = None
    memory_gb: float | None = None
    decode: bool = False
    training: bool = True
    min_speedup: float | None = None
    quality_tolerance: float = 0.05
    baseline_margin: float = 0.02

    def __post_init__(self) -> None:
        check_positive_int("length", self.length, example=4096)
        for name in ("max_error", "memory_gb", "min_speedup"):
            if getattr(self, name) is not None:
                check_positive_float(name, getattr(self, name))
        check_positive_float("quality_tolerance", self.quality_tolerance)
        check_non_negative_float("baseline_margin", self.baseline_margin)

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
        speedup: speed-up over exact attention timed side by side in the same cell (the median
            of its interleaved rounds' ratios); None: exact attention's own cell time over
            ``time_ms`` is used.
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
    speedup: float | None = None


@dataclass
class Verdict:
    """One row of the advice table.

    Attributes:
        candidate: the facts judged.
        eligible: meets every constraint.
        reasons: why it won or lost, readable.
        categories: for a rejected candidate, the :data:`CATEGORIES` entry of each reason (same order).
        needs: the value each missed numeric limit would need, ``{"max_error": 0.2, ...}``.
    """

    candidate: Candidate
    eligible: bool
    reasons: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    needs: dict[str, float] = field(default_factory=dict)

    def reject(self, category: str, reason: str, **needs: float) -> None:
        """Record one reason this candidate loses (``category`` from :data:`CATEGORIES`)."""
        assert category in CATEGORIES, category
        self.reasons.append(reason)
        self.categories.append(category)
        self.needs.update(needs)


@dataclass
class Advice:
    """The recommendation and the table of why the others lost.

    Attributes:
        constraints: the question.
        recommended: the winning mechanism's name, or None when nothing qualifies.
        verdicts: one per mechanism, winner first, then the other eligible ones in rank order,
            then the rejected ones (fewest reasons first).
        closest: when nothing qualifies, ``(name, what to relax)`` pairs, best first.
        quality: the task facts quality was judged on (None = no task given).
    """

    constraints: Constraints
    recommended: str | None
    verdicts: list[Verdict]
    closest: list[tuple[str, str]] = field(default_factory=list)
    quality: TaskFacts | None = None


def decide(constraints: Constraints, candidates: list[Candidate], quality: TaskFacts | None = None) -> Advice:
    """Rank the candidates that satisfy every constraint; explain every loss.

    Args:
        constraints: the question.
        candidates: measured facts, one per mechanism (exact attention's time is the
            reference of ``min_speedup``).
        quality: the task's measured quality; None ranks by speed alone.

    Returns:
        The advice: without ``quality`` the fastest eligible candidate wins; with it the best
        quality wins, and among figures within each other's spread the fastest.
    """
    reference_ms = next((c.time_ms for c in candidates if c.name == REFERENCE), None)
    verdicts = [_judge(constraints, c, reference_ms, quality) for c in candidates]
    groups = _rank([v for v in verdicts if v.eligible], quality)
    if groups:
        _explain_ranking(groups, quality)
    eligible = [v for group in groups for v in group]
    winner = eligible[0] if eligible else None
    rest = sorted((v for v in verdicts if not v.eligible), key=lambda v: (len(v.reasons), v.candidate.time_ms or 1e30))
    advice = Advice(constraints, winner.candidate.name if winner else None, [*eligible, *rest], quality=quality)
    if winner is None:
        advice.closest = _closest(constraints, rest)
    return advice


def _time(v: Verdict) -> float:
    return v.candidate.time_ms or float("inf")


#: Within a quality tie, how many times faster a mechanism must be to displace the best-scoring one:
#: timings on a loaded 2-core machine vary by more than 5% between runs (measured), so a 1.05x
#: "win" would flip from run to run.
SPEED_MARGIN = 1.1


def _rank(eligible: list[Verdict], quality: TaskFacts | None) -> list[list[Verdict]]:
    """The eligible verdicts in rank order, as groups of quality ties (one group per verdict without a task).

    With a task, figures whose ``mean ± spread`` overlap tie. Overlap is not transitive, so
    each group gathers every remaining figure that overlaps the best remaining one (its
    leader); groups come best first and each is ordered fastest first, except that the
    leader stays first unless the fastest is at least :data:`SPEED_MARGIN` times faster
    (a smaller difference is within the timing noise of a shared machine).
    """
    if quality is None:
        return [[v] for v in sorted(eligible, key=_time)]
    sign = -1.0 if quality.higher_is_better else 1.0
    remaining = sorted(eligible, key=lambda v: (sign * _figure(quality, v).mean, _time(v)))
    groups: list[list[Verdict]] = []
    while remaining:
        leader = _figure(quality, remaining[0])
        tied = [v for v in remaining if _figure(quality, v).overlaps(leader)]
        by_time = sorted(tied, key=_time)
        if _time(remaining[0]) < SPEED_MARGIN * _time(by_time[0]):
            by_time.remove(remaining[0])
            by_time.insert(0, remaining[0])
        groups.append(by_time)
        remaining = [v for v in remaining if all(v is not t for t in tied)]
    return groups


def _figure(quality: TaskFacts, v: Verdict) -> QualityFigure:
    return quality.figures[v.candidate.name]  # eligible verdicts always have a figure


def _explain_ranking(groups: list[list[Verdict]], quality: TaskFacts | None) -> None:
    winner, *tied = groups[0]
    best = _time(winner)
    name = winner.candidate.name
    if quality is None:
        winner.reasons = [f"fastest that meets every constraint ({winner.candidate.source})"]
        for (v,) in groups[1:]:
            # a speed-up, as everywhere in the arena: > 1 = the winner is faster
            v.reasons = [f"meets the constraints, but {name} is {_time(v) / best:.2f}x faster"]
        return
    fastest = min(groups[0], key=_time)
    if fastest is winner:
        how = f", and the fastest of the {len(tied) + 1} tied for it" if tied else ""
    else:
        how = f", and the best-scoring of the {len(tied) + 1} tied for it (none is {SPEED_MARGIN:g}x faster)"
    winner.reasons = [f"best quality on {quality.task} that meets every constraint{how} ({winner.candidate.source})"]
    for v in tied:
        speedup = best / _time(v)
        v.reasons = [
            f"ties {name} on quality within the spread, but {name} is {1 / speedup:.2f}x faster"
            if speedup <= 1
            else f"ties {name} on quality within the spread and is only {speedup:.2f}x faster (< {SPEED_MARGIN:g}x: "
            f"within timing noise), so {name}'s better score decides"
        ]
    sign = 1.0 if quality.higher_is_better else -1.0
    top = max(groups[0], key=lambda v: sign * _figure(quality, v).mean)
    # a lower group is worse than the top figure by more than both spreads (not always than the winner's own)
    better = name if top is winner else f"{top.candidate.name} (tied with {name})"
    for v in (v for group in groups[1:] for v in group):
        v.reasons = [
            f"meets the constraints, but {better} scores better on {quality.task} "
            f"({quality.format(_figure(quality, top).mean)} vs {quality.format(_figure(quality, v).mean)})"
        ]


def _judge(c: Constraints, cand: Candidate, reference_ms: float | None, quality: TaskFacts | None) -> Verdict:
    v = Verdict(cand, eligible=False)
    if c.causal and not cand.causal:
        v.reject("causal", "no causal mode")
    if c.decode and cand.decoding is None:
        v.reject("decode", "no incremental decoding state")
    if quality is not None and cand.name not in quality.figures:
        _judge_quality(v, c, quality)  # no figure settles it too (measure_candidates may skip it)
    if v.reasons:  # a missing capability settles it; its numbers were not even measured
        return v
    if c.max_error is not None:
        if cand.error is None:
            v.reject("error", f"error unknown ({cand.note or 'fidelity not measured'})")
        elif cand.error > c.max_error:
            v.reject("error", f"error {cand.error:.3g} > max {c.max_error:g}", max_error=cand.error)
    if cand.time_ms is None:
        v.reject("error", f"could not run at length {c.length}" + (f": {cand.note}" if cand.note else ""))
    elif c.min_speedup is not None:
        _judge_speed(v, c.min_speedup, reference_ms)
    if c.memory_gb is not None and cand.peak_mb is not None and cand.peak_mb > c.memory_gb * 1024:
        v.reject("memory", f"needs {cand.peak_mb / 1024:.2f} GB > {c.memory_gb:g} GB", memory_gb=cand.peak_mb / 1024)
    if quality is not None:
        _judge_quality(v, c, quality)
    v.eligible = not v.reasons
    return v


def _judge_speed(v: Verdict, min_speedup: float, reference_ms: float | None) -> None:
    time_ms, speedup = v.candidate.time_ms, v.candidate.speedup
    if speedup is None:
        if not reference_ms or not time_ms:
            v.reject("speed", f"speed-up unknown: exact attention ({REFERENCE}) was not measured at this length")
            return
        speedup = reference_ms / time_ms
    if speedup < min_speedup:
        v.reject("speed", f"{speedup:.2f}x the speed of {REFERENCE} < min {min_speedup:g}x", min_speedup=speedup)


def _judge_quality(v: Verdict, c: Constraints, quality: TaskFacts) -> None:
    """Quality within ``c.quality_tolerance`` of exact attention's, and beyond the baseline by ``c.baseline_margin``.

    Accuracy is compared in points (absolute), bits per character relatively (see :class:`Constraints`).
    """
    fig = quality.figures.get(v.candidate.name)
    if fig is None:
        why = quality.notes.get(v.candidate.name, "the facts have none")
        v.reject("quality", f"no quality figure on {quality.task} ({why}); not guessed")
        return
    exact, score = quality.reference.mean, quality.format(fig.mean)
    if quality.higher_is_better:
        shortfall, units = exact - fig.mean, f"{100 * c.quality_tolerance:g} points"
    else:
        shortfall, units = fig.mean / exact - 1.0, f"{100 * c.quality_tolerance:g}%"
    if shortfall > c.quality_tolerance:
        v.reject(
            "quality",
            f"{quality.task} {score} vs exact {quality.format(exact)}: worse by more than {units}",
            quality_tolerance=shortfall,
        )
    if quality.baseline is not None:  # None: the suite lost it; the printed answer says it was not checked
        _judge_baseline(v, c, quality, fig.mean)


def _judge_baseline(v: Verdict, c: Constraints, quality: TaskFacts, score: float) -> None:
    """Reject a score that does not beat the no-context baseline by ``c.baseline_margin`` (a model there learned nothing)."""
    baseline = quality.baseline
    assert baseline is not None
    if quality.higher_is_better:
        floor, margin = baseline + c.baseline_margin, f"{100 * c.baseline_margin:g} points"
    else:
        floor, margin = baseline * (1.0 - c.baseline_margin), f"{100 * c.baseline_margin:g}%"
    if not quality.better(score, baseline) or quality.better(floor, score):
        v.reject(
            "quality",
            f"{quality.task} {quality.format(score)} does not beat the no-context baseline "
            f"{quality.format(baseline)} by {margin}",
        )


#: How ``_closest`` names each numeric limit, and the head-room it suggests past the measured value.
_RELAX = {
    "max_error": ("--max-error", 1.05),
    "memory_gb": ("--memory-gb", 1.05),
    "min_speedup": ("--min-speedup", 0.95),
    "quality_tolerance": ("--quality-tolerance", 1.05),
}


def _closest(c: Constraints, rejected: list[Verdict]) -> list[tuple[str, str]]:
    """Mechanisms that fail only numeric limits, ordered by how far (relatively) the limits must move."""
    limits = {
        "max_error": c.max_error,
        "memory_gb": c.memory_gb,
        "min_speedup": c.min_speedup,
        "quality_tolerance": c.quality_tolerance,
    }
    options = []
    for v in rejected:
        if len(v.needs) != len(v.reasons):  # also fails a capability, the baseline, or could not run
            continue
        relax = [f"{_RELAX[limit][0]} {needed * _RELAX[limit][1]:.3g}" for limit, needed in v.needs.items()]
        # how many times the limit must grow (or shrink, for min_speedup): always >= 1
        cost = max(
            max(needed, limits[limit] or 1.0) / max(min(needed, limits[limit] or 1.0), 1e-12)
            for limit, needed in v.needs.items()
        )
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
    skip: frozenset[str] = frozenset(),
) -> list[Candidate]:
    """Facts for every mechanism (or ``mechanisms``) at ``constraints.length`` on this machine.

    Mechanisms that fail a capability, and those in ``skip`` (e.g. without a quality figure
    for the task), are not measured: their verdict needs no numbers.
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
            candidates.append(_measure_one(name, constraints, cfg, cells, measure=name not in skip))
            bar.update(1)
    return candidates


def _measure_one(name: str, c: Constraints, cfg: ArenaConfig, cells: CellRunner, *, measure: bool) -> Candidate:
    spec = attnkit.get_spec(name)
    caps = spec.capabilities
    cand = Candidate(name, caps.causal, caps.decoding, caps.exact)
    if not measure or (c.causal and not caps.causal) or (c.decode and caps.decoding is None):
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
        if last.get("reference_times_ms"):  # timed in rounds with exact attention: the paired ratio is steadier
            cand.speedup = paired_speedups(last["times_ms"], last["reference_times_ms"])["median"]
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
