"""Peak memory means the same with attnkit's buffer pool on or off, and grows with the length.

The pool (``attnkit.kernels.buffers.empty_buffer``) keeps large freed buffers for reuse. A cell
that runs in buffers an earlier cell paid for must still count them: the arena once reported
linear attention's fwd+bwd step at 8K as 19 MB with the pool against 86 MB without, and its
peak memory fell as the length grew.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tqdm import tqdm

import attnkit
import attnkit.kernels.buffers as buffers
from attnkit.arena import ArenaConfig
from attnkit.arena.cells import CellCache
from attnkit.arena.efficiency import warm_up_libraries
from attnkit.arena.runner import CellRunner, build_seeded, efficiency_sweep
from attnkit.metrics.memory import PeakMemoryMeter

LENGTHS = (1024, 2048)  # the smallest lengths whose linear-attention buffers (>= 2 MB) are pooled
SWEEPS = [(mode, causal) for mode in ("fwd", "fwd+bwd") for causal in (False, True)]  # the arena's order


@pytest.fixture
def buffer_pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """``set(on)`` switches the pool as ``ATTNKIT_BUFFER_POOL=1/0`` would in a fresh process."""

    class Switch:
        def set(self, on: bool) -> None:
            monkeypatch.setenv(buffers.BUFFER_POOL_ENV, "1" if on else "0")
            buffers.pool_enabled.cache_clear()  # the switch is read once per process

    yield Switch()
    monkeypatch.delenv(buffers.BUFFER_POOL_ENV, raising=False)
    buffers.pool_enabled.cache_clear()
    buffers.release_buffers()


def sweep_memory(tmp_path: Path) -> dict[tuple[str, bool], list[float]]:
    """Peak MB of linear attention's four sweeps, measured as the arena measures them."""
    cfg = ArenaConfig.preset("default", lengths=LENGTHS, repeats=1, cell_seconds=0.01)
    warm_up_libraries(cfg)
    cells = CellRunner(CellCache(tmp_path, enabled=False), {}, tqdm(disable=True))
    peaks = {}
    for mode, causal in SWEEPS:
        module = build_seeded("linear", attnkit.get_spec("linear").benchmark_options, cfg.seed)
        rows = efficiency_sweep(cfg, "linear", causal, mode, cells, module)
        assert all(r["status"] == "ok" for r in rows), rows
        peaks[(mode, causal)] = [r["peak_mb"] for r in rows]
    return peaks


def test_peak_memory_is_the_same_with_the_pool_on_or_off_and_grows_with_length(
    tmp_path: Path, buffer_pool: object
) -> None:
    if PeakMemoryMeter("cpu").method == "unavailable":
        pytest.skip("no peak-memory method on this platform")
    buffer_pool.set(False)  # type: ignore[attr-defined]
    off = sweep_memory(tmp_path / "off")
    buffer_pool.set(True)  # type: ignore[attr-defined]
    on = sweep_memory(tmp_path / "on")
    for sweep in SWEEPS:
        for length, with_pool, without in zip(LENGTHS, on[sweep], off[sweep]):
            # RSS peaks of a few MB move by over a half between runs (seen: 8.4 vs 12.4 MB, and in CI
            # rehearsals 20.3 vs 14.2 and 22.3 vs 14.4 MB, at 1K); the bug this guards against reported 6.4 MB
            # against 14.9 (1K) and 24.3 (2K): a factor over 2.3.
            close = max(with_pool, without) <= 1.75 * min(with_pool, without) or abs(with_pool - without) <= 2.0
            assert close, (sweep, length, on[sweep], off[sweep])
        for peaks in (on[sweep], off[sweep]):
            # every buffer of linear attention is proportional to the length: twice the length, more memory
            assert peaks[1] > 1.3 * peaks[0], (sweep, peaks)
