"""Multi-head attention around any registered mechanism.

This module owns everything that is not the attention maths: the q/k/v/output
projections, grouped key/value heads, rotary embeddings, relative score biases (ALiBi,
T5) and the decoding cache. The mechanism sees projected ``(B, H, L, D)`` tensors.

Per-head mixing: ``attention`` may instead be a list of head groups (``[HeadGroup("sliding_window",
4, {"window": 64}), HeadGroup("linear", 4)]``); the projections stay shared and each group's
mechanism runs on its slice of heads (:mod:`attnkit.attention.head_groups`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.attention.head_groups import HeadGroup, MixedHeads
from attnkit.core.base import AttentionMechanism, repeat_kv_heads
from attnkit.core.errors import check_positive_int
from attnkit.core.registry import build_attention
from attnkit.core.types import ScoreBias
from attnkit.core.validation import check_no_key_padding_mask
from attnkit.positions.relative import ALiBi, T5RelativeBias
from attnkit.positions.rotary import RotaryEmbedding


@dataclass
class AttentionCache:
    """Incremental-decoding state of one :class:`MultiHeadAttention` layer.

    Attributes:
        state: the mechanism's own state (KV cache, rolling window or recurrent state; with
            per-head mixing a :class:`~attnkit.attention.head_groups.MixedState` of each group's
            state); None for cross-attention.
        position: number of positions already consumed (the next token's position).
        context: projected cross-attention keys/values ``(k, v)`` and their padding mask,
            computed once on the first call.
    """

    state: Any = None
    position: int = 0
    context: tuple[Tensor, Tensor, Tensor | None] | None = field(default=None, repr=False)


class MultiHeadAttention(nn.Module):
    """Multi-head self- or cross-attention on ``(B, T, dim)`` inputs.

    Args:
        dim: model width.
        heads: number of query heads.
        attention: registered mechanism name (see :func:`attnkit.list_attention`), or a
            per-head mix: a list of :class:`~attnkit.attention.head_groups.HeadGroup` (or tables
            ``{"mechanism": ..., "heads": ..., "options": {...}}``) whose ``heads`` add up to
            ``heads``; group ``i`` runs on the next ``heads_i`` query heads, and under
            grouped-query attention owns whole key/value heads.
        kv_heads: number of key/value heads (grouped-query attention); must divide
            ``heads``. Default ``heads``.
        head_dim: per-head width; default ``dim // heads``.
        context_dim: width of the cross-attention context; default ``dim``.
        rotary: apply rotary embeddings to queries and keys (self-attention only).
        rotary_base: rotary frequency base.
        position_bias: ``"alibi"``, ``"t5"`` or None: an additive relative score bias
            (the mechanism must declare ``score_bias`` support).
        t5_num_buckets: T5 buckets (with ``position_bias="t5"``).
        t5_max_distance: T5 maximum distance.
        bias: whether the projections have biases.
        dropout: dropout on the output projection (training only).
        **options: options of the mechanism (e.g. ``window=256``); with a per-head mix, each
            group carries its own options and these must be empty.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        attention: str | Sequence[HeadGroup | Mapping[str, Any]] = "full",
        *,
        kv_heads: int | None = None,
        head_dim: int | None = None,
        context_dim: int | None = None,
        rotary: bool = False,
        rotary_base: float = 10000.0,
        position_bias: str | None = None,
        t5_num_buckets: int = 32,
        t5_max_distance: int = 128,
        bias: bool = False,
        dropout: float = 0.0,
        **options: Any,
    ) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim, example=512)
        self.heads = check_positive_int("heads", heads, example=8)
        self.kv_heads = check_positive_int("kv_heads", kv_heads if kv_heads is not None else heads)
        if heads % self.kv_heads:
            raise ValueError(f"kv_heads must divide heads, got heads={heads}, kv_heads={self.kv_heads}")
        if head_dim is None:
            if dim % heads:
                raise ValueError(f"dim must be divisible by heads (or pass head_dim), got dim={dim}, heads={heads}")
            head_dim = dim // heads
        self.head_dim = check_positive_int("head_dim", head_dim)
        context_dim = check_positive_int("context_dim", context_dim if context_dim is not None else dim)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")

        self.to_q = nn.Linear(dim, heads * self.head_dim, bias=bias)
        self.to_k = nn.Linear(context_dim, self.kv_heads * self.head_dim, bias=bias)
        self.to_v = nn.Linear(context_dim, self.kv_heads * self.head_dim, bias=bias)
        self.to_out = nn.Linear(heads * self.head_dim, dim, bias=bias)
        self.out_dropout = nn.Dropout(dropout)
        self.attention: AttentionMechanism | MixedHeads = self._build_attention(attention, options)
        self.rotary = RotaryEmbedding(self.head_dim, base=rotary_base) if rotary else None

        self.position_bias: ALiBi | T5RelativeBias | None
        if position_bias is None:
            self.position_bias = None
        elif position_bias == "alibi":
            self.position_bias = ALiBi(heads)
        elif position_bias == "t5":
            self.position_bias = T5RelativeBias(heads, num_buckets=t5_num_buckets, max_distance=t5_max_distance)
        else:
            raise ValueError(f"position_bias must be 'alibi', 't5' or None, got {position_bias!r}")
        if self.position_bias is not None and not _accepts_score_bias(self.attention):
            raise ValueError(
                f"attention {self.attention.name!r} does not support additive position biases ({position_bias!r}); "
                "use rotary=True or absolute positions instead"
            )

    def _build_attention(self, attention: Any, options: dict[str, Any]) -> AttentionMechanism | MixedHeads:
        if isinstance(attention, str):
            return build_attention(attention, **options)
        if not isinstance(attention, Sequence) or isinstance(attention, (bytes, bytearray)):
            raise ValueError(
                "attention must be a registered mechanism name or a list of head groups "
                f"[{{'mechanism': ..., 'heads': ..., 'options': {{...}}}}, ...], got {type(attention).__name__}"
            )
        if options:
            # Which group would they belong to? Refuse rather than guess or drop them.
            raise ValueError(
                f"options {sorted(options)} were given next to a per-head mix; put each group's options "
                "in its own options table"
            )
        return MixedHeads(attention, heads=self.heads, kv_heads=self.kv_heads)

    # -- helpers --------------------------------------------------------------------
    def _split(self, x: Tensor, heads: int) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, heads, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)

    def _score_bias(self) -> ScoreBias | None:
        return None if self.position_bias is None else self.position_bias.score_bias()

    def _check_input(self, name: str, x: Tensor, width: int) -> None:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != width:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must have shape (B, T, {width}), got {shape}")

    def _check_positions(self, positions: Tensor, x: Tensor) -> None:
        b, t = x.shape[0], x.shape[1]
        if not isinstance(positions, Tensor) or positions.dtype in (torch.bool,) or positions.is_floating_point():
            got = positions.dtype if isinstance(positions, Tensor) else type(positions).__name__
            raise ValueError(f"positions must be an integer tensor of shape ({t},) or ({b}, {t}), got {got}")
        if tuple(positions.shape) not in ((t,), (b, t)):
            raise ValueError(f"positions must have shape ({t},) or ({b}, {t}), got {tuple(positions.shape)}")

    def new_cache(self) -> AttentionCache:
        """A fresh decoding cache for this layer (pass it to :meth:`forward` as ``cache``)."""
        return AttentionCache()

    # -- forward --------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        causal: bool = False,
        attention_mask: Tensor | None = None,
        cache: AttentionCache | None = None,
        positions: Tensor | None = None,
        **attention_kwargs: Any,
    ) -> Tensor:
        """Attend from ``x`` to itself (or to ``context``).

        Args:
            x: ``(B, T, dim)``.
            context: ``(B, S, context_dim)`` for cross-attention, else None.
            causal: causal self-attention.
            attention_mask: bool ``(B, S)`` over the keys (``x``'s tokens, or ``context``'s),
                True = real token; with a self-attention cache, over the new tokens only. In
                self-attention, padded tokens' queries are zeroed, so their content cannot reach real
                tokens through query-built structure (landmarks, buckets, clusters); their own output
                rows are not meaningful.
                PyTorch's ``key_padding_mask`` (True = padding) is refused with a ``TypeError``:
                pass ``attention_mask=~key_padding_mask``.
            cache: an :class:`AttentionCache` for incremental decoding: ``x`` holds only the
                new tokens; self-attention is then causal.
            positions: absolute positions of ``x``'s tokens for rotary embeddings, ``(T,)`` or
                per row ``(B, T)`` (left-padded batches); default ``0..T-1``, or continuing
                from the cache. Ignored without rotary embeddings.
            **attention_kwargs: per-call options of the mechanism.

        Returns:
            ``(B, T, dim)`` (empty when ``T = 0``).
        """
        check_no_key_padding_mask(attention_kwargs)
        self._check_input("x", x, self.dim)
        if context is not None:
            self._check_input("context", context, self.to_k.in_features)
            if self.rotary is not None:
                raise ValueError(
                    "rotary embeddings are for self-attention; build the cross-attention layer without them"
                )
        if positions is not None:
            self._check_positions(positions, x)
        if context is None:
            q, k, v = self._project_self(x)
        else:
            q, k, v = self._split(self.to_q(x), self.heads), None, None
        if cache is not None:
            out = self._forward_cached(q, k, v, context, attention_mask, cache, positions, attention_kwargs)
        else:
            if k is None or v is None:
                assert context is not None
                k = self._split(self.to_k(context), self.kv_heads)
                v = self._split(self.to_v(context), self.kv_heads)
            if self.rotary is not None:
                pos = positions if positions is not None else torch.arange(x.shape[1], device=x.device)
                q, k = self.rotary.rotate_pair(q, k, pos)
            if context is None and attention_mask is not None:
                # Padded tokens' queries are zeroed: their outputs are never used, but Nystrom's landmarks,
                # LSH buckets, routing clusters and Sinkhorn's block sort are built from all queries, so
                # their content would otherwise reach real tokens.
                q = q.masked_fill(~attention_mask[:, None, :, None], 0)
            out = self.attention(
                q,
                repeat_kv_heads(k, self.heads),  # grouped key/value heads serve H // kv_heads query heads each
                repeat_kv_heads(v, self.heads),
                causal=causal,
                attention_mask=attention_mask,
                score_bias=self._score_bias() if context is None else None,
                **attention_kwargs,
            )
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], self.heads * self.head_dim)
        return self.out_dropout(self.to_out(out))

    def _project_self(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values of ``x``, split into heads. Projection layers that can run as one
        call (``fused_forward``, e.g. int8 layers) do; the result is the same as three calls."""
        fused = getattr(self.to_q, "fused_forward", None)
        projected = fused((self.to_k, self.to_v), x) if fused is not None else None
        if projected is None:
            projected = (self.to_q(x), self.to_k(x), self.to_v(x))
        q, k, v = projected
        return self._split(q, self.heads), self._split(k, self.kv_heads), self._split(v, self.kv_heads)

    def _forward_cached(
        self,
        q: Tensor,
        k: Tensor | None,
        v: Tensor | None,
        context: Tensor | None,
        attention_mask: Tensor | None,
        cache: AttentionCache,
        positions: Tensor | None,
        attention_kwargs: dict[str, Any],
    ) -> Tensor:
        if not isinstance(cache, AttentionCache):
            raise ValueError(f"cache must come from MultiHeadAttention.new_cache(), got {type(cache).__name__}")
        if context is not None:
            # Cross-attention: project the context once, then reuse it at every step.
            if cache.context is None:  # kept with kv_heads heads, like the self-attention cache
                k = self._split(self.to_k(context), self.kv_heads)
                v = self._split(self.to_v(context), self.kv_heads)
                cache.context = (k, v, attention_mask)
            k, v, context_mask = cache.context
            k, v = repeat_kv_heads(k, self.heads), repeat_kv_heads(v, self.heads)
            return self.attention(q, k, v, attention_mask=context_mask, **attention_kwargs)
        if attention_kwargs:
            raise TypeError(
                f"per-call options {sorted(attention_kwargs)} are not supported while decoding with a cache"
            )
        assert k is not None and v is not None, "self-attention projects keys and values with the queries"
        if self.rotary is not None:
            pos = positions
            if pos is None:
                pos = torch.arange(cache.position, cache.position + q.shape[2], device=q.device)
            q, k = self.rotary.rotate_pair(q, k, pos)
        if cache.state is None:
            cache.state = self.attention.new_state()
        # Keys/values go in with kv_heads heads: a key/value cache stores them so (heads / kv_heads
        # times smaller under grouped-query attention) and expands them only to attend.
        out = self.attention.decode(
            q,
            k,
            v,
            cache.state,
            attention_mask=attention_mask,
            score_bias=self._score_bias(),
        )
        cache.position += q.shape[2]
        return out


def _accepts_score_bias(attention: AttentionMechanism | MixedHeads) -> bool:
    if isinstance(attention, MixedHeads):
        return attention.supports_score_bias
    return attention.capabilities.score_bias
