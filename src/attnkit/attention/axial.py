"""Axial attention over a 2-D grid: each query attends to its row and to its column.

"Axial Attention in Multidimensional Transformers" (Ho et al. 2019, arXiv:1912.12180); the
"axial" fixed pattern of seed 002 §3.2. The sequence is a grid of ``rows × cols`` cells in
raster order: position ``p`` is cell ``(p // cols, p mod cols)``. The query at ``p`` sees the
keys of its row (``p // cols == j // cols``) and of its column (``(p - j) mod cols == 0``);
causal (raster order): only ``j <= p``, i.e. the row to its left and the column above.

One head sees the union of the row and the column, rather than the paper's row and column
attention as two sublayers or two head groups: the union is one exact softmax pattern (one
``pattern()``, a dense oracle and a FlexAttention ``mask_mod``), every head computes the same
thing (any head count, grouped-query attention and head pruning work unchanged), and two
stacked layers already carry information from any cell to any cell, as the paper's
row-then-column pair does.

The grid: ``shape=(rows, cols)`` per call or at construction (the sequence must then hold
exactly ``rows·cols`` positions; decoding may fill it partially), or ``cols`` at construction
for sequences of any length (rows of ``cols`` positions, the last one possibly partial, which
is what generating a raster token by token produces).

Runs as two parts on the blocked core, joined exactly through their log-sum-exps: the row
(one gather per row, ``O(N·cols)``) and the rest of the column (one gather per column,
``O(N·rows)``): ``O(N·(rows + cols))``, ``O(N·√N)`` for a square grid. Supports causal, key
padding, ALiBi/T5 score biases (over raster positions) and decoding with a growing KV cache.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from attnkit.attention.pattern import (
    PatternAttention,
    PatternCall,
    block_diagonal_pattern,
    column_pattern,
    pattern_capabilities,
)
from attnkit.core.base import KVState
from attnkit.core.errors import check_positive_int
from attnkit.core.registry import register
from attnkit.core.types import MaskFunction, ScoreBias
from attnkit.kernels.blocked import gathered_attention_with_lse, merge_attention
from attnkit.masks.functions import Mask
from attnkit.masks.patterns import axial_mask


def check_shape(shape: Any) -> tuple[int, int]:
    """``shape`` as ``(rows, cols)`` if it is a pair of positive ints, else a ``ValueError`` naming it."""
    if not isinstance(shape, (tuple, list)) or len(shape) != 2:
        raise ValueError(
            f"shape must be a pair (rows, cols) of positive integers, got {shape!r} (set shape=(32, 32), say)"
        )
    rows = check_positive_int("shape[0] (rows)", shape[0], example=32)
    cols = check_positive_int("shape[1] (cols)", shape[1], example=32)
    return rows, cols


@register(
    "axial",
    pattern_capabilities(
        complexity="O(N·(rows+cols))",
        summary="axial: each cell of a rows×cols raster attends to its row and its column",
    ),
    small_options={"cols": 6},
    benchmark_options={"cols": 128},
)
class AxialAttention(PatternAttention):
    """Axial attention over a raster-order grid.

    Args:
        cols: row length of the grid for sequences of any length (the last row may be
            partial). Give ``cols`` or ``shape``, not both; with neither, each call passes ``shape``.
        shape: ``(rows, cols)``: a fixed grid; every forward call must hold exactly
            ``rows·cols`` positions and decoding at most that many.
        backend: ``"auto"``, ``"blocked"`` or ``"flex"``.
        scale: score scale; default ``1/sqrt(D)``.

    Per call: ``shape=(rows, cols)``, the grid of this input (``T`` must be ``rows·cols``); it
    overrides the constructor's grid.
    """

    call_options = ("shape",)

    def __init__(
        self,
        *,
        cols: int | None = None,
        shape: tuple[int, int] | None = None,
        backend: str = "auto",
        scale: float | None = None,
    ) -> None:
        super().__init__(backend=backend, scale=scale)
        if cols is not None and shape is not None:
            raise ValueError(
                f"give cols or shape, not both (got cols={cols!r}, shape={shape!r}): "
                "shape=(rows, cols) fixes the length, cols alone allows any length"
            )
        self.cols = None if cols is None else check_positive_int("cols", cols, example=32)
        self.shape = None if shape is None else check_shape(shape)

    def grid_cols(self, call_shape: Any = None) -> int:
        """The row length in force: the per-call ``shape``, else the constructor's ``shape`` or ``cols``.

        Raises:
            ValueError: no grid was given anywhere, or the per-call ``shape`` is malformed.
        """
        if call_shape is not None:
            return check_shape(call_shape)[1]
        if self.shape is not None:
            return self.shape[1]
        if self.cols is not None:
            return self.cols
        raise ValueError(
            "attention 'axial' needs the grid: pass shape=(rows, cols) per call, "
            "or build it with shape=(rows, cols) or cols=... (any length)"
        )

    def _check_length(self, length: int, call_shape: Any) -> None:
        """A fixed grid (per call or constructor ``shape``) must hold exactly ``length`` positions."""
        grid = check_shape(call_shape) if call_shape is not None else self.shape
        if grid is not None and grid[0] * grid[1] != length:
            where = "passed to this call" if call_shape is not None else "given at construction"
            raise ValueError(
                f"shape {grid} ({where}) holds {grid[0] * grid[1]} positions but the sequence has T={length}: "
                "pass shape=(rows, cols) with rows·cols == T, or build with cols=... for any length"
            )

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = False,
        attention_mask: Tensor | None = None,
        mask: MaskFunction | None = None,
        score_bias: ScoreBias | None = None,
        **call_kwargs: Any,
    ) -> Tensor:
        """As :meth:`AttentionMechanism.forward`, plus the per-call ``shape=(rows, cols)``.

        Raises:
            ValueError: also when a fixed grid (``shape``) does not hold exactly ``T`` positions.
        """
        self._check_length(q.shape[2], call_kwargs.get("shape"))
        return super().forward(
            q, k, v, causal=causal, attention_mask=attention_mask, mask=mask, score_bias=score_bias, **call_kwargs
        )

    def _decode(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        state: Any,
        *,
        attention_mask: Tensor | None,
        score_bias: ScoreBias | None,
    ) -> Tensor:
        self.grid_cols()  # decoding has no per-call shape: the grid must come from the constructor
        length = (state.length if isinstance(state, KVState) else 0) + k.shape[2]
        if self.shape is not None and length > self.shape[0] * self.shape[1]:
            raise ValueError(
                f"decoding past the grid: shape {self.shape} holds {self.shape[0] * self.shape[1]} positions, "
                f"this step would make {length}; build with a larger shape, or with cols=... for any length"
            )
        return super()._decode(q, k, v, state, attention_mask=attention_mask, score_bias=score_bias)

    def pattern(self, q_len: int, kv_len: int, *, causal: bool, **call_kwargs: Any) -> Mask:
        return axial_mask(q_len, kv_len, self.grid_cols(call_kwargs.get("shape")), causal=causal)

    def _blocked(self, q: Tensor, k: Tensor, v: Tensor, call: PatternCall) -> Tensor:
        cols = self.grid_cols(call.options.get("shape"))
        t_len, s_len = q.shape[2], k.shape[2]
        opts = call.softmax_options()
        row = block_diagonal_pattern(t_len, s_len, cols, causal=call.causal, device=q.device)
        parts = [gathered_attention_with_lse(q, k, v, row, **opts)]
        if s_len > cols:  # a second row exists: columns hold keys outside the query's row
            column = column_pattern(t_len, s_len, cols, causal=call.causal, device=q.device)
            parts.append(gathered_attention_with_lse(q, k, v, column, **opts))
        return merge_attention(parts)
