"""Floors judged and rendered on synthetic rows whose ratios are worked out by hand in each test."""

from __future__ import annotations

from typing import Any

import pytest
from benchmarks.floors import Floor, judge
from benchmarks.suite import Case, Part, Suite

from benchmarks import render, schema

SUITE = Suite(
    name="synthetic",
    title="a made-up suite",
    description="Synthetic rows.",
    parts=(
        Part(
            "main",
            (
                Case("sdpa", "m:f", role="sdpa"),
                Case("ours", "m:f"),
                Case("slow anchor", "m:f", role="anchor"),
                Case("fast anchor", "m:f", role="anchor"),
                Case("cheaper anchor", "m:f", role="anchor"),
            ),
            lengths=(1024, 4096),
        ),
    ),
    anchors={"ours": ("slow anchor", "fast anchor", "cheaper anchor")},
    # the cheaper anchor computes another function in causal cells: shown, never judged there
    unmatched={("cheaper anchor", True): "computes less"},
    plot=False,
)


def row(
    label: str, seconds: float | None, *, length: int = 4096, causal: bool = True, peak: float = 100.0, **extra: Any
) -> dict[str, Any]:
    role = {"sdpa": "sdpa", "ours": "attnkit"}.get(label, "anchor")
    r: dict[str, Any] = {
        "label": label,
        "role": role,
        "part": "main",
        "length": length,
        "causal": causal,
        "mode": "fwd+bwd",
        "run": 0,
    }
    if seconds is None:
        return {**r, "status": "error", "error": "failed"}
    return {**r, "status": "ok", "median_s": seconds, "peak_mb": peak, **extra}


def cell(**overrides: float | None) -> list[dict[str, Any]]:
    """ours 0.1 s / 100 MB; anchors 0.4 s / 50 MB, 0.25 s / 200 MB, 0.05 s (unmatched when causal); SDPA 1 s."""
    times = {"sdpa": 1.0, "ours": 0.1, "slow anchor": 0.4, "fast anchor": 0.25, "cheaper anchor": 0.05, **overrides}
    peaks = {"slow anchor": 50.0, "fast anchor": 200.0}
    return [row(label, t, peak=peaks.get(label, 100.0)) for label, t in times.items()]


def floor(
    metric: str,
    comparison: str,
    threshold: float,
    *,
    length: int = 4096,
    causal: bool = True,
    base_length: int | None = None,
) -> Floor:
    """A floor on ``ours`` (forward+backward) in the synthetic suite."""
    return Floor(0, "synthetic", "ours", None, length, causal, "fwd+bwd", metric, comparison, threshold, base_length)


def test_the_judged_anchor_is_the_fastest_computing_the_same_function() -> None:
    # fastest matched anchor: 0.25 s (the 0.05 s one is not matched in causal cells) -> 0.25 / 0.1 = 2.5
    v = judge(floor("speedup_vs_anchor", ">=", 2.0), cell(), SUITE)
    assert (v.status, v.against) == ("met", "fast anchor")
    assert v.value == pytest.approx(2.5)
    assert judge(floor("speedup_vs_anchor", ">=", 3.0), cell(), SUITE).status == "not met"


def test_an_unmatched_anchor_is_judged_where_it_is_matched() -> None:
    rows = [{**r, "causal": False} for r in cell()]
    v = judge(floor("speedup_vs_anchor", ">=", 1.0, causal=False), rows, SUITE)
    assert v.against == "cheaper anchor" and v.value == pytest.approx(0.05 / 0.1)
    assert v.status == "not met"


def test_a_failed_anchor_leaves_the_next_fastest_and_none_leaves_no_verdict() -> None:
    v = judge(floor("speedup_vs_anchor", ">=", 3.0), cell(**{"fast anchor": None}), SUITE)
    assert (v.status, v.against, v.value) == ("met", "slow anchor", pytest.approx(4.0))
    v = judge(floor("speedup_vs_anchor", ">=", 1.0), cell(**{"fast anchor": None, "slow anchor": None}), SUITE)
    assert v.status == "not measured" and v.value is None


