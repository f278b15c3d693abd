"""Load-robust speed-ups: cells timed in rounds with exact attention, their spread, and the busy-machine warning.

Timings here come from a virtual machine (a fake clock that steps advance), so every
expected number is computed by hand from the steps' known costs.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from torch import Tensor

import attnkit
from attnkit.arena import ArenaConfig, ArenaRun, assemble, run_arena
from attnkit.arena.cells import CellCache, cell_key, machine_fingerprint
from attnkit.arena.efficiency import (
    Baseline,
    efficiency_params,
    measure_efficiency,
    paired_speedups,
    time_rounds,
    usable_cores,
)
from attnkit.arena.report import leaderboard_table, legend, terminal_summary, write_report
from attnkit.arena.results import load_warning
from attnkit.arena.runner import make_baseline, reference_at
from attnkit.metrics.memory import PeakMemoryMeter


class VirtualMachine:
    """A clock, and steps that advance it: ``work`` units at rate 1, or ``1 / slowdown`` during a spike.

    The spike is a window of virtual time ``[spike_start, spike_end)`` in which another process
    takes the core: a step running across its edge is slowed for the part inside it.
    """

    def __init__(self, spike: tuple[float, float] = (0.0, 0.0), slowdown: float = 1.0) -> None:
        self.now = 0.0
        self.spike_start, self.spike_end = spike
        self.slowdown = slowdown
        self.log: list[str] = []

    def clock(self) -> float:
        return self.now

    def _advance(self, work: float) -> None:
        while work > 1e-12:
            if self.spike_start <= self.now < self.spike_end:
                rate, span = 1.0 / self.slowdown, self.spike_end - self.now
            elif self.now < self.spike_start:
                rate, span = 1.0, self.spike_start - self.now
            else:
                rate, span = 1.0, float("inf")
            done = min(work, span * rate)
            self.now += done / rate
            work -= done

    def step(self, label: str, costs: list[float]) -> Callable[[], None]:
        """A step whose ``i``-th call costs ``costs[i]`` units of work (the last cost repeats)."""
        calls = iter(range(10**6))

        def run() -> None:
            i = next(calls)
            self.log.append(label)
            self._advance(costs[min(i, len(costs) - 1)])

        return run


def test_rounds_alternate_order_and_ratios_are_the_hand_computed_ones() -> None:
    vm = VirtualMachine()
    mech = vm.step("mech", [10.0, 12.0, 11.0])
    full = vm.step("full", [30.0, 60.0, 33.0])
    times, ref_times = time_rounds(mech, full, repeats=3, seconds=1e9, clock=vm.clock)
    # round 0: mechanism first; round 1: exact attention first; round 2: mechanism first
    assert vm.log == ["mech", "full", "full", "mech", "mech", "full"]
    assert times == [10.0, 12.0, 11.0] and ref_times == [30.0, 60.0, 33.0]
    paired = paired_speedups(times, ref_times)
    assert paired["round_speedups"] == pytest.approx([3.0, 5.0, 3.0])
    assert paired["median"] == pytest.approx(3.0)
    assert (paired["min"], paired["max"], paired["rounds"]) == (pytest.approx(3.0), pytest.approx(5.0), 3)


def test_rounds_stop_once_both_sides_spent_the_cell_time_but_never_before_one() -> None:
    vm = VirtualMachine()
    # each round costs 1 + 2 = 3 units: after round 1, 3 < 5 spent; after round 2, 6 >= 5: stop
    times, ref_times = time_rounds(vm.step("m", [1.0]), vm.step("f", [2.0]), repeats=10, seconds=5.0, clock=vm.clock)
    assert (len(times), len(ref_times)) == (2, 2)
    vm = VirtualMachine()
    times, _ = time_rounds(vm.step("m", [1.0]), vm.step("f", [2.0]), repeats=10, seconds=1e-9, clock=vm.clock)
    assert len(times) == 1
    vm = VirtualMachine()
    times, _ = time_rounds(vm.step("m", [1.0]), vm.step("f", [2.0]), repeats=4, seconds=1e9, clock=vm.clock)
    assert len(times) == 4


def test_paired_speedups_refuse_mismatched_rounds() -> None:
    with pytest.raises(ValueError, match="one time per round"):
        paired_speedups([1.0, 2.0], [3.0])
    with pytest.raises(ValueError, match="positive"):
        paired_speedups([0.0], [3.0])


def test_a_load_spike_moves_the_interleaved_speedup_far_less_than_separate_cells() -> None:
    # Exact attention costs 4 units a step, the mechanism 1: the true speed-up is 4.
    # A spike slows the machine 3x for 36 units of time, as long as exact attention's own
    # 3-step cell takes under it.
    true_speedup, spike, slowdown = 4.0, (0.0, 36.0), 3.0

    # Separate cells (the old protocol): exact attention's cell runs inside the spike, the
    # mechanism's right after it; the speed-up is the ratio of the two cells' medians.
    vm = VirtualMachine(spike, slowdown)
    full, mech = vm.step("full", [4.0]), vm.step("mech", [1.0])
    full_times = []
    for _ in range(3):
        start = vm.clock()
        full()
        full_times.append(vm.clock() - start)
    mech_times = []
    for _ in range(3):
        start = vm.clock()
        mech()
        mech_times.append(vm.clock() - start)
    separate = statistics.median(full_times) / statistics.median(mech_times)

    # Interleaved rounds under the same spike: rounds 0-1 run wholly inside it (both sides
    # 3x slower), round 2's exact-attention step straddles its end, rounds 3-4 run after it.
    vm = VirtualMachine(spike, slowdown)
    times, ref_times = time_rounds(
        vm.step("mech", [1.0]), vm.step("full", [4.0]), repeats=5, seconds=1e9, clock=vm.clock
    )
    paired = paired_speedups(times, ref_times)
    # by hand: round times (mech, full) = (3, 12), (3, 12), (3, 6), (1, 4), (1, 4)
    assert times == pytest.approx([3.0, 3.0, 3.0, 1.0, 1.0]) and ref_times == pytest.approx([12.0, 12.0, 6.0, 4.0, 4.0])
    assert paired["round_speedups"] == pytest.approx([4.0, 4.0, 2.0, 4.0, 4.0])

    # separate cells: 12.00x (3x off); interleaved: 4.00x, exact (spread 2.00-4.00 shows the straddling round)
    assert separate == pytest.approx(12.0), f"separate cells: {separate:.2f}x, true {true_speedup}x"
    assert paired["median"] == pytest.approx(true_speedup), f"interleaved: {paired['median']:.2f}x"
    assert (paired["min"], paired["max"]) == (pytest.approx(2.0), pytest.approx(4.0))
    # a ratio of the rounds' medians would have lost the pairing: median 6 over median 3 = 2.00x
    assert statistics.median(ref_times) / statistics.median(times) == pytest.approx(2.0)


def _row(name: str, length: int, causal: bool, mode: str, before: float | None, after: float | None) -> dict:
    return {"mechanism": name, "length": length, "causal": causal, "mode": mode, "status": "ok"} | {
        "load_before": before,
        "load_after": after,
    }


def test_busy_warning_exactly_when_a_recorded_load_exceeds_the_core_count() -> None:
    rows = [
        _row("full", 1024, False, "fwd", 2.0, 2.0),  # equal to the core count: not busy
        _row("lsh", 1024, False, "fwd", 1.0, 2.01),  # above it after the cell
        _row("lsh", 2048, True, "fwd+bwd", 3.5, 0.5),  # above it before the cell
        _row("linear", 1024, False, "fwd", None, None),  # not recorded (platform without a load average)
    ]
    warning = load_warning(rows, cores=2)
    assert warning is not None and warning["cores"] == 2
    assert [(c["mechanism"], c["length"], c["causal"], c["load"]) for c in warning["cells"]] == [
        ("lsh", 1024, False, 2.01),
        ("lsh", 2048, True, 3.5),
    ]
    assert [r["busy"] for r in rows] == [False, True, True, None]
    assert "2 of 3 efficiency cells" in warning["message"] and "above its 2 cores" in warning["message"]
    assert "lsh fwd at 1K; lsh causal fwd+bwd at 2K" in warning["message"]
    assert load_warning(rows[:1] + rows[3:], cores=2) is None


def test_the_run_records_load_around_each_cell_and_warns_about_the_busy_one(
    tmp_path: Path, tiny_config: ArenaConfig
) -> None:
    cores = usable_cores()
    calls: list[int] = []

    def read_load() -> float:
        # calls: 0 = run start, then (before, after) per efficiency cell, last = run end.
        # Cells in order: fwd, causal fwd, fwd+bwd, causal fwd+bwd; call 3 is the second cell's "before".
        calls.append(len(calls))
        return cores + 0.5 if len(calls) - 1 == 3 else float(cores)

    config = tiny_config.with_(mechanisms=("full",), lengths=(64,))
    run = run_arena(config, tmp_path, progress=False, stages=("efficiency",), read_load=read_load)
    assert len(calls) == 1 + 2 * 4 + 1
    doc = assemble(run)
    rows = doc["efficiency"]
    assert [(r["load_before"], r["load_after"]) for r in rows][1] == (cores + 0.5, cores)
    assert [r["busy"] for r in rows] == [False, True, False, False]
    warning = doc["load_warning"]
    assert [(c["mechanism"], c["causal"], c["mode"], c["length"]) for c in warning["cells"]] == [
        ("full", True, "fwd", 64)
    ]
    assert "full causal fwd at 64" in warning["message"]
    write_report(doc, tmp_path)
    assert f"WARNING: {warning['message']}" in (tmp_path / "report.md").read_text()
    assert f"WARNING: {warning['message']}" in terminal_summary(doc)

    quiet = assemble(
        run_arena(config, tmp_path / "quiet", progress=False, stages=("efficiency",), read_load=lambda: 0.1)
    )
    assert quiet["load_warning"] is None and "WARNING" not in terminal_summary(quiet)


def test_mechanism_cells_are_timed_in_rounds_with_exact_attention(
    tmp_path: Path, toy_mechanism: str, tiny_config: ArenaConfig
) -> None:
    config = tiny_config.with_(mechanisms=(toy_mechanism,), repeats=3, cell_seconds=10.0)
    doc = assemble(run_arena(config, tmp_path, progress=False, stages=("efficiency",)))
    for r in doc["efficiency"]:
        assert r["status"] == "ok", r
        if r["mechanism"] == "full":
            assert "reference_times_ms" not in r and r["speedup_method"] == "self"
            continue
        assert r["reference"] == "full" and len(r["reference_times_ms"]) == len(r["times_ms"]) == 3
        ratios = [ref / own for own, ref in zip(r["times_ms"], r["reference_times_ms"])]
        assert r["speedup_method"] == "interleaved" and r["speedup_rounds"] == 3
        assert r["speedup_vs_full"] == pytest.approx(sorted(ratios)[1])
        assert r["speedup_spread"] == pytest.approx([min(ratios), max(ratios)])
    (toy,) = [r for r in doc["leaderboard"] if r["mechanism"] == toy_mechanism]
    low, high = toy["speedup_vs_full_spread"]
    # "?" marks a noisy cell (steps of a few ms on a shared machine can be)
    shown = rf"{toy['speedup_vs_full']:.2f}x\?? \({low:.2f}-{high:.2f}\)"
    assert re.search(shown, leaderboard_table(doc)), shown


def test_cells_of_the_old_protocol_and_cells_timed_alone_are_not_reused(
    tmp_path: Path, toy_mechanism: str, tiny_config: ArenaConfig
) -> None:
    config = tiny_config.with_(mechanisms=(toy_mechanism,), lengths=(64,))
    machine = machine_fingerprint(config.device)
    interleaved = efficiency_params(config, 64, False, "fwd", reference_at_full())
    alone = efficiency_params(config, 64, False, "fwd")
    assert alone["protocol"] == interleaved["protocol"] == 4
    assert interleaved["reference"]["name"] == "full" and alone["reference"] is None
    # what protocol 3 stored for the same cell: no reference, protocol 3
    old = {k: v for k, v in alone.items() if k != "reference"} | {"protocol": 3, "machine": machine}
    cache = CellCache(tmp_path)
    fake = {"status": "ok", "median_ms": 123456.0, "times_ms": [123456.0], "peak_mb": 1.0}
    cache.put(cell_key("efficiency", toy_mechanism, {"block": 8}, old), fake)
    cache.put(cell_key("efficiency", toy_mechanism, {"block": 8}, {**alone, "machine": machine}), fake)
    run = run_arena(config, tmp_path, progress=False, stages=("efficiency",))
    toy_rows = [r for r in run.efficiency if r["mechanism"] == toy_mechanism]
    assert toy_rows and all(not r["cached"] and r["median_ms"] != 123456.0 for r in toy_rows)
    assert run.cache_hits == 0


def reference_at_full() -> Baseline | None:
    """Exact attention as the reference of a cell whose own exact-attention cell ran."""
    baseline = make_baseline(attnkit.build_attention("full"))
    assert reference_at(baseline, {"status": "stopped"}) is None  # past its budget: timed alone
    assert reference_at(baseline, {"status": "error"}) is None
    return reference_at(baseline, {"status": "ok"})


def test_the_report_shows_the_spread_and_one_round_cells(tmp_path: Path) -> None:
    config = ArenaConfig.preset("default", mechanisms=("linear",), lengths=(1024, 2048), tasks=())
    rows = [
        {"mechanism": "full", "length": n, "causal": False, "mode": "fwd+bwd", "status": "ok"}
        | {"median_ms": ms, "times_ms": [ms], "peak_mb": 40.0}
        for n, ms in ((1024, 100.0), (2048, 400.0))
    ]
    rows += [
        {"mechanism": "linear", "length": 1024, "causal": False, "mode": "fwd+bwd", "status": "ok"}
        | {"median_ms": 25.0, "times_ms": [20.0, 25.0, 25.0], "reference_times_ms": [60.0, 100.0, 100.0]}
        | {"peak_mb": 10.0},
        {"mechanism": "linear", "length": 2048, "causal": False, "mode": "fwd+bwd", "status": "ok"}
        | {"median_ms": 50.0, "times_ms": [50.0], "reference_times_ms": [300.0], "peak_mb": 20.0},
    ]
    doc = assemble(ArenaRun(config, ["full", "linear"], efficiency=rows, threads=1, cores=2))
    short = next(r for r in doc["efficiency"] if r["mechanism"] == "linear" and r["length"] == 1024)
    # per-round ratios 60/20, 100/25, 100/25 = 3, 4, 4: median 4, spread 3-4
    assert short["speedup_vs_full"] == pytest.approx(4.0) and short["speedup_spread"] == pytest.approx([3.0, 4.0])
    (linear,) = [r for r in doc["leaderboard"] if r["mechanism"] == "linear"]
    assert linear["speedup_vs_full"] == pytest.approx(6.0)  # 300 / 50 in its one round, not 400 / 50
    assert "6.00x (1 round)" in leaderboard_table(doc)
    write_report(doc, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "25.0 ms · 4.00x (3.00-4.00) · 10 MB" in report and "50.0 ms · 6.00x (1 round) · 20 MB" in report
    assert "the median of the per-round ratios" in report and "the median of the per-round ratios" in legend(doc)

    # cells measured before interleaving (no reference times) divide medians of separate cells, and say so
    for r in rows:
        r.pop("reference_times_ms", None)
    old = assemble(ArenaRun(config, ["full", "linear"], efficiency=rows, threads=1, cores=2))
    assert "Speed-ups divide medians from separate cells" in legend(old) and "per-round" not in legend(old)
    assert "8.00x" in leaderboard_table(old) and "(1 round)" not in leaderboard_table(old)  # 400 / 50


def test_a_failing_reference_is_named_in_the_error_not_blamed_on_the_mechanism(
    tiny_config: ArenaConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(*args: Any, **kwargs: Any) -> Tensor:
        raise RuntimeError("out of memory (simulated)")

    broken = attnkit.build_attention("full")
    monkeypatch.setattr(broken, "forward", out_of_memory)  # exact attention failing, as out of memory
    module = attnkit.build_attention("full")
    reference = Baseline("full", broken, {})
    row = measure_efficiency(module, tiny_config, 64, False, "fwd", PeakMemoryMeter("cpu"), reference=reference)
    assert row["status"] == "error"
    assert row["error"].startswith("RuntimeError: full, timed alongside as the reference, failed: RuntimeError: out")
