"""The arena: measure every registered mechanism on this machine, and advise on one.

``attnkit arena`` runs three stages over every mechanism in the registry (no per-name
code: capabilities and options come from :func:`attnkit.get_spec`):

1. efficiency: forward and forward+backward time and peak memory across lengths, with
   ratios to exact attention measured in the same run (:mod:`.efficiency`);
2. fidelity: error against float64 exact attention on structured inputs (:mod:`.fidelity`);
3. quality: a small model per mechanism trained on MQAR, ListOps and character-level
   language modelling (:mod:`.quality`).

Cells are cached (:mod:`.cells`) so an interrupted run resumes; :mod:`.results` and
:mod:`.report` turn them into ``results.json``, ``report.md`` and the leaderboard, and
:mod:`.plots` into PNGs. :mod:`.flags` marks the cells whose timings cannot be trusted
as they stand (repeats that disagree, time that falls or jumps as the length grows).
Every speed-up is time of exact attention / time of the mechanism (> 1 = faster).
``attnkit advise`` (:mod:`.advisor`) answers "which mechanism for this length, mode and
budget?" from the same cells.

From Python::

    from attnkit.arena import ArenaConfig, run_arena_report
    doc = run_arena_report(ArenaConfig.preset("quick"), "arena-report")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from attnkit.arena.advisor import Advice, Candidate, Constraints, decide, measure_candidates
from attnkit.arena.config import PRESETS, TASKS, ArenaConfig
from attnkit.arena.results import assemble, load_results, write_results
from attnkit.arena.runner import ArenaRun, run_arena

__all__ = [
    "PRESETS",
    "TASKS",
    "Advice",
    "ArenaConfig",
    "ArenaRun",
    "Candidate",
    "Constraints",
    "assemble",
    "decide",
    "load_results",
    "measure_candidates",
    "run_arena",
    "run_arena_report",
    "write_results",
]


def run_arena_report(
    config: ArenaConfig,
    out_dir: Path | str = "arena-report",
    *,
    resume: bool = True,
    progress: bool = True,
    plots: bool = True,
) -> dict[str, Any]:
    """Run the arena and write ``results.json``, ``report.md`` and the PNGs under ``out_dir``.

    Returns:
        The results document (see :mod:`attnkit.arena.results` for the schema).
    """
    from attnkit.arena.report import write_report

    run = run_arena(config, out_dir, resume=resume, progress=progress)
    doc = assemble(run)
    write_results(doc, out_dir)
    if plots:
        from attnkit.arena.plots import write_plots

        write_plots(doc, out_dir)
    write_report(doc, out_dir)
    return doc
