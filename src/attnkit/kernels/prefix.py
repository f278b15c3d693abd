"""Linear attention over feature maps: one chunked causal core, its recurrent step, and the wrapper.

Kernel attention replaces ``exp(q·k)`` by ``φ(q)·φ(k)`` so that causal attention becomes a
prefix sum of outer products ("Transformers are RNNs", Katharopoulos et al. 2020,
arXiv:2006.16236)::

    out_t = Σ_{s≤t} (φ(q_t)·φ(k_s)) v_s / Σ_{s≤t} φ(q_t)·φ(k_s)

The causal form here is *chunked* (as in FLASH, Hua et al. 2022, arXiv:2202.10447): inside a
chunk of ``C`` tokens the (C, C) score block is formed and masked; across chunks each chunk's
sum ``Σ φ(k_s) v_sᵀ`` (F, Dv) is formed by one batched matrix product and turned into a running
sum in place, which the next chunk's queries read. Time O(T·C·F + T·F·Dv), memory
O(T·(F + Dv + C) + (T/C)·F·Dv): per-chunk states, never a (T, F, Dv) cumulative tensor. The
backward pass is written by hand with the same two levels (the keys' share of later queries is
a reverse running sum), so nothing is recomputed and no autograd graph is kept inside.

Stabilisation (for exponential features such as FAVOR+): a feature may be given as
``φ(k_s) · exp(a_s)`` with a per-key log-scale ``a_s`` (``key_log_scale``). Every query uses
the running maximum ``M_t = max_{s≤t} a_s`` as its reference; chunk sums are kept relative to
the maximum at the end of their chunk and rescaled by ``exp(old - new) ≤ 1`` as the running
sum moves on, so every factor is ≤ 1, no reference ever depends on a later token (exact
causality), none mixes batch elements or heads, and all cancel exactly between numerator and
denominator. The log-scales are stabilisers: they must carry no gradient (pass them detached).

The normaliser ``Σ φ(q_t)·φ(k_s)`` is carried next to the numerator as an (F,) running sum (in
the recurrent state, as a last column). Queries with no visible key (or an all-zero
normaliser) output zeros.

Why one file of over 600 lines: it is still one module of the causal prefix core, the bidirectional grouped core, recurrent decode and the CPU buffer pool; issue 21 splits it by purpose
(the split moves code without changing it, so it is done in one step with the benchmark re-run it asks for).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import math
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

#: Log-scale given to padded keys: exp(NEG - anything finite) underflows to exactly 0.
NEG = -1e30

#: glibc serves blocks above 32 MB with fresh mappings whose every 4 KB page faults on first
#: touch (1.7 µs each here: 14 ms for a (8, 16384, 64) float32 tensor, 10x a pass over it);
#: blocks of 8-32 MB come from a heap whose top it trims and regrows, faulting in the same way
#: (measured at 4K: 0-14000 faults per step, on average 4x fewer with the advice from 8 MB)
HUGE_PAGE_MIN_BYTES = 1 << 23
_HUGE_PAGE = 1 << 21
_MADV_HUGEPAGE = 14


#: ``0`` turns the huge-page advice of :func:`empty_buffer` off everywhere, ``1`` gives it
#: everywhere; unset, each mechanism decides with :func:`huge_page_advice` (read once per process)
HUGE_PAGES_ENV = "ATTNKIT_HUGE_PAGES"

#: whether :func:`empty_buffer` advises huge pages in the current context (see :func:`huge_page_advice`)
_ADVICE: contextvars.ContextVar[bool] = contextvars.ContextVar("attnkit_huge_page_advice", default=False)


def _switch(name: str, meanings: str) -> bool | None:
    """The 0/1 environment switch ``name``: None when unset or empty; anything else raises."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be {meanings}, got {value!r}")
    return value == "1"


@functools.cache
def _forced() -> bool | None:
    return _switch(HUGE_PAGES_ENV, "0 (never advise huge pages) or 1 (always)")


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux") or _forced() is False:
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def advising() -> bool:
    """Whether :func:`empty_buffer` gives huge-page advice here (the context's choice unless the environment forces one)."""
    forced = _forced()
    return _ADVICE.get() if forced is None else forced


@contextlib.contextmanager
def huge_page_advice(enabled: bool) -> Iterator[None]:
    """Within the block, :func:`empty_buffer` gives huge-page advice when ``enabled`` (off by default).

    Whether 2 MB pages pay depends on the work, and was measured per mechanism here (fresh
    processes alternated, fwd+bwd, 2 threads): Performer's 256-wide features gain (4K
    bidirectional 176 -> 166 ms, causal 276 -> 220 ms; 16K bidirectional 757 -> 698 ms), while
    64-wide linear attention loses (4K 25 -> 33 ms, 16K 157 -> 207 ms) and so does the Sinkhorn
    path (16K 303 -> 381 ms). The autograd functions of this module record the choice in their
    forward pass and restore it in their backward pass.
    """
    token = _ADVICE.set(enabled)
    try:
        yield
    finally:
        _ADVICE.reset(token)


#: set to ``0`` to turn off the reuse of freed buffers (see :func:`empty_buffer`; read once per process)
BUFFER_POOL_ENV = "ATTNKIT_BUFFER_POOL"
#: buffers smaller than this are not pooled (glibc's heap serves them without new mappings)
POOL_MIN_BYTES = 1 << 20
#: an idle pooled buffer not handed out in this many requests is released
POOL_STALE_TAKES = 256
#: idle pooled buffers are released, oldest first, beyond this many bytes
POOL_MAX_IDLE_BYTES = 1 << 30


@functools.cache
def _pool_enabled() -> bool:
    return _switch(BUFFER_POOL_ENV, "0 (no buffer reuse) or 1 (reuse, the default)") is not False


@dataclass
class _Pooled:
    flat: Tensor  # the 1-d buffer; what callers get are views of it
    advised: bool  # whether it was given huge-page advice when allocated
    last: int  # the request count when it was last handed out


