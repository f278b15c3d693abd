"""Large CPU work buffers of the kernels, kept after use and handed out again once nothing references them.

glibc returns freed blocks above its mmap threshold (at most 32 MB) to the system, so the same
buffers, allocated again every training step, fault in every page on first touch (linear
attention at 16K: 83,000 faults per step). :func:`empty_buffer` serves CPU requests of at least
:data:`POOL_MIN_BYTES` from a pool instead: a training step then finds last step's pages already
mapped, at the same peak memory.

When a buffer is free again: the pool owns each buffer's memory as a NumPy array and hands out
tensors made from it with :func:`torch.from_numpy`. Every tensor, view or autograd graph that
shares that memory shares one storage, and that storage holds exactly one reference to the
array, dropped when the storage dies. So the array's reference count (:func:`sys.getrefcount`)
says whether anything outside the pool still uses the buffer: public API only, and exact (no
view, saved tensor or user tensor can keep the storage alive without keeping that reference).

Idle buffers not requested for :data:`POOL_STALE_TAKES` requests, or beyond
:data:`POOL_MAX_IDLE_BYTES` in all, are released; :func:`release_buffers` releases every idle
one. ``ATTNKIT_BUFFER_POOL=0`` turns the reuse off (read once per process).
"""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

#: set to ``0`` to turn off the reuse of freed buffers (read once per process)
BUFFER_POOL_ENV = "ATTNKIT_BUFFER_POOL"
#: buffers smaller than this are not pooled (glibc's heap serves them without new mappings)
POOL_MIN_BYTES = 1 << 20
#: an idle pooled buffer not handed out in this many requests is released
POOL_STALE_TAKES = 256
#: idle pooled buffers are released, oldest first, beyond this many bytes
POOL_MAX_IDLE_BYTES = 1 << 30
#: alignment of pooled buffers, as PyTorch's own CPU allocator gives (vector loads and MKL prefer it)
_ALIGN = 64
#: ``sys.getrefcount`` of an idle buffer's array: the pool's entry and the call's own argument
_IDLE_REFS = 2


@functools.cache
def pool_enabled() -> bool:
    """Whether :func:`empty_buffer` reuses buffers: ``ATTNKIT_BUFFER_POOL`` unset, empty or ``1`` (read once).

    Raises:
        ValueError: when the variable holds anything else.
    """
    value = os.environ.get(BUFFER_POOL_ENV, "")
    if value not in ("", "0", "1"):
        raise ValueError(
            f"{BUFFER_POOL_ENV} must be 0 (no buffer reuse) or 1 (reuse, the default), got {value!r}; "
            f"unset it or set {BUFFER_POOL_ENV}=1"
        )
    return value != "0"


@dataclass
class _Pooled:
    memory: np.ndarray  # 1-d uint8, 64-byte aligned: the only owner of the buffer besides live storages
    dtype: torch.dtype  # the element type its tensors are viewed as
    last: int  # the request count when it was last handed out

    @property
    def nbytes(self) -> int:
        return int(self.memory.nbytes)


def _aligned_bytes(nbytes: int) -> np.ndarray:
    """An uninitialised 1-d uint8 array of ``nbytes`` starting on a :data:`_ALIGN`-byte boundary."""
    raw = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    offset = -raw.ctypes.data % _ALIGN
    return raw[offset : offset + nbytes]  # a view: it keeps ``raw`` alive


class BufferPool:
    """Large CPU buffers kept after their last user drops them, for reuse (see the module docstring).

    A buffer is handed out for the next request of the same byte size and element type once it
    is idle: nothing but the pool references its memory.
    """

    def __init__(self) -> None:
        self._entries: list[_Pooled] = []
        self._takes = 0
        self._lock = threading.Lock()

    @staticmethod
    def _idle(entry: _Pooled) -> bool:
        # Any live storage over the buffer holds one more reference to its array.
        return sys.getrefcount(entry.memory) <= _IDLE_REFS

    def get(self, dtype: torch.dtype, shape: tuple[int, ...] | torch.Size) -> Tensor:
        """An uninitialised CPU ``shape`` tensor of ``dtype`` over an idle pooled buffer, or a new one kept here.

        The tensor is made under the lock, so no other thread can find the buffer idle meanwhile.
        """
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            self._takes += 1
            for entry in self._entries:
                if entry.nbytes == nbytes and entry.dtype == dtype and self._idle(entry):
                    entry.last = self._takes
                    return _as_tensor(entry.memory, dtype, shape)
            entry = _Pooled(_aligned_bytes(nbytes), dtype, self._takes)
            self._entries.append(entry)
            out = _as_tensor(entry.memory, dtype, shape)  # held by the caller from here on: not idle while pruning
            self._prune()
            return out

    def _prune(self) -> None:
        """Release idle buffers unused for :data:`POOL_STALE_TAKES` requests, then the oldest beyond the byte cap."""
        idle = sorted((e for e in self._entries if self._idle(e)), key=lambda e: e.last)
        drop = {id(e) for e in idle if e.last < self._takes - POOL_STALE_TAKES}
        total = sum(e.nbytes for e in idle if id(e) not in drop)
        for e in idle:
            if total <= POOL_MAX_IDLE_BYTES:
                break
            if id(e) not in drop:
                drop.add(id(e))
                total -= e.nbytes
        if drop:
            self._entries = [e for e in self._entries if id(e) not in drop]

    def release(self) -> int:
        """Drop every idle buffer; returns the bytes released."""
        with self._lock:
            kept, freed = [], 0
            for e in self._entries:
                if self._idle(e):
                    freed += e.nbytes
                else:
                    kept.append(e)
            self._entries = kept
            return freed

    def stats(self) -> tuple[int, int]:
        """``(buffers, bytes)`` held, in use or idle."""
        with self._lock:
            return len(self._entries), sum(e.nbytes for e in self._entries)


def _as_tensor(memory: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...] | torch.Size) -> Tensor:
    # from_numpy's storage references ``memory`` (see the module docstring); the dtype view and the
    # reshape share that one storage
    return torch.from_numpy(memory).view(dtype).view(shape)


_POOL = BufferPool()


def release_buffers() -> int:
    """Release the idle buffers attnkit's kernels keep for reuse (see :func:`empty_buffer`); returns the bytes freed.

    Buffers in use (by a tensor, a view or an autograd graph) stay; they become reusable, and
    releasable, once their last user drops them.
    """
    return _POOL.release()


def empty_buffer(like: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """An uninitialised ``shape`` tensor of ``like``'s dtype and device; a large CPU one comes from the pool.

    Args:
        like: the tensor whose dtype and device the buffer takes.
        shape: the buffer's shape.

    Returns:
        A contiguous ``shape`` tensor. CPU buffers of at least :data:`POOL_MIN_BYTES` are pooled
        (unless ``ATTNKIT_BUFFER_POOL=0``); write it before reading it.
    """
    nbytes = math.prod(shape) * like.element_size()
    if like.device.type != "cpu" or nbytes < POOL_MIN_BYTES or not pool_enabled():
        return like.new_empty(shape)
    return _POOL.get(like.dtype, shape)
