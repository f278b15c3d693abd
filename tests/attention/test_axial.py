"""axial beyond the contract: the pattern against Ho et al.'s row/column definition on a 2-D grid
written as loops, output and gradients against the dense float64 oracle over that brute-force mask,
causality in raster order, exact limits, the grid given per call or at construction, decoding within a
fixed grid, the FlexAttention pattern, errors that name ``shape``."""

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


def brute_force(length: int, cols: int, causal: bool) -> torch.Tensor:
    """Cells ``(row, col)`` of a raster of width ``cols``: a cell sees its row and its column; causal:
    only cells at or before it in raster order."""
    cells = [(p // cols, p % cols) for p in range(length)]
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for p, (row, col) in enumerate(cells):
        for j, (key_row, key_col) in enumerate(cells):
            allowed[p, j] = (row == key_row or col == key_col) and (j <= p or not causal)
    return allowed


@pytest.mark.parametrize("cols", [1, 4, 6, 23, 40])
@pytest.mark.parametrize("causal", [False, True])
def test_pattern_is_the_definition(cols: int, causal: bool) -> None:
    module = attnkit.build_attention("axial", cols=cols)
    got = module.pattern(23, 23, causal=causal).materialize(1, 1, 23, 23)[0, 0]
    assert torch.equal(got, brute_force(23, cols, causal))


@pytest.mark.parametrize("cols", [3, 6, 8])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [41, 48])  # a last partial row, and whole rows
def test_matches_dense_over_brute_force_mask(cols: int, causal: bool, length: int) -> None:
    module = attnkit.build_attention("axial", cols=cols)
    assert_equals_dense_over(module, brute_force(length, cols, causal), causal)


@pytest.mark.parametrize("causal", [False, True])
def test_grid_per_call_and_fixed_at_construction(causal: bool) -> None:
    """``shape=(6, 7)`` per call, ``shape=(6, 7)`` at construction and ``cols=7`` are the same 6×7 grid."""
    per_call = attnkit.build_attention("axial")
    assert_equals_dense_over(per_call, brute_force(42, 7, causal), causal, shape=(6, 7))
    assert_equals_dense_over(attnkit.build_attention("axial", shape=(6, 7)), brute_force(42, 7, causal), causal)
    # the per-call grid overrides the constructor's
    assert_equals_dense_over(attnkit.build_attention("axial", cols=5), brute_force(42, 6, causal), causal, shape=(7, 6))


@pytest.mark.parametrize("cut", [0, 6, 13, 30])
def test_causality_is_exact_in_raster_order(cut: int) -> None:
    assert_exactly_causal(attnkit.build_attention("axial", cols=7), 35, cut)
    assert_exactly_causal(attnkit.build_attention("axial"), 35, cut, shape=(5, 7))


@pytest.mark.parametrize("cols", [1, 29, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_one_row_or_one_column_is_full_attention(cols: int, causal: bool) -> None:
    """A grid of one column (``cols=1``) or one row (``cols >= T``): every cell shares an axis with every other."""
    q, k, v = structured_qkv(B, H, 29, 29, D, seed=6, dtype=torch.float64)
    kpm = random_padding(B, 29, seed=6, min_real=10)
    out = attnkit.build_attention("axial", cols=cols)(q, k, v, causal=causal, attention_mask=kpm)
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=causal, attention_mask=kpm), atol=1e-10, rtol=0)


def test_decoding_a_fixed_grid_equals_recompute_and_stops_at_its_end() -> None:
    module = attnkit.build_attention("axial", shape=(4, 5))
    q, k, v = structured_qkv(B, H, 20, 20, D, seed=4, dtype=torch.float64)
    full = module(q, k, v, causal=True)
    state = module.new_state()
    steps = [module.decode(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state) for t in range(20)]
    torch.testing.assert_close(torch.cat(steps, dim=2), full, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match=r"shape \(4, 5\) holds 20 positions"):
        module.decode(q[:, :, :1], k[:, :, :1], v[:, :, :1], state)


@pytest.mark.parametrize("causal", [False, True])
def test_flex_pattern_matches_brute_force(causal: bool) -> None:
    q, k, v = structured_qkv(B, H, 27, 27, D, seed=3)
    kpm = random_padding(B, 27, seed=3, min_real=12)
    module = attnkit.build_attention("axial", cols=5, backend="blocked")
    flex = flex_pattern_attention(q, k, v, module.pattern(27, 27, causal=causal), attention_mask=kpm, compiled=False)
    ref = reference_attention(q, k, v, attention_mask=kpm, mask=brute_force(27, 5, causal))
    torch.testing.assert_close(flex.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(flex, module(q, k, v, causal=causal, attention_mask=kpm), atol=1e-5, rtol=0)


def test_a_length_that_is_not_the_grid_names_shape() -> None:
    q, k, v = structured_qkv(1, 2, 30, 30, D)
    with pytest.raises(ValueError, match=r"shape \(4, 8\) \(passed to this call\) holds 32 positions .* T=30"):
        attnkit.build_attention("axial")(q, k, v, shape=(4, 8))
    with pytest.raises(ValueError, match=r"shape \(5, 5\) \(given at construction\) holds 25 positions .* T=30"):
        attnkit.build_attention("axial", shape=(5, 5))(q, k, v)
    with pytest.raises(ValueError, match=r"needs the grid: pass shape=\(rows, cols\)"):
        attnkit.build_attention("axial")(q, k, v)
    with pytest.raises(ValueError, match=r"needs the grid"):
        attnkit.build_attention("axial").decode(q, k, v, attnkit.build_attention("axial").new_state())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cols": 0}, "cols must be a positive integer"),
        ({"shape": (4, 0)}, r"shape\[1\] \(cols\) must be a positive integer"),
        ({"shape": (0, 4)}, r"shape\[0\] \(rows\) must be a positive integer"),
        ({"shape": 16}, r"shape must be a pair \(rows, cols\)"),
        ({"shape": (2, 2, 4)}, r"shape must be a pair \(rows, cols\)"),
        ({"cols": 4, "shape": (4, 4)}, "give cols or shape, not both"),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        attnkit.build_attention("axial", **options)


def test_bad_per_call_shape_is_refused() -> None:
    q, k, v = structured_qkv(1, 2, 16, 16, D)
    with pytest.raises(ValueError, match=r"shape must be a pair \(rows, cols\)"):
        attnkit.build_attention("axial")(q, k, v, shape=16)
