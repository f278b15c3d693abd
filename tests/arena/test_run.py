"""A whole (tiny) arena run: the results schema, the report files, and resumption."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import attnkit.arena.runner as runner
from attnkit.arena import ArenaConfig, assemble, load_results, run_arena, run_arena_report
from attnkit.arena.report import terminal_summary

ROW_KEYS = {
    "efficiency": {"mechanism", "length", "causal", "mode", "status"},
    "fidelity": {"mechanism", "input", "causal", "status"},
    "quality": {"mechanism", "task", "status"},
}


def test_report_schema_and_files(tmp_path: Path, toy_mechanism: str, tiny_config: ArenaConfig) -> None:
    config = tiny_config.with_(mechanisms=(toy_mechanism,))
    doc = run_arena_report(config, tmp_path, progress=False)

    assert doc["schema_version"] == 2
    assert [m["name"] for m in doc["mechanisms"]] == ["full", toy_mechanism]  # the baseline is always added
    assert doc["meta"]["config"]["lengths"] == [64, 128]
    for kind, keys in ROW_KEYS.items():
        assert doc[kind], kind
        for row in doc[kind]:
            assert keys <= set(row), (kind, row)

    eff = doc["efficiency"]
    # full: 2 lengths x 2 modes x (bidirectional, causal); the toy has no causal mode
    assert len([r for r in eff if r["mechanism"] == "full"]) == 8
    toy_rows = [r for r in eff if r["mechanism"] == toy_mechanism]
    assert len(toy_rows) == 4 and not any(r["causal"] for r in toy_rows)
    for r in eff:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and len(r["times_ms"]) >= 1
        assert r["speedup_vs_full"] is not None
        if r["mechanism"] == "full":
            assert r["speedup_vs_full"] == pytest.approx(1.0)

    fid = {(r["mechanism"], r["input"], r["causal"]): r for r in doc["fidelity"]}
    assert fid[("full", "local", True)]["relative_error"] < 1e-5
    assert fid[(toy_mechanism, "local", False)]["relative_error"] > 1e-3
    assert (toy_mechanism, "local", True) not in fid

    qual = {(r["mechanism"], r["task"]): r for r in doc["quality"]}
    assert set(qual) == {(n, t) for n in ("full", toy_mechanism) for t in ("mqar", "listops")}
    for r in qual.values():
        assert r["status"] == "ok" and r["metric"] == "accuracy" and 0.0 <= r["value"] <= 1.0

    board = {r["mechanism"]: r for r in doc["leaderboard"]}
    assert board["full"]["speedup_vs_full"] == pytest.approx(1.0) and board["full"]["max_length"] == 128
    assert board[toy_mechanism]["error_causal"] is None
    headline = fid[(toy_mechanism, "self", False)]["relative_error"]
    assert board[toy_mechanism]["error"] == headline  # the leaderboard's err is the self-attention input's
    baselines = doc["meta"]["quality_baselines"]
    assert set(baselines) == {"mqar", "listops"} and all(0.0 <= b["value"] <= 1.0 for b in baselines.values())

    for name in ("results.json", "report.md", "efficiency.png", "pareto.png", "patterns.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_results(tmp_path) == json.loads((tmp_path / "results.json").read_text())
    report = (tmp_path / "report.md").read_text()
    assert "## Leaderboard" in report and toy_mechanism in report and "![" in report
    table = terminal_summary(doc)
    assert "MQAR acc" in table and f"{toy_mechanism} ~" in table and "(no context)" in table


def test_interrupted_run_resumes_from_cached_cells(
    tmp_path: Path, tiny_config: ArenaConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config.with_(mechanisms=("full",), tasks=("mqar",))
    real = runner.measure_efficiency
    calls: list[tuple[int, bool, str]] = []

    def interrupted(module: Any, cfg: ArenaConfig, length: int, causal: bool, mode: str, meter: Any, **kw: Any) -> Any:
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the fourth cell
        calls.append((length, causal, mode))
        return real(module, cfg, length, causal, mode, meter, **kw)

    monkeypatch.setattr(runner, "measure_efficiency", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_arena(config, tmp_path, progress=False)
    assert len(list((tmp_path / "cells" / "efficiency").glob("*/*.json"))) == 3
    assert not list(tmp_path.rglob(".tmp-*"))  # no half-written cell

    monkeypatch.setattr(runner, "measure_efficiency", real)
    resumed = run_arena(config, tmp_path, progress=False)
    total = 8 + 6 + 1  # full: 8 efficiency cells, 6 fidelity cells (3 inputs x 2 modes), 1 quality cell
    assert resumed.cache_hits == 3 and resumed.cache_misses == total - 3
    cached = [(r["length"], r["causal"], r["mode"]) for r in resumed.efficiency if r["cached"]]
    assert cached == calls

    again = run_arena(config, tmp_path, progress=False)
    assert again.cache_hits == total and again.cache_misses == 0
    assert assemble(again)["quality"][0]["value"] == assemble(resumed)["quality"][0]["value"]

    fresh = run_arena(config, tmp_path, progress=False, resume=False, stages=("fidelity",))
    assert fresh.cache_hits == 0 and fresh.cache_misses == 6


def test_budget_stop_is_reported_and_not_cached(tmp_path: Path, tiny_config: ArenaConfig) -> None:
    config = tiny_config.with_(
        mechanisms=("full",), lengths=(64, 128, 256), step_budget_s=1e-6
    )  # any step is over budget
    doc = assemble(run_arena(config, tmp_path, progress=False, stages=("efficiency",)))
    rows = [r for r in doc["efficiency"] if not r["causal"] and r["mode"] == "fwd"]
    assert [r["status"] for r in rows] == ["ok", "stopped", "stopped"]
    assert "> budget" in rows[1]["reason"] and rows[2]["reason"] == rows[1]["reason"]
    assert doc["stops"][0]["at_length"] == 128
    assert len(list((tmp_path / "cells").rglob("*.json"))) == 4  # only the measured cells
    # raising the budget resumes the sweep where it was cut
    resumed = run_arena(config.with_(step_budget_s=60.0), tmp_path, progress=False, stages=("efficiency",))
    assert resumed.cache_hits == 4 and all(r["status"] == "ok" for r in resumed.efficiency)


def test_unknown_mechanism_and_stage_fail_before_any_work(tmp_path: Path, tiny_config: ArenaConfig) -> None:
    with pytest.raises(ValueError, match="Did you mean 'full'"):
        run_arena(tiny_config.with_(mechanisms=("fulll",)), tmp_path, progress=False)
    with pytest.raises(ValueError, match="stages"):
        run_arena(tiny_config, tmp_path, progress=False, stages=("speed",))
    assert not (tmp_path / "cells").exists()


def test_load_results_explains_a_missing_report(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="attnkit arena"):
        load_results(tmp_path)


def test_threads_setting_applies_to_the_measurements_and_is_recorded(
    tmp_path: Path, tiny_config: ArenaConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from attnkit.arena.report import reproduce_command

    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2  # a count different from the process's own
    seen: list[int] = []
    real = runner.measure_efficiency

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "measure_efficiency", spy)
    config = tiny_config.with_(mechanisms=("full",), lengths=(64,), threads=wanted)
    run = run_arena(config, tmp_path, progress=False, stages=("efficiency",))
    assert seen and set(seen) == {wanted}
    assert torch.get_num_threads() == before  # the caller's setting is restored
    doc = assemble(run)
    assert doc["meta"]["threads"] == wanted and doc["meta"]["config"]["threads"] == wanted
    assert f"--threads {wanted}" in reproduce_command(doc["meta"]["config"])
    stored = [json.loads(p.read_text()) for p in (tmp_path / "cells" / "efficiency").rglob("*.json")]
    assert {s["key"]["params"]["machine"]["threads"] for s in stored} == {wanted}  # cells keyed on the count
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        tiny_config.with_(threads=0)
