"""Efficiency cells: forward and forward+backward time and peak memory at one length.

Protocol: ``B x H x L x D`` fp32 locally correlated inputs, the mechanism's registered
``benchmark_options``, one warm-up step, then timed steps; the median is reported. Peak
memory is that of the warm-up step (see :mod:`attnkit.metrics.memory`: idle pooled buffers
are released first, so the step counts every byte it needs, buffer pool on or off).
One-time costs are paid before a tracked step: the libraries' set-up before the first cell
(:func:`warm_up_libraries`), and each sweep's first measured cell runs one extra untracked
step (a code path's first call in a process allocates once-only buffers: linear
attention's first causal call, 36 MB, which made its 1K cell look larger than its 2K one).
Everything runs in the arena's own process so a cell costs milliseconds of overhead, not
an interpreter start.

Speed-ups are measured side by side (:func:`time_rounds`). A mechanism's cell times its
step interleaved with exact attention's on the same inputs, in rounds of alternating order
(mechanism then exact attention in even rounds, the reverse in odd ones: neither side
always runs second, in the caches and allocator state the other left). Each round gives
one ratio of two steps taken moments apart, so load that lasts a round slows both and
cancels; the speed-up is the median of the per-round ratios (:func:`paired_speedups`),
which also shrugs off a round where a stall hit one side only, and their min-max is its
spread. A ratio of medians would discard the pairing: its two medians can come from
different rounds. Rounds go on until ``repeats`` are done or ``cell_seconds`` are spent
on both sides together (at least one). Exact attention's own cell is timed alone.

A sweep over lengths stops for a mechanism as soon as a step exceeds the time or memory
budget, or is *projected* to exceed it at the next length (power-law fit through the
last two lengths), so a quadratic mechanism never gets the chance to exhaust memory.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attnkit.arena.config import ArenaConfig
from attnkit.core.base import AttentionMechanism
from attnkit.inputs import structured_qkv
from attnkit.metrics.memory import PeakMemoryMeter

#: Version of the measurement protocol (2: memory from the warm-up step, timed steps at full allocator speed;
#: 3: pooled buffers released before the tracked step, one untracked step before a sweep's first cell;
#: 4: timed in alternating-order rounds with exact attention, the load average recorded around each cell).
PROTOCOL = 4

#: A clock in seconds (``time.perf_counter``; tests inject a fake one).
Clock = Callable[[], float]
#: Reads the machine's 1-minute load average, None where the platform has none (tests inject a fake one).
LoadReader = Callable[[], float | None]


def load_average() -> float | None:
    """The 1-minute load average (runnable processes, averaged), or None where the platform has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class Baseline:
    """Exact attention as the other side of every interleaved cell.

    Attributes:
        name: its registered name.
        module: the module, built with its ``benchmark_options``.
        options: those options (part of an interleaved cell's key).
        warm: the ``(length, causal, mode)`` at which it has already stepped in this
            process; elsewhere one untimed step precedes the rounds, so the first round
            does not charge a cold start to exact attention.
    """

    name: str
    module: AttentionMechanism
    options: dict[str, Any]
    warm: set[tuple[int, bool, str]] = field(default_factory=set)


