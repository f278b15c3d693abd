"""fan_out beyond the contract: the pattern against the LogSparse definition written as loops, output
and gradients against the dense float64 oracle over that brute-force mask, causality, exact limits,
the FlexAttention pattern, option errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attnkit
from attnkit.attention.reference import reference_attention
from attnkit.kernels.flex import flex_pattern_attention
from tests.attention.test_block_local import assert_equals_dense_over, assert_exactly_causal
from tests.helpers import random_padding, structured_qkv

B, H, D = 2, 3, 8


def is_power(distance: int, base: int) -> bool:
    """``distance == base**m`` for some ``m >= 0``."""
    while distance > 1 and distance % base == 0:
        distance //= base
    return distance == 1


def brute_force(length: int, window: int, base: int, causal: bool) -> torch.Tensor:
    """LogSparse with a local window (Li et al. 2019) as loops: ``p`` sees its window and the keys at
    distance ``1, base, base², ...`` (both sides unless causal)."""
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for p in range(length):
        for j in range(length):
            dist = p - j
            in_window = 0 <= dist < window if causal else abs(dist) <= window // 2
            far = is_power(abs(dist), base) and (dist > 0 or not causal)
            allowed[p, j] = in_window or far
    return allowed


OPTIONS = [(1, 2), (3, 2), (4, 3), (8, 2), (2, 5)]


@pytest.mark.parametrize(("window", "base"), OPTIONS)
@pytest.mark.parametrize("causal", [False, True])
def test_pattern_is_the_definition(window: int, base: int, causal: bool) -> None:
    module = attnkit.build_attention("fan_out", window=window, base=base)
    got = module.pattern(40, 40, causal=causal).materialize(1, 1, 40, 40)[0, 0]
    assert torch.equal(got, brute_force(40, window, base, causal))


def test_pure_log_sparse_row() -> None:
    """window=1, base=2 is the paper's LogSparse cell: itself and ``l - 2^k`` (written out for one row)."""
    row = attnkit.build_attention("fan_out", window=1, base=2).pattern(40, 40, causal=True).materialize(1, 1, 40, 40)
    assert row[0, 0, 37].nonzero().flatten().tolist() == [5, 21, 29, 33, 35, 36, 37]


@pytest.mark.parametrize(("window", "base"), OPTIONS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [41, 64])
def test_matches_dense_over_brute_force_mask(window: int, base: int, causal: bool, length: int) -> None:
    module = attnkit.build_attention("fan_out", window=window, base=base)
    assert_equals_dense_over(module, brute_force(length, window, base, causal), causal)


@pytest.mark.parametrize(("window", "base"), [(1, 2), (3, 3)])
@pytest.mark.parametrize("cut", [0, 9, 16, 27])
def test_causality_is_exact(window: int, base: int, cut: int) -> None:
    assert_exactly_causal(attnkit.build_attention("fan_out", window=window, base=base), 33, cut)


@pytest.mark.parametrize("causal", [False, True])
def test_a_window_covering_the_sequence_is_full_attention(causal: bool) -> None:
    """Causal windows hold ``w`` keys back, bidirectional ones ``w // 2`` each side: ``T`` and ``2T - 1`` cover all."""
    length = 29
    window = length if causal else 2 * length - 1
    q, k, v = structured_qkv(B, H, length, length, D, seed=6, dtype=torch.float64)
    kpm = random_padding(B, length, seed=6, min_real=10)
    out = attnkit.build_attention("fan_out", window=window, base=2)(q, k, v, causal=causal, attention_mask=kpm)
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=causal, attention_mask=kpm), atol=1e-10, rtol=0)


def test_keys_per_query_grow_logarithmically() -> None:
    """The point of the pattern: at most ``w + ceil(log_b T)`` keys per causal query, at any length."""
    module = attnkit.build_attention("fan_out", window=4, base=2)
    for length in (64, 256, 1000):
        seen = module.pattern(length, length, causal=True).materialize(1, 1, length, length)[0, 0].sum(-1)
        assert int(seen.max()) <= 4 + (length - 1).bit_length() - 2  # powers 1, 2 lie in the window


@pytest.mark.parametrize("causal", [False, True])
def test_flex_pattern_matches_brute_force(causal: bool) -> None:
    q, k, v = structured_qkv(B, H, 27, 27, D, seed=3)
    kpm = random_padding(B, 27, seed=3, min_real=12)
    module = attnkit.build_attention("fan_out", window=3, base=2, backend="blocked")
    flex = flex_pattern_attention(q, k, v, module.pattern(27, 27, causal=causal), attention_mask=kpm, compiled=False)
    ref = reference_attention(q, k, v, attention_mask=kpm, mask=brute_force(27, 3, 2, causal))
    torch.testing.assert_close(flex.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(flex, module(q, k, v, causal=causal, attention_mask=kpm), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"window": 0}, "window must be a positive integer"),
        ({"window": 2.0}, "window must be a positive integer"),
        ({"base": 1}, "base must be an integer >= 2"),
        ({"base": 1.5}, "base must be an integer >= 2"),
        ({"base": True}, "base must be an integer >= 2"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        attnkit.build_attention("fan_out", **options)
