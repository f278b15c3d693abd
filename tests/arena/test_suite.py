"""The quality suite: planning, aggregation, the facts file, resume, state sizes, the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

import attnkit
from attnkit.arena import config as arena_config
from attnkit.arena.config import SUITE_BUDGETS, SUITE_BUDGETS_FULL, SUITE_TASKS, TOKEN_SHIFT, ArenaConfig, TaskBudget
from attnkit.arena.leaderboard import aggregate, mean_and_spread, render_markdown
from attnkit.arena.quality import model_config
from attnkit.arena.state_size import decoding_state_bytes
from attnkit.arena.suite import (
    BASELINE_ROW,
    SuiteCell,
    SuiteConfig,
    SuiteRun,
    cell_config,
    plan_cells,
    quality_task,
    run_suite,
    skipped_cells,
    train_cell,
)
from attnkit.cli.main import main

#: Tiny budgets: a few steps on short sequences, so a real cell trains in about a second.
TINY_MQAR = TaskBudget(
    "mqar", (("length", 32), ("num_keys", 8), ("num_pairs", 4), ("num_values", 8)), 4, 4, 1e-2, eval_batches=2
)
TINY_SWEEP = TaskBudget(
    "mqar",
    (("length", 32), ("num_keys", 16), ("num_pairs", 8), ("num_values", 16)),
    4,
    4,
    1e-2,
    eval_batches=2,
    sweep=True,
)
TINY_LM = TaskBudget("char_lm", (("length", 48),), 3, 2, 3e-3, eval_batches=2)


def test_plan_gives_every_mechanism_the_same_budget_and_both_seeds() -> None:
    config = SuiteConfig(mechanisms=("linformer", "linear"), custom_budgets=(TINY_MQAR, TINY_SWEEP, TINY_LM))
    cells = plan_cells(config)
    # mqar and its sweep cell: (baseline + full + linformer + linear) x 2 seeds each; char_lm: linformer
    # has no causal mode, so (baseline + full + linear) x 2 seeds
    assert len(cells) == 2 * 4 * 2 + 3 * 2
    for budget in (TINY_MQAR, TINY_SWEEP):
        mine = [c for c in cells if c.budget == budget]
        assert {(c.mechanism, c.seed) for c in mine} == {
            (m, s) for m in (BASELINE_ROW, "full", "linformer", "linear") for s in (0, 1)
        }
    assert {c.mechanism for c in cells if c.budget == TINY_LM} == {BASELINE_ROW, "full", "linear"}
    assert skipped_cells(config) == [
        {"task": "char_lm", "mechanism": "linformer", "status": "n/a", "reason": "no causal mode"}
    ]
    # one cache key per cell: nothing is trained twice, and seeds are part of the key
    assert len({json.dumps(c.key(), sort_keys=True) for c in cells}) == len(cells)


def test_presets_cover_every_task_once_and_full_reaches_lra_lengths() -> None:
    for budgets in (SUITE_BUDGETS, SUITE_BUDGETS_FULL):
        headline = [b.task for b in budgets if not b.sweep]
        assert sorted(headline) == sorted(SUITE_TASKS)
        sweep = [b.key for b in budgets if b.sweep]
        assert len(sweep) >= 2 and all(k.startswith("mqar@pairs=") for k in sweep)
    full = {b.task: dict(b.options) for b in SUITE_BUDGETS_FULL if not b.sweep}
    assert full["listops"]["max_length"] == 2000  # LRA ListOps
    assert full["text_classification"]["length"] == 4096  # LRA Text
    assert full["document_matching"]["window"] == 4096  # LRA Retrieval: 4K per document
    assert full["pathfinder"]["size"] == 32  # LRA Pathfinder 32 x 32
    assert full["passkey"]["length"] >= 1024 and full["char_lm"]["length"] >= 1024
    reduced = {b.task: dict(b.options) for b in SUITE_BUDGETS if not b.sweep}
    assert reduced["char_lm"]["length"] >= 1024  # bits per character at >= 1K context even in the hour


def test_a_budgets_token_shift_reaches_the_model_and_the_cache_key() -> None:
    wide = dataclasses.replace(TINY_LM, token_shift=4)
    cell, wide_cell = SuiteCell("full", TINY_LM, 0, "cpu"), SuiteCell("full", wide, 0, "cpu")
    assert cell_config(cell).model_token_shift == TOKEN_SHIFT == 2
    config = model_config("full", wide_cell.options, quality_task(wide), cell_config(wide_cell))
    assert config.token_shift == 4
    assert json.dumps(cell.key(), sort_keys=True) != json.dumps(wide_cell.key(), sort_keys=True)
    # the suite's passkey model sees the two digits before each answer digit (and the one at it)
    assert {b.task: b.token_shift for b in SUITE_BUDGETS if b.token_shift != TOKEN_SHIFT} == {"passkey": 4}


@pytest.mark.parametrize("value", [1, -1, True, 2.0])
def test_token_shift_widths_are_checked(value: Any) -> None:
    with pytest.raises(ValueError, match="token_shift must be 0"):
        dataclasses.replace(TINY_LM, token_shift=value)
    with pytest.raises(ValueError, match="model_token_shift must be 0"):
        ArenaConfig(model_token_shift=value)


@pytest.mark.slow
def test_exact_attention_finds_the_passkey_within_the_suites_budget() -> None:
    """The floor the suite is calibrated to: a needle test asks for >= 95% (measured 98.0%, seed 0)."""
    (budget,) = [b for b in SUITE_BUDGETS if b.task == "passkey"]
    result = train_cell(SuiteCell("full", budget, 0, "cpu"))
    assert result["status"] == "ok" and result["metric"] == "accuracy"
    assert result["value"] >= 0.95


def test_sweep_key_names_pairs_and_length() -> None:
    assert TINY_MQAR.key == "mqar"
    assert TINY_SWEEP.key == "mqar@pairs=8,length=32"


@pytest.mark.parametrize(
    ("values", "mean", "spread"),
    [([0.5, 0.7], 0.6, 0.1), ([1.0, 2.0, 4.0], 7 / 3, 1.5), ([0.25], 0.25, 0.0)],
)
def test_mean_and_spread_by_hand(values: list[float], mean: float, spread: float) -> None:
    got = mean_and_spread(values)
    assert got == pytest.approx((mean, spread))


def test_step_time_is_the_median_gap_between_steps() -> None:
    from attnkit.arena.quality import _median_step

    # steps start at 0, 5 (a 5 s first step: warm-up), 6, 7, 9
    assert _median_step([0.0, 5.0, 6.0, 7.0, 9.0], 10.0) == 2.0  # sorted gaps 1, 1, 2, 5: the upper median
    assert _median_step([0.0, 5.0, 6.0, 7.0], 8.0) == 1.0  # gaps 5, 1, 1
    assert _median_step([0.0], 3.0) == 3.0  # one step: the mean, here its whole time


def test_mean_and_spread_refuses_no_values() -> None:
    with pytest.raises(ValueError, match="at least one value"):
        mean_and_spread([])


def _synthetic_run() -> SuiteRun:
    config = SuiteConfig(mechanisms=("linformer",), custom_budgets=(TINY_MQAR, TINY_LM))
    rows = [
        {"mechanism": BASELINE_ROW, "task": "mqar", "seed": 0, "status": "ok", "value": 0.1},
        {"mechanism": BASELINE_ROW, "task": "mqar", "seed": 1, "status": "ok", "value": 0.2},
        {"mechanism": "full", "task": "mqar", "seed": 0, "status": "ok", "value": 1.0, "step_ms": 10.0},
        {"mechanism": "full", "task": "mqar", "seed": 1, "status": "ok", "value": 0.9, "step_ms": 14.0},
        {"mechanism": "linformer", "task": "mqar", "seed": 1, "status": "ok", "value": 0.4, "step_ms": 8.0},
        {"mechanism": "linformer", "task": "mqar", "seed": 0, "status": "ok", "value": 0.3, "step_ms": 6.0},
        {"mechanism": BASELINE_ROW, "task": "char_lm", "seed": 0, "status": "ok", "value": 4.5},
        {"mechanism": BASELINE_ROW, "task": "char_lm", "seed": 1, "status": "ok", "value": 4.7},
        {"mechanism": "full", "task": "char_lm", "seed": 0, "status": "ok", "value": 3.0, "step_ms": 20.0},
        {"mechanism": "full", "task": "char_lm", "seed": 1, "status": "error", "error": "RuntimeError: boom"},
    ]
    return SuiteRun(
        config,
        rows=rows,
        skipped=skipped_cells(config),
        state_bytes={"mqar": {"full": 4096, "linformer": None}, "char_lm": {"full": 8192, "linformer": None}},
        wall_s=12.5,
        load_average=[0.5, 0.7],
    )


def test_aggregate_against_hand_computed_numbers() -> None:
    doc = aggregate(_synthetic_run(), meta={"commit": "abc"})
    mqar = doc["tasks"]["mqar"]
    assert mqar["metric"] == "accuracy" and mqar["higher_is_better"] is True
    assert mqar["baseline"] == pytest.approx(0.15)
    assert mqar["length"] == 32 - 4  # MQAR's answer slots are dropped: 4 pairs x 2 + 4 queries + 16 filler
    assert mqar["mechanisms"]["full"] == {
        "mean": pytest.approx(0.95),
        "spread": pytest.approx(0.05),
        "seeds": [1.0, 0.9],
        "state_bytes": 4096,
        "step_ms": 12.0,
    }
    # seeds are listed in seed order whatever order the rows finished in
    assert mqar["mechanisms"]["linformer"]["seeds"] == [0.3, 0.4]
    assert mqar["mechanisms"]["linformer"]["state_bytes"] is None
    lm = doc["tasks"]["char_lm"]
    assert lm["metric"] == "bpc" and lm["higher_is_better"] is False
    assert lm["baseline"] == pytest.approx(4.6)
    # a failed seed keeps the mechanism out of the task and is reported, never averaged over one seed
    assert lm["mechanisms"] == {}
    assert doc["meta"]["failures"] == [
        {"task": "char_lm", "mechanism": "full", "seed": 1, "error": "RuntimeError: boom"}
    ]
    assert doc["meta"]["not_applicable"][0]["mechanism"] == "linformer"


def test_unlearned_tasks_are_those_where_exact_does_not_beat_the_baseline() -> None:
    from attnkit.arena.leaderboard import unlearned_tasks

    def task(exact: float, spread: float, baseline: float, higher: bool) -> dict[str, Any]:
        return {
            "baseline": baseline,
            "higher_is_better": higher,
            "mechanisms": {"full": {"mean": exact, "spread": spread}},
        }

    tasks = {
        "mqar": task(0.99, 0.01, 0.07, True),  # learned
        "pathfinder": task(0.51, 0.02, 0.50, True),  # 1 point above, inside a 2-point spread
        "listops": task(0.40, 0.02, 0.37, True),  # 3 points above a 2-point spread: learned
        "char_lm": task(4.70, 0.05, 4.60, False),  # more bits than the unigram model
        "passkey": {"baseline": 0.1, "higher_is_better": True, "mechanisms": {}},  # exact failed: no verdict
    }
    assert unlearned_tasks(tasks) == ["pathfinder", "char_lm"]


def check_facts_schema(doc: dict[str, Any]) -> None:
    """The advisor's contract: exactly these keys and types."""
    assert set(doc) == {"suite", "meta", "tasks"} and doc["suite"] == "quality"
    assert {"commit", "torch", "date", "machine", "load", "wall_s"} <= set(doc["meta"])
    for key, task in doc["tasks"].items():
        assert key.split("@")[0] in SUITE_TASKS
        assert set(task) == {"metric", "higher_is_better", "baseline", "length", "mechanisms"}
        assert task["metric"] in ("accuracy", "bpc")
        assert task["higher_is_better"] is (task["metric"] == "accuracy")
        assert isinstance(task["baseline"], float) and isinstance(task["length"], int)
        for facts in task["mechanisms"].values():
            assert set(facts) == {"mean", "spread", "seeds", "state_bytes", "step_ms"}
            assert all(isinstance(facts[k], float) for k in ("mean", "spread", "step_ms"))
            assert all(isinstance(v, float) for v in facts["seeds"])
            assert facts["state_bytes"] is None or isinstance(facts["state_bytes"], int)


