"""The advisor's constraint logic on synthetic facts, and one real measurement round."""

from __future__ import annotations

from pathlib import Path

import pytest

from attnkit.arena import ArenaConfig, Candidate, Constraints, decide, measure_candidates
from attnkit.arena.advisor import advisor_config


def cand(
    name: str,
    time_ms: float | None,
    *,
    peak_mb: float = 100.0,
    error: float = 0.0,
    causal: bool = True,
    decoding: str | None = "kv_cache",
) -> Candidate:
    return Candidate(name, causal, decoding, error == 0.0, time_ms=time_ms, peak_mb=peak_mb, error=error)


POOL = [
    cand("full", 100.0, peak_mb=4000.0, error=0.0),
    cand("sliding_window", 30.0, peak_mb=500.0, error=0.08),
    cand("linear", 10.0, peak_mb=200.0, error=0.40, decoding="recurrent"),
    cand("linformer", 8.0, peak_mb=150.0, error=0.20, causal=False, decoding=None),
]


def verdict(advice, name):  # type: ignore[no-untyped-def]
    return next(v for v in advice.verdicts if v.candidate.name == name)


def test_without_limits_the_fastest_wins() -> None:
    advice = decide(Constraints(length=4096), POOL)
    assert advice.recommended == "linformer"
    assert advice.verdicts[0].candidate.name == "linformer"
    assert verdict(advice, "linear").reasons == [
        "meets the constraints, but linformer is 1.25x faster"
    ]  # a speed-up: >1 = faster


def test_the_table_shows_labelled_speedups_and_memory_in_mb() -> None:
    from attnkit.cli.advise import advice_as_dict, render

    advice = decide(Constraints(length=4096), POOL)
    text = render(advice)
    header = next(line for line in text.splitlines() if line.startswith("mechanism"))
    assert "speed-up vs full (>1 = faster)" in header and "peak MB" in header
    linear = next(line for line in text.splitlines() if line.strip().startswith("linear "))
    assert "10.00x" in linear and " 200 " in linear  # 100 ms / 10 ms; 200 MB
    rows = {r["mechanism"]: r for r in advice_as_dict(advice)["candidates"]}
    assert rows["linformer"]["speedup_vs_full"] == pytest.approx(100.0 / 8.0)
    assert rows["full"]["speedup_vs_full"] == pytest.approx(1.0)


def test_causal_filters_by_capability() -> None:
    advice = decide(Constraints(length=4096, causal=True), POOL)
    assert advice.recommended == "linear"
    assert verdict(advice, "linformer").reasons == ["no causal mode"]
    assert not verdict(advice, "linformer").eligible
    unmeasured = Candidate("linformer", False, None, False)  # as measure_candidates leaves it
    assert decide(Constraints(length=4096, causal=True, max_error=0.1), [unmeasured]).verdicts[0].reasons == [
        "no causal mode"
    ]


def test_error_budget_moves_the_choice_to_more_exact_mechanisms() -> None:
    assert decide(Constraints(length=4096, max_error=0.1), POOL).recommended == "sliding_window"
    tight = decide(Constraints(length=4096, max_error=0.01), POOL)
    assert tight.recommended == "full"
    assert verdict(tight, "linear").reasons == ["error 0.4 > max 0.01"]


def test_memory_limit() -> None:
    advice = decide(Constraints(length=4096, max_error=0.01, memory_gb=1.0), POOL)
    assert advice.recommended is None
    assert verdict(advice, "full").reasons == ["needs 3.91 GB > 1 GB"]


def test_unsatisfiable_names_the_closest_options_and_what_to_relax() -> None:
    advice = decide(Constraints(length=4096, causal=True, max_error=0.01, memory_gb=1.0), POOL)
    assert advice.recommended is None
    names = [n for n, _ in advice.closest]
    # full misses only the memory limit (3.9x over), sliding_window only the error limit (8x over)
    assert names[:2] == ["full", "sliding_window"]
    assert "--max-error 0.084" in dict(advice.closest)["sliding_window"]
    assert "--memory-gb" in dict(advice.closest)["full"]
    assert "linformer" not in names  # fails a capability, relaxing numbers cannot help


def test_decode_requires_a_decoding_state() -> None:
    advice = decide(Constraints(length=512, causal=True, decode=True), POOL)
    assert verdict(advice, "linformer").reasons == ["no causal mode", "no incremental decoding state"]
    assert advice.recommended == "linear"


def test_unknown_measurements_are_reasons_not_crashes() -> None:
    pool = [cand("full", None, error=0.0), Candidate("odd", True, None, False, time_ms=5.0, error=None, note="boom")]
    advice = decide(Constraints(length=1024, max_error=0.1), pool)
    assert advice.recommended is None
    assert "could not run at length 1024" in verdict(advice, "full").reasons[0]
    assert verdict(advice, "odd").reasons == ["error unknown (boom)"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"length": 0}, "length must be a positive integer"), ({"length": 8, "max_error": -1}, "max_error")],
)
def test_constraints_validate(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Constraints(**kwargs)


def test_ladder_ends_at_the_requested_length() -> None:
    assert advisor_config(Constraints(length=3000)).lengths == (1024, 2048, 3000)
    assert advisor_config(Constraints(length=65536)).lengths == (1024, 2048, 4096, 8192, 65536)
    assert advisor_config(Constraints(length=100)).lengths == (100,)


def test_measure_candidates_reuses_cached_cells(tmp_path: Path, toy_mechanism: str, tiny_config: ArenaConfig) -> None:
    config = tiny_config.with_(lengths=(128,))
    constraints = Constraints(length=128)
    first = measure_candidates(
        constraints, cache_dir=tmp_path, config=config, mechanisms=["full", toy_mechanism], progress=False
    )
    assert [c.source for c in first] == ["measured", "measured"]
    assert first[0].error is not None and first[0].error < 1e-5
    assert first[1].error is not None and first[1].error > 1e-3  # the toy is approximate
    again = measure_candidates(
        constraints, cache_dir=tmp_path, config=config, mechanisms=["full", toy_mechanism], progress=False
    )
    assert [c.source for c in again] == ["cached", "cached"]
    assert again[0].time_ms == first[0].time_ms
    causal = measure_candidates(
        Constraints(length=128, causal=True),
        cache_dir=tmp_path,
        config=config,
        mechanisms=["full", toy_mechanism],
        progress=False,
    )
    assert causal[1].time_ms is None  # no causal mode: not measured at all
    assert decide(Constraints(length=128, causal=True), causal).recommended == "full"


def test_a_noisy_cell_behind_a_number_is_flagged(tmp_path: Path, tiny_config: ArenaConfig) -> None:
    import json

    from attnkit.cli.advise import render

    config = tiny_config.with_(lengths=(128,))
    (first,) = measure_candidates(
        Constraints(length=128), cache_dir=tmp_path, config=config, mechanisms=["full"], progress=False
    )
    assert "flagged" not in first.source  # one timed repeat: nothing to judge
    (path,) = [p for p in (tmp_path / "cells" / "efficiency" / "full").glob("*.json") if '"fwd+bwd"' in p.read_text()]
    stored = json.loads(path.read_text())
    stored["result"]["times_ms"] = [1.0, 2.0, 9.0]  # as if a stall hit the last repeat
    path.write_text(json.dumps(stored))
    (again,) = measure_candidates(
        Constraints(length=128), cache_dir=tmp_path, config=config, mechanisms=["full"], progress=False
    )
    assert again.source == "cached, flagged: noisy"
    text = render(decide(Constraints(length=128), [again]))
    assert "(cached, flagged: noisy)" in text and "--threads 1 --repeats 5 --no-resume" in text
