"""Shared machinery of the exact sparse mechanisms (a support module, not a mechanism).

:class:`PatternAttention` is their base class: one pattern, two backends. A subclass states
its pattern twice, as data for each backend: :meth:`~PatternAttention.pattern` (a
:class:`~attnkit.masks.Mask`, the dense oracle and FlexAttention's ``mask_mod``) and
:meth:`~PatternAttention._blocked` (the :mod:`attnkit.kernels.blocked` gather core).
``backend`` picks:

- ``"blocked"``: the gather core; forward and backward on any device, ``O(T·W)``.
- ``"flex"``: FlexAttention under ``torch.compile``; on CPU only without gradients
  (torch 2.13 has no CPU backward for it).
- ``"auto"`` (default): FlexAttention on GPU, the blocked core on CPU, where it is the
  faster of the two for these patterns (``benchmarks/results/sparse.md``).

:func:`sliding_window_attention` is the (dilated) sliding window on the blocked core, shared
by ``sliding_window``, ``longformer`` and ``strided``; which keys a window holds is
:func:`attnkit.masks.sliding_window_mask`. Mechanisms import from here, never from each other.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from attnkit.core.base import AttentionMechanism
from attnkit.core.capabilities import Capabilities, DecodingKind
from attnkit.core.errors import check_choice, check_positive_float
from attnkit.core.types import MaskFunction, ScoreBias
from attnkit.kernels.blocked import GatherPattern, gathered_attention_with_lse, span_pattern
from attnkit.kernels.flex import flex_pattern_attention
from attnkit.masks.functions import Mask, causal_mask, sliding_window_mask

BACKENDS = ("auto", "blocked", "flex")


def pattern_capabilities(*, complexity: str, summary: str, decoding: DecodingKind = "kv_cache") -> Capabilities:
    """The capabilities every :class:`PatternAttention` mechanism has, by construction of its two backends.

    Exact softmax over the pattern, exactly causal (the pattern includes causality), key
    padding and additive score biases (both backends take them), no cross-attention (the
    patterns are defined on one sequence), and decoding with a growing KV cache (queries
    end-aligned, so a decoding step is the pattern's last rows) unless ``decoding`` says otherwise.

    Args:
        complexity: time complexity in the sequence length, e.g. ``"O(N·w)"``.
        summary: one line for listings.
        decoding: ``"kv_cache"`` or, for a cache that can forget, ``"window_cache"``.
    """
    return Capabilities(
        exact=True,
        causal=True,
        key_padding=True,
        cross_attention=False,
        decoding=decoding,
        complexity=complexity,
        family="sparse",
        score_bias=True,
        summary=summary,
    )


@dataclass(frozen=True)
class PatternCall:
    """One validated call, as the blocked core needs it (see :meth:`PatternAttention._blocked`).

    Attributes:
        causal: query ``i`` sees key ``j`` only when ``j <= i + S - T``.
        attention_mask: bool ``(B, S)``, True = real token, or None.
        score_bias: additive bias ``(h, q_pos, kv_pos)``, or None.
        scale: score scale; None for ``1/sqrt(D)``.
        options: the mechanism's per-call options (e.g. Longformer's ``global_tokens``).
    """

    causal: bool
    attention_mask: Tensor | None
    score_bias: ScoreBias | None
    scale: float | None
    options: dict[str, Any] = field(default_factory=dict)

    def softmax_options(self) -> dict[str, Any]:
        """Keyword arguments of every gather-core call: padding, bias and scale."""
        return {"attention_mask": self.attention_mask, "score_bias": self.score_bias, "scale": self.scale}


class PatternAttention(AttentionMechanism):
    """Dispatches an exact sparse pattern to the blocked core or to FlexAttention.

    Args:
        backend: ``"auto"``, ``"blocked"`` or ``"flex"`` (see the module docstring).
        scale: score scale; default ``1/sqrt(D)``.
    """

    def __init__(self, *, backend: str = "auto", scale: float | None = None) -> None:
        super().__init__()
        self.backend = check_choice("backend", backend, BACKENDS)
        self.scale = None if scale is None else check_positive_float("scale", scale)

    def resolved_backend(self, q: Tensor) -> str:
        """The backend a call on ``q`` will use."""
        if self.backend != "auto":
            return self.backend
        return "flex" if q.is_cuda else "blocked"

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool,
        attention_mask: Tensor | None,
        mask: MaskFunction | None,
        score_bias: ScoreBias | None,
        **call_kwargs: Any,
    ) -> Tensor:
        if self.resolved_backend(q) == "flex":
            needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
            if needs_grad and q.device.type == "cpu":
                raise ValueError(
                    f"attention {self.name!r}: backend='flex' has no backward on CPU in this torch; "
                    "use backend='blocked' (or 'auto') for training on CPU"
                )
            pattern = self.pattern(q.shape[2], k.shape[2], causal=causal, **call_kwargs)
            return flex_pattern_attention(
                q, k, v, pattern, attention_mask=attention_mask, score_bias=score_bias, scale=self.scale
            )
        call = PatternCall(causal, attention_mask, score_bias, self.scale, dict(call_kwargs))
        return self._blocked(q, k, v, call)

    @abstractmethod
    def pattern(self, q_len: int, kv_len: int, *, causal: bool, **call_kwargs: Any) -> Mask:
        """The exact pattern (a sparse mechanism always has one); FlexAttention's ``mask_mod``."""

    @abstractmethod
    def _blocked(self, q: Tensor, k: Tensor, v: Tensor, call: PatternCall) -> Tensor:
        """The pattern on the blocked core: ``q (B, H, T, D)``, ``k (B, H, S, D)``, ``v (B, H, S, Dv)``,
        ``T <= S``, queries end-aligned; returns ``(B, H, T, Dv)``."""


