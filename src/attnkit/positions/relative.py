"""Relative position biases added to attention scores: ALiBi and T5 buckets.

ALiBi: "Train Short, Test Long" (Press et al. 2022, arXiv:2108.12409): a fixed, per-head
linear penalty ``-m_h · |i - j|`` with geometric slopes ``m_h``.
T5: "Exploring the Limits of Transfer Learning" (Raffel et al. 2020, arXiv:1910.10683):
a learned scalar per head and per logarithmic distance bucket.

Both produce a :data:`~attnkit.core.types.ScoreBias` for mechanisms that declare
``score_bias`` support; they depend only on ``q_pos - kv_pos``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnkit.core.errors import check_positive_int
from attnkit.core.types import ScoreBias


def alibi_slopes(heads: int) -> Tensor:
    """The per-head slopes of ALiBi: a geometric sequence starting at ``2^(-8/n)``.

    For a head count that is not a power of two, the slopes of the next lower power of
    two are followed by every other slope of the next higher power (as in the paper).
    """
    check_positive_int("heads", heads)

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(heads).is_integer():
        slopes = power_of_two(heads)
    else:
        lower = 2 ** math.floor(math.log2(heads))
        slopes = power_of_two(lower) + power_of_two(2 * lower)[0::2][: heads - lower]
    return torch.tensor(slopes, dtype=torch.float32)


class ALiBi(nn.Module):
    """ALiBi bias for ``heads`` heads (no parameters)."""

    slopes: Tensor

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(heads), persistent=False)

    def score_bias(self) -> ScoreBias:
        """A bias ``-slope[h] * |q_pos - kv_pos|``."""
        slopes = self.slopes

        def bias(h: Tensor, q_pos: Tensor, kv_pos: Tensor) -> Tensor:
            return -slopes[h] * (q_pos - kv_pos).abs().to(slopes.dtype)

        return bias


def t5_bucket(relative: Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """T5's bucket of each relative position ``kv_pos - q_pos``.

    Half the buckets hold exact small distances, the rest grow logarithmically up to
    ``max_distance``; bidirectional buckets split by sign.
    """
    buckets = torch.zeros_like(relative)
    n = num_buckets
    if bidirectional:
        n //= 2
        buckets = buckets + (relative > 0).long() * n
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = n // 2
    is_small = distance < exact
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (n - exact)).long()).clamp(max=n - 1)
    return buckets + torch.where(is_small, distance, large)


class T5RelativeBias(nn.Module):
    """Learned T5 relative-position bias.

    Args:
        heads: number of heads.
        num_buckets: distance buckets (32 in T5).
        max_distance: distance beyond which all offsets share the last bucket.
        bidirectional: separate buckets for keys before and after the query.
    """

    def __init__(
        self, heads: int, *, num_buckets: int = 32, max_distance: int = 128, bidirectional: bool = True
    ) -> None:
        super().__init__()
        check_positive_int("heads", heads)
        self.num_buckets = check_positive_int("num_buckets", num_buckets)
        self.max_distance = check_positive_int("max_distance", max_distance)
        if num_buckets < (4 if bidirectional else 2):
            raise ValueError(f"num_buckets must be at least {4 if bidirectional else 2}, got {num_buckets}")
        self.bidirectional = bidirectional
        self.bias = nn.Embedding(num_buckets, heads)
        nn.init.normal_(self.bias.weight, std=0.02)

    def score_bias(self) -> ScoreBias:
        """A bias ``table[bucket(kv_pos - q_pos), h]``."""

        def bias(h: Tensor, q_pos: Tensor, kv_pos: Tensor) -> Tensor:
            bucket = t5_bucket(
                kv_pos - q_pos,
                bidirectional=self.bidirectional,
                num_buckets=self.num_buckets,
                max_distance=self.max_distance,
            )
            return self.bias.weight[bucket, h]

        return bias