def test_synthetic_facts_follow_the_schema() -> None:
    doc = aggregate(_synthetic_run())
    check_facts_schema(doc)
    json.dumps(doc)  # JSON-ready
    table = render_markdown(doc)
    assert "| *no-context baseline* | 15.0 | 4.600 |" in table
    assert "95.0 ± 5.0" in table and "35.0 ± 5.0" in table


class Interrupt(Exception):
    """Stands for the kill: raised by the fake trainer after a few cells."""


def test_a_killed_run_resumes_without_training_finished_cells(tmp_path: Path) -> None:
    config = SuiteConfig(mechanisms=("linear",), custom_budgets=(TINY_MQAR,), workers=1)
    trained: list[tuple[str, int]] = []

    def fake_train(cell: SuiteCell, *, stop_after: int | None = None) -> dict[str, Any]:
        if stop_after is not None and len(trained) == stop_after:
            raise Interrupt
        trained.append((cell.mechanism, cell.seed))
        return {"status": "ok", "metric": "accuracy", "value": 0.5 + cell.seed / 10, "step_ms": 1.0}

    with pytest.raises(Interrupt):
        run_suite(config, tmp_path, progress=False, train=lambda c: fake_train(c, stop_after=2))
    first = list(trained)
    assert len(first) == 2
    run = run_suite(config, tmp_path, progress=False, train=fake_train)
    # 3 rows x 2 seeds = 6 cells; the 2 stored before the kill are reused, not trained again
    assert len(trained) == 6 and set(trained[2:]).isdisjoint(first)
    assert (run.cells_trained, run.cells_reused) == (4, 2)
    assert sorted((r["mechanism"], r["seed"]) for r in run.rows if r["cached"]) == sorted(first)
    again = run_suite(config, tmp_path, progress=False, train=fake_train)
    assert len(trained) == 6 and again.cells_trained == 0
    # --no-resume trains everything again
    run_suite(config, tmp_path, progress=False, train=fake_train, resume=False)
    assert len(trained) == 12


