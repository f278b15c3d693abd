"""block_local beyond the contract: the pattern against its definition written as loops, output and
gradients against the dense float64 oracle over that brute-force mask, causality, exact limits, the
FlexAttention pattern, option errors.

The two generic checks here (:func:`assert_equals_dense_over` and :func:`assert_exactly_causal`) are
shared by ``test_axial.py`` and ``test_fan_out.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attnkit
from attnkit.attention.reference import reference_attention
from attnkit.kernels.flex import flex_pattern_attention
from attnkit.positions import ALiBi
from tests.attention.test_sparse import assert_output_and_gradients_equal
from tests.helpers import random_padding, structured_qkv

B, H, D = 2, 3, 8


def brute_force(length: int, block_size: int, causal: bool) -> torch.Tensor:
    """Seed 002 §3.2's block pattern as loops: position ``p`` sees ``j`` iff both lie in one block of ``n``."""
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for p in range(length):
        for j in range(length):
            allowed[p, j] = p // block_size == j // block_size and (j <= p or not causal)
    return allowed


def assert_equals_dense_over(
    module: attnkit.AttentionMechanism, allowed: torch.Tensor, causal: bool, **call_kwargs: Any
) -> None:
    """``module`` with padding and an ALiBi bias equals the float64 oracle over the bool ``(T, T)`` mask
    ``allowed``, output and the gradients of q, k and v."""
    length = allowed.shape[0]
    q, k, v = structured_qkv(B, H, length, length, D, seed=length, dtype=torch.float64, requires_grad=True)
    kpm = random_padding(B, length, seed=length, min_real=length // 3)
    bias = ALiBi(H).score_bias()
    out = module(q, k, v, causal=causal, attention_mask=kpm, score_bias=bias, **call_kwargs)
    ref = reference_attention(q, k, v, attention_mask=kpm, mask=allowed, score_bias=bias)
    assert_output_and_gradients_equal(out, ref, (q, k, v))


def assert_exactly_causal(module: attnkit.AttentionMechanism, length: int, cut: int, **call_kwargs: Any) -> None:
    """Changing positions after ``cut`` leaves outputs up to ``cut`` bit-identical and gives them no gradient."""
    q, k, v = structured_qkv(B, H, length, length, D, seed=cut, requires_grad=True)
    out = module(q, k, v, causal=True, **call_kwargs)
    future = (torch.arange(length) > cut)[None, None, :, None]
    with torch.no_grad():
        changed = [torch.where(future, 9.0 * torch.randn_like(t), t) for t in (q, k, v)]
    assert torch.equal(module(*changed, causal=True, **call_kwargs)[:, :, : cut + 1], out[:, :, : cut + 1])
    out[:, :, : cut + 1].sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.all(t.grad[:, :, cut + 1 :] == 0)
    assert v.grad is not None and v.grad[:, :, : cut + 1].abs().sum() > 0  # not vacuous: the past gets gradients


@pytest.mark.parametrize("block_size", [1, 4, 7, 16])
@pytest.mark.parametrize("causal", [False, True])
def test_pattern_is_the_definition(block_size: int, causal: bool) -> None:
    module = attnkit.build_attention("block_local", block_size=block_size)
    got = module.pattern(23, 23, causal=causal).materialize(1, 1, 23, 23)[0, 0]
    assert torch.equal(got, brute_force(23, block_size, causal))


@pytest.mark.parametrize("block_size", [4, 7, 16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [41, 48])  # a last partial block, and whole blocks
def test_matches_dense_over_brute_force_mask(block_size: int, causal: bool, length: int) -> None:
    module = attnkit.build_attention("block_local", block_size=block_size)
    assert_equals_dense_over(module, brute_force(length, block_size, causal), causal)


@pytest.mark.parametrize("block_size", [5, 8])
@pytest.mark.parametrize("cut", [0, 7, 8, 20])
def test_causality_is_exact(block_size: int, cut: int) -> None:
    assert_exactly_causal(attnkit.build_attention("block_local", block_size=block_size), 29, cut)


def test_blocks_are_independent() -> None:
    """No information crosses a block boundary: changing one block leaves every other block's output bit-identical."""
    module = attnkit.build_attention("block_local", block_size=6)
    q, k, v = structured_qkv(B, H, 27, 27, D, seed=1)
    base = module(q, k, v)
    inside = (torch.arange(27) // 6 == 2)[None, None, :, None]
    out = module(*(torch.where(inside, t + torch.randn_like(t), t) for t in (q, k, v)))
    assert torch.equal(out[:, :, ~inside[0, 0, :, 0]], base[:, :, ~inside[0, 0, :, 0]])
    assert not torch.equal(out[:, :, inside[0, 0, :, 0]], base[:, :, inside[0, 0, :, 0]])


@pytest.mark.parametrize("block_size", [29, 30, 1000])
@pytest.mark.parametrize("causal", [False, True])
def test_a_block_as_long_as_the_sequence_is_full_attention(block_size: int, causal: bool) -> None:
    q, k, v = structured_qkv(B, H, 29, 29, D, seed=6, dtype=torch.float64)
    kpm = random_padding(B, 29, seed=6, min_real=10)
    out = attnkit.build_attention("block_local", block_size=block_size)(q, k, v, causal=causal, attention_mask=kpm)
    ref = reference_attention(q, k, v, causal=causal, attention_mask=kpm)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def test_block_size_one_is_each_position_alone() -> None:
    q, k, v = structured_qkv(B, H, 13, 13, D, seed=2, dtype=torch.float64)
    out = attnkit.build_attention("block_local", block_size=1)(q, k, v)
    torch.testing.assert_close(out, v, atol=1e-12, rtol=0)  # softmax over one key: its value


@pytest.mark.parametrize("causal", [False, True])
def test_flex_pattern_matches_brute_force(causal: bool) -> None:
    """The ``pattern()`` FlexAttention runs (its eager path: CPU, no compile) gives the same answer."""
    q, k, v = structured_qkv(B, H, 27, 27, D, seed=3)
    kpm = random_padding(B, 27, seed=3, min_real=12)
    module = attnkit.build_attention("block_local", block_size=5, backend="blocked")
    flex = flex_pattern_attention(q, k, v, module.pattern(27, 27, causal=causal), attention_mask=kpm, compiled=False)
    ref = reference_attention(q, k, v, attention_mask=kpm, mask=brute_force(27, 5, causal))
    torch.testing.assert_close(flex.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(flex, module(q, k, v, causal=causal, attention_mask=kpm), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_bad_block_size_is_refused(bad: Any) -> None:
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        attnkit.build_attention("block_local", block_size=bad)