def window_extent(window: int, dilation: int, causal: bool) -> tuple[int, int]:
    """How far the window reaches before and after the query: ``(before, after)`` positions."""
    if causal:
        return dilation * (window - 1), 0
    return dilation * (window // 2), dilation * (window // 2)


def default_group_size(reach: int) -> int:
    """Queries per group for a window reaching ``reach`` keys beyond the group: about a quarter
    of it (the gathered span is ``group + reach``, so the waste stays near 25%), 16 to 128."""
    return int(min(128, max(16, (reach // 4) // 16 * 16)))


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    *,
    causal: bool,
    dilation: int = 1,
    attention_mask: Tensor | None = None,
    score_bias: ScoreBias | None = None,
    scale: float | None = None,
    group_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Sliding-window softmax attention on the blocked core (queries end-aligned, ``T <= S``).

    Args:
        q: ``(B, H, T, D)``.
        k: ``(B, H, S, D)``.
        v: ``(B, H, S, Dv)``.
        window: ``w``, see the module docstring for exactly which keys.
        causal: causal or bidirectional window.
        dilation: ``d``, spacing between window keys.
        attention_mask: bool ``(B, S)``, True = real token.
        score_bias: additive bias ``(h, q_pos, kv_pos)``.
        scale: score scale, default ``1/sqrt(D)``.
        group_size: queries per gathered group; default from :func:`default_group_size`.

    Returns:
        ``out (B, H, T, Dv)`` and the per-row log-sum-exp ``(B, H, T)`` (``-inf`` for empty rows).
    """
    t_len, s_len = q.shape[2], k.shape[2]
    if dilation > 1 and t_len == s_len:
        return _interleaved(q, k, v, window, causal, dilation, attention_mask, score_bias, scale, group_size)
    before, after = window_extent(window, dilation, causal)
    size = group_size or default_group_size(before + after)
    element = sliding_window_mask(t_len, s_len, window, causal=causal, dilation=dilation)
    pattern = span_pattern(t_len, s_len, size, before=before, after=after, element_mask=element, device=q.device)
    return gathered_attention_with_lse(
        q, k, v, pattern, attention_mask=attention_mask, score_bias=score_bias, scale=scale
    )


def _interleaved(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    causal: bool,
    dilation: int,
    attention_mask: Tensor | None,
    score_bias: ScoreBias | None,
    scale: float | None,
    group_size: int | None,
) -> tuple[Tensor, Tensor]:
    # Positions p = r + d·m with the same residue r form an undilated sequence over m:
    # run d undilated windows side by side as extra batch rows.
    b, h, length, _ = q.shape
    d = dilation
    rows = -(-length // d)
    pad = rows * d - length

    def split(x: Tensor) -> Tensor:  # (B, H, L, E) -> (B·d, H, rows, E)
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        return x.view(b, h, rows, d, -1).permute(0, 3, 1, 2, 4).reshape(b * d, h, rows, -1)

    real = attention_mask if attention_mask is not None else torch.ones(b, length, dtype=torch.bool, device=q.device)
    real = torch.nn.functional.pad(real, (0, pad), value=False).view(b, rows, d).transpose(1, 2).reshape(b * d, rows)
    bias = None
    if score_bias is not None:
        outer = score_bias

        def bias(hi: Tensor, q_pos: Tensor, kv_pos: Tensor) -> Tensor:
            return outer(hi, q_pos * d, kv_pos * d)

    out, lse = sliding_window_attention(
        split(q),
        split(k),
        split(v),
        window,
        causal=causal,
        attention_mask=real,
        score_bias=bias,
        scale=scale,
        group_size=group_size,
    )

    def join(x: Tensor) -> Tensor:  # (B·d, H, rows, E) -> (B, H, L, E)
        return x.view(b, d, h, rows, -1).permute(0, 2, 3, 1, 4).reshape(b, h, rows * d, -1)[:, :, :length]

    return join(out), join(lse[..., None])[..., 0]


#: Most queries in one gathered group of :func:`block_diagonal_pattern` / :func:`column_pattern`:
#: bounds one group's ``(group, keys)`` scores when blocks or columns are long.
_MAX_GROUP = 64


def block_diagonal_pattern(
    q_len: int, kv_len: int, block_size: int, *, causal: bool, device: torch.device | None = None
) -> GatherPattern:
    """Each query gathers the keys of its own block of ``block_size`` absolute positions.

    A block's queries are split into groups of at most 64 that all gather the whole block (a
    run of ``block_size`` keys, gathered block-wise); the last block may be partial. The keys
    are exactly the block, so only causality needs an element mask. ``O(T·n)``.
    """
    offset = kv_len - q_len
    block_size = min(block_size, kv_len)  # a block longer than the keys is the one block 0 .. S-1
    group = min(block_size, _MAX_GROUP)
    splits = -(-block_size // group)  # groups per block
    blocks = torch.arange(offset // block_size, (kv_len - 1) // block_size + 1, device=device)  # blocks with queries
    keys = blocks[:, None] * block_size + torch.arange(block_size, device=device)  # (blocks, n) absolute
    queries = torch.where((keys >= offset) & (keys < kv_len), keys - offset, -1)  # local, -1 = none
    queries = torch.nn.functional.pad(queries, (0, splits * group - block_size), value=-1).view(-1, group)
    keys = torch.where(keys < kv_len, keys, -1).repeat_interleave(splits, dim=0)
    element = causal_mask(q_len, kv_len) if causal else None
    return GatherPattern(group, keys[None, None], element, q_index=queries[None, None], key_block=block_size)


def column_pattern(
    q_len: int,
    kv_len: int,
    cols: int,
    *,
    causal: bool,
    min_distance: int = 1,
    device: torch.device | None = None,
) -> GatherPattern:
    """Each query gathers the keys of its column in rows of ``cols`` positions, at least
    ``min_distance`` away.

    Key ``j`` is in the column of the query at absolute position ``p`` when ``(p - j) mod cols
    == 0``; keys nearer than ``min_distance`` are left out (``1``: the query itself, which a row
    part holds (``axial``); ``cols``: the whole local band (``strided``)), and causal leaves out
    ``j > p``. Queries are grouped by column (at most 64 per group), each group gathering its
    whole column: ``O(T·S/cols)``.
    """
    offset = kv_len - q_len
    columns = min(cols, kv_len)  # columns at or beyond S hold no key
    per_column = -(-q_len // cols)  # queries in one column at most
    group = min(per_column, _MAX_GROUP)
    splits = -(-per_column // group)
    column = torch.arange(columns, device=device)[:, None]
    # local queries of column c: i ≡ c - offset (mod cols)
    queries = (column - offset).remainder(cols) + cols * torch.arange(splits * group, device=device)
    queries = torch.where(queries < q_len, queries, -1).view(columns * splits, group)
    keys = column + cols * torch.arange(-(-kv_len // cols), device=device)
    keys = torch.where(keys < kv_len, keys, -1).repeat_interleave(splits, dim=0)

    def far_in_column(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        dist = q + offset - k
        return dist >= min_distance if causal else dist.abs() >= min_distance

    return GatherPattern(group, keys[None, None], Mask(far_in_column, "far_in_column"), q_index=queries[None, None])


def distance_pattern(
    q_len: int, kv_len: int, distances: list[int], device: torch.device | None = None
) -> GatherPattern:
    """Each query gathers the keys at the given signed distances: ``j = p - d`` for each ``d``.

    Queries each form their own group (no two share a key set), so the listed keys are exactly
    the pattern and need no element mask: ``O(T·len(distances))``. Distances must be distinct.
    """
    positions = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    keys = positions - torch.tensor(distances, dtype=torch.long, device=device)
    keys = torch.where((keys >= 0) & (keys < kv_len), keys, -1)
    return GatherPattern(1, keys[None, None])
