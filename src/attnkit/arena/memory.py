"""Peak memory of one measurement, in-process.

On CUDA this is the caching allocator's peak (``torch.cuda.max_memory_allocated``)
above the memory held before the measurement. On Linux CPUs it is the peak resident set
size (``VmHWM``) above the resident size before the measurement: the high-water mark is
reset through ``/proc/self/clear_refs`` and glibc is told to serve large blocks with
``mmap`` (returned to the system on free), so each cell sees only its own allocations
rather than memory left over by earlier cells. Elsewhere the meter reports None rather
than a misleading number.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator
from pathlib import Path

import torch

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


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
        libc = _libc()
        if libc is not None and hasattr(libc, "mallopt"):
            # Large blocks via mmap: freed memory leaves the process, so RSS tracks live tensors.
            libc.mallopt(_M_MMAP_THRESHOLD, 1 << 16)
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
            libc = _libc()
            if libc is not None and hasattr(libc, "malloc_trim"):
                libc.malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")
            before = _read_status_kb("VmRSS") or 0
            yield peak
            high = _read_status_kb("VmHWM") or before
            peak.mb = max(0.0, (high - before) / 1024.0)
        else:
            yield peak


class _Peak:
    """Result holder of :meth:`PeakMemoryMeter.track`."""

    mb: float | None = None
