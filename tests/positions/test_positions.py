"""Position schemes against their closed forms and independent scalar re-implementations."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.positions import (
    ALiBi,
    LearnedPositions,
    RotaryEmbedding,
    SinusoidalPositions,
    T5RelativeBias,
    alibi_slopes,
    t5_bucket,
)


def test_sinusoidal_closed_form() -> None:
    dim = 8
    emb = SinusoidalPositions(dim)(5, offset=3)
    for p in range(5):
        for i in range(dim // 2):
            angle = (p + 3) / 10000 ** (2 * i / dim)
            assert emb[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert emb[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)


def test_empty_position_tables() -> None:
    """Length 0 (an input with T = 0) gives an empty ``(0, dim)`` table; negative lengths raise."""
    assert SinusoidalPositions(8)(0, offset=5).shape == (0, 8)
    assert LearnedPositions(4, max_len=6)(0).shape == (0, 4)
    with pytest.raises(ValueError, match="length must be a non-negative integer"):
        SinusoidalPositions(8)(-1)
    with pytest.raises(ValueError, match="offset must be a non-negative integer"):
        SinusoidalPositions(8)(3, offset=-1)


def test_learned_positions_bounds() -> None:
    pos = LearnedPositions(4, max_len=6)
    assert pos(6).shape == (6, 4)
    with pytest.raises(ValueError, match="max_len=6"):
        pos(4, offset=3)
    with pytest.raises(ValueError, match="max_len"):
        LearnedPositions(4, max_len=0)


def test_rotary_matches_complex_rotation_and_is_relative() -> None:
    d = 8
    rot = RotaryEmbedding(d)
    x = torch.randn(1, 1, 5, d, dtype=torch.float64)
    pos = torch.arange(5) * 3
    got = rot(x.float(), pos).double()
    # independent: channels (i, i + d/2) as a complex number rotated by pos * base^(-2i/d)
    z = torch.complex(x[..., : d // 2], x[..., d // 2 :])
    freqs = torch.tensor([10000 ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    z = z * torch.polar(torch.ones_like(freqs), pos[:, None].double() * freqs)
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], dim=-1), atol=1e-5, rtol=1e-5)
    # q(m)·k(n) depends only on m - n
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)
    dots = [(rot(q, torch.tensor([m])) * rot(k, torch.tensor([m - 4]))).sum().item() for m in (4, 10, 50)]
    assert dots[0] == pytest.approx(dots[1], abs=1e-4) and dots[0] == pytest.approx(dots[2], abs=1e-4)
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryEmbedding(7)


def test_alibi_slopes_from_the_paper() -> None:
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 12 heads: the 8-head slopes, then every other slope of the 16-head sequence
    sixteen = [2.0 ** (-0.5 * (i + 1)) for i in range(16)]
    expected = [2.0 ** -(i + 1) for i in range(8)] + sixteen[0::2][:4]
    assert torch.allclose(alibi_slopes(12), torch.tensor(expected))
    bias = ALiBi(4).score_bias()(torch.tensor([1]), torch.tensor([7]), torch.tensor([3]))
    assert bias.item() == pytest.approx(-(2.0**-4) * 4)


def _t5_bucket_scalar(rel: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    # Written from the T5 description: half the buckets exact, the rest log-spaced up to max_distance.
    bucket = 0
    n = num_buckets
    if bidirectional:
        n //= 2
        if rel > 0:
            bucket += n
        dist = abs(rel)
    else:
        dist = max(-rel, 0)
    exact = n // 2
    if dist < exact:
        return bucket + dist
    scaled = exact + int(math.log(dist / exact) / math.log(max_distance / exact) * (n - exact))
    return bucket + min(scaled, n - 1)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_buckets_match_scalar_definition(bidirectional: bool) -> None:
    rel = torch.arange(-300, 301)
    got = t5_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    want = [_t5_bucket_scalar(int(r), bidirectional, 32, 128) for r in rel]
    assert got.tolist() == want


def test_t5_bias_reads_the_table() -> None:
    t5 = T5RelativeBias(2, num_buckets=8, max_distance=16)
    h = torch.tensor([[1]])
    b = t5.score_bias()(h, torch.tensor([[5]]), torch.tensor([[5]]))
    assert b.item() == t5.bias.weight[0, 1].item()
