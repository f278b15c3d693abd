"""The normalised chunked prefix core (attnkit.kernels.prefix) against a float64 quadratic formula.

The reference forms the explicit (T, S) matrix of feature products ``φq_t·φk_s e^{a_s}``,
masks it, and normalises by its row sums: no chunks, no running sums, no stabilisers.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import Tensor

from attnkit.kernels import prefix
from attnkit.kernels.prefix import PrefixState, empty_buffer, huge_page_advice, kernel_attention, kernel_decode

F64 = torch.float64


def naive(q: Tensor, k: Tensor, v: Tensor, log_scale: Tensor | None, real: Tensor | None, causal: bool) -> Tensor:
    """``Σ_s w_ts v_s / Σ_s w_ts`` with ``w_ts = (q_t·k_s) e^{a_s}`` over visible real keys; zero rows if none."""
    weights = q @ k.transpose(-1, -2)
    if log_scale is not None:
        weights = weights * log_scale.exp()[..., None, :]
    if real is not None:
        weights = weights * real[:, None, None, :]
    if causal:
        t_len, s_len = weights.shape[-2:]
        weights = weights * torch.ones(t_len, s_len, dtype=torch.bool).tril(diagonal=s_len - t_len)
    den = weights.sum(dim=-1, keepdim=True)
    return (weights @ v) / torch.where(den > 0, den, torch.ones_like(den))


def inputs(t_len: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.rand(2, 3, t_len, 6, generator=g, dtype=F64) for _ in range(2))
    v = torch.randn(2, 3, t_len, 5, generator=g, dtype=F64)
    a = 6.0 * torch.randn(2, 3, t_len, generator=g, dtype=F64)  # spans e^{±20}: needs the stabiliser
    return q, k, v, a


def weighted_grads(out: Tensor, leaves: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return torch.autograd.grad((out * weight).sum(), leaves)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_normalised_attention_equals_naive_with_gradients(chunk: int, scaled: bool, causal: bool) -> None:
    q, k, v, a = inputs(37, seed=chunk)
    real = torch.ones(2, 37, dtype=torch.bool)
    real[1, :9] = False  # leading padding: early queries of batch 1 see no key at all
    log_scale = a if scaled else None
    ours = tuple(x.clone().requires_grad_(True) for x in (q, k, v))
    ref = tuple(x.clone().requires_grad_(True) for x in (q, k, v))
    out = kernel_attention(*ours, causal=causal, attention_mask=real, key_log_scale=log_scale, chunk_size=chunk)
    want = naive(*ref, log_scale, real, causal)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    for got, expected in zip(weighted_grads(out, ours), weighted_grads(want, ref)):
        torch.testing.assert_close(got, expected, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_buffers_with_huge_page_advice_give_the_same_results(
    monkeypatch: pytest.MonkeyPatch, scaled: bool, causal: bool
) -> None:
    # every buffer takes the advice path (the 2 MB-aligned interior of these is empty: no call)
    monkeypatch.setattr(prefix, "HUGE_PAGE_MIN_BYTES", 1)
    q, k, v, a = inputs(29, seed=3)
    ours = tuple(x.clone().requires_grad_(True) for x in (q, k, v))
    ref = tuple(x.clone().requires_grad_(True) for x in (q, k, v))
    with huge_page_advice(True):
        out = kernel_attention(*ours, causal=causal, key_log_scale=a if scaled else None, chunk_size=8)
    want = naive(*ref, a if scaled else None, None, causal)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    for got, expected in zip(weighted_grads(out, ours), weighted_grads(want, ref)):
        torch.testing.assert_close(got, expected, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("features", [4, 6])
@pytest.mark.parametrize("scaled", [False, True])
def test_retained_graph_gives_the_same_gradients_twice(features: int, scaled: bool) -> None:
    # the backward writes into buffers of its own, never into saved tensors (chunk = features = values
    # reuses the scores' buffer for the running sums; 6 features keeps the scores for the backward)
    g = torch.Generator().manual_seed(5)
    q, k = (torch.rand(1, 2, 19, features, generator=g, dtype=F64, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 19, 4, generator=g, dtype=F64, requires_grad=True)
    a = torch.randn(1, 2, 19, generator=g, dtype=F64) if scaled else None
    out = kernel_attention(q, k, v, causal=True, key_log_scale=a, chunk_size=4)
    loss = (out * torch.randn(out.shape, generator=g, dtype=F64)).sum()
    first = torch.autograd.grad(loss, (q, k, v), retain_graph=True)
    second = torch.autograd.grad(loss, (q, k, v))
    for x, y in zip(first, second):
        torch.testing.assert_close(x, y, atol=0.0, rtol=0.0)


def _recorded_advice(monkeypatch: pytest.MonkeyPatch, *, tiny_pages: bool = False) -> list[tuple[int, int]]:
    """Record every madvise call, still advising for real where the platform has it.

    ``tiny_pages``: 64-byte "huge pages", so that small buffers have an aligned interior too
    (recorded only, never passed to the kernel). Buffers are not pooled here: every request
    allocates, so each one shows its advice.
    """
    monkeypatch.setattr(prefix, "HUGE_PAGE_MIN_BYTES", 1)
    monkeypatch.setattr(prefix, "_pool_enabled", lambda: False)
    calls: list[tuple[int, int]] = []
    advise = None if tiny_pages else prefix._madvise()
    if tiny_pages:
        monkeypatch.setattr(prefix, "_HUGE_PAGE", 64)

    def recorded(start: int, length: int, flag: int) -> int:
        calls.append((start, length))
        return advise(start, length, flag) if advise is not None else 0

    monkeypatch.setattr(prefix, "_madvise", lambda: recorded)
    return calls


def test_large_buffer_is_advised_and_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _recorded_advice(monkeypatch)
    like = torch.zeros(1, dtype=torch.float32)
    with huge_page_advice(True):
        buf = empty_buffer(like, (3, 1 << 20))  # 12 MB: at least one aligned 2 MB page inside
    assert buf.shape == (3, 1 << 20) and buf.dtype == torch.float32
    buf.fill_(2.0)
    assert float(buf.sum()) == 2.0 * buf.numel()
    assert len(calls) == 1
    start, length = calls[0]
    assert start % (1 << 21) == 0 and length % (1 << 21) == 0 and length >= 1 << 21
    assert buf.data_ptr() <= start and start + length <= buf.data_ptr() + 4 * buf.numel()


def test_advice_is_off_by_default_and_scoped(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _recorded_advice(monkeypatch)
    like = torch.zeros(1)
    empty_buffer(like, (3, 1 << 20))
    assert calls == []  # no context: no advice
    with huge_page_advice(True):
        with huge_page_advice(False):
            empty_buffer(like, (3, 1 << 20))
        assert calls == []
        empty_buffer(like, (3, 1 << 20))
    assert len(calls) == 1
    empty_buffer(like, (3, 1 << 20))
    assert len(calls) == 1  # the context is left as it was found


@pytest.mark.parametrize("causal", [False, True])
def test_backward_keeps_the_forward_passes_advice(monkeypatch: pytest.MonkeyPatch, causal: bool) -> None:
    # the backward pass runs after the forward's context is gone: it follows the forward's choice
    g = torch.Generator().manual_seed(2)
    q, k = (torch.rand(1, 2, 64, 16, generator=g, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 64, 16, generator=g, requires_grad=True)
    for advise in (False, True):
        calls = _recorded_advice(monkeypatch, tiny_pages=True)
        with huge_page_advice(advise):
            out = kernel_attention(q, k, v, causal=causal, chunk_size=16)
        forward_calls = len(calls)
        assert (forward_calls > 0) == advise
        out.sum().backward()
        assert (len(calls) > forward_calls) == advise
        monkeypatch.undo()


@pytest.mark.parametrize(("value", "forced"), [("0", False), ("1", True)])
def test_environment_forces_the_advice(monkeypatch: pytest.MonkeyPatch, value: str, forced: bool) -> None:
    monkeypatch.setenv(prefix.HUGE_PAGES_ENV, value)
    prefix._forced.cache_clear()
    prefix._madvise.cache_clear()
    try:
        for context in (False, True):
            with huge_page_advice(context):
                assert prefix.advising() is forced
        if not forced:
            assert prefix._madvise() is None
        monkeypatch.setattr(prefix, "HUGE_PAGE_MIN_BYTES", 1)
        buf = empty_buffer(torch.zeros(1), (2, 1 << 20))
        assert buf.shape == (2, 1 << 20)
    finally:
        monkeypatch.delenv(prefix.HUGE_PAGES_ENV)
        prefix._forced.cache_clear()
        prefix._madvise.cache_clear()
    assert prefix.advising() is False
    if sys.platform.startswith("linux"):
        assert prefix._madvise() is not None


def test_environment_value_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(prefix.HUGE_PAGES_ENV, "yes")
    prefix._forced.cache_clear()
    try:
        with pytest.raises(ValueError, match="ATTNKIT_HUGE_PAGES must be 0"):
            prefix.advising()
    finally:
        monkeypatch.delenv(prefix.HUGE_PAGES_ENV)
        prefix._forced.cache_clear()


@pytest.mark.parametrize("scaled", [False, True])
def test_decoding_in_pieces_carries_numerator_and_normaliser(scaled: bool) -> None:
    """Prompt pieces through the chunked core with a state, then single tokens, equal one causal pass."""
    q, k, v, a = inputs(40, seed=7)
    state = PrefixState()
    pieces = []
    for lo, hi in [(0, 13), (13, 14), (14, 31), (31, 32), (32, 40)]:
        pieces.append(
            kernel_decode(
                q[:, :, lo:hi],
                k[:, :, lo:hi],
                v[:, :, lo:hi],
                state,
                key_log_scale=a[:, :, lo:hi] if scaled else None,
                chunk_size=4,
            )
        )
    want = naive(q, k, v, a if scaled else None, None, causal=True)
    torch.testing.assert_close(torch.cat(pieces, dim=2), want, atol=1e-12, rtol=1e-10)
    assert state.length == 40 and state.kv is not None and state.kv.shape == (2, 3, 6, 6)  # (F, Dv + 1)


def test_queries_longer_and_shorter_than_keys_are_end_aligned() -> None:
    q, k, v, a = inputs(20, seed=3)
    for t_len, s_len in [(7, 20), (20, 7)]:
        out = kernel_attention(
            q[:, :, :t_len], k[:, :, :s_len], v[:, :, :s_len], causal=True, key_log_scale=a[:, :, :s_len], chunk_size=3
        )
        want = naive(q[:, :, :t_len], k[:, :, :s_len], v[:, :, :s_len], a[:, :, :s_len], None, causal=True)
        torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_only_performer_asks_for_huge_pages(monkeypatch: pytest.MonkeyPatch, causal: bool) -> None:
    # the measured choice (huge_page_advice's docstring): Performer's wide features advise, linear does not
    import attnkit

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g, requires_grad=True) for _ in range(3))
    for name, options, expected in (("linear", {}, False), ("performer", {"nb_features": 16, "seed": 1}, True)):
        calls = _recorded_advice(monkeypatch, tiny_pages=True)
        out = attnkit.build_attention(name, chunk_size=8, **options)(q, k, v, causal=causal)
        forward_calls = len(calls)
        out.sum().backward()
        assert (forward_calls > 0) is expected, name
        assert (len(calls) > forward_calls) is expected, name
        monkeypatch.undo()


# -- the buffer pool ------------------------------------------------------------------------
@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> prefix._BufferPool:
    """A fresh pool, on whatever the environment says, with 1 MB as the smallest pooled buffer."""
    fresh = prefix._BufferPool()
    monkeypatch.setattr(prefix, "_POOL", fresh)
    monkeypatch.setattr(prefix, "_pool_enabled", lambda: True)
    monkeypatch.setattr(prefix, "POOL_MIN_BYTES", 1 << 20)
    return fresh


MB = (1 << 20) // 4  # float32 elements in 1 MB


def test_a_dropped_buffer_is_reused_and_one_in_use_is_not(pool: prefix._BufferPool) -> None:
    like = torch.zeros(1)
    first = empty_buffer(like, (2, MB))
    address = first.data_ptr()
    held = empty_buffer(like, (2, MB))  # the first is still referenced: a new buffer
    assert held.data_ptr() != address
    del first
    again = empty_buffer(like, (MB, 2))  # same size, other shape: the dropped buffer
    assert again.data_ptr() == address and again.shape == (MB, 2)
    assert pool.stats() == (2, 2 * (2 << 20))  # two 2 MB buffers


def test_a_view_or_an_autograd_graph_keeps_a_buffer_in_use(pool: prefix._BufferPool) -> None:
    like = torch.zeros(1)
    buf = empty_buffer(like, (2, MB))
    address = buf.data_ptr()
    row = buf[1]  # a view alone keeps the storage
    del buf
    assert empty_buffer(like, (2, MB)).data_ptr() != address
    del row
    # saved for backward: in use until the graph goes
    weight = torch.ones(2, MB, requires_grad=True)
    buf = empty_buffer(like, (2, MB)).fill_(3.0)
    address = buf.data_ptr()
    loss = (weight * buf).sum()
    del buf
    other = empty_buffer(like, (2, MB)).fill_(-1.0)  # must not overwrite the saved factor
    assert other.data_ptr() != address
    loss.backward()
    assert weight.grad is not None and bool((weight.grad == 3.0).all())
    del loss
    assert empty_buffer(like, (2, MB)).data_ptr() == address


def test_small_buffers_other_types_and_the_switch_bypass_the_pool(
    pool: prefix._BufferPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty_buffer(torch.zeros(1), (MB // 2,))  # 512 KB: below the pool's minimum
    assert pool.stats() == (0, 0)
    single = empty_buffer(torch.zeros(1), (MB,))
    address = single.data_ptr()
    del single  # idle now, but a float64 request of as many elements is not served by it
    double = empty_buffer(torch.zeros(1, dtype=torch.float64), (MB,))
    assert double.dtype == torch.float64 and double.data_ptr() != address and pool.stats()[0] == 2
    monkeypatch.setattr(prefix, "_pool_enabled", lambda: False)
    empty_buffer(torch.zeros(1), (MB,))
    assert pool.stats()[0] == 2


def test_idle_buffers_are_released_when_stale_over_the_cap_or_on_request(
    pool: prefix._BufferPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    like = torch.zeros(1)
    mib = 1 << 20
    empty_buffer(like, (MB,))  # request 1: dropped at once, idle from here on
    kept = empty_buffer(like, (2 * MB,))  # request 2: in use throughout
    monkeypatch.setattr(prefix, "POOL_STALE_TAKES", 3)
    for _ in range(3):  # requests 3-5: one new 3 MB buffer, reused twice
        empty_buffer(like, (3 * MB,))
    assert pool.stats() == (3, 6 * mib)
    empty_buffer(like, (4 * MB,))  # request 6 allocates: the 1 MB buffer, idle since request 1, goes
    assert pool.stats() == (3, 9 * mib)
    monkeypatch.setattr(prefix, "POOL_MAX_IDLE_BYTES", 4 * mib)
    empty_buffer(like, (5 * MB,))  # idle 3 + 4 MB > 4 MB: the older idle one (3 MB) goes
    assert pool.stats() == (3, 11 * mib)
    assert prefix.release_buffers() == 9 * mib  # every idle one; the one in use stays
    assert pool.stats() == (1, 2 * mib)
    del kept
    assert prefix.release_buffers() == 2 * mib and pool.stats() == (0, 0)


def test_pool_switch_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    for value, enabled in (("0", False), ("1", True), ("", True)):
        monkeypatch.setenv(prefix.BUFFER_POOL_ENV, value)
        prefix._pool_enabled.cache_clear()
        assert prefix._pool_enabled() is enabled
    monkeypatch.setenv(prefix.BUFFER_POOL_ENV, "off")
    prefix._pool_enabled.cache_clear()
    with pytest.raises(ValueError, match="ATTNKIT_BUFFER_POOL must be 0"):
        prefix._pool_enabled()
    monkeypatch.delenv(prefix.BUFFER_POOL_ENV)
    prefix._pool_enabled.cache_clear()


def test_pooled_buffers_give_the_same_results_step_after_step() -> None:
    """Training steps reuse the pool's buffers: the gradients stay those of the float64 formula."""
    g = torch.Generator().manual_seed(5)
    q, k = (torch.rand(2, 3, 1500, 64, generator=g, dtype=torch.float64) for _ in range(2))  # positive features
    v = torch.randn(2, 3, 1500, 64, generator=g, dtype=torch.float64)
    want = []
    for causal in (False, True):
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        naive(qq, kk, vv, None, None, causal=causal).sum().backward()
        want.append([x.grad for x in (qq, kk, vv)])
    q32, k32, v32 = (x.float().requires_grad_(True) for x in (q, k, v))
    for _step in range(3):
        for causal, grads in zip((False, True), want, strict=True):
            for x in (q32, k32, v32):
                x.grad = None
            kernel_attention(q32, k32, v32, causal=causal, chunk_size=64).sum().backward()
            for x, expected in zip((q32, k32, v32), grads, strict=True):
                assert x.grad is not None
                torch.testing.assert_close(x.grad.double(), expected, atol=2e-3, rtol=2e-3)