@pytest.mark.parametrize("length", [5, 33])
def test_state_bytes_of_a_kv_cache_and_a_recurrent_state(length: int) -> None:
    heads, head_dim, fp32 = 3, 8, 4
    # exact attention keeps every key and value: 2 x H x L x D floats
    assert decoding_state_bytes("full", {}, length=length, heads=heads, head_dim=head_dim) == (
        2 * heads * length * head_dim * fp32
    )
    # causal linear attention keeps sum phi(k) [v, 1]^T per head: H x D x (D + 1) floats, at any length
    assert decoding_state_bytes("linear", {}, length=length, heads=heads, head_dim=head_dim) == (
        heads * head_dim * (head_dim + 1) * fp32
    )
    # a sliding window of w keeps the w - 1 newest keys and values once it is full
    window = 4
    kept = min(length, window - 1)
    assert decoding_state_bytes(
        "sliding_window", {"window": window}, length=length, heads=heads, head_dim=head_dim
    ) == (2 * heads * kept * head_dim * fp32)


def test_state_bytes_is_none_without_a_decoding_state() -> None:
    assert attnkit.attention_capabilities("linformer").decoding is None
    assert decoding_state_bytes("linformer", {"max_len": 16}, length=16, heads=2, head_dim=4) is None
    with pytest.raises(ValueError, match="length must be a positive integer"):
        decoding_state_bytes("full", {}, length=0, heads=2, head_dim=4)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["arena", "--suite", "qualty"], "--suite must be one of quality, got 'qualty'"),
        (["arena", "--suite", "quality", "--quick"], "--suite quality does not use --quick"),
        (["arena", "--suite", "quality", "--seeds", "a"], "--seeds must be comma-separated integers"),
        (["arena", "--suite", "quality", "--seeds", "0,0"], "seeds must be distinct"),
        (["arena", "--suite", "quality", "--workers", "0"], "workers must be a positive integer"),
        (["arena", "--suite", "quality", "--tasks", "lra"], "tasks must be one of"),
        (["arena", "--seeds", "0,1"], "--seeds applies only to --suite quality"),
    ],
)
def test_suite_flag_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) != 0
    assert message in capsys.readouterr().err


