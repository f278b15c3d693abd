"""What a benchmark suite declares: its cases, the cells they run in, and how its rows compare.

A suite is data: :class:`Case` says what to build and time, :class:`Part` says in which cells
(lengths, causal or not, forward or forward+backward) and under which protocol settings, and
:class:`Suite` groups the parts with the anchors each row is compared against. Every suite goes
through the one measurement loop of :mod:`benchmarks.harness`; the thresholds a comparison must
meet live in ``benchmarks/floors.toml``, never in a suite.

A case's *target* is ``"module:function"``: the function takes ``(length, causal, **kwargs)``
and returns a zero-argument closure that runs one step and returns a tensor (inputs are built
in the function, outside the timed region). A closure may carry ``closure.info``, a
zero-argument function returning a dict of facts (state size, FLOPs) that the worker records
in the row after the timed steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Untimed steps before the timed ones. The first step pays for one-off work (lazy imports, kernel
#: selection); for a few more, glibc's allocator is still raising its mmap threshold, so each step
#: maps fresh memory and pays first-touch page faults (BigBird + projections at 16K: 2769, 1992, 1766,
#: then 1720-1840 ms per step; HF BigBird 4.57 at 4K: 978, 864, 765, then 640-800). Three untimed
#: steps measure the steady state a training run sees.
WARMUP = 3

#: Interpreter of the comparison implementations (``bash benchmarks/setup_env.sh`` builds it).
BENCH_PYTHON = ".venv-bench/bin/python"

#: ``sdpa``: the baseline of ``vs SDPA``; ``attnkit``: ours; ``anchor``: an open implementation;
#: ``component``: a piece of work timed alone (the lower-bound suites); ``bound`` and ``derived``:
#: rows computed from measured ones.
ROLES = ("sdpa", "attnkit", "anchor", "component", "bound", "derived")
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Case:
    """One thing to build and time.

    Attributes:
        label: row label, unique within its part, e.g. ``"attnkit sliding_window (w256)"``.
        target: ``"module:function"`` building the closure (see the module docstring).
        kwargs: keyword arguments for the target; recorded in each row as ``params``.
        role: one of :data:`ROLES` (``sdpa``, ``attnkit``, ``anchor`` or ``component``).
        causal_only: run only in causal cells; ``bidirectional_only`` likewise.
        python: interpreter for this case, relative to the repository root (anchors live in
            ``.venv-bench``); default: the interpreter running the suite.
        autograd: ``False`` for a closure that does all its work itself (the lower-bound
            suites' products): it is timed under ``no_grad`` and never back-propagated, even
            in a forward+backward cell.
    """

    label: str
    target: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    role: str = "attnkit"
    causal_only: bool = False
    bidirectional_only: bool = False
    python: str | None = None
    autograd: bool = True

    def runs_in(self, causal: bool) -> bool:
        """Whether the case is measured in a cell with this ``causal`` value."""
        return not ((self.causal_only and not causal) or (self.bidirectional_only and causal))


def anchor(label: str, target: str, kwargs: Mapping[str, Any] | None = None, **options: Any) -> Case:
    """A comparison implementation, run with the benchmark environment's interpreter."""
    return Case(label, target, dict(kwargs or {}), role="anchor", python=BENCH_PYTHON, **options)


@dataclass(frozen=True)
class Column:
    """An extra column of a part's rows table (or the value a plot shows instead of time).

    Attributes:
        header: column title, e.g. ``"tokens/s"``.
        value: the value of one row (``None``: shown as ``-``).
        fmt: format of a numeric value.
    """

    header: str
    value: Callable[[Mapping[str, Any]], Any]
    fmt: str = "{:.3g}"

    def render(self, row: Mapping[str, Any]) -> str:
        """The cell text for ``row``."""
        try:
            value = self.value(row)
        except (KeyError, TypeError, ZeroDivisionError):
            return "-"
        if value is None:
            return "-"
        return self.fmt.format(value) if isinstance(value, int | float) else str(value)


@dataclass(frozen=True)
class Part:
    """A set of cases and the cells and protocol they are measured with.

    Attributes:
        name: the part's name (rows record it); ``"main"`` for a one-part suite.
        cases: the cases, or a function building them (for cases read from the registry).
        lengths: sequence lengths of the cells.
        causal: the ``causal`` values of the cells.
        modes: ``"fwd"`` and/or ``"fwd+bwd"``, measured in this order (outermost loop).
        repeats: timed steps per measurement (median); interleaved: timed rounds.
        warmup: untimed steps (interleaved: rounds) before the timed ones.
        rounds: measurements of every case of a cell, round-robin, order reversed every
            other round; a row keeps the median of its rounds' medians.
        threads: ``torch.set_num_threads`` and ``OMP_NUM_THREADS`` of the workers.
        timeout: seconds before a measurement's process is killed (``status: timeout``).
        time_budget: seconds of steps after which a measurement cuts its repeats short.
        max_seconds_per_step: a case slower than this (or failing) is not run at longer lengths.
        max_round_seconds: a case slower than this in its first round keeps that one round.
        interleaved: measure all cases of a cell in one fresh process, one step of each per
            round (pairs a case with its reference step by step, so load drift hits both).
        reference: interleaved: each row records its per-round time ratios to this case.
        grad_scope: ``"step"``: each step enters its grad mode (the usual protocol);
            ``"measurement"``: one grad mode around all steps (µs-scale steps, where entering
            ``no_grad`` would be part of what is timed).
        env: environment defaults for the workers (a variable already set wins).
        x: the row field on the plot's x axis and the pivot tables' columns (``length`` or a
            case keyword such as ``depth``).
        series: the row field naming a plotted line (``label`` or a case keyword).
        columns: extra columns of the rows table.
        compute: for a part that is computed, not timed: returns its rows (``benchmarks.
            suites.hashing_error``); ``cases`` is then empty.
    """

    name: str
    cases: Sequence[Case] | Callable[[], Sequence[Case]]
    lengths: tuple[int, ...]
    causal: tuple[bool, ...] = (False, True)
    modes: tuple[str, ...] = ("fwd", "fwd+bwd")
    repeats: int = 5
    warmup: int = WARMUP
    rounds: int = 1
    threads: int = 2
    timeout: float = 600.0
    time_budget: float = 120.0
    max_seconds_per_step: float = 60.0
    max_round_seconds: float = 10.0
    interleaved: bool = False
    reference: str | None = None
    grad_scope: str = "step"
    env: Mapping[str, str] = field(default_factory=dict)
    x: str = "length"
    series: str = "label"
    columns: tuple[Column, ...] = ()
    compute: Callable[[], list[dict[str, Any]]] | None = None

    def case_list(self) -> list[Case]:
        """The cases, built if declared as a function."""
        return list(self.cases() if callable(self.cases) else self.cases)

    def protocol(self) -> dict[str, Any]:
        """The settings recorded in a run's meta."""
        if self.compute is not None:
            return {"computed": True}
        settings: dict[str, Any] = {
            "lengths": list(self.lengths),
            "causal": list(self.causal),
            "modes": list(self.modes),
            "repeats": self.repeats,
            "warmup": self.warmup,
            "rounds": self.rounds,
            "threads": self.threads,
            "timeout_s": self.timeout,
            "time_budget_s": self.time_budget,
            "max_seconds_per_step": self.max_seconds_per_step,
            "process": "all cases of a cell in one fresh process, interleaved step by step"
            if self.interleaved
            else "each measurement in a fresh process",
        }
        if self.grad_scope != "step":
            settings["grad_scope"] = self.grad_scope
        if self.env:
            settings["env"] = dict(self.env)
        return settings


#: ``(label, causal)`` -> why comparisons of that row are not like-for-like; ``causal=None``: both.
Unmatched = Mapping[tuple[str, bool | None], str]
#: Extra rows computed from a finished cell: ``derive(cell_rows, earlier_rows)``.
Derive = Callable[[list[dict[str, Any]], list[dict[str, Any]]], list[dict[str, Any]]]


@dataclass(frozen=True)
class Suite:
    """A benchmark suite.

    Attributes:
        name: the suite's name: ``python -m benchmarks run NAME``, ``results/NAME.{json,md,png}``.
        title: one line saying what the suite answers.
        description: markdown put at the top of the results file (anchors, matched settings).
        parts: the parts, measured in this order.
        anchors: row label -> labels of the anchors it is compared against (the fastest of
            those computing the same function, in the same part and cell, is the judged one).
        unmatched: comparisons shown but never judged, with the reason (see :data:`Unmatched`).
        derive: extra rows (bounds, sums) computed from each finished cell.
        plot: whether the results get a plot.
        plot_value: what the plot's first panel shows instead of the time (e.g. tokens/s).
    """

    name: str
    title: str
    description: str
    parts: tuple[Part, ...]
    anchors: Mapping[str, Sequence[str]] = field(default_factory=dict)
    unmatched: Unmatched = field(default_factory=dict)
    derive: Derive | None = None
    plot: bool = True
    plot_value: Column | None = None

    def part(self, name: str) -> Part:
        """The part called ``name`` (``KeyError`` listing the parts when there is none)."""
        for part in self.parts:
            if part.name == name:
                return part
        raise KeyError(f"suite {self.name!r} has no part {name!r} (parts: {', '.join(p.name for p in self.parts)})")

    def why_unmatched(self, label: str, causal: bool | None) -> str | None:
        """Why comparisons of ``label``'s row in a ``causal`` cell are not judged, or ``None``."""
        return self.unmatched.get((label, causal)) or self.unmatched.get((label, None))

    def labels(self) -> set[str]:
        """Every case label of every part."""
        return {case.label for part in self.parts for case in part.case_list()}


def derived_row(
    cell: Sequence[Mapping[str, Any]],
    label: str,
    seconds: float | None,
    formula: str,
    *,
    role: str = "derived",
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A row computed from the rows of ``cell`` (same part, length, causal, mode and run).

    ``seconds=None`` means an input row did not finish: the row gets ``status: error``.
    """
    first = cell[0]
    row: dict[str, Any] = {
        "label": label,
        "role": role,
        "part": first["part"],
        "length": first["length"],
        "causal": first["causal"],
        "mode": first["mode"],
        "run": max(r["run"] for r in cell),
        "derived_from": formula,
    }
    if seconds is None:
        return {**row, "status": "error", "error": f"an input of {formula} did not finish"}
    row.update(status="ok", median_s=seconds)
    if info:
        row["info"] = dict(info)
    return row


def by_label(cell: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """``label -> median_s`` of a cell's rows (``None`` for a row that did not finish)."""
    return {r["label"]: r["median_s"] if r["status"] == "ok" else None for r in cell}


def total(*seconds: float | None) -> float | None:
    """Sum of times, ``None`` when any is missing."""
    return None if any(s is None for s in seconds) else sum(s for s in seconds if s is not None)


def fastest(*seconds: float | None) -> float | None:
    """Smallest time, ``None`` when any is missing (a bound must not skip a failed layout)."""
    return None if any(s is None for s in seconds) else min(s for s in seconds if s is not None)
