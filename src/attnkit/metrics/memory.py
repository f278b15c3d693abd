"""Peak memory of one measurement, in-process.

On CUDA this is the caching allocator's peak (``torch.cuda.max_memory_allocated``)
above the memory held before the measurement. On Linux CPUs it is the peak resident set
size (``VmHWM``) above the resident size before the measurement: the high-water mark is
reset through ``/proc/self/clear_refs``, the idle buffers attnkit's kernels keep for reuse
are released (:func:`attnkit.release_buffers`), free heap pages are handed back
(``malloc_trim``) and, while a measurement is tracked, glibc serves blocks of 64 KiB and
more with ``mmap`` (returned to the system on free), so each cell sees only its own
allocations rather than memory left over by earlier cells. Without the release a cell ran
in buffers an earlier cell had paid for and reported only what it added (linear attention,
fwd+bwd at 8K: 19 MB with the pool against 86 MB without; peak memory even fell with
length); with it, a step counts every byte it needs, pool on or off. The mmap setting
makes every large temporary cost page faults (1.3-1.8x slower steps, measured), so outside
:meth:`PeakMemoryMeter.track` the meter switches glibc to a fixed high threshold that
keeps timed steps at full speed. Elsewhere the meter reports None rather than a misleading
number.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Iterator
from pathlib import Path

import torch

from attnkit.kernels.buffers import release_buffers

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters
_M_MMAP_THRESHOLD = -3
#: While tracking: blocks from 64 KiB up are mmap-ed, so freed memory leaves the process at once.
_TRACKING_MMAP = 1 << 16
#: Otherwise: glibc's own upper bound for its dynamic threshold, i.e. what a long-running
#: process settles at by itself; heap memory is reused between steps instead of re-faulted.
_TIMING_MMAP = 32 << 20


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def _read_status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemoryMeter:
    """Measures the peak extra memory (MB) of a block of code on ``device``.

    Use::

        meter = PeakMemoryMeter("cpu")
        with meter.track() as peak:
            run()
        peak.mb  # float, or None where the platform offers no reliable method
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.method = self._choose_method()

    def _choose_method(self) -> str:
        if self.device.startswith("cuda"):
            return "cuda_max_allocated"
        if _read_status_kb("VmHWM") is None:
            return "unavailable"
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return "unavailable"
        _set_mmap_threshold(_TIMING_MMAP)
        return "rss_high_water"

    @contextlib.contextmanager
    def track(self) -> Iterator[_Peak]:
        """Context manager yielding a :class:`_Peak` whose ``mb`` is set on exit."""
        peak = _Peak()
        if self.method == "cuda_max_allocated":
            device = torch.device(self.device)
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            yield peak
            torch.cuda.synchronize(device)
            peak.mb = max(0.0, (torch.cuda.max_memory_allocated(device) - before) / 2**20)
        elif self.method == "rss_high_water":
            # Large blocks via mmap while tracking: freed memory leaves the process, so RSS
            # follows live tensors; pooled and free heap pages are returned first so that reusing
            # them shows as growth: the step then counts every byte it needs, pool on or off.
            _set_mmap_threshold(_TRACKING_MMAP)
            release_buffers()
            libc = _libc()
            if libc is not None and hasattr(libc, "malloc_trim"):
                libc.malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            before = _read_status_kb("VmRSS") or 0
            try:
                yield peak
            finally:
                _set_mmap_threshold(_TIMING_MMAP)
            high = _read_status_kb("VmHWM") or before
            peak.mb = max(0.0, (high - before) / 1024.0)
        else:
            yield peak


def _set_mmap_threshold(size: int) -> None:
    """Set glibc's mmap threshold (and a trim threshold above it); no-op without glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, size)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * size)


class _Peak:
    """Result holder of :meth:`PeakMemoryMeter.track`."""

    mb: float | None = None
