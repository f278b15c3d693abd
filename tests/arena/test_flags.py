"""Flags on noisy cells and impossible length curves, on synthetic timings."""

from __future__ import annotations

from typing import Any

import pytest

from attnkit.arena.flags import (
    FALL_RATIO,
    JUMP_EXPONENT,
    NOISY_RATIO,
    efficiency_flags,
    falling_points,
    jumping_points,
    repeat_spread,
)


def cell(
    length: int,
    ms: float,
    *,
    times: list[float] | None = None,
    mb: float | None = 10.0,
    name: str = "sinkhorn",
    causal: bool = False,
    mode: str = "fwd",
    status: str = "ok",
) -> dict[str, Any]:
    return {
        "mechanism": name,
        "length": length,
        "causal": causal,
        "mode": mode,
        "status": status,
        "median_ms": ms,
        "times_ms": times if times is not None else [ms],
        "peak_mb": mb,
    }


def kinds(flags: list[dict[str, Any]]) -> dict[str, list[int]]:
    return {f["kind"]: f["lengths"] for f in flags}


def test_thresholds_are_the_documented_ones() -> None:
    assert (NOISY_RATIO, FALL_RATIO, JUMP_EXPONENT) == (1.5, 1.25, 3.0)


def test_repeat_spread() -> None:
    assert repeat_spread([10.0, 12.0, 30.0]) == pytest.approx(3.0)
    assert repeat_spread([10.0]) is None  # one repeat: nothing to compare
    assert repeat_spread([]) is None


def test_a_cell_whose_repeats_disagree_is_noisy() -> None:
    rows = [
        cell(1024, 20.0, times=[20.0, 21.0, 19.0]),  # 1.1x: a quiet machine
        cell(2048, 45.0, times=[40.0, 45.0, 88.0]),  # 2.2x: one repeat stalled
        cell(4096, 95.0, times=[95.0]),  # one repeat cannot be judged
        cell(8192, 190.0, times=[150.0, 190.0, 224.0]),  # 1.49x: just inside
    ]
    flags = efficiency_flags(rows)
    assert kinds(flags) == {"noisy": [2048]}
    assert flags[0]["message"] == "slowest/fastest repeat 2.2x at 2K"
    assert [r["flags"] for r in rows] == [[], ["noisy"], [], []]


def test_time_falling_with_length_flags_the_shorter_cells() -> None:
    # the Sinkhorn sweep: 164 ms at 1K, 85 ms at 8K
    rows = [cell(1024, 164.0), cell(2048, 120.0), cell(4096, 100.0), cell(8192, 85.0)]
    flags = efficiency_flags(rows)
    assert kinds(flags) == {"time_falls": [1024, 2048]}  # 100 ms vs 85: within 1.25x, noise
    message = flags[0]["message"]
    assert "164.0 ms at 1K" in message and "120.0 ms at 2K" in message and "85.0 ms at 8K" in message
    assert (flags[0]["mechanism"], flags[0]["causal"], flags[0]["mode"]) == ("sinkhorn", False, "fwd")


def test_time_jumping_beyond_any_mechanisms_complexity_flags_the_longer_cell() -> None:
    # the linear sweep: 10.5 ms at 1K, then 510 ms at 2K
    rows = [cell(1024, 10.5, name="linear"), cell(2048, 510.0, name="linear"), cell(4096, 1000.0, name="linear")]
    flags = efficiency_flags(rows)
    assert kinds(flags) == {"time_jumps": [2048]}
    assert "10.5 ms at 1K -> 510.0 ms at 2K" in flags[0]["message"]


def test_plausible_curves_are_not_flagged() -> None:
    quadratic = [cell(n, 10.0 * (n / 1024) ** 2, name="full") for n in (1024, 2048, 4096, 8192)]
    flat = [cell(n, ms, name="linear") for n, ms in ((512, 10.0), (1024, 9.0), (2048, 11.0))]  # overhead-bound
    steep = [cell(1024, 10.0, name="topk"), cell(2048, 10.0 * 2**2.9, name="topk")]  # quadratic + cache effects
    assert efficiency_flags(quadratic + flat + steep) == []


def test_memory_falling_with_length_is_flagged_beyond_measurement_granularity() -> None:
    rows = [
        cell(n, ms, mb=mb, name="full") for n, ms, mb in ((1024, 10.0, 54.0), (2048, 30.0, 39.0), (4096, 90.0, 67.0))
    ]
    flags = efficiency_flags(rows)
    assert kinds(flags) == {"memory_falls": [1024]}
    assert "54 MB at 1K > 39 MB at 2K" in flags[0]["message"]
    small = [cell(64, 1.0, mb=3.0), cell(128, 2.0, mb=1.5)]  # 2x, but only 1.5 MB: page granularity
    assert efficiency_flags(small) == []


def test_sweeps_are_judged_separately_and_only_ok_cells_count() -> None:
    rows = [
        cell(1024, 100.0, causal=False),
        cell(2048, 20.0, causal=True),  # another sweep: no contradiction with the bidirectional 1K cell
        cell(2048, 20.0, mode="fwd+bwd"),
        cell(4096, 1.0, status="error"),  # an error row has no meaningful time
    ]
    assert efficiency_flags(rows) == []
    assert all(r["flags"] == [] for r in rows)


def test_falling_and_jumping_points_directly() -> None:
    # each shorter length is paired with the longer length of the smallest value
    assert falling_points([(1, 10.0), (2, 5.0), (3, 3.0)], ratio=1.25) == [(1, 3), (2, 3)]
    assert falling_points([(1, 10.0), (2, 9.0)], ratio=1.25) == []
    assert falling_points([(1, 3.0), (2, 1.0)], ratio=1.25, slack=2.0) == []  # 3x, but within the slack
    assert jumping_points([(1, 1.0), (2, 8.1), (4, 16.0)], exponent=3.0) == [(1, 2)]
    assert jumping_points([(1, 1.0), (2, 8.0)], exponent=3.0) == []  # exactly L^3 is not beyond it