def efficiency_params(
    cfg: ArenaConfig, length: int, causal: bool, mode: str, reference: Baseline | None = None
) -> dict[str, Any]:
    """The parameters that identify an efficiency cell (part of its cache key).

    ``reference`` is the baseline the cell is timed interleaved with (None: timed alone),
    so a cell timed alone and one timed side by side never stand in for each other.
    """
    return {
        "length": length,
        "causal": causal,
        "mode": mode,
        "batch": cfg.batch,
        "heads": cfg.heads,
        "head_dim": cfg.head_dim,
        "dtype": "float32",
        "repeats": cfg.repeats,
        "seed": cfg.seed,
        # bumped when the way a cell is measured changes, so cached cells of the old way are not reused
        "protocol": PROTOCOL,
        "reference": None if reference is None else {"name": reference.name, "options": reference.options},
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def measure_efficiency(
    module: AttentionMechanism,
    cfg: ArenaConfig,
    length: int,
    causal: bool,
    mode: str,
    meter: PeakMemoryMeter,
    *,
    first_use: bool = False,
    reference: Baseline | None = None,
    clock: Clock = time.perf_counter,
) -> dict[str, Any]:
    """Time one (length, causal, mode) cell of ``module``, interleaved with ``reference`` when given.

    Args:
        module: the mechanism, built with its ``benchmark_options``.
        cfg: shapes, repeats and time per cell.
        length: sequence length ``L``.
        causal: causal attention.
        mode: ``"fwd"`` or ``"fwd+bwd"``.
        meter: the peak-memory meter.
        first_use: the first cell of this (mechanism, causal, mode) measured in this
            process: one more untracked step runs first, so once-only allocations are not
            charged to the cell's memory.
        reference: exact attention, stepped on the same inputs in alternating rounds with
            ``module`` (see :func:`time_rounds`); None times ``module`` alone.
        clock: the timer (injected by tests).

    Returns:
        ``{"status": "ok", "median_ms", "times_ms", "peak_mb", "memory_method"}``, plus
        ``"reference"`` (its name) and ``"reference_times_ms"`` (its step in each round,
        aligned with ``times_ms``) when interleaved; or ``{"status": "error", "error":
        message}`` when the mechanism raised (including out of memory).
    """
    backward = mode == "fwd+bwd"
    try:
        q, k, v = structured_qkv(
            cfg.batch, cfg.heads, length, length, cfg.head_dim, seed=cfg.seed, device=cfg.device, requires_grad=backward
        )
        step = _stepper(module.to(cfg.device), q, k, v, causal=causal, backward=backward, device=cfg.device)
        if first_use:
            step()
        if reference is None:
            return _time_alone(step, cfg, meter, clock)
        reference.module.to(cfg.device).train(backward)
        # both sides step on the same tensors: the same inputs, and no second copy in memory
        reference_step = _blamed(
            reference.name, _stepper(reference.module, q, k, v, causal=causal, backward=backward, device=cfg.device)
        )
        if (length, causal, mode) not in reference.warm:
            reference_step()
            reference.warm.add((length, causal, mode))
        peak = _tracked_step(step, meter)
        times, reference_times = time_rounds(
            step, reference_step, repeats=cfg.repeats, seconds=cfg.cell_seconds, clock=clock
        )
        return {
            **_timing_result(times, peak, meter),
            "reference": reference.name,
            "reference_times_ms": [t * 1e3 for t in reference_times],
        }
    except (RuntimeError, ValueError, TypeError, MemoryError) as err:
        return {"status": "error", "error": _one_line(err)}


def _stepper(
    module: AttentionMechanism, q: Tensor, k: Tensor, v: Tensor, *, causal: bool, backward: bool, device: str
) -> Callable[[], None]:
    """One step of ``module`` on ``q, k, v`` (forward, plus backward of a ones gradient), finished on the device."""

    def step() -> None:
        if backward:
            for t in (q, k, v):
                t.grad = None
            out = module(q, k, v, causal=causal)
            out.backward(torch.ones_like(out))
        else:
            with torch.no_grad():
                module(q, k, v, causal=causal)
        _sync(device)

    return step


def _blamed(name: str, step: Callable[[], None]) -> Callable[[], None]:
    """``step``, whose failure names ``name``: an error of the reference must not read as the mechanism's."""

    def run() -> None:
        try:
            step()
        except (RuntimeError, ValueError, TypeError, MemoryError) as err:
            raise RuntimeError(f"{name}, timed alongside as the reference, failed: {_one_line(err)}") from err

    return run


def _tracked_step(step: Callable[[], None], meter: PeakMemoryMeter) -> float | None:
    # The warm-up step (lazy initialisation, kernel selection) is the one whose memory is
    # tracked: tracking changes the allocator's behaviour (see attnkit.metrics.memory), which
    # would skew a timed step, and a separate memory step would cost a third long step.
    with meter.track() as peak:
        step()
    return peak.mb


def _time_alone(step: Callable[[], None], cfg: ArenaConfig, meter: PeakMemoryMeter, clock: Clock) -> dict[str, Any]:
    peak = _tracked_step(step, meter)
    times: list[float] = []
    while len(times) < cfg.repeats and (not times or sum(times) < cfg.cell_seconds):
        start = clock()
        step()
        times.append(clock() - start)
    return _timing_result(times, peak, meter)


def _timing_result(times: list[float], peak_mb: float | None, meter: PeakMemoryMeter) -> dict[str, Any]:
    return {
        "status": "ok",
        "median_ms": statistics.median(times) * 1e3,
        "times_ms": [t * 1e3 for t in times],
        "peak_mb": peak_mb,
        "memory_method": meter.method,
    }


def time_rounds(
    step: Callable[[], None],
    reference_step: Callable[[], None],
    *,
    repeats: int,
    seconds: float,
    clock: Clock = time.perf_counter,
) -> tuple[list[float], list[float]]:
    """Time ``step`` and ``reference_step`` side by side, one step of each per round.

    Round ``r`` runs ``step`` then ``reference_step`` when ``r`` is even, the reverse when
    it is odd. Rounds go on until ``repeats`` are done or both sides together have spent
    ``seconds`` (at least one round runs).

    Returns:
        ``(times, reference_times)`` in seconds, one entry per round each, in round order.
    """
    times: list[float] = []
    reference_times: list[float] = []
    while len(times) < repeats and (not times or sum(times) + sum(reference_times) < seconds):
        sides = [(step, times), (reference_step, reference_times)]
        for run, out in sides if len(times) % 2 == 0 else sides[::-1]:
            start = clock()
            run()
            out.append(clock() - start)
    return times, reference_times


def paired_speedups(times_ms: list[float], reference_times_ms: list[float]) -> dict[str, Any]:
    """The speed-up over the reference from steps timed in rounds (see :func:`time_rounds`).

    Args:
        times_ms: the mechanism's step in each round.
        reference_times_ms: the reference's step in the same rounds.

    Returns:
        ``{"round_speedups": [reference / mechanism per round], "median", "min", "max",
        "rounds"}``: the speed-up is the median of the per-round ratios (> 1 = faster than
        the reference), min and max their spread.

    Raises:
        ValueError: the two lists differ in length, are empty, or hold a non-positive time.
    """
    if len(times_ms) != len(reference_times_ms) or not times_ms:
        raise ValueError(
            f"times_ms and reference_times_ms must hold one time per round each, got {len(times_ms)} and "
            f"{len(reference_times_ms)} (pass the lists time_rounds returned)"
        )
    if min(times_ms) <= 0 or min(reference_times_ms) <= 0:
        raise ValueError("step times must be positive (a clock that does not advance cannot time a step)")
    ratios = [ref / own for own, ref in zip(times_ms, reference_times_ms)]
    return {
        "round_speedups": ratios,
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "rounds": len(ratios),
    }


def warm_up_libraries(cfg: ArenaConfig) -> None:
    """One small exact forward+backward before any cell, so the math libraries' one-time
    buffers and thread pools are not charged to the first cell's memory."""
    q, k, v = structured_qkv(1, cfg.heads, 256, 256, cfg.head_dim, seed=cfg.seed, device=cfg.device, requires_grad=True)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out.sum().backward()
    _sync(cfg.device)


@contextlib.contextmanager
def thread_count(threads: int | None) -> Iterator[int]:
    """Run the block on ``threads`` intra-op CPU threads (None: leave PyTorch's setting); yields the count in force.

    The previous setting is restored on exit, so a library caller's process is left as it was.
    """
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def project(points: list[tuple[int, float]], length: int, *, low: float = 1.0, high: float = 2.2) -> float | None:
    """Extrapolate ``value(length)`` from measured ``(length, value)`` points.

    Fits a power law through the last two points (exponent clamped to ``[low, high]``);
    with a single point it assumes the quadratic worst case. Returns None without points.
    """
    pts = sorted(p for p in points if p[1] is not None and p[1] > 0)
    if not pts:
        return None
    last_len, last_val = pts[-1]
    exponent = 2.0
    if len(pts) >= 2:
        prev_len, prev_val = pts[-2]
        exponent = math.log(last_val / prev_val) / math.log(last_len / prev_len)
    exponent = min(max(exponent, low), high)
    return last_val * (length / last_len) ** exponent


def budget_stop(cfg: ArenaConfig, mode: str, done: list[dict[str, Any]], next_length: int) -> str | None:
    """Why a sweep must stop before ``next_length`` (None = go on).

    Args:
        cfg: budgets (``step_budget_s``, ``memory_budget_gb``).
        mode: ``"fwd"`` or ``"fwd+bwd"``.
        done: the sweep's earlier results (dicts with ``length``, ``status``,
            ``median_ms``, ``peak_mb``), ascending in length.
        next_length: the length about to be measured.
    """
    if not done:
        return None
    last = done[-1]
    if last["status"] == "stopped":
        return str(last["reason"])
    if last["status"] != "ok":
        return f"stopped after an error at length {last['length']}"
    budget_ms = cfg.step_budget_s * 1e3
    budget_mb = cfg.memory_budget_gb * 1024
    if last["median_ms"] > budget_ms:
        return f"{mode} step took {last['median_ms'] / 1e3:.1f} s at length {last['length']} > budget {cfg.step_budget_s:g} s"
    if last["peak_mb"] is not None and last["peak_mb"] > budget_mb:
        return f"peak memory {last['peak_mb'] / 1024:.1f} GB at length {last['length']} > budget {cfg.memory_budget_gb:g} GB"
    ok = [r for r in done if r["status"] == "ok"]
    t_next = project([(r["length"], r["median_ms"]) for r in ok], next_length)
    if t_next is not None and t_next > budget_ms:
        return f"projected {mode} step {t_next / 1e3:.1f} s at length {next_length} > budget {cfg.step_budget_s:g} s"
    m_next = project([(r["length"], r["peak_mb"]) for r in ok], next_length, high=2.0)
    if m_next is not None and m_next > budget_mb:
        return (
            f"projected peak memory {m_next / 1024:.1f} GB at length {next_length} > budget {cfg.memory_budget_gb:g} GB"
        )
    return None
