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
(``O(N·b·(3 + g + r))``). The ``g`` global query blocks attend to every key (``O(g·b·N)``)
through PyTorch's fused ``scaled_dot_product_attention`` (the blocked core when a score bias
is given). Supports causal, key padding and ALiBi/T5 score biases.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.attention.pattern import PatternAttention, PatternCall, pattern_capabilities
from attnkit.core.errors import check_non_negative_int, check_positive_int
from attnkit.core.registry import register
from attnkit.kernels.blocked import GatherPattern, dense_rows_pattern, gathered_attention_with_lse
from attnkit.kernels.precision import upcast
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
    pattern_capabilities(
        complexity="O(N·b·(3+g+r))",
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

    def _blocked(self, q: Tensor, k: Tensor, v: Tensor, call: PatternCall) -> Tensor:
        t_len, s_len = q.shape[2], k.shape[2]
        size = self.block_size
        table = self.block_table(s_len, causal=call.causal).to(q.device)
        g = min(self.num_global_blocks, table.shape[0])
        opts = call.softmax_options()
        # Queries are end-aligned (query i at absolute position i + S - T): the leading m queries
        # of this call, those in global blocks, are cut off and attended densely, and the rest
        # stays end-aligned on its own.
        m = max(0, min(t_len, g * size - (s_len - t_len)))
        parts = []
        if m > 0:
            rows_out = None
            if call.score_bias is None:
                rows_out = _global_rows_sdpa(
                    q, k, v, m, causal=call.causal, attention_mask=call.attention_mask, scale=call.scale
                )
            if rows_out is None:
                element = causal_mask(t_len, s_len) if call.causal else None
                dense = dense_rows_pattern(torch.arange(m, device=q.device).view(1, -1), s_len, element, key_block=size)
                rows_out = gathered_attention_with_lse(q, k, v, dense, **opts)[0][:, :, :m]
            parts.append(rows_out)
        if m < t_len:
            pattern = self._gather_pattern(table, t_len - m, s_len, call.causal)
            parts.append(gathered_attention_with_lse(q[:, :, m:], k, v, pattern, **opts)[0])
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def _gather_pattern(self, table: Tensor, t_len: int, s_len: int, causal: bool) -> GatherPattern:
        """Each non-global query block gathers its listed key blocks (in order, ``-1`` padded).

        Queries that start on a block boundary form consecutive groups, the cheap layout;
        otherwise (decoding mid-block) each block lists its query positions."""
        size, offset, n = self.block_size, s_len - t_len, table.shape[0]
        within = torch.arange(size, device=table.device)
        rows = torch.arange(offset // size, n, device=table.device)
        columns = torch.where(table[rows], torch.arange(n, device=table.device), n).sort(dim=1).values
        columns = columns[:, : int(table[rows].sum(dim=1).max())]
        keys = torch.where(columns[..., None] < n, columns[..., None] * size + within, -1).flatten(1)
        element = causal_mask(t_len, s_len) if causal else None
        if offset % size == 0:
            return GatherPattern(size, keys[None, None], element, key_block=size)
        queries = rows[:, None] * size + within - offset
        queries = torch.where((queries >= 0) & (queries < t_len), queries, -1)
        return GatherPattern(size, keys[None, None], element, q_index=queries[None, None], key_block=size)


def _global_rows_sdpa(
    q: Tensor, k: Tensor, v: Tensor, m: int, *, causal: bool, attention_mask: Tensor | None, scale: float | None
) -> Tensor | None:
    """The first ``m`` queries attending to every key (up to causality and padding) with PyTorch's
    fused SDPA: ``(B, H, m, Dv)`` in float32 or wider, or None when a row sees no key (what SDPA
    returns there has differed between backends and torch versions, NaN in some; such calls go
    to the blocked core, which gives the contract's zeros).

    Fused, it keeps no ``m × S`` probabilities and skips the gather of every key block: about
    half the time of the blocked core on these rows at 16K keys, 60% at 4K (measured, fwd+bwd)."""
    t_len, s_len = q.shape[2], k.shape[2]
    q, k, v = upcast(q), upcast(k), upcast(v)
    rows = q[:, :, :m]
    allowed = None
    if causal:  # query i sits at absolute position i + S - T
        allowed = torch.arange(s_len, device=q.device) <= torch.arange(m, device=q.device)[:, None] + s_len - t_len
    if attention_mask is not None:
        real = attention_mask[:, None, None, :]
        allowed = real if allowed is None else allowed & real
    if allowed is not None and not bool(allowed.any(dim=-1).all()):
        return None
    if allowed is not None and attention_mask is None and s_len == t_len:
        # plain causal over a square prefix: the kernel's own causal mask, no mask tensor
        return F.scaled_dot_product_attention(rows, k[:, :, :m], v[:, :, :m], is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(rows, k, v, attn_mask=allowed, scale=scale)
