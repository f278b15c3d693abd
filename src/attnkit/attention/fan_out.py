"""Fan-out (log-sparse) attention: a local window plus keys at exponentially growing distances.

"Enhancing the Locality and Breaking the Memory Bottleneck of Transformer on Time Series
Forecasting" (Li et al. 2019, arXiv:1907.00235), the LogSparse Transformer with local
attention; the "fan-out" fixed pattern of seed 002 §3.2. The query at absolute position ``p``
(``w`` = ``window``, ``b`` = ``base``) sees:

- its sliding window, exactly the keys of :mod:`attnkit.attention.sliding_window`: causal
  ``p - w + 1 .. p``; bidirectional ``|p - j| <= w // 2``;
- the keys at distance ``1, b, b², b³, ...`` from it (``p - b**m``; bidirectional also
  ``p + b**m``), as far as the sequence reaches.

So every query sees ``O(w + log_b N)`` keys, and with ``b = 2`` any key is reached from any
query within ``log₂ N`` layers. ``window=1`` is the paper's pure LogSparse pattern (itself and
``p - 2**m``). Causal: only ``j <= p``.

Runs as two parts on the blocked core, joined exactly through their log-sum-exps: the window
(``O(N·w)``) and the far keys, gathered per query (``O(N·log_b N)``); or on FlexAttention
(see :class:`~attnkit.attention.pattern.PatternAttention`). Supports causal, key padding,
ALiBi/T5 score biases and decoding with a growing KV cache (the far keys reach back to the
start, so the cache cannot roll).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from attnkit.attention.pattern import (
    PatternAttention,
    PatternCall,
    distance_pattern,
    pattern_capabilities,
    sliding_window_attention,
)
from attnkit.core.errors import check_positive_int
from attnkit.core.registry import register
from attnkit.kernels.blocked import gathered_attention_with_lse, merge_attention
from attnkit.masks.functions import Mask
from attnkit.masks.patterns import fan_out_distances, fan_out_mask


@register(
    "fan_out",
    pattern_capabilities(
        complexity="O(N·(w + log N))",
        summary="LogSparse fan-out: local window of w plus keys at distances 1, b, b², ...",
    ),
    small_options={"window": 3, "base": 2},
    benchmark_options={"window": 128, "base": 2},
)
class FanOutAttention(PatternAttention):
    """Fan-out (LogSparse) attention.

    Args:
        window: ``w``, the local window (as in ``sliding_window``: causal windows hold ``w``
            keys including self, bidirectional ones ``w // 2`` on each side plus self).
        base: ``b >= 2``, the ratio between successive far distances ``1, b, b², ...``.
        backend: ``"auto"``, ``"blocked"`` or ``"flex"``.
        scale: score scale; default ``1/sqrt(D)``.
    """

    def __init__(self, *, window: int = 128, base: int = 2, backend: str = "auto", scale: float | None = None) -> None:
        super().__init__(backend=backend, scale=scale)
        self.window = check_positive_int("window", window, example=128)
        if isinstance(base, bool) or not isinstance(base, int) or base < 2:
            raise ValueError(
                f"base must be an integer >= 2 (far keys at distances 1, base, base², ...), got {base!r} (set base=2, say)"
            )
        self.base = base

    def pattern(self, q_len: int, kv_len: int, *, causal: bool, **call_kwargs: Any) -> Mask:
        return fan_out_mask(q_len, kv_len, self.window, self.base, causal=causal)

    def _blocked(self, q: Tensor, k: Tensor, v: Tensor, call: PatternCall) -> Tensor:
        opts = call.softmax_options()
        local = sliding_window_attention(q, k, v, self.window, causal=call.causal, **opts)
        # only distances the window does not hold, so the two parts' key sets are disjoint
        far = fan_out_distances(self.window, self.base, k.shape[2], causal=call.causal)
        if not far:
            return local[0]
        signed = far if call.causal else far + [-d for d in far]
        keys = distance_pattern(q.shape[2], k.shape[2], signed, device=q.device)
        return merge_attention([local, gathered_attention_with_lse(q, k, v, keys, **opts)])
