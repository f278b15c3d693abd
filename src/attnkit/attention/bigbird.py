"""BigBird block-sparse attention: window + global + random blocks.

"Big Bird: Transformers for Longer Sequences" (Zaheer et al. 2020, arXiv:2007.14062).
Positions fall into blocks of ``block_size``; query block ``i`` sees key blocks
``i-1, i, i+1`` (window; causal: ``i-1, i``), the first ``num_global_blocks`` blocks
(global: they also see every block), and ``num_random_blocks`` random blocks among the
rest (causal: among earlier blocks only). Causality is exact inside blocks. The last
block may be partial: any length works.

The random blocks come from a counter-based hash of ``(seed, query block, key block)``,
not from the global RNG: the **same pattern in training and evaluation**, the same across
heads, a different one for another seed (:meth:`BigBirdAttention.reseed`), and in the
causal variant independent of the sequence length, so decoding with a growing KV cache
equals recompute. (HF transformers drops the random blocks in eval mode; this does not.)

Runs on the blocked core: each query block gathers its ``3 + g + r`` key blocks
(``O(N·b·(3 + g + r))``), the ``g`` global query blocks attend to every key (``O(g·b·N)``).
Supports causal, key padding and ALiBi/T5 score biases.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from attnkit.core.capabilities import Capabilities
from attnkit.core.errors import check_non_negative_int, check_positive_int
from attnkit.core.registry import register
from attnkit.core.types import ScoreBias
from attnkit.kernels.blocked import GatherPattern, dense_rows_pattern, gathered_attention_with_lse
from attnkit.kernels.pattern_attention import PatternAttention
from attnkit.masks.functions import Mask, causal_mask
from attnkit.masks.patterns import block_table_mask

_MASK62 = (1 << 62) - 1


def _hash(seed: int, rows: Tensor, cols: Tensor) -> Tensor:
    """A deterministic pseudo-random int64 in ``[0, 2^62)`` per ``(seed, row, col)`` (splitmix-style)."""
    x = (rows * 0x2545F4914F6CDD1D + cols * 0x1B873593 + seed * 0x5BD1E995 + 0x3C6EF372) & _MASK62
    for shift, mult in ((31, 0x3FB58476D1CE4E5B), (29, 0x14D049BB133111EB), (32, 0x2545F4914F6CDD1D)):
        x = ((x ^ (x >> shift)) * mult) & _MASK62
    return x


@functools.lru_cache(maxsize=64)
def bigbird_block_table(
    num_blocks: int, *, num_global_blocks: int, num_random_blocks: int, causal: bool, seed: int
) -> Tensor:
    """The block pattern: bool ``(num_blocks, num_blocks)``, ``[i, j]`` = query block ``i`` sees key block ``j``."""
    i = torch.arange(num_blocks)[:, None]
    j = torch.arange(num_blocks)[None, :]
    g = num_global_blocks
    window = (j >= i - 1) & (j <= i) if causal else (j - i).abs() <= 1
    table = window | (j < g) | (i < g)
    candidates = (j >= g) & (i >= g) & ((j < i - 1) if causal else (j - i).abs() > 1)
    if num_random_blocks > 0 and bool(candidates.any()):
        score = torch.where(candidates, _hash(seed, i, j), -1)
        picks = score.topk(min(num_random_blocks, num_blocks), dim=1).indices
        chosen = torch.zeros_like(table).scatter_(1, picks, True) & candidates
        table = table | chosen
    return table & (j <= i) if causal else table


@register(
    "bigbird",
    Capabilities(
        exact=True,
        causal=True,
        key_padding=True,
        cross_attention=False,
        decoding="kv_cache",
        complexity="O(N·b·(3+g+r))",
        family="sparse",
        score_bias=True,
        summary="BigBird: window, global and seeded random blocks (same pattern in train and eval)",
    ),
    small_options={"block_size": 4, "num_random_blocks": 2, "num_global_blocks": 1},
    benchmark_options={"block_size": 64, "num_random_blocks": 3, "num_global_blocks": 2},
)
class BigBirdAttention(PatternAttention):
    """BigBird block-sparse attention.

    Args:
        block_size: ``b``, positions per block.
        num_random_blocks: ``r``, random key blocks per query block.
        num_global_blocks: ``g``, leading blocks that are global.
        seed: seed of the random blocks (saved in the state dict).
        backend: ``"auto"``, ``"blocked"`` or ``"flex"``.
        scale: score scale; default ``1/sqrt(D)``.
    """

    seed: Tensor

    def __init__(
        self,
        *,
        block_size: int = 64,
        num_random_blocks: int = 3,
        num_global_blocks: int = 2,
        seed: int = 0,
        backend: str = "auto",
        scale: float | None = None,
    ) -> None:
        super().__init__(backend=backend, scale=scale)
        self.block_size = check_positive_int("block_size", block_size, example=64)
        self.num_random_blocks = check_non_negative_int("num_random_blocks", num_random_blocks)
        self.num_global_blocks = check_non_negative_int("num_global_blocks", num_global_blocks)
        self.register_buffer("seed", torch.tensor(check_non_negative_int("seed", seed)))

    def reseed(self, seed: int) -> None:
        """Draw a new random-block pattern (kept until the next reseed, in train and eval alike)."""
        self.seed.fill_(check_non_negative_int("seed", seed))

    def block_table(self, kv_len: int, *, causal: bool) -> Tensor:
        """The block pattern for ``kv_len`` keys: bool ``(n, n)`` with ``n = ceil(kv_len / block_size)``."""
        return bigbird_block_table(
            -(-kv_len // self.block_size),
            num_global_blocks=self.num_global_blocks,
            num_random_blocks=self.num_random_blocks,
            causal=causal,
            seed=int(self.seed),
        )

    def pattern(self, q_len: int, kv_len: int, *, causal: bool, **call_kwargs: Any) -> Mask:
        table = self.block_table(kv_len, causal=causal)
        return block_table_mask(q_len, kv_len, self.block_size, table[None], causal=causal)

    def _blocked(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool,
        key_padding_mask: Tensor | None,
        score_bias: ScoreBias | None,
        **call_kwargs: Any,
    ) -> Tensor:
        t_len, s_len = q.shape[2], k.shape[2]
        offset, size = s_len - t_len, self.block_size
        table = self.block_table(s_len, causal=causal).to(q.device)
        n, g = table.shape[0], min(self.num_global_blocks, table.shape[0])
        opts: dict[str, Any] = {"key_padding_mask": key_padding_mask, "score_bias": score_bias, "scale": self.scale}
        element = causal_mask(t_len, s_len) if causal else None
        within = torch.arange(size, device=q.device)

        # query blocks that hold queries of this call; global ones are done densely below
        rows = torch.arange(max(g, offset // size), n, device=q.device)
        out = q.new_zeros(*q.shape[:-1], v.shape[-1])
        if len(rows) > 0:
            columns = torch.where(table[rows], torch.arange(n, device=q.device), n).sort(dim=1).values
            columns = columns[:, : int(table[rows].sum(dim=1).max())]
            keys = torch.where(columns[..., None] < n, columns[..., None] * size + within, -1).flatten(1)
            queries = rows[:, None] * size + within - offset
            queries = torch.where((queries >= 0) & (queries < t_len), queries, -1)
            pattern = GatherPattern(size, keys[None, None], element, q_index=queries[None, None], key_block=size)
            out = out + gathered_attention_with_lse(q, k, v, pattern, **opts)[0]
        global_queries = torch.arange(g * size, device=q.device) - offset
        global_queries = global_queries[(global_queries >= 0) & (global_queries < t_len)]
        if len(global_queries) > 0:
            dense = dense_rows_pattern(global_queries.view(1, -1), s_len, element, key_block=size)
            out = out + gathered_attention_with_lse(q, k, v, dense, **opts)[0]
        return out