class _BufferPool:
    """Large CPU buffers of :func:`empty_buffer` kept after their last user drops them, for reuse.

    glibc returns freed blocks of more than its mmap threshold (at most 32 MB) to the system, so
    the same buffers, allocated again every training step, fault in every page on first touch
    (linear attention at 16K: 83000 faults per step). The pool keeps each buffer it hands out;
    one is free again when nothing but the pool references its storage (no view, no autograd
    graph, no user tensor), and is then handed out for the next request of the same size, type
    and huge-page advice. Idle buffers not requested for :data:`POOL_STALE_TAKES` requests, or
    beyond :data:`POOL_MAX_IDLE_BYTES` in all, are released; :func:`release_buffers` releases
    every idle one.
    """

    def __init__(self) -> None:
        self._entries: list[_Pooled] = []
        self._takes = 0
        self._lock = threading.Lock()

    @staticmethod
    def _idle(entry: _Pooled) -> bool:
        # the pool's tensor and the temporary storage object are the only references
        return torch._C._storage_Use_Count(entry.flat.untyped_storage()._cdata) <= 2

    def get(self, like: Tensor, shape: tuple[int, ...] | torch.Size, advised: bool) -> Tensor:
        """A ``shape`` view of an idle buffer of ``like``'s type and device, or of a new one kept here.

        The view is made under the lock, so no other thread can see the buffer idle meanwhile.
        """
        numel = math.prod(shape)
        with self._lock:
            self._takes += 1
            for entry in self._entries:
                flat = entry.flat
                if (
                    flat.numel() == numel
                    and flat.dtype == like.dtype
                    and flat.device == like.device
                    and entry.advised == advised
                    and self._idle(entry)
                ):
                    entry.last = self._takes
                    return flat.view(shape)
            flat = _allocate(like, (numel,), advised)
            self._entries.append(_Pooled(flat, advised, self._takes))
            out = flat.view(shape)  # held by the caller from here on: not idle while pruning
            self._prune()
            return out

    def _prune(self) -> None:
        """Release idle buffers unused for :data:`POOL_STALE_TAKES` requests, then the oldest beyond the byte cap."""
        idle = sorted((e for e in self._entries if self._idle(e)), key=lambda e: e.last)
        drop = {id(e) for e in idle if e.last < self._takes - POOL_STALE_TAKES}
        total = sum(e.flat.numel() * e.flat.element_size() for e in idle if id(e) not in drop)
        for e in idle:
            if total <= POOL_MAX_IDLE_BYTES:
                break
            if id(e) not in drop:
                drop.add(id(e))
                total -= e.flat.numel() * e.flat.element_size()
        if drop:
            self._entries = [e for e in self._entries if id(e) not in drop]

    def release(self) -> int:
        """Drop every idle buffer; returns the bytes released."""
        with self._lock:
            kept, freed = [], 0
            for e in self._entries:
                if self._idle(e):
                    freed += e.flat.numel() * e.flat.element_size()
                else:
                    kept.append(e)
            self._entries = kept
            return freed

    def stats(self) -> tuple[int, int]:
        """``(buffers, bytes)`` held, in use or idle."""
        with self._lock:
            return len(self._entries), sum(e.flat.numel() * e.flat.element_size() for e in self._entries)


_POOL = _BufferPool()


def release_buffers() -> int:
    """Release the idle buffers attnkit's kernels keep for reuse (see :func:`empty_buffer`); returns the bytes freed.

    Buffers in use (by a tensor, a view or an autograd graph) stay; they become reusable, and
    releasable, once their last user drops them.
    """
    return _POOL.release()


