"""One meaning of 'x' everywhere (a speed-up over exact attention, > 1 = faster), flags in every
view, and results.json files of the previous schema, on a hand-made run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from attnkit.arena import ArenaConfig, ArenaRun, assemble, load_results, write_results
from attnkit.arena.report import leaderboard_table, terminal_summary, write_report

#: (mechanism, length, median ms, timed repeats, peak MB), bidirectional fwd+bwd
CELLS = [
    ("full", 1024, 100.0, [100.0, 101.0, 99.0], 40.0),
    ("full", 2048, 400.0, [400.0, 390.0, 700.0], 80.0),  # one stalled repeat: noisy
    ("linear", 1024, 25.0, [25.0, 24.0, 26.0], 10.0),
    ("linear", 2048, 50.0, [50.0, 51.0, 49.0], 20.0),
]


def run_of(cells: list[tuple[str, int, float, list[float], float]], tmp: Path) -> ArenaRun:
    config = ArenaConfig.preset("default", mechanisms=("linear",), lengths=(1024, 2048), tasks=())
    rows = [
        {
            "mechanism": name,
            "length": n,
            "causal": False,
            "mode": "fwd+bwd",
            "status": "ok",
            "median_ms": ms,
            "times_ms": times,
            "peak_mb": mb,
        }
        for name, n, ms, times, mb in cells
    ]
    run = ArenaRun(config, ["full", "linear"], efficiency=rows)
    run.threads = 1
    return run


def row(doc: dict[str, Any], name: str, length: int) -> dict[str, Any]:
    return next(r for r in doc["efficiency"] if r["mechanism"] == name and r["length"] == length)


def test_speedups_are_time_of_full_over_time_of_the_mechanism(tmp_path: Path) -> None:
    doc = assemble(run_of(CELLS, tmp_path))
    assert row(doc, "linear", 1024)["speedup_vs_full"] == pytest.approx(100.0 / 25.0)
    assert row(doc, "linear", 1024)["memory_vs_full"] == pytest.approx(10.0 / 40.0)
    assert row(doc, "full", 2048)["speedup_vs_full"] == pytest.approx(1.0)
    assert "time_vs_full" not in row(doc, "linear", 1024)  # the old, inverse ratio is gone
    (linear,) = [r for r in doc["leaderboard"] if r["mechanism"] == "linear"]
    assert linear["reference_length"] == 2048
    assert linear["speedup_vs_full"] == pytest.approx(400.0 / 50.0)
    assert linear["speedup_vs_full_longest"] == pytest.approx(8.0) and linear["longest_shared_length"] == 2048
    assert doc["meta"]["threads"] == 1


def test_every_table_shows_the_same_labelled_speedup(tmp_path: Path) -> None:
    doc = assemble(run_of(CELLS, tmp_path))
    table = leaderboard_table(doc)
    assert "speed-up vs full @2K (>1 = faster)" in table
    assert "8.00x" in table and "0.12x" not in table
    write_report(doc, tmp_path)
    report = (tmp_path / "report.md").read_text()
    # the per-length tables used the inverse ratio, "25.0 ms (0.25x)"
    assert "25.0 ms · 4.00x · 10 MB" in report and "0.25x" not in report
    assert "Each cell: median time · speed-up vs full (>1 = faster) (min-max over rounds) · peak MB." in report


def test_flags_reach_the_leaderboard_the_report_and_the_terminal(tmp_path: Path) -> None:
    doc = assemble(run_of(CELLS, tmp_path))
    assert [(f["kind"], f["mechanism"], f["lengths"]) for f in doc["flags"]] == [("noisy", "full", [2048])]
    assert row(doc, "full", 2048)["flags"] == ["noisy"] and row(doc, "linear", 2048)["flags"] == []
    (linear,) = [r for r in doc["leaderboard"] if r["mechanism"] == "linear"]
    # linear's own cell is clean, but its speed-up divides by the noisy exact-attention cell
    assert linear["flags"] == {"speedup_vs_full": ["noisy"], "peak_mb": [], "speedup_vs_full_longest": ["noisy"]}
    assert "8.00x?" in leaderboard_table(doc)
    write_report(doc, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "## Flags" in report and "400.0 ms? · 1.00x · 80 MB" in report
    assert "`noisy`: the timed repeats of a cell disagree" in report
    assert "--threads 1" in report and "--no-resume" in report
    summary = terminal_summary(doc)
    assert "full fwd+bwd: noisy: slowest/fastest repeat 1.8x at 2K" in summary and "--repeats 5" in summary

    clean = assemble(
        run_of([c if c[1] != 2048 or c[0] != "full" else (*c[:3], [400.0], 80.0) for c in CELLS], tmp_path)
    )
    assert clean["flags"] == [] and "?" not in leaderboard_table(clean)


def test_a_schema_1_results_file_is_upgraded(tmp_path: Path) -> None:
    doc = assemble(run_of(CELLS, tmp_path))
    old = json.loads(json.dumps(doc))
    old["schema_version"] = 1
    for r in old["efficiency"]:  # what version 1 stored: the time ratio, < 1 = faster
        r["time_vs_full"] = 1.0 / r.pop("speedup_vs_full")
        r.pop("flags")
    for key in ("flags", "leaderboard"):
        old.pop(key)
    old["meta"].pop("flag_help")
    old["meta"]["config"].pop("threads")  # version 1 had no thread setting
    write_results(old, tmp_path)
    loaded = load_results(tmp_path)
    assert loaded["schema_version"] == 2 and loaded["meta"]["upgraded_from_schema"] == 1
    assert row(loaded, "linear", 1024)["speedup_vs_full"] == pytest.approx(4.0)
    assert loaded["leaderboard"] == doc["leaderboard"] and loaded["flags"] == doc["flags"]
    assert ArenaConfig.from_dict(loaded["meta"]["config"]).threads is None  # the advisor reads this

    old["schema_version"] = 99
    write_results(old, tmp_path)
    with pytest.raises(ValueError, match=r"schema version 99.*run 'attnkit arena --out"):
        load_results(tmp_path)
