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
from attnkit.kernels.prefix import PrefixState, empty_buffer, kernel_attention, kernel_decode

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
    out = kernel_attention(*ours, causal=causal, key_padding_mask=real, key_log_scale=log_scale, chunk_size=chunk)
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


def test_large_buffer_is_advised_and_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefix, "HUGE_PAGE_MIN_BYTES", 1)
    calls: list[tuple[int, int]] = []
    advise = prefix._madvise()
    if advise is not None:  # record the calls, still advising for real

        def recorded(start: int, length: int, flag: int) -> int:
            calls.append((start, length))
            return advise(start, length, flag)

        monkeypatch.setattr(prefix, "_madvise", lambda: recorded)
    like = torch.zeros(1, dtype=torch.float32)
    buf = empty_buffer(like, (3, 1 << 20))  # 12 MB: at least one aligned 2 MB page inside
    assert buf.shape == (3, 1 << 20) and buf.dtype == torch.float32
    buf.fill_(2.0)
    assert float(buf.sum()) == 2.0 * buf.numel()
    if sys.platform.startswith("linux"):
        assert len(calls) == 1
        start, length = calls[0]
        assert start % (1 << 21) == 0 and length % (1 << 21) == 0 and length >= 1 << 21
        assert buf.data_ptr() <= start and start + length <= buf.data_ptr() + 4 * buf.numel()


def test_huge_page_advice_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(prefix.HUGE_PAGES_ENV, "0")
    prefix._madvise.cache_clear()
    try:
        assert prefix._madvise() is None
        monkeypatch.setattr(prefix, "HUGE_PAGE_MIN_BYTES", 1)
        buf = empty_buffer(torch.zeros(1), (2, 1 << 20))
        assert buf.shape == (2, 1 << 20)
    finally:
        monkeypatch.delenv(prefix.HUGE_PAGES_ENV)
        prefix._madvise.cache_clear()
    if sys.platform.startswith("linux"):
        assert prefix._madvise() is not None


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