def test_memory_is_compared_with_the_judged_anchor() -> None:
    # the judged (fastest) anchor peaks at 200 MB: 100 / 200 = 0.5, though the slow one uses less
    v = judge(floor("memory_vs_anchor", "<=", 1.0), cell(), SUITE)
    assert (v.status, v.value, v.against) == ("met", pytest.approx(0.5), "fast anchor")
    v = judge(floor("memory_vs_anchor", "<=", 1.0), cell(**{"fast anchor": None}), SUITE)
    assert (v.status, v.value) == ("not met", pytest.approx(2.0))


def test_speedup_over_sdpa_and_a_missing_row() -> None:
    assert judge(floor("speedup_vs_sdpa", ">=", 10.0), cell(), SUITE).status == "met"  # 1 / 0.1 = 10, inclusive
    assert judge(floor("speedup_vs_sdpa", ">=", 10.5), cell(), SUITE).status == "not met"
    assert judge(floor("speedup_vs_sdpa", ">=", 1.0), cell(sdpa=None), SUITE).status == "not measured"
    assert judge(floor("speedup_vs_sdpa", ">=", 1.0, length=1024), cell(), SUITE).status == "not measured"
    assert judge(floor("speedup_vs_sdpa", ">=", 1.0), cell(ours=None), SUITE).status == "not measured"


def test_growth_with_length() -> None:
    rows = [*cell(), row("ours", 0.08, length=1024, peak=0.5)]
    v = judge(floor("time_growth", "<=", 1.2, base_length=1024), rows, SUITE)
    assert (v.status, v.value) == ("not met", pytest.approx(0.1 / 0.08))
    # a base peak under 1 MB counts as 1 MB: 100 / 1
    v = judge(floor("peak_growth", "<=", 150.0, base_length=1024), rows, SUITE)
    assert (v.status, v.value) == ("met", pytest.approx(100.0))


def test_paired_ratio() -> None:
    rows = cell()
    rows[1]["pair_ratios"] = {"vs": "sdpa", "median": 1.04, "min": 0.9, "max": 1.2, "count": 9}
    assert judge(floor("paired_ratio", "<=", 1.05), rows, SUITE).status == "met"
    assert judge(floor("paired_ratio", "<=", 1.03), rows, SUITE).status == "not met"


def test_a_value_next_to_the_threshold_is_shown_on_its_side() -> None:
    f = floor("speedup_vs_anchor", ">=", 1.5)
    assert render.shown_value(1.4998835, f) == "1.4999"
    assert render.shown_value(1.5, f) == "1.50"
    assert render.shown_value(2.345, f) == "2.35"


def test_the_markdown_marks_each_floor() -> None:
    floors = [floor("speedup_vs_anchor", ">=", 2.0), floor("speedup_vs_anchor", ">=", 3.0)]
    data = schema.result("synthetic", [_run()], cell())
    text = render.markdown(data, SUITE, [judge(f, data["rows"], SUITE) for f in floors])
    assert "## Floors (1 of 2 met)" in text
    lines = [line for line in text.splitlines() if line.startswith("| 0 | ours |")]
    assert len(lines) == 2
    assert "| 2.50 | fast anchor | ≥ 2 | met |" in lines[0]
    assert "| 2.50 | fast anchor | ≥ 3 | **not met** |" in lines[1]
    # every anchor against ours, the unmatched one marked with its reason
    assert (
        "| ours | yes | fwd+bwd | 4096 | 100.0 | cheaper anchor | 50.0 | 0.50x | 100 / 100 | not matched: computes less |"
        in text
    )
    assert "| ours | yes | fwd+bwd | 4096 | 100.0 | fast anchor | 250.0 | 2.50x | 100 / 200 | yes |" in text
    # the rows table: time / SDPA time in the same cell
    assert "| ours | yes | fwd+bwd | 4096 | 100.0 | 0.10 | 100 | ok |" in text


def _run() -> dict[str, Any]:
    return {
        "commit": "unknown",
        "dirty": "unknown",
        "torch": "unknown",
        "date": "2026-12-01",
        "machine": {"cpu": "unknown", "cores": "unknown", "threads": "unknown", "platform": "unknown"},
        "load": {"start": "unknown", "end": "unknown"},
        "protocol": {},
    }
