"""Linear attention's cores (attnkit.kernels.prefix and the modules it calls) against a float64 quadratic formula.

The reference forms the explicit (T, S) matrix of feature products ``φq_t·φk_s e^{a_s}``,
masks it, and normalises by its row sums: no chunks, no running sums, no stabilisers.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from attnkit.kernels import linear_features
from attnkit.kernels.causal_prefix import CausalSettings, causal_prefix
from attnkit.kernels.prefix import kernel_attention
from attnkit.kernels.recurrent import PrefixState, kernel_decode

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


class Elu1:
    """``φ(x) = elu(x) + 1`` as a :class:`~attnkit.kernels.linear_features.FeatureMap` (derivative through φ)."""

    def into(self, x: Tensor, out: Tensor) -> Tensor:
        return out.copy_(torch.nn.functional.elu(x)).add_(1.0)

    def derivative_into(self, phi: Tensor, out: Tensor) -> Tensor:
        # elu'(x) = 1 for x > 0 (φ > 1), e^x = φ otherwise
        return out.copy_(torch.where(phi > 1.0, torch.ones_like(phi), phi))


@pytest.mark.parametrize("causal", [False, True])
def test_feature_map_inside_the_cores_in_small_blocks_equals_naive(
    monkeypatch: pytest.MonkeyPatch, causal: bool
) -> None:
    """φ applied by the cores a group of heads / a block of rows at a time, with tiny blocks, equals φ applied first."""
    monkeypatch.setattr(linear_features, "BLOCK_BYTES", 4 * 2 * 2 * 6 * 5)  # a few rows, one head at a time
    g = torch.Generator().manual_seed(11)
    q, k = (torch.randn(2, 3, 37, 6, generator=g, dtype=F64) for _ in range(2))
    v = torch.randn(2, 3, 37, 5, generator=g, dtype=F64)
    ours = tuple(x.clone().requires_grad_(True) for x in (q, k, v))
    ref = tuple(x.clone().requires_grad_(True) for x in (q, k, v))
    out = kernel_attention(*ours, causal=causal, feature_map=Elu1(), chunk_size=8)
    phi = [torch.nn.functional.elu(x) + 1.0 for x in ref[:2]]
    want = naive(phi[0], phi[1], ref[2], None, None, causal)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    for got, expected in zip(weighted_grads(out, ours), weighted_grads(want, ref)):
        torch.testing.assert_close(got, expected, atol=1e-11, rtol=1e-9)


def test_causal_prefix_state_continues_the_sums() -> None:
    """Two calls of the typed core, the second starting from the first's state, equal one pass (unnormalised)."""
    q, k, v, a = inputs(30, seed=9)
    settings = CausalSettings(chunk_size=4, need_state=True)
    first = causal_prefix(q[:, :, :11], k[:, :, :11], v[:, :, :11], settings=settings, key_log_scale=a[:, :, :11])
    second = causal_prefix(
        q[:, :, 11:],
        k[:, :, 11:],
        v[:, :, 11:],
        settings=settings,
        key_log_scale=a[:, :, 11:],
        initial_sums=first.sums,
        initial_ref=first.ref,
    )
    assert first.normaliser is None and second.sums is not None and second.ref is not None
    # unnormalised outputs are scaled by exp(-M_t), M_t the running maximum of the log-scales
    running = a.cummax(dim=-1).values
    weights = (q @ k.transpose(-1, -2)) * (a[..., None, :] - running[..., :, None]).exp()
    want = (weights * torch.ones(30, 30, dtype=torch.bool).tril()) @ v
    torch.testing.assert_close(torch.cat([first.out, second.out], dim=2), want, atol=1e-12, rtol=1e-10)
    # the final state: Σ_s φ(k_s) e^{a_s - ref} v_sᵀ with ref the maximum of every log-scale
    ref = a.amax(dim=-1)
    want_sums = (k * (a - ref[..., None]).exp()[..., None]).transpose(-1, -2) @ v
    torch.testing.assert_close(second.sums, want_sums, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(second.ref, ref, atol=0.0, rtol=0.0)


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
