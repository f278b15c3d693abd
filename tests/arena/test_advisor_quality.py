"""The advisor's quality logic (``decide`` with task facts) on hand-built synthetic facts.

Every expected winner, order and reason below is worked out by hand from the numbers in the
test, not taken from the code's output.
"""

from __future__ import annotations

import pytest

from attnkit.arena.advisor import CATEGORIES, Advice, Candidate, Constraints, Verdict, decide
from attnkit.arena.task_facts import QualityFigure, TaskFacts


def cand(name: str, time_ms: float | None, **kw: object) -> Candidate:
    kw.setdefault("peak_mb", 100.0)
    kw.setdefault("error", 0.0)
    causal = bool(kw.pop("causal", True))
    decoding = kw.pop("decoding", "kv_cache")
    return Candidate(name, causal, decoding, kw["error"] == 0.0, time_ms=time_ms, **kw)  # type: ignore[arg-type]


def facts(figures: dict[str, tuple[float, float]], *, baseline: float, metric: str = "accuracy") -> TaskFacts:
    return TaskFacts(
        "mqar" if metric == "accuracy" else "char_lm",
        metric,
        metric == "accuracy",
        baseline,
        512,
        {name: QualityFigure(mean, spread, (mean,)) for name, (mean, spread) in figures.items()},
        "synthetic",
    )


def verdict(advice: Advice, name: str) -> Verdict:
    return next(v for v in advice.verdicts if v.candidate.name == name)


POOL = [
    cand("full", 100.0),
    cand("sliding_window", 30.0),
    cand("linear", 10.0),
    cand("nsa", 40.0),
    cand("performer", 12.0),
]
RECALL = facts(
    {
        "full": (0.99, 0.005),
        "nsa": (0.985, 0.01),  # within full's spread: |0.99 - 0.985| = 0.005 <= 0.015
        "sliding_window": (0.60, 0.02),  # 39 points below exact
        "linear": (0.076, 0.01),  # at the 7.4% baseline
    },
    baseline=0.074,
)


def test_a_quality_tie_goes_to_the_faster_mechanism() -> None:
    advice = decide(Constraints(length=4096), POOL, RECALL)
    assert advice.recommended == "nsa"
    assert [v.candidate.name for v in advice.verdicts if v.eligible] == ["nsa", "full"]
    assert verdict(advice, "full").reasons == ["ties nsa on quality within the spread, but nsa is 2.50x faster"]
    assert "the fastest of the 2 tied for it" in verdict(advice, "nsa").reasons[0]


def test_without_spread_the_better_score_wins_even_if_slower() -> None:
    exact = facts({"full": (0.99, 0.0), "nsa": (0.985, 0.0)}, baseline=0.074)
    advice = decide(Constraints(length=4096), POOL[:1] + POOL[3:4], exact)
    assert advice.recommended == "full"  # 2.5x slower, but 0.5 points better and no noise to excuse it
    assert verdict(advice, "nsa").reasons == ["meets the constraints, but full scores better on mqar (99.0% vs 98.5%)"]


def test_quality_rejections_say_why_and_are_categorised() -> None:
    advice = decide(Constraints(length=4096), POOL, RECALL)
    window = verdict(advice, "sliding_window")
    assert not window.eligible and window.categories == ["quality"]
    assert window.reasons == ["mqar 60.0% vs exact 99.0%: worse by more than 5 points"]
    linear = verdict(advice, "linear")  # 91.4 points short of exact and 0.2 points over the 7.4% baseline
    assert linear.categories == ["quality", "quality"]
    assert "does not beat the no-context baseline 7.4% by 2 points" in linear.reasons[1]
    missing = verdict(advice, "performer")  # not in the facts: rejected, never guessed
    assert missing.categories == ["quality"]
    assert missing.reasons == ["no quality figure on mqar (the facts have none); not guessed"]


def test_quality_ranks_before_speed_among_the_accepted() -> None:
    loose = decide(Constraints(length=4096, quality_tolerance=0.5), POOL, RECALL)
    # sliding_window (60%) now passes the tolerance and is 1.3x faster than nsa, but ranks after the 99% pair
    assert [v.candidate.name for v in loose.verdicts if v.eligible] == ["nsa", "full", "sliding_window"]
    assert verdict(loose, "sliding_window").reasons == [
        "meets the constraints, but full (tied with nsa) scores better on mqar (99.0% vs 60.0%)"
    ]


def test_ties_are_grouped_around_the_best_remaining_figure() -> None:
    # b overlaps a and c, but c does not overlap a: the first group is {a, b}; c ranks last although fastest
    pool = [cand("full", 100.0), cand("a", 50.0), cand("b", 20.0), cand("c", 5.0)]
    three = facts({"full": (0.90, 0.01), "a": (0.90, 0.01), "b": (0.885, 0.01), "c": (0.87, 0.01)}, baseline=0.1)
    advice = decide(Constraints(length=512), pool, three)
    assert [v.candidate.name for v in advice.verdicts] == ["b", "a", "full", "c"]
    # the comparison names the best of the winner's group, not the winner (c is closer to b than to a)
    assert verdict(advice, "c").reasons == [
        "meets the constraints, but a (tied with b) scores better on mqar (90.0% vs 87.0%)"
    ]