def test_full_flag_selects_lra_budgets() -> None:
    import argparse

    from attnkit.cli.arena import register, suite_config_from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    config = suite_config_from_args(parser.parse_args(["arena", "--suite", "quality", "--full", "--tasks", "listops"]))
    assert config.full and [dict(b.options)["max_length"] for b in config.budgets] == [2000]
    config = suite_config_from_args(parser.parse_args(["arena", "--suite", "quality", "--tasks", "listops"]))
    assert config.budgets == tuple(b for b in SUITE_BUDGETS if b.task == "listops")
    assert config.seeds == (0, 1) and config.workers == 2


def test_suite_command_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real (tiny) run: trains, writes results.json in the advisor's schema, report.md and the PNG."""
    monkeypatch.setattr(arena_config, "SUITE_BUDGETS", (TINY_MQAR, TINY_SWEEP))
    out = tmp_path / "q"
    argv = [
        "arena",
        "--suite",
        "quality",
        "--mechanisms",
        "linear",
        "--tasks",
        "mqar",
        "--workers",
        "1",
        "--seeds",
        "0",
    ]
    assert main([*argv, "--out", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    check_facts_schema(doc)
    assert doc == json.loads((out / "results.json").read_text())
    assert set(doc["tasks"]) == {"mqar", "mqar@pairs=8,length=32"}
    assert set(doc["tasks"]["mqar"]["mechanisms"]) == {"full", "linear"}
    assert doc["tasks"]["mqar"]["mechanisms"]["linear"]["state_bytes"] == 2 * 4 * 16 * 17 * 4  # 2 layers, H=4, D=16
    assert "no-context baseline" in (out / "report.md").read_text()
    assert (out / "quality_vs_state.png").stat().st_size > 0
    # the second run trains nothing
    assert main([*argv, "--out", str(out)]) == 0
    assert "0 cells trained, 6 reused" in capsys.readouterr().out