def _allocate(like: Tensor, shape: tuple[int, ...] | torch.Size, advised: bool) -> Tensor:
    out = like.new_empty(shape)
    if advised:
        madvise = _madvise()
        if madvise is not None:
            nbytes = out.numel() * out.element_size()
            start = -(-out.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
            stop = (out.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
            if stop > start:
                madvise(start, stop - start, _MADV_HUGEPAGE)
    return out


def empty_buffer(like: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """An uninitialised ``shape`` tensor like ``like``; a large one is reused and may ask for 2 MB pages.

    Where :func:`advising` (inside ``huge_page_advice(True)``), for CPU blocks of at least
    :data:`HUGE_PAGE_MIN_BYTES` the 2 MB-aligned interior is marked ``MADV_HUGEPAGE`` before
    anything touches it, so first writes to fresh pages fault 512x less often (pages already in
    use are unaffected) (measured: a fresh 32 MB tensor filled in 4.3 ms instead of 13.7;
    PyTorch's ``THP_MEM_ALLOC_ENABLE`` does the same for every allocation). Only advice: where
    transparent huge pages are off, or not on Linux, nothing changes; the environment variable
    ``ATTNKIT_HUGE_PAGES`` (``0`` or ``1``) overrides every mechanism's choice.

    CPU buffers of at least :data:`POOL_MIN_BYTES` come from a pool of buffers whose users have
    all dropped them (see :class:`_BufferPool`): a training step then finds last step's pages
    already mapped (linear attention, fwd+bwd, fresh processes alternated: causal 16K 501-535 ->
    342-359 ms, bidirectional 16K 265 -> 174 ms, page faults per step 83000 -> 8000, peak
    resident memory unchanged). ``ATTNKIT_BUFFER_POOL=0`` turns the reuse off;
    :func:`release_buffers` frees the idle buffers.
    """
    numel = math.prod(shape)
    nbytes = numel * like.element_size()
    cpu = like.device.type == "cpu"
    advised = cpu and nbytes >= HUGE_PAGE_MIN_BYTES and advising()
    if not (cpu and nbytes >= POOL_MIN_BYTES and _pool_enabled()):
        return _allocate(like, shape, advised)
    return _POOL.get(like, shape, advised)


def _product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` (batched) into an :func:`empty_buffer`."""
    shape = (*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
    return torch.matmul(a, b, out=empty_buffer(a, shape))


@dataclass
class PrefixState:
    """The recurrent state of causal linear attention (``decoding="recurrent"``).

    Attributes:
        kv: ``(B, H, F, Dv + 1)`` running ``Σ_s φ(k_s) exp(a_s - ref) [v_s, 1]ᵀ``, or None
            before the first token. The last column is the normaliser.
        ref: ``(B, H)`` running maximum of the key log-scales, or None without log-scales.
        length: number of positions consumed.
    """

    kv: Tensor | None = None
    ref: Tensor | None = None
    length: int = 0


# -- the causal core: chunked sums with a hand-written backward ----------------------------
@dataclass
class _Scales:
    """Factors of the stabilised core (key log-scales ``a_s``), every one in ``[0, 1]``.

    With ``M_t`` the running maximum of the log-scales, ``R_c`` its value before chunk ``c``
    and ``P_c = R_{c+1}`` after it:

    Attributes:
        key: ``(BH, n, C)`` ``exp(a_s - P_c)``: a key's weight in its chunk's sum.
        read: ``(BH, n, C)`` ``exp(R_c - M_t)``: a query's weight on the state before its chunk.
        decay: ``(BH, n)`` ``exp(R_c - P_c)``: carries the state across chunk ``c``.
        pair: ``(BH, n, C, C)`` ``exp(a_s - M_t)`` inside a chunk, zero above the diagonal.
        last: ``(BH,)`` the reference ``P_{n-1}`` of the final state.
    """

    key: Tensor
    read: Tensor
    decay: Tensor
    pair: Tensor
    last: Tensor


def _scales(a: Tensor, ref0: Tensor | None, n: int, chunk: int) -> _Scales:
    """The stabilisers for log-scales ``a (BH, n·C)`` and an initial reference ``ref0 (BH,)``."""
    bh = a.shape[0]
    running = a.cummax(dim=-1).values
    if ref0 is not None:
        running = torch.maximum(running, ref0[:, None])
    m = running.view(bh, n, chunk)
    after = m[..., -1]  # P_c
    start = ref0[:, None] if ref0 is not None else a.new_full((bh, 1), NEG)
    before = torch.cat([start, after[:, :-1]], dim=1)  # R_c
    ac = a.view(bh, n, chunk)
    # clamp: only pairs above the diagonal (a later key) can exceed 0, and tril_ zeroes them
    pair = (ac[:, :, None, :] - m[..., None]).clamp_(max=0.0).exp_().tril_()
    return _Scales(
        key=(ac - after[..., None]).exp_(),
        read=(before[..., None] - m).exp_(),
        decay=(before - after).exp_(),
        pair=pair,
        last=after[:, -1].contiguous(),
    )


def _scan_(x: Tensor, decay: Tensor | None, *, reverse: bool = False) -> None:
    """In place over chunks (dim 1): ``x_c += decay_c · x_{c∓1}``, an inclusive running sum.

    A Python loop of ``n`` in-place adds for ``(BH, n, F, E)`` blocks: ``torch.cumsum`` over a
    middle dimension is 10x slower there (measured, n = 256: 54 vs 5.7 ms), and the loop
    touches each ``(F, E)`` block once. Small ``(BH, n, F)`` sums without decay are the other
    way round (cumsum 0.2 ms, the loop's ``n`` calls 3 ms).
    """
    n = x.shape[1]
    if decay is None and x.dim() == 3:
        x.copy_(x.flip(1).cumsum(1).flip(1) if reverse else x.cumsum(1))
        return
    for c in range(n - 2, -1, -1) if reverse else range(1, n):
        prev = x[:, c + 1] if reverse else x[:, c - 1]
        if decay is None:
            x[:, c].add_(prev)
        else:
            x[:, c].addcmul_(prev, decay[:, c].view(-1, *([1] * (x.dim() - 2))))


def _intra_scores(q: Tensor, k: Tensor, scales: _Scales | None) -> Tensor:
    """``(BH, n, C_q, C_k)`` scores inside each chunk, weighted, zero above the diagonal."""
    scores = _product(q, k.transpose(-1, -2))
    return scores.mul_(scales.pair) if scales is not None else scores.tril_()


def _reuse(buf: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``buf``'s storage as a ``shape`` tensor when it holds exactly that many elements, else a new one.

    A fresh (T, D)-sized tensor costs a round of page faults (glibc maps large blocks anew), more
    than the product written into it; exact size only, so no larger buffer outlives its use.
    """
    if buf.numel() == math.prod(shape) and buf.is_contiguous():
        return buf.view(shape)
    return empty_buffer(buf, shape)


def _causal_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scales: _Scales | None,
    s0: Tensor | None,
    z0: Tensor | None,
    normalize: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None]:
    """``o_t = Σ_{s≤t} (q_t·k_s) w_ts v_s`` (+ the state's share) for chunked inputs.

    Args:
        q: ``(BH, n, C, F)``; k: ``(BH, n, C, F)``; v: ``(BH, n, C, E)``.
        scales: the stabilisers (``w_ts = exp(a_s - M_t)``), or None for ``w = 1``.
        s0: ``(BH, F, E)`` initial state or None; z0: ``(BH, F)`` its normaliser (if normalising).
        normalize: also return ``den_t = Σ_{s≤t} (q_t·k_s) w_ts`` and divide by it.

    Returns:
        ``out (BH, n, C, E)`` (divided by the normaliser where it is positive), ``den (BH, n, C)``
        or None, the inclusive running sums ``(BH, n, F, E)`` and ``(BH, n, F)`` (None
        unless normalising) after each chunk, and the weighted scores ``(BH, n, C, C)`` when
        their buffer did not become the running sums (F or E != C), else None.
    """
    bh = q.shape[0]
    scores = _intra_scores(q, k, scales)
    out = _product(scores, v)
    den = scores.sum(dim=-1) if normalize else None

    # the state before chunk c is the running sum of the earlier chunks' k_sᵀ v_s (BH, n, F, E),
    # in the scores' buffer when it is the same size (C = F = E)
    values = torch.mul(v, scales.key[..., None], out=empty_buffer(v, v.shape)) if scales is not None else v
    sums = torch.matmul(k.transpose(-1, -2), values, out=_reuse(scores, (bh, q.shape[1], q.shape[-1], v.shape[-1])))
    # kept for the backward when free (the product is 1/13 of the core's work with 256 features)
    kept = scores if sums.data_ptr() != scores.data_ptr() else None
    del scores
    decay = scales.decay if scales is not None else None
    if s0 is not None:
        sums[:, 0].addcmul_(s0, decay[:, 0, None, None]) if decay is not None else sums[:, 0].add_(s0)
    _scan_(sums, decay)
    zsums = None
    if den is not None:
        zsums = (k.transpose(-1, -2) @ scales.key[..., None])[..., 0] if scales is not None else k.sum(dim=2)
        if z0 is not None:
            zsums[:, 0].addcmul_(z0, decay[:, :1]) if decay is not None else zsums[:, 0].add_(z0)
        _scan_(zsums, decay)
        # exclusive: the normaliser state each chunk reads (small: (BH, n, F))
        z_before = torch.cat(
            [z0[:, None] if z0 is not None else zsums.new_zeros(bh, 1, zsums.shape[-1]), zsums[:, :-1]], 1
        )
        den_reads = (q @ z_before[..., None])[..., 0]  # (BH, n, C)
        den.addcmul_(den_reads, scales.read) if scales is not None else den.add_(den_reads)

    # chunk c reads the running sum after chunk c - 1: shifted 3-d views, one (B·H) slice at a time
    if scales is None:
        for b in range(bh):
            out[b, 1:].baddbmm_(q[b, 1:], sums[b, :-1])
        if s0 is not None:
            out[:, 0].baddbmm_(q[:, 0], s0)
    else:
        reads = values  # its own buffer, no longer needed
        for b in range(bh):
            torch.bmm(q[b, 1:], sums[b, :-1], out=reads[b, 1:])
        if s0 is not None:
            torch.bmm(q[:, 0], s0, out=reads[:, 0])
        else:
            reads[:, 0].zero_()
        out.addcmul_(reads, scales.read[..., None])
        del reads
    if den is not None:
        out.div_(_safe_denominator(den)[..., None])
    return out, den, sums, zsums, kept


def _z_before(zsums: Tensor, z0: Tensor | None) -> Tensor:
    """``(BH, n, F)`` normaliser state each chunk reads: the running sum after the chunk before."""
    first = z0[:, None] if z0 is not None else zsums.new_zeros(zsums.shape[0], 1, zsums.shape[-1])
    return torch.cat([first, zsums[:, :-1]], dim=1)


def _causal_backward(
    grad: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scales: _Scales | None,
    s0: Tensor | None,
    z0: Tensor | None,
    saved: tuple[Tensor, Tensor | None, Tensor, Tensor | None, Tensor | None],
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`_causal_forward`'s ``out`` with respect to ``q``, ``k`` and ``v`` (chunked shapes).

    The same two levels as the forward: inside a chunk the (C, C) blocks, across chunks running
    sums of ``q_tᵀ g_t`` over the *later* chunks (a reverse scan) for the keys and values.
    """
    out, den, sums, zsums, kept = saved
    bh = q.shape[0]
    grad_den = None
    owned = False  # whether ``grad`` is a buffer of ours, free to be overwritten
    if den is not None:
        # out = num / den: d num = g / den, d den = -(g·out) / den (zero where den was replaced by 1)
        # (g / den)·out: the row products go through dq's buffer, untouched until its products
        # (a fresh (T, E) temporary costs a round of page faults, as much as the pass itself)
        safe = _safe_denominator(den)
        grad = torch.div(grad, safe[..., None], out=empty_buffer(out, out.shape))
        owned = True
        dq = empty_buffer(q, q.shape)
        grad_den = _rowdot(grad, out, dq)[..., 0].neg_().masked_fill_(den <= 0, 0.0)

    # inside each chunk: the weighted scores (kept, or recomputed: one product, cheaper in memory
    # than keeping them when their buffer holds the running sums) give dv; a buffer of ours
    # (never the saved one) then holds d scores for dq and dk
    scores = kept if kept is not None else _intra_scores(q, k, scales)
    dv = _product(scores.transpose(-1, -2), grad)
    if kept is not None:
        scores = empty_buffer(kept, kept.shape)
    grad_scores = torch.matmul(grad, v.transpose(-1, -2), out=scores)  # (BH, n, C_q, C_k)
    if grad_den is not None:
        grad_scores.add_(grad_den[..., None])  # den = Σ_s scores_ts
    if scales is not None:
        grad_scores.mul_(scales.pair)
    else:
        grad_scores.tril_()
    dq = torch.matmul(grad_scores, k, out=dq) if den is not None else _product(grad_scores, k)
    dk = _product(grad_scores.transpose(-1, -2), q)
    del grad_scores

    # queries read the state before their chunk (the unscaled gradient is not needed again)
    if scales is None:
        grad_read = grad
    elif owned:
        grad_read = grad.mul_(scales.read[..., None])
    else:
        grad_read = torch.mul(grad, scales.read[..., None], out=empty_buffer(grad, grad.shape))
    for b in range(bh):
        dq[b, 1:].baddbmm_(grad_read[b, 1:], sums[b, :-1].transpose(-1, -2))
    if s0 is not None:
        dq[:, 0].baddbmm_(grad_read[:, 0], s0.transpose(-1, -2))
    den_read = None
    if grad_den is not None and zsums is not None:
        den_read = grad_den * scales.read if scales is not None else grad_den
        # a rank-one update per chunk: one broadcast pass (bmm with an inner size of 1 is slower)
        dq.addcmul_(den_read[..., None], _z_before(zsums, z0)[:, :, None, :])

    # keys and values are read by every query of the later chunks: a reverse running sum
    decay = scales.decay if scales is not None else None
    # (BH, n, F, E), then Σ over chunks c..n-1; in the scores' buffer when it is large enough
    # (C >= F, E): a fresh tensor of this size costs a round of page faults
    later = torch.matmul(
        q.transpose(-1, -2), grad_read, out=_reuse(scores, (bh, q.shape[1], q.shape[-1], grad.shape[-1]))
    )
    # with scales, grad_read is a (T, E) buffer of ours, free from here on: it holds the weighted
    # values, then the keys' reads of the later chunks
    spare = grad_read if scales is not None else None
    del scores, grad, grad_read  # (T, E) buffers no longer needed: lower the peak before dk, dv
    _scan_(later, decay, reverse=True)
    values = torch.mul(v, scales.key[..., None], out=spare) if scales is not None else v
    for b in range(bh):
        dk[b, :-1].baddbmm_(values[b, :-1], later[b, 1:].transpose(-1, -2))
    if scales is None:
        for b in range(bh):
            dv[b, :-1].baddbmm_(k[b, :-1], later[b, 1:])
    else:
        reads = values
        reads[:, -1].zero_()
        for b in range(bh):
            torch.bmm(k[b, :-1], later[b, 1:], out=reads[b, :-1])
        dv.addcmul_(reads, scales.key[..., None])
        del reads
    if den_read is not None:
        later_den = (q.transpose(-1, -2) @ den_read[..., None])[..., 0]  # (BH, n, F)
        _scan_(later_den, decay, reverse=True)
        if scales is not None:
            dk[:, :-1].addcmul_(scales.key[:, :-1, :, None], later_den[:, 1:, None, :])
        else:
            dk[:, :-1].add_(later_den[:, 1:, None, :])
    return dq, dk, dv


class _CausalKernel(torch.autograd.Function):
    """Autograd for the chunked causal core: saves the inputs, the output and the running chunk sums."""

    @staticmethod
    def forward(ctx: Any, *args: Any) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        q, k, v, a, s0, z0, ref0, chunk, normalize, need_state, feature_map = args
        bsz, heads, t_len, feat = q.shape
        e_dim = v.shape[-1]
        bh = bsz * heads
        chunk = max(1, min(chunk, t_len))
        n = math.ceil(t_len / chunk)
        pad = n * chunk - t_len

        def chunked(x: Tensor) -> Tensor:
            # (B, H, T, X) -> (B·H, n, C, X): a view when T is a multiple of C (zero rows pad the tail)
            x = x.reshape(bh, t_len, x.shape[-1])
            return (F.pad(x, (0, 0, 0, pad)) if pad else x).view(bh, n, chunk, x.shape[-1])

        if feature_map is not None:
            q, k = (_features_by_rows(x.reshape(bh, t_len, feat), feature_map) for x in (q, k))
        qc, kc, vc = chunked(q), chunked(k), chunked(v)
        scales = None
        if a is not None:
            # padded keys get NEG log-scales: weight exp(NEG - anything finite) = 0
            a_flat = F.pad(a.reshape(bh, t_len), (0, pad), value=NEG) if pad else a.reshape(bh, t_len)
            scales = _scales(a_flat, ref0.reshape(bh) if ref0 is not None else None, n, chunk)
        s0_ = s0.reshape(bh, feat, e_dim) if s0 is not None else None
        z0_ = z0.reshape(bh, feat) if z0 is not None else None
        saved = _causal_forward(qc, kc, vc, scales, s0_, z0_, normalize)
        out, den, sums, zsums, kept = saved
        ctx.save_for_backward(qc, kc, vc, s0_, z0_, out, den, sums, zsums, kept)
        ctx.scales = scales
        ctx.feature_map = feature_map
        ctx.shape = (bsz, heads, t_len, pad)
        ctx.advice = advising()
        result = out.view(bh, n * chunk, e_dim)[:, :t_len].reshape(bsz, heads, t_len, e_dim)
        if not need_state:
            return result, None, None, None
        state = sums[:, -1].reshape(bsz, heads, feat, e_dim).clone()
        z_state = zsums[:, -1].reshape(bsz, heads, feat).clone() if zsums is not None else None
        ref = scales.last.reshape(bsz, heads) if scales is not None else None
        for t in (state, z_state, ref):
            if t is not None:
                ctx.mark_non_differentiable(t)
        return result, state, z_state, ref

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple[Tensor | None, ...]:
        qc, kc, vc, s0, z0, out, den, sums, zsums, kept = ctx.saved_tensors
        bsz, heads, t_len, pad = ctx.shape
        bh, n, chunk, _ = qc.shape
        grad = grads[0].reshape(bh, t_len, out.shape[-1])
        if pad:
            grad = F.pad(grad, (0, 0, 0, pad))
        elif den is None:  # with a normaliser, the first pass (a division into a buffer of ours) reads it as it is
            grad = grad.contiguous()
        grad = grad.reshape(bh, n, chunk, -1)
        with huge_page_advice(ctx.advice):
            dq, dk, dv = _causal_backward(grad, qc, kc, vc, ctx.scales, s0, z0, (out, den, sums, zsums, kept))
        if ctx.feature_map is not None:  # through φ in place: the saved qc, kc are φ(q), φ(k)
            for d_phi, phi in ((dq, qc), (dk, kc)):
                _chain_features_(d_phi.view(bh, n * chunk, -1), phi.view(bh, n * chunk, -1), ctx.feature_map)

        def unchunked(x: Tensor) -> Tensor:
            return x.view(bh, n * chunk, x.shape[-1])[:, :t_len].reshape(bsz, heads, t_len, x.shape[-1])

        return unchunked(dq), unchunked(dk), unchunked(dv), None, None, None, None, None, None, None, None


# -- feature maps; bidirectional attention a group of heads at a time --------------------------
class FeatureMap(Protocol):
    """A feature map ``φ`` the kernels apply themselves, into buffers of their own.

    Its derivative must be expressible through ``φ(x)`` itself (true for elu+1, relu and
    identity), so that the backward pass needs only the saved features.
    """

    def into(self, x: Tensor, out: Tensor) -> Tensor:
        """Write ``φ(x)`` into ``out`` (same shape) and return it."""
        ...

    def derivative_into(self, phi: Tensor, out: Tensor) -> Tensor:
        """Write ``φ'(x)`` into ``out`` given ``phi = φ(x)`` (left unchanged) and return it."""
        ...


#: bytes of one block of features: small enough that the passes over it and the products that
#: read it right after find it in cache
BLOCK_BYTES = 1 << 21


def _block_rows(bh: int, width: int) -> int:
    return max(16, BLOCK_BYTES // (4 * bh * width))


def _spans(length: int, rows: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of consecutive blocks of ``rows`` rows covering ``length``."""
    return [(a, min(a + rows, length)) for a in range(0, length, rows)]


def _scratch(buf: Tensor, *shape: int) -> Tensor:
    """A contiguous ``shape`` view at the start of the preallocated ``buf`` (reused, never reallocated)."""
    return buf.view(-1)[: math.prod(shape)].view(shape)


def _features_by_rows(x: Tensor, feature_map: FeatureMap) -> Tensor:
    """``φ(x)`` for ``x (BH, L, D)`` into a new tensor, a block of rows at a time so each pass stays in cache."""
    out = empty_buffer(x, x.shape)
    for a, b in _spans(x.shape[1], _block_rows(x.shape[0], x.shape[-1])):
        feature_map.into(x[:, a:b], out[:, a:b])
    return out


def _chain_features_(grad: Tensor, phi: Tensor, feature_map: FeatureMap) -> None:
    """``grad ← grad · φ'(x)`` in place for ``grad, phi = φ(x) (BH, L, D)``, a block of rows at a time."""
    rows = _block_rows(phi.shape[0], phi.shape[-1])
    buf = phi.new_empty(phi.shape[0], rows, phi.shape[-1])
    for a, b in _spans(phi.shape[1], rows):
        block = grad[:, a:b]
        block.mul_(feature_map.derivative_into(phi[:, a:b], _scratch(buf, *block.shape)))


class _Features(torch.autograd.Function):
    """``φ(x)`` for a whole tensor, keeping only ``φ(x)`` for the backward pass."""

    @staticmethod
    def forward(ctx: Any, *args: Any) -> Tensor:
        x, feature_map = args
        phi = feature_map.into(x, empty_buffer(x, x.shape))
        ctx.save_for_backward(phi)
        ctx.feature_map = feature_map
        return phi

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple[Tensor | None, ...]:
        (phi,) = ctx.saved_tensors
        derivative = ctx.feature_map.derivative_into(phi, torch.empty_like(phi))
        return derivative.mul_(grads[0]), None


def apply_features(x: Tensor, feature_map: FeatureMap) -> Tensor:
    """``φ(x)`` with autograd, for paths that need the features as a tensor (causal, decoding)."""
    out: Tensor = _Features.apply(x, feature_map)
    return out


def _head_groups(bh: int, length: int, width: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of consecutive groups of (batch, head) slices of about :data:`BLOCK_BYTES`."""
    return _spans(bh, max(1, BLOCK_BYTES // (4 * length * width)))


def _group_features(x: Tensor, feature_map: FeatureMap | None, out: Tensor, real: Tensor | None) -> Tensor:
    """``φ(x)`` for a group ``x (n, L, D)`` into ``out``, rows of padded keys zeroed; ``x`` when it is φ already."""
    if feature_map is None and real is None:
        return x
    phi = out.copy_(x) if feature_map is None else feature_map.into(x, out)
    return phi.masked_fill_(~real, 0.0) if real is not None else phi


class _GlobalKernel(torch.autograd.Function):
    """Bidirectional linear attention ``φq (φkᵀ v) / φq (φkᵀ 1)``, a group of heads at a time.

    A group's features are written into the saved ``(B·H, L, F)`` buffers and read by its
    products at once, while still in cache; the backward pass, written by hand, reads them back
    (measured at 4K, fwd+bwd: 35.4 ms, against 39.4 recomputing them a group at a time in cache).
    A group is contiguous in memory, unlike a block of rows across heads (42.0 ms). The normaliser is a separate matrix-vector product: a ones column on ``v`` makes every
    product 65 wide, which MKL runs 40% slower. With a feature map, the query and key gradients
    are written over the spent features (a group at a time, once its products have read them):
    two fresh ``(B·H, L, F)`` tensors fewer per step, whose first touch costs page faults (side by
    side, fresh processes alternated: 4K 35 -> 29 ms, 16K 172 -> 146 ms); a second backward over
    the same graph recomputes the features from ``q`` and ``k``.
    """

    @staticmethod
    def forward(ctx: Any, *args: Any) -> Tensor:
        q, k, v, real, feature_map, normalize = args
        bsz, heads, t_len, feat = q.shape
        s_len, e_dim = k.shape[2], v.shape[-1]
        bh = bsz * heads
        q3, k3, v3 = (x.reshape(bh, x.shape[2], x.shape[3]) for x in (q, k, v))
        # True = real key, one row per (batch, head)
        real3 = real[:, None, :, None].expand(bsz, heads, s_len, 1).reshape(bh, s_len, 1) if real is not None else None
        if real3 is not None:  # padded values are zeroed too: no inf or nan there leaks through 0 · v
            v3 = v3.masked_fill(~real3, 0.0)
        phi_q = q3 if feature_map is None else empty_buffer(q3, q3.shape)
        phi_k = k3 if feature_map is None and real3 is None else empty_buffer(k3, k3.shape)
        kv = q3.new_empty(bh, feat, e_dim)
        z = q3.new_empty(bh, 1, feat) if normalize else None
        out = empty_buffer(q3, (bh, t_len, e_dim))
        den = q3.new_empty(bh, t_len, 1) if normalize else None
        for a, b in _head_groups(bh, max(t_len, s_len), feat):
            phi = _group_features(k3[a:b], feature_map, phi_k[a:b], real3[a:b] if real3 is not None else None)
            torch.bmm(phi.transpose(1, 2), v3[a:b], out=kv[a:b])
            if z is not None:
                torch.sum(phi, dim=1, keepdim=True, out=z[a:b])
            phi = _group_features(q3[a:b], feature_map, phi_q[a:b], None)
            block = torch.bmm(phi, kv[a:b], out=out[a:b])
            if z is not None and den is not None:
                block.div_(_safe_denominator(torch.bmm(phi, z[a:b].transpose(1, 2), out=den[a:b])))
        if feature_map is None:
            ctx.save_for_backward(phi_q, phi_k, v3, real3, kv, z, out, den)
        else:
            # the features are our own buffers: handed to the backward, which writes dq and dk over
            # them (no fresh (L, F) tensors there); a second backward recomputes them from q and k
            ctx.save_for_backward(q, k, v3, real3, kv, z, out, den)
            ctx.features = [(phi_q, phi_k)]
        ctx.feature_map = feature_map
        ctx.advice = advising()
        return out.view(bsz, heads, t_len, e_dim)

    @staticmethod
    def features(q: Tensor, k: Tensor, real3: Tensor | None, feature_map: FeatureMap) -> tuple[Tensor, Tensor]:
        """``φ(q), φ(k)`` as the forward pass made them (padded keys' rows zeroed), for a second backward."""
        q3, k3 = (x.reshape(-1, x.shape[2], x.shape[3]) for x in (q, k))
        phi_q, phi_k = q3.new_empty(q3.shape), k3.new_empty(k3.shape)
        for a, b in _head_groups(q3.shape[0], max(q3.shape[1], k3.shape[1]), q3.shape[-1]):
            _group_features(k3[a:b], feature_map, phi_k[a:b], real3[a:b] if real3 is not None else None)
            _group_features(q3[a:b], feature_map, phi_q[a:b], None)
        return phi_q, phi_k

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple[Tensor | None, ...]:
        phi_q, phi_k, v3, real3, kv, z, out, den = ctx.saved_tensors
        feature_map = ctx.feature_map
        if feature_map is not None:  # phi_q, phi_k saved as q, k
            phi_q, phi_k = (
                ctx.features.pop() if ctx.features else _GlobalKernel.features(phi_q, phi_k, real3, feature_map)
            )
        bh, t_len, feat = phi_q.shape
        s_len, e_dim = phi_k.shape[1], v3.shape[-1]
        grad = grads[0].reshape(bh, t_len, e_dim)
        groups = _head_groups(bh, max(t_len, s_len), max(feat, e_dim))
        group_shape = (groups[0][1], max(t_len, s_len), max(feat, e_dim))
        with huge_page_advice(ctx.advice):
            # one group's scaled gradient (n, T, E); then row products and the features' derivative (n, L, F)
            scratch = empty_buffer(phi_q, group_shape)
            spare = phi_q.new_empty(group_shape)
            if feature_map is None:  # q and k are the features: gradients of their own
                dq, dk = empty_buffer(phi_q, phi_q.shape), empty_buffer(phi_k, phi_k.shape)
            else:  # written over the features, each group once nothing reads its features any more
                dq, dk = phi_q, phi_k
            dv = empty_buffer(v3, v3.shape)
        d_kv = phi_q.new_empty(groups[0][1], feat, e_dim)
        d_z = phi_q.new_empty(groups[0][1], 1, feat)
        for a, b in groups:
            n = b - a
            g, phi = grad[a:b], phi_q[a:b]
            grad_den = None
            if den is not None and z is not None:
                # out = num / den: d num = g / den, d den = -(g · out) / den (zero where den was not positive)
                block_den = den[a:b]
                g = torch.div(g, _safe_denominator(block_den), out=_scratch(scratch, n, t_len, e_dim))
                grad_den = _rowdot(g, out[a:b], spare).neg_().masked_fill_(block_den <= 0, 0.0)
                torch.bmm(grad_den.transpose(1, 2), phi, out=d_z[:n])
            torch.bmm(phi.transpose(1, 2), g, out=d_kv[:n])
            derivative = (
                None if feature_map is None else feature_map.derivative_into(phi, _scratch(spare, n, t_len, feat))
            )
            target = torch.bmm(g, kv[a:b].transpose(1, 2), out=dq[a:b])
            if grad_den is not None and z is not None:
                target.addcmul_(grad_den, z[a:b])
            if derivative is not None:
                target.mul_(derivative)
            phi = phi_k[a:b]
            torch.bmm(phi, d_kv[:n], out=dv[a:b])
            derivative = (
                None if feature_map is None else feature_map.derivative_into(phi, _scratch(spare, n, s_len, feat))
            )
            target = torch.bmm(v3[a:b], d_kv[:n].transpose(1, 2), out=dk[a:b])
            if grad_den is not None:  # the normaliser's gradient reaches every key's features alike
                target.add_(d_z[:n])
            if derivative is not None:
                target.mul_(derivative)
            if real3 is not None:
                target.masked_fill_(~real3[a:b], 0.0)
        lead = grads[0].shape[:2]
        return dq.view(*lead, t_len, feat), dk.view(*lead, s_len, feat), dv.view(*lead, s_len, e_dim), None, None, None


def _rowdot(x: Tensor, y: Tensor, spare: Tensor) -> Tensor:
    """``(n, L, 1)`` row-wise dot products of ``x, y (n, L, E)``, the product formed in ``spare``'s storage when it fits."""
    if spare.is_contiguous() and spare.numel() >= x.numel():
        return torch.mul(x, y, out=_scratch(spare, *x.shape)).sum(dim=-1, keepdim=True)
    return torch.linalg.vecdot(x, y)[..., None]


# -- public functions ----------------------------------------------------------------------
def causal_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_log_scale: Tensor | None = None,
    state: PrefixState | None = None,
    chunk_size: int = 64,
    need_state: bool = False,
) -> tuple[Tensor, PrefixState | None]:
    """Unnormalised causal linear attention ``Σ_{s≤t} (q_t·k_s e^{a_s}) v_s``, chunked.

    Args:
        q: ``(B, H, T, F)`` query features.
        k: ``(B, H, T, F)`` key features (zero rows for padded keys).
        v: ``(B, H, T, E)`` values (append a ones column to get the normaliser).
        key_log_scale: ``(B, H, T)`` detached log-scale ``a_s`` of each key's features, or None.
        state: a :class:`PrefixState` of earlier positions (treated as a constant by autograd).
        chunk_size: tokens per chunk.
        need_state: return the state after the last position.

    Returns:
        ``(B, H, T, E)`` sums scaled by ``exp(-M_t)`` where ``M_t`` is the running maximum of the
        key log-scales (1 when there are none), and the new state (or None).
    """
    if state is not None and state.kv is not None and (key_log_scale is None) != (state.ref is None):
        raise ValueError("key_log_scale must be given on every call or on none (it was not on an earlier one)")
    kv0 = state.kv if state is not None else None
    ref0 = state.ref if state is not None else None
    out, kv, _, ref = _CausalKernel.apply(q, k, v, key_log_scale, kv0, None, ref0, chunk_size, False, need_state, None)
    if not need_state:
        return out, None
    length = (state.length if state is not None else 0) + q.shape[2]
    return out, PrefixState(kv, ref, length)


def recurrent_step(
    q: Tensor, k: Tensor, v: Tensor, state: PrefixState, *, key_log_scale: Tensor | None = None
) -> Tensor:
    """One token of causal linear attention as an RNN: update ``state`` in place, then read it.

    Args:
        q: ``(B, H, 1, F)`` query features; k: ``(B, H, 1, F)`` key features; v: ``(B, H, 1, E)``.
        state: the running :class:`PrefixState` (updated in place).
        key_log_scale: ``(B, H, 1)`` detached log-scale of the key's features, or None.

    Returns:
        ``(B, H, 1, E)``, equal to the last row of :func:`causal_linear_attention` over the prefix.
        O(F·E) per head, whatever the context length.
    """
    # One token: the (F, 1) @ (1, E) product as a broadcast multiply gives the same numbers and skips a
    # matmul that can stall in the thread pool on a busy machine (seen: 16.7 ms on 2 threads against 0.02 ms
    # on 1). Quiet machine, linear decode at 1K, 8 heads, 3 alternating rounds: 0.25-0.45 -> 0.25-0.26 ms.
    outer = k.transpose(-1, -2) * v  # (B, H, F, E)
    if key_log_scale is not None:
        a = key_log_scale[..., 0]
        ref = a if state.ref is None else torch.maximum(state.ref, a)
        outer = outer * (a - ref).exp()[..., None, None]
        if state.kv is not None and state.ref is not None:
            outer = outer + state.kv * (state.ref - ref).exp()[..., None, None]
        state.ref = ref
    elif state.kv is not None:
        outer = outer + state.kv
    state.kv = outer
    state.length += 1
    return q @ outer


def kernel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    attention_mask: Tensor | None = None,
    key_log_scale: Tensor | None = None,
    feature_map: FeatureMap | None = None,
    normalize: bool = True,
    chunk_size: int = 64,
) -> Tensor:
    """Linear attention over features, with the library's conventions.

    Args:
        q: ``(B, H, T, F)`` query features, or queries when ``feature_map`` is given.
        k: ``(B, H, S, F)`` key features, or keys when ``feature_map`` is given.
        v: ``(B, H, S, Dv)`` values.
        causal: end-aligned causal (query ``i`` sees keys ``j <= i + S - T``).
        attention_mask: bool ``(B, S)``, True = real key; padded keys are removed exactly.
        key_log_scale: ``(B, H, S)`` detached per-key log-scales of ``k`` (see module docstring).
        feature_map: ``φ``, applied here to ``q`` and ``k`` (inside the kernels, a group of
            heads or a block of rows at a time), or None when they are features already.
        normalize: divide by ``Σ φ(q)·φ(k)`` (rows whose normaliser is not positive give zeros).
        chunk_size: chunk length of the causal core.

    Returns:
        ``(B, H, T, Dv)`` in the features' dtype.
    """
    t_len, s_len = q.shape[2], k.shape[2]
    if not causal:
        if key_log_scale is not None:
            if attention_mask is not None:  # padded keys must not set the maximum
                key_log_scale = key_log_scale.masked_fill(~attention_mask[:, None, :], NEG)
            k = k * (key_log_scale - key_log_scale.amax(dim=-1, keepdim=True)).exp()[..., None]
        return _GlobalKernel.apply(q, k, v, attention_mask, feature_map, normalize)
    if feature_map is not None and attention_mask is not None:
        # padded keys are zeroed as features: map first (without padding, φ is applied in the core)
        q, k, feature_map = apply_features(q, feature_map), apply_features(k, feature_map), None
    k, v, key_log_scale = _drop_padded(k, v, key_log_scale, attention_mask)
    if t_len <= s_len:
        # queries sit at the last T positions: give the first S - T positions empty queries
        q_full = F.pad(q, (0, 0, s_len - t_len, 0)) if t_len < s_len else q
        out = _CausalKernel.apply(
            q_full, k, v, key_log_scale, None, None, None, chunk_size, normalize, False, feature_map
        )[0]
        # no slice when nothing is cut: its backward would copy the gradient into a fresh zeroed tensor
        return out[:, :, s_len - t_len :] if t_len < s_len else out
    # the first T - S queries see no key at all
    out = _CausalKernel.apply(
        q[:, :, t_len - s_len :], k, v, key_log_scale, None, None, None, chunk_size, normalize, False, feature_map
    )[0]
    return F.pad(out, (0, 0, t_len - s_len, 0))


def kernel_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    state: PrefixState,
    *,
    attention_mask: Tensor | None = None,
    key_log_scale: Tensor | None = None,
    normalize: bool = True,
    chunk_size: int = 64,
) -> Tensor:
    """Append ``t`` positions to ``state`` and return their outputs (recurrent decoding).

    One token uses :func:`recurrent_step`; a longer chunk (a prompt) the chunked core.

    Args:
        q: ``(B, H, t, F)``; k: ``(B, H, t, F)``; v: ``(B, H, t, Dv)``.
        state: a :class:`PrefixState`, updated in place.
        attention_mask: bool ``(B, t)`` for the new positions.
        key_log_scale: ``(B, H, t)`` detached key log-scales, or None.
        normalize: as in :func:`kernel_attention`.
        chunk_size: chunk length for multi-token steps.

    Returns:
        ``(B, H, t, Dv)``.
    """
    dv = v.shape[-1]
    k, v, key_log_scale = _drop_padded(k, v, key_log_scale, attention_mask)
    if q.shape[2] == 1:
        if normalize:
            v = torch.cat([v, v.new_ones((*v.shape[:-1], 1))], dim=-1)
        out = recurrent_step(q, k, v, state, key_log_scale=key_log_scale)
        return normalise(out, dv) if normalize else out
    # a prompt: the chunked core; with a normaliser, the state's last column is its running sum
    s0 = z0 = None
    if state.kv is not None:
        s0, z0 = (state.kv[..., :dv], state.kv[..., dv]) if normalize else (state.kv, None)
    out, kv, z, ref = _CausalKernel.apply(q, k, v, key_log_scale, s0, z0, state.ref, chunk_size, normalize, True, None)
    state.kv = torch.cat([kv, z[..., None]], dim=-1) if z is not None else kv
    state.ref = ref
    state.length += q.shape[2]
    return out


def normalise(out: Tensor, dv: int) -> Tensor:
    """Split ``(…, Dv + 1)`` sums into numerator and normaliser; zeros where the normaliser is not positive."""
    return out[..., :dv] / _safe_denominator(out[..., dv:])


def _safe_denominator(den: Tensor) -> Tensor:
    # With non-negative features a zero normaliser means every weight is zero, so the numerator
    # is exactly zero too: dividing it by 1 gives the zeros of a query that sees no key. (A
    # reciprocal would overflow for tiny but positive normalisers.)
    return torch.where(den > 0, den, torch.ones_like(den))


def upcast(x: Tensor) -> Tensor:
    """Half-precision inputs are accumulated in float32: sums run over thousands of keys."""
    return x.float() if x.element_size() < 4 else x


def _drop_padded(
    k: Tensor, v: Tensor, key_log_scale: Tensor | None, attention_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    # Zero features and values of padded keys, and keep them out of every running maximum.
    if attention_mask is None:
        return k, v, key_log_scale
    real = attention_mask[:, None, :, None]
    k = k.masked_fill(~real, 0.0)
    v = v.masked_fill(~real, 0.0)
    if key_log_scale is not None:
        key_log_scale = key_log_scale.masked_fill(~real[..., 0], NEG)
    return k, v, key_log_scale