def test_bits_per_char_tolerance_is_relative_and_lower_is_better() -> None:
    lm = facts(
        {"full": (2.0, 0.0), "a": (2.08, 0.0), "b": (2.2, 0.0), "c": (4.45, 0.0)},
        baseline=4.5,
        metric="bpc",
    )
    pool = [cand("full", 100.0), cand("a", 50.0), cand("b", 20.0), cand("c", 5.0)]
    advice = decide(Constraints(length=512), pool, lm)
    # a: 4% more bits (<= 5%); b: 10% more; c: 4.45 does not beat 4.5 by 2% (the bar is 4.41)
    assert [v.candidate.name for v in advice.verdicts if v.eligible] == ["full", "a"]
    assert verdict(advice, "b").reasons == ["char_lm 2.200 bpc vs exact 2.000 bpc: worse by more than 5%"]
    assert verdict(advice, "c").reasons[-1] == "char_lm 4.450 bpc does not beat the no-context baseline 4.500 bpc by 2%"
    assert verdict(advice, "a").reasons == [
        "meets the constraints, but full scores better on char_lm (2.000 bpc vs 2.080 bpc)"
    ]


def test_an_exact_model_at_the_baseline_leaves_nothing_to_recommend() -> None:
    unlearned = facts({"full": (0.08, 0.01), "linear": (0.08, 0.01)}, baseline=0.074)
    advice = decide(Constraints(length=512), [cand("full", 100.0), cand("linear", 10.0)], unlearned)
    assert advice.recommended is None
    assert all(v.categories == ["quality"] for v in advice.verdicts)
    assert advice.closest == []  # no limit the user can move makes an unlearned model count


def test_the_baseline_margin_is_a_margin() -> None:
    pool = [cand("full", 100.0)]
    fig = facts({"full": (0.10, 0.0)}, baseline=0.074)  # 2.6 points over the baseline
    assert decide(Constraints(length=512, baseline_margin=0.02), pool, fig).recommended == "full"
    assert decide(Constraints(length=512, baseline_margin=0.03), pool, fig).recommended is None
    at_baseline = facts({"full": (0.074, 0.0)}, baseline=0.074)
    assert decide(Constraints(length=512, baseline_margin=0.0), pool, at_baseline).recommended is None


def test_every_category_is_used() -> None:
    pool = [
        cand("full", 100.0, peak_mb=4096.0),  # memory
        cand("bidir", 5.0, causal=False, decoding=None),  # causal and decode
        cand("rough", 20.0, error=0.5),  # error
        cand("slowish", 80.0),  # speed: 1.25x < 2x
        cand("crashes", None, note="RuntimeError: boom"),  # error: could not run
        cand("forgetful", 10.0),  # quality
        cand("good", 25.0),  # eligible
    ]
    figures = {n: (0.9, 0.0) for n in ("full", "bidir", "rough", "slowish", "crashes", "good")}
    task = facts({**figures, "forgetful": (0.2, 0.0)}, baseline=0.1)
    advice = decide(
        Constraints(length=1024, causal=True, decode=True, max_error=0.1, memory_gb=1.0, min_speedup=2.0), pool, task
    )
    assert advice.recommended == "good"
    got = {v.candidate.name: v.categories for v in advice.verdicts}
    assert got == {
        "good": [],
        "full": ["speed", "memory"],  # 1.0x < 2x, and 4 GB > 1 GB
        "bidir": ["causal", "decode"],
        "rough": ["error"],
        "slowish": ["speed"],
        "crashes": ["error"],
        "forgetful": ["quality"],
    }
    assert {c for cats in got.values() for c in cats} == set(CATEGORIES)
    assert verdict(advice, "slowish").reasons == ["1.25x the speed of full < min 2x"]
    assert verdict(advice, "crashes").reasons == ["could not run at length 1024: RuntimeError: boom"]


def test_without_full_a_speed_floor_cannot_be_checked() -> None:
    advice = decide(Constraints(length=1024, min_speedup=2.0), [cand("linear", 10.0)])
    assert verdict(advice, "linear").reasons == [
        "speed-up unknown: exact attention (full) was not measured at this length"
    ]


