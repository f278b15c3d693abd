"""The pool of CPU work buffers (attnkit.kernels.buffers): reuse only what nothing references any more.

Each test checks addresses and contents against what it holds itself: a buffer that a live
tensor, view, dtype view, bare storage or autograd graph still uses must never be handed out
again, and one that nothing uses must be.
"""

from __future__ import annotations

import pytest
import torch

from attnkit.kernels import buffers
from attnkit.kernels.buffers import BufferPool, empty_buffer

MB = (1 << 20) // 4  # float32 elements in 1 MB
MIB = 1 << 20


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> BufferPool:
    """A fresh, enabled pool whatever the environment says, with 1 MB as the smallest pooled buffer."""
    fresh = BufferPool()
    monkeypatch.setattr(buffers, "_POOL", fresh)
    monkeypatch.setattr(buffers, "pool_enabled", lambda: True)
    monkeypatch.setattr(buffers, "POOL_MIN_BYTES", MIB)
    return fresh


def test_a_dropped_buffer_is_reused_and_one_in_use_is_not(pool: BufferPool) -> None:
    like = torch.zeros(1)
    first = empty_buffer(like, (2, MB))
    address = first.data_ptr()
    held = empty_buffer(like, (2, MB))  # the first is still referenced: a new buffer
    assert held.data_ptr() != address
    del first
    again = empty_buffer(like, (MB, 2))  # same size, other shape: the dropped buffer
    assert again.data_ptr() == address and again.shape == (MB, 2) and again.dtype == torch.float32
    assert again.is_contiguous()
    assert pool.stats() == (2, 2 * 2 * MIB)  # two 2 MB buffers


@pytest.mark.parametrize(
    "keep",
    [
        lambda t: t[1],  # a view
        lambda t: t.view(torch.int32),  # a view as another dtype
        lambda t: t.untyped_storage(),  # the bare storage
        lambda t: [t.view(-1)[5:]],  # a view inside a container
    ],
    ids=["view", "dtype-view", "storage", "listed-view"],
)
def test_anything_sharing_the_memory_keeps_a_buffer_in_use(pool: BufferPool, keep: object) -> None:
    like = torch.zeros(1)
    buf = empty_buffer(like, (2, MB)).fill_(7.0)
    address = buf.data_ptr()
    kept = keep(buf)  # type: ignore[operator]  # (the parametrized lambdas)
    del buf
    other = empty_buffer(like, (2, MB)).fill_(-1.0)
    assert other.data_ptr() != address
    if isinstance(kept, torch.UntypedStorage):  # untouched by the new request
        assert bool((torch.empty(0).set_(kept, 0, (2 * MB,)) == 7.0).all())
    del kept, other
    assert empty_buffer(like, (2, MB)).data_ptr() == address  # nothing uses it now


def test_an_autograd_graph_keeps_a_buffer_in_use(pool: BufferPool) -> None:
    like = torch.zeros(1)
    weight = torch.ones(2, MB, requires_grad=True)
    buf = empty_buffer(like, (2, MB)).fill_(3.0)
    address = buf.data_ptr()
    loss = (weight * buf).sum()  # saves buf for the backward
    del buf
    other = empty_buffer(like, (2, MB)).fill_(-1.0)  # must not overwrite the saved factor
    assert other.data_ptr() != address
    loss.backward()
    assert weight.grad is not None and bool((weight.grad == 3.0).all())
    del loss
    assert empty_buffer(like, (2, MB)).data_ptr() == address


def test_buffers_are_aligned_and_take_any_dtype(pool: BufferPool) -> None:
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.bool):
        buf = empty_buffer(torch.zeros(1, dtype=dtype), (3, MIB // 3))
        assert buf.dtype == dtype and buf.shape == (3, MIB // 3) and buf.data_ptr() % 64 == 0
        buf.fill_(1)
        assert bool((buf == 1).all())


def test_small_buffers_other_types_and_the_switch_bypass_the_pool(
    pool: BufferPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty_buffer(torch.zeros(1), (MB // 2,))  # 512 KB: below the pool's minimum
    assert pool.stats() == (0, 0)
    single = empty_buffer(torch.zeros(1), (MB,))
    address = single.data_ptr()
    del single  # idle now, but a request of another type is not served by it, even of as many bytes
    as_int = empty_buffer(torch.zeros(1, dtype=torch.int32), (MB,))
    assert as_int.dtype == torch.int32 and as_int.data_ptr() != address and pool.stats()[0] == 2
    monkeypatch.setattr(buffers, "pool_enabled", lambda: False)
    empty_buffer(torch.zeros(1), (MB,))
    assert pool.stats()[0] == 2


def test_idle_buffers_are_released_when_stale_over_the_cap_or_on_request(
    pool: BufferPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    like = torch.zeros(1)
    empty_buffer(like, (MB,))  # request 1: dropped at once, idle from here on
    kept = empty_buffer(like, (2 * MB,))  # request 2: in use throughout
    monkeypatch.setattr(buffers, "POOL_STALE_TAKES", 3)
    for _ in range(3):  # requests 3-5: one new 3 MB buffer, reused twice
        empty_buffer(like, (3 * MB,))
    assert pool.stats() == (3, 6 * MIB)
    empty_buffer(like, (4 * MB,))  # request 6 allocates: the 1 MB buffer, idle since request 1, goes
    assert pool.stats() == (3, 9 * MIB)
    monkeypatch.setattr(buffers, "POOL_MAX_IDLE_BYTES", 4 * MIB)
    empty_buffer(like, (5 * MB,))  # idle 3 + 4 MB > 4 MB: the older idle one (3 MB) goes
    assert pool.stats() == (3, 11 * MIB)
    assert buffers.release_buffers() == 9 * MIB  # every idle one; the one in use stays
    assert pool.stats() == (1, 2 * MIB)
    del kept
    assert buffers.release_buffers() == 2 * MIB and pool.stats() == (0, 0)


def test_pool_switch_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        for value, enabled in (("0", False), ("1", True), ("", True)):
            monkeypatch.setenv(buffers.BUFFER_POOL_ENV, value)
            buffers.pool_enabled.cache_clear()
            assert buffers.pool_enabled() is enabled
        monkeypatch.setenv(buffers.BUFFER_POOL_ENV, "off")
        buffers.pool_enabled.cache_clear()
        with pytest.raises(ValueError, match=r"ATTNKIT_BUFFER_POOL must be 0 .* got 'off'"):
            buffers.pool_enabled()
    finally:
        monkeypatch.delenv(buffers.BUFFER_POOL_ENV, raising=False)
        buffers.pool_enabled.cache_clear()
