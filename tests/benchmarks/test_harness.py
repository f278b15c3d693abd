"""The measurement protocol: warm-up and repeats, the time budget, interleaving order, rounds and pairs."""

from __future__ import annotations

import statistics
from typing import Any

import pytest
from benchmarks.suite import Case, Part
from benchmarks.suites import get_suite

from benchmarks import harness, runner
from tests.benchmarks import targets

RECORDER = "tests.benchmarks.targets:recorder"


def spec(**kw: Any) -> dict[str, Any]:
    base = {
        "length": 8,
        "causal": False,
        "repeats": 5,
        "warmup": 3,
        "threads": 1,
        "time_budget": 120.0,
        "grad_scope": "step",
    }
    return {**base, **kw}


@pytest.fixture(autouse=True)
def _clear_calls() -> None:
    targets.CALLS.clear()


def test_single_takes_the_warmup_then_the_repeats() -> None:
    result = harness._single(spec(target=RECORDER, kwargs={"name": "a"}, backward=False))
    assert targets.CALLS == ["a"] * 8
    assert len(result["times"]) == 5
    assert result["median_s"] == statistics.median(result["times"])
    assert result["info"] == {"calls": 8, "length": 8}  # read after the timed steps


def test_single_stops_warming_up_and_repeating_within_the_time_budget() -> None:
    # 50 ms steps, 0.1 s budget: the first warm-up step passes a quarter of the budget, and after one
    # timed step the four left would take 0.2 s > 0.1 s
    result = harness._single(
        spec(target="tests.benchmarks.targets:sleeper", kwargs={"seconds": 0.05}, backward=False, time_budget=0.1)
    )
    assert targets.CALLS == ["sleep", "sleep"]
    assert len(result["times"]) == 1


def test_interleaved_alternates_the_order_every_round() -> None:
    result = harness._interleaved(
        spec(
            targets=[
                {"label": "a", "target": RECORDER, "kwargs": {"name": "a"}, "backward": False},
                {"label": "b", "target": RECORDER, "kwargs": {"name": "b"}, "backward": False},
            ],
            warmup=1,
            repeats=3,
            min_repeats=3,
        )
    )
    # warm-up round 0 in order; timed rounds 0, 1, 2: in order, reversed, in order
    assert targets.CALLS == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(result[k]["times"]) for k in "ab"] == [3, 3]


def test_interleaved_rows_record_their_ratios_to_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = {"ref": {"times": [1.0, 2.0, 4.0], "median_s": 2.0}, "x": {"times": [1.5, 1.0, 8.0], "median_s": 1.5}}
    monkeypatch.setattr(harness, "_spawn", lambda python, spec, part: ("ok", worker))
    part = Part("p", (), (8,), interleaved=True, reference="ref")
    rows = harness.measure_interleaved([Case("ref", RECORDER, role="sdpa"), Case("x", RECORDER)], part, 8, False, "fwd")
    assert "pair_ratios" not in rows[0]
    assert rows[1]["pair_ratios"] == {"vs": "ref", "median": 1.5, "min": 0.5, "max": 2.0, "count": 3}
    assert rows[1]["peak_mb"] is None  # one process ran both: no peak of its own


def test_a_case_whose_interpreter_is_missing_is_skipped_with_what_to_do() -> None:
    case = Case("anchor", RECORDER, python=".no-such-venv/bin/python")
    row = harness.measure(case, Part("p", (case,), (8,)), 8, False, "fwd")
    assert row["status"] == "skipped" and "setup_env.sh" in row["error"]


def test_rounds_keep_the_median_of_the_round_medians() -> None:
    rounds = [
        {"status": "ok", "median_s": 3.0, "times": [3.0], "peak_mb": 10.0},
        {"status": "ok", "median_s": 1.0, "times": [1.0], "peak_mb": 30.0},
        {"status": "ok", "median_s": 2.0, "times": [2.0], "peak_mb": 20.0},
    ]
    merged = harness.merge_rounds(rounds)
    assert merged["median_s"] == 2.0 and merged["round_medians_s"] == [3.0, 1.0, 2.0]
    assert merged["peak_mb"] == 30.0 and merged["times"] == [3.0, 1.0, 2.0]
    failed = harness.merge_rounds([rounds[0], {"status": "error", "error": "x"}])
    assert failed["failed_rounds"] == 1 and failed["median_s"] == 3.0


def test_selection_by_part_case_mode_and_causal() -> None:
    suite = get_suite("full_vs_sdpa")
    parts = runner.select(
        suite, parts=["paired"], cases=["full"], overrides={"modes": ("fwd",), "causal": (True,), "repeats": 2}
    )
    assert [(p.name, p.modes, p.causal, p.repeats) for p in parts] == [("paired", ("fwd",), (True,), 2)]
    assert [c.label for c in parts[0].case_list()] == ["attnkit full"]
    # the overhead part has no causal cell: asking for causal cells only drops it
    assert [p.name for p in runner.select(suite, overrides={"causal": (True,)})] == ["harness", "paired"]
    with pytest.raises(runner.SelectionError, match="has no part"):
        runner.select(suite, parts=["nope"])
    with pytest.raises(runner.SelectionError, match="leaves nothing to measure"):
        runner.select(suite, cases=["no such label"])