def test_nothing_fits_suggests_the_quality_tolerance_or_speed_floor_to_relax() -> None:
    pool = [cand("full", 100.0, peak_mb=4096.0), cand("sliding_window", 30.0), cand("nsa", 60.0)]
    task = facts({"full": (0.99, 0.0), "sliding_window": (0.60, 0.0), "nsa": (0.98, 0.0)}, baseline=0.074)
    advice = decide(Constraints(length=4096, memory_gb=1.0, min_speedup=2.0), pool, task)
    assert advice.recommended is None
    closest = dict(advice.closest)
    # nsa: 100/60 = 1.67x < 2x -> suggest 1.67 * 0.95 = 1.58; sliding_window: 39 points short -> 0.39 * 1.05
    assert closest["nsa"] == "relax --min-speedup 1.58"
    assert closest["sliding_window"] == "relax --quality-tolerance 0.41"
    # one limit to move before two (full misses the speed floor and the memory limit); then the nearest first:
    # nsa's floor 1.2x away, sliding_window's tolerance 7.8x (0.39 / 0.05)
    assert [n for n, _ in advice.closest] == ["nsa", "sliding_window", "full"]


def test_render_shows_quality_and_says_when_it_is_an_extrapolation() -> None:
    from attnkit.cli.advise import advice_as_dict, render

    text = render(decide(Constraints(length=4096), POOL, RECALL))
    assert "measured at length 512" in text and "you asked about length 4096" in text and "extrapolation" in text
    assert "exact attention 99.0%, no-context baseline 7.4%" in text
    nsa = next(line for line in text.splitlines() if line.startswith("* nsa"))
    assert "98.5 ± 1.0%" in nsa
    window = next(line for line in text.splitlines() if line.strip().startswith("sliding_window"))
    assert "quality: mqar 60.0% vs exact 99.0%" in window
    same = render(decide(Constraints(length=512), POOL, RECALL))
    assert "extrapolation" not in same
    doc = advice_as_dict(decide(Constraints(length=4096), POOL, RECALL))
    assert doc["quality"]["extrapolated"] is True and doc["quality"]["exact"] == pytest.approx(0.99)
    rows = {r["mechanism"]: r for r in doc["candidates"]}
    assert rows["linear"]["rejected_for"] == ["quality", "quality"]
    assert rows["performer"]["quality"] is None


def test_a_mechanism_without_a_figure_needs_no_measurement() -> None:
    unmeasured = Candidate("performer", True, "recurrent", False)  # as measure_candidates leaves a skipped one
    advice = decide(Constraints(length=4096, min_speedup=2.0), [cand("full", 100.0), unmeasured], RECALL)
    assert verdict(advice, "performer").reasons == ["no quality figure on mqar (the facts have none); not guessed"]
    notes = TaskFacts("mqar", "accuracy", True, 0.074, 512, RECALL.figures, "your data", {"performer": "raised X"})
    assert verdict(decide(Constraints(length=64), [unmeasured], notes), "performer").reasons == [
        "no quality figure on mqar (raised X); not guessed"
    ]


def test_a_missing_baseline_is_not_checked_and_the_answer_says_so() -> None:
    from attnkit.cli.advise import render

    lost = TaskFacts("mqar", "accuracy", True, None, 512, RECALL.figures, "synthetic")
    advice = decide(Constraints(length=512), [cand("full", 100.0), cand("linear", 10.0)], lost)
    # linear (7.6%) still fails the tolerance, but no baseline reason can be given
    assert verdict(advice, "linear").reasons == ["mqar 7.6% vs exact 99.0%: worse by more than 5 points"]
    assert "no-context baseline not measured by the suite (so no mechanism was checked against it)" in render(advice)


def test_a_speed_difference_within_timing_noise_does_not_beat_a_better_score() -> None:
    # nsa ties full on quality (as above) but is only 100 / 95 = 1.05x faster: under the 1.1x margin, full stays
    close = [cand("full", 100.0), cand("nsa", 95.0)]
    advice = decide(Constraints(length=4096), close, RECALL)
    assert advice.recommended == "full"
    assert "the best-scoring of the 2 tied for it (none is 1.1x faster)" in verdict(advice, "full").reasons[0]
    assert verdict(advice, "nsa").reasons == [
        "ties full on quality within the spread and is only 1.05x faster (< 1.1x: within timing noise), "
        "so full's better score decides"
    ]
    # 100 / 90 = 1.11x clears the margin
    assert decide(Constraints(length=4096), [cand("full", 100.0), cand("nsa", 90.0)], RECALL).recommended == "nsa"


def test_a_speed_floor_uses_the_side_by_side_ratio_when_the_cell_has_one() -> None:
    """Exact attention's own cell (100 ms) says 2.5x; the interleaved rounds of the cell said 1.6x: 1.6x decides."""
    paired = cand("linear", 40.0, speedup=1.6)
    alone = cand("performer", 40.0)
    advice = decide(Constraints(length=1024, min_speedup=2.0), [cand("full", 100.0), paired, alone])
    assert verdict(advice, "linear").reasons == ["1.60x the speed of full < min 2x"]
    assert verdict(advice, "performer").eligible
