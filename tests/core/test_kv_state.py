"""KVState: the preallocated growing cache equals plain concatenation, step by step."""

from __future__ import annotations

import pytest
import torch

from attnkit import KVState, build_attention, reference_attention
from attnkit.models.cache import reorder_batch


def test_appends_equal_concatenation_and_earlier_views_stay_intact() -> None:
    g = torch.Generator().manual_seed(0)
    state = KVState()
    keys, values, pads, seen = [], [], [], []
    for step, t in enumerate([5, 1, 1, 3, 1, 70, 1, 1, 40, 1]):
        k = torch.randn(2, 3, t, 4, generator=g)
        v = torch.randn(2, 3, t, 6, generator=g)
        pad = None if step < 3 else torch.rand(2, t, generator=g) > 0.3  # padding appears mid-way
        state.append(k, v, pad)
        keys.append(k)
        values.append(v)
        pads.append(torch.ones(2, t, dtype=torch.bool) if pad is None else pad)
        assert torch.equal(state.keys, torch.cat(keys, dim=2))
        assert torch.equal(state.values, torch.cat(values, dim=2))
        if step >= 3:
            assert torch.equal(state.key_padding, torch.cat(pads, dim=1))
        else:
            assert state.key_padding is None
        seen.append((state.keys, torch.cat(keys, dim=2).clone()))
    assert state.key_store is not None and state.key_store.shape[2] >= state.length
    for view, expected in seen:  # later writes never touched positions an earlier view covers
        assert torch.equal(view, expected)


def test_reordered_cache_keeps_appending_correctly() -> None:
    g = torch.Generator().manual_seed(1)
    state = KVState()
    pieces = [torch.randn(3, 2, t, 4, generator=g) for t in (4, 1, 1)]
    for p in pieces:
        state.append(p, p + 1, None)
    index = torch.tensor([2, 2, 0])
    reorder_batch(state, index, 3)
    new = torch.randn(3, 2, 1, 4, generator=g)
    state.append(new, new + 1, None)
    expected = torch.cat([torch.cat(pieces, dim=2).index_select(0, index), new], dim=2)
    assert torch.equal(state.keys, expected) and torch.equal(state.values, expected + 1)


def test_cache_under_autograd_concatenates_so_gradients_flow() -> None:
    state = KVState()
    k1 = torch.randn(1, 1, 3, 2, requires_grad=True)
    k2 = torch.randn(1, 1, 1, 2, requires_grad=True)
    state.append(k1, k1 * 2, None)
    first = state.keys
    assert first is not None
    saved = (first * first).sum()  # autograd keeps ``first`` for the backward
    state.append(k2, k2 * 2, None)
    assert state.key_store is None  # no in-place store while autograd records
    (saved + state.values.sum()).backward()
    assert torch.equal(k1.grad, 2 * k1.detach() + 2) and torch.equal(k2.grad, torch.full_like(k2, 2.0))


def test_decode_with_grouped_keys_caches_kv_heads_and_equals_the_float64_oracle() -> None:
    """decode() takes keys/values with H_kv heads (H_kv dividing H): the cache keeps H_kv heads."""
    g = torch.Generator().manual_seed(3)
    heads, kv_heads, length = 6, 2, 9
    q = torch.randn(2, heads, length, 4, generator=g)
    k = torch.randn(2, kv_heads, length, 4, generator=g)
    v = torch.randn(2, kv_heads, length, 5, generator=g)
    # the oracle sees every query head with its group's key/value head, written out
    group = [j // (heads // kv_heads) for j in range(heads)]
    expected = reference_attention(q, k[:, group], v[:, group], causal=True)
    attention = build_attention("full")
    state = attention.new_state()
    out = torch.cat(
        [attention.decode(q[:, :, i : i + 1], k[:, :, i : i + 1], v[:, :, i : i + 1], state) for i in range(length)],
        dim=2,
    )
    assert (out.double() - expected).abs().max() <= 1e-5
    assert state.keys.shape == (2, kv_heads, length, 4) and state.values.shape == (2, kv_heads, length, 5)


def test_decode_refuses_key_heads_that_do_not_divide_the_query_heads() -> None:
    attention = build_attention("full")
    q, k = torch.randn(1, 6, 1, 4), torch.randn(1, 4, 1, 4)
    with pytest.raises(ValueError, match=r"k must have shape \(1, 6 or a divisor of 6, S, 4\)"):
        attention.decode(q, k, k, attention.new_state())
    with pytest.raises(ValueError, match=r"k must have shape \(1, 6, S, 4\)"):
        attention(q, k, k)  # a forward call takes H key/value heads: MultiHeadAttention expands them
