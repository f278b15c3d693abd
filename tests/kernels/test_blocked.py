"""The blocked gather core against the float64 oracle over the same pattern, materialized by hand."""

from __future__ import annotations

import pytest
import torch

from attnkit.attention.reference import reference_attention
from attnkit.kernels.blocked import (
    GatherPattern,
    gathered_attention,
    gathered_attention_with_lse,
    merge_attention,
    span_pattern,
)
from attnkit.masks.functions import Mask, sliding_window_mask
from attnkit.positions import ALiBi, T5RelativeBias
from tests.helpers import random_padding, structured_qkv


def dense_mask(pattern: GatherPattern, batch: int, heads: int, q_len: int, kv_len: int) -> torch.Tensor:
    """The pattern as a dense bool (B, H, T, S), by looping over groups and slots."""
    allowed = torch.zeros(batch, heads, q_len, kv_len, dtype=torch.bool)
    kv_index = pattern.kv_index.expand(batch, heads, -1, -1)
    for b in range(batch):
        for h in range(heads):
            for g in range(pattern.num_groups):
                if pattern.q_index is None:
                    queries = [g * pattern.group_size + i for i in range(pattern.group_size)]
                else:
                    queries = pattern.q_index.expand(batch, 1, -1, -1)[b, 0, g].tolist()
                for i in queries:
                    if not 0 <= i < q_len:
                        continue
                    for j in kv_index[b, h, g].tolist():
                        if not 0 <= j < kv_len:
                            continue
                        seen = True
                        if pattern.element_mask is not None:
                            idx = [torch.tensor(x) for x in (b, h, i, j)]
                            seen = bool(pattern.element_mask(*idx))
                        allowed[b, h, i, j] = seen
    return allowed


