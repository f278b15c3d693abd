"""Block-local attention: the sequence is cut into blocks and each block attends only within itself.

The "block" fixed pattern of seed 002 §3.2, the local attention of "Image Transformer"
(Parmar et al. 2018, arXiv:1802.05751) in 1-D query blocks, and the own-block half of the
Sparse Transformer's fixed pattern ("Generating Long Sequences with Sparse Transformers",
Child et al. 2019, arXiv:1904.10509). Positions ``0 .. n-1`` form block 0, ``n .. 2n-1`` block
1, and so on (``n`` = ``block_size``, absolute positions, the last block may be partial); the
query at ``p`` sees exactly the keys ``j`` with ``p // n == j // n``, and causal: ``j <= p``.
Unlike a sliding window, no information crosses a block boundary in one layer.

Runs on the blocked core as one gather per block (``O(N·n)`` time and memory, forward and
backward) or on FlexAttention (see :class:`~attnkit.attention.pattern.PatternAttention`).
Supports causal, key padding, ALiBi/T5 score biases and decoding with a growing KV cache.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from attnkit.attention.pattern import PatternAttention, PatternCall, block_diagonal_pattern, pattern_capabilities
from attnkit.core.errors import check_positive_int
from attnkit.core.registry import register
from attnkit.kernels.blocked import gathered_attention
from attnkit.masks.functions import Mask
from attnkit.masks.patterns import block_local_mask


@register(
    "block_local",
    pattern_capabilities(
        complexity="O(N·n)",
        summary="block-diagonal: each block of n positions attends only within itself",
    ),
    small_options={"block_size": 8},
    benchmark_options={"block_size": 256},
)
class BlockLocalAttention(PatternAttention):
    """Block-local (block-diagonal) attention.

    Args:
        block_size: ``n``, positions per block; a block at least as long as the sequence is
            full attention.
        backend: ``"auto"``, ``"blocked"`` or ``"flex"``.
        scale: score scale; default ``1/sqrt(D)``.
    """

    def __init__(self, *, block_size: int = 256, backend: str = "auto", scale: float | None = None) -> None:
        super().__init__(backend=backend, scale=scale)
        self.block_size = check_positive_int("block_size", block_size, example=256)

    def pattern(self, q_len: int, kv_len: int, *, causal: bool, **call_kwargs: Any) -> Mask:
        return block_local_mask(q_len, kv_len, self.block_size, causal=causal)

    def _blocked(self, q: Tensor, k: Tensor, v: Tensor, call: PatternCall) -> Tensor:
        blocks = block_diagonal_pattern(q.shape[2], k.shape[2], self.block_size, causal=call.causal, device=q.device)
        return gathered_attention(q, k, v, blocks, **call.softmax_options())
