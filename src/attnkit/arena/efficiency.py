"""Efficiency cells: forward and forward+backward time and peak memory at one length.

Protocol: ``B x H x L x D`` fp32 locally correlated inputs, the mechanism's registered
``benchmark_options``, one warm-up step, then timed repeats until ``repeats`` are done
or ``cell_seconds`` are spent (at least one); the median is reported. Peak memory is
that of the warm-up step (see :mod:`attnkit.metrics.memory`: idle pooled buffers are
released first, so the step counts every byte it needs, buffer pool on or off). One-time
costs are paid before a tracked step: the libraries' set-up before the first cell
(:func:`warm_up_libraries`), and each sweep's first measured cell runs one extra untracked
step (a code path's first call in a process allocates once-only buffers: linear
attention's first causal call, 36 MB, which made its 1K cell look larger than its 2K one).
Everything runs in the arena's own process so a cell costs milliseconds of overhead, not
an interpreter start.

A sweep over lengths stops for a mechanism as soon as a step exceeds the time or memory
budget, or is *projected* to exceed it at the next length (power-law fit through the
last two lengths), so a quadratic mechanism never gets the chance to exhaust memory.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from attnkit.arena.config import ArenaConfig
from attnkit.core.base import AttentionMechanism
from attnkit.inputs import structured_qkv
from attnkit.metrics.memory import PeakMemoryMeter

#: Version of the measurement protocol (2: memory from the warm-up step, timed steps at full allocator speed;
#: 3: pooled buffers released before the tracked step, one untracked step before a sweep's first cell).
PROTOCOL = 3


def efficiency_params(cfg: ArenaConfig, length: int, causal: bool, mode: str) -> dict[str, Any]:
    """The parameters that identify an efficiency cell (part of its cache key)."""
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
) -> dict[str, Any]:
    """Time one (length, causal, mode) cell of ``module``.

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

    Returns:
        ``{"status": "ok", "median_ms", "times_ms", "peak_mb", "memory_method"}``, or
        ``{"status": "error", "error": message}`` when the mechanism raised (including
        out of memory).
    """
    backward = mode == "fwd+bwd"
    try:
        q, k, v = structured_qkv(
            cfg.batch, cfg.heads, length, length, cfg.head_dim, seed=cfg.seed, device=cfg.device, requires_grad=backward
        )
        module = module.to(cfg.device)

        def step() -> None:
            if backward:
                for t in (q, k, v):
                    t.grad = None
                out = module(q, k, v, causal=causal)
                out.backward(torch.ones_like(out))
            else:
                with torch.no_grad():
                    module(q, k, v, causal=causal)

        if first_use:
            step()
            _sync(cfg.device)
        return _time_steps(step, cfg, meter)
    except (RuntimeError, ValueError, TypeError, MemoryError) as err:
        return {"status": "error", "error": _one_line(err)}


def _time_steps(step: Callable[[], None], cfg: ArenaConfig, meter: PeakMemoryMeter) -> dict[str, Any]:
    # The warm-up step (lazy initialisation, kernel selection) is the one whose memory is
    # tracked: tracking changes the allocator's behaviour (see attnkit.metrics.memory), which
    # would skew a timed step, and a separate memory step would cost a third long step.
    with meter.track() as peak:
        step()
        _sync(cfg.device)
    times: list[float] = []
    spent = 0.0
    while len(times) < cfg.repeats and (not times or spent < cfg.cell_seconds):
        start = time.perf_counter()
        step()
        _sync(cfg.device)
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
    return {
        "status": "ok",
        "median_ms": statistics.median(times) * 1e3,
        "times_ms": [t * 1e3 for t in times],
        "peak_mb": peak.mb,
        "memory_method": meter.method,
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