def random_pattern(q_len: int, kv_len: int, size: int, width: int, *, per_batch: bool, seed: int) -> GatherPattern:
    """Random duplicate-free key lists per group (per batch and head), random element mask."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-q_len // size)
    bk, hk = (2, 3) if per_batch else (1, 1)
    lists = torch.stack([torch.randperm(kv_len + 4, generator=g)[:width] for _ in range(bk * hk * groups)])
    lists = torch.where(lists < kv_len, lists, -1).view(bk, hk, groups, width)
    parity = Mask(lambda b, h, q, k: (q * 7 + k * 3 + h).remainder(5) != 0, "parity")
    return GatherPattern(size, lists, parity)


@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_random_patterns_match_reference_with_gradients(per_batch: bool, padded: bool) -> None:
    q_len, kv_len = 23, 29
    q, k, v = structured_qkv(2, 3, q_len, kv_len, 8, seed=1, dtype=torch.float64, requires_grad=True)
    pattern = random_pattern(q_len, kv_len, 5, 11, per_batch=per_batch, seed=2)
    kpm = random_padding(2, kv_len, seed=3, min_real=10) if padded else None
    out = gathered_attention(q, k, v, pattern, attention_mask=kpm)
    ref = reference_attention(q, k, v, attention_mask=kpm, mask=dense_mask(pattern, 2, 3, q_len, kv_len))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad((out * grad).sum(), (q, k, v))
    theirs = torch.autograd.grad((ref * grad).sum(), (q, k, v))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_explicit_query_groups_and_empty_rows() -> None:
    q_len, kv_len = 12, 12
    q, k, v = structured_qkv(1, 2, q_len, kv_len, 8, seed=4, dtype=torch.float64, requires_grad=True)
    # two groups holding odd queries only; even queries belong to no group -> zeros
    rows = torch.tensor([[1, 3, 5], [7, 9, 11]]).view(1, 1, 2, 3)
    keys = torch.tensor([[0, 1, 2, 3, 4], [6, 7, 8, -1, 11]]).view(1, 1, 2, 5)
    pattern = GatherPattern(3, keys, None, q_index=rows)
    out, lse = gathered_attention_with_lse(q, k, v, pattern)
    ref = reference_attention(q, k, v, mask=dense_mask(pattern, 1, 2, q_len, kv_len))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    assert torch.equal(out[:, :, 0::2], torch.zeros_like(out[:, :, 0::2]))
    assert torch.isinf(lse[:, :, 0::2]).all() and (lse[:, :, 0::2] < 0).all()
    out.sum().backward()
    assert q.grad is not None and torch.equal(q.grad[:, :, 0::2], torch.zeros_like(q.grad[:, :, 0::2]))


def test_merge_of_disjoint_parts_is_softmax_over_the_union() -> None:
    q_len = kv_len = 19
    q, k, v = structured_qkv(2, 2, q_len, kv_len, 8, seed=5, dtype=torch.float64, requires_grad=True)
    near = Mask(lambda b, h, qi, ki: (qi - ki).abs() <= 2, "near")
    far_even = Mask(lambda b, h, qi, ki: ((qi - ki).abs() > 2) & (ki.remainder(2) == 0), "far_even")
    every_key = torch.arange(kv_len).view(1, 1, 1, -1).expand(1, 1, 4, -1)
    parts = [
        gathered_attention_with_lse(q, k, v, span_pattern(q_len, kv_len, 4, before=2, after=2, element_mask=near)),
        gathered_attention_with_lse(q, k, v, GatherPattern(5, every_key, far_even)),
    ]
    out = merge_attention(parts)
    ref = reference_attention(q, k, v, mask=(near | far_even))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad((out * grad).sum(), (q, k, v))
    theirs = torch.autograd.grad((ref * grad).sum(), (q, k, v))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("q_len", [40, 13])  # 40: block-wise gathers (aligned); 13: row gathers
def test_span_pattern_block_and_row_gathers(q_len: int) -> None:
    kv_len = 40
    q, k, v = structured_qkv(2, 2, q_len, kv_len, 8, seed=6, dtype=torch.float64, requires_grad=True)
    window = sliding_window_mask(q_len, kv_len, 9, causal=False)
    pattern = span_pattern(q_len, kv_len, 8, before=4, after=4, element_mask=window)
    assert pattern.key_block == (8 if q_len == 40 else 1)
    assert pattern.kv_index.shape[-1] <= 8 + 2 * 8  # O(group + window) keys per group, never S
    out = gathered_attention(q, k, v, pattern)
    torch.testing.assert_close(out, reference_attention(q, k, v, mask=window), atol=1e-10, rtol=0)


def test_learned_score_bias_gets_the_reference_gradient() -> None:
    q_len = kv_len = 21
    q, k, v = structured_qkv(1, 2, q_len, kv_len, 8, seed=7, dtype=torch.float64)
    t5 = T5RelativeBias(2, num_buckets=8, max_distance=16).double()
    window = sliding_window_mask(q_len, kv_len, 7, causal=True)
    pattern = span_pattern(q_len, kv_len, 4, before=6, after=0, element_mask=window)
    out = gathered_attention(q, k, v, pattern, score_bias=t5.score_bias())
    ref = reference_attention(q, k, v, mask=window, score_bias=t5.score_bias())
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    grad = torch.randn_like(out)
    (ours,) = torch.autograd.grad((out * grad).sum(), t5.bias.weight)
    (theirs,) = torch.autograd.grad((ref * grad).sum(), t5.bias.weight)
    torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=0)


def test_low_precision_inputs_and_alibi() -> None:
    q, k, v = structured_qkv(1, 4, 33, 33, 16, seed=8)
    window = sliding_window_mask(33, 33, 5, causal=False)
    pattern = span_pattern(33, 33, 8, before=2, after=2, element_mask=window)
    bias = ALiBi(4).score_bias()
    out = gathered_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), pattern, score_bias=bias)
    ref = reference_attention(q, k, v, mask=window, score_bias=bias)
    assert (out.double() - ref).abs().max().item() < 5e-2
