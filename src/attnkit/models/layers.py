"""The building blocks of a Transformer layer: norms, the feed-forward and residual branches.

A layer is a list of *branches*, each a pre-norm function ``f(x) -> (B, T, dim)`` whose
output is added to the residual stream: self-attention, optionally cross-attention, then
the feed-forward. Keeping the branch (without the addition) as the unit lets the same
layers run with plain residuals (``x + f(x)``), activation checkpointing, or Reformer's
reversible coupling (:mod:`attnkit.models.reversible`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.attention.multi_head import AttentionCache, MultiHeadAttention
from attnkit.models.config import LayerSpec, TransformerConfig


def make_norm(config: TransformerConfig) -> nn.Module:
    """The configured norm over the last dimension (``LayerNorm`` or ``RMSNorm``)."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.dim, eps=config.norm_eps)
    return nn.LayerNorm(config.dim, eps=config.norm_eps)


@dataclass
class LayerInputs:
    """Everything besides the residual stream that a layer's branches read.

    Attributes:
        attention_mask: bool ``(B, T)`` over the layer's own tokens (True = real), or None.
        positions: absolute positions ``(B, T)`` of the tokens (rotary), or None for ``0..T-1``.
        context: encoder output ``(B, S, dim)`` for cross-attention, or None.
        context_mask: bool ``(B, S)`` over the context, or None.
        caches: per layer, ``(self-attention cache, cross-attention cache)`` while decoding.
    """

    attention_mask: Tensor | None = None
    positions: Tensor | None = None
    context: Tensor | None = None
    context_mask: Tensor | None = None
    caches: list[tuple[AttentionCache, AttentionCache]] | None = None


class FeedForward(nn.Module):
    """Position-wise feed-forward: GELU MLP or SwiGLU (Shazeer 2020, arXiv:2002.05202).

    Args:
        dim: model width.
        hidden: hidden width.
        activation: ``"gelu"`` or ``"swiglu"``.
        dropout: dropout after the activation (training only).
        chunks: evaluate the sequence in this many chunks (Reformer's chunked feed-forward):
            the ``(B, T, hidden)`` activation then exists for ``T / chunks`` tokens at a time.
    """

    def __init__(self, dim: int, hidden: int, *, activation: str, dropout: float, chunks: int = 1) -> None:
        super().__init__()
        self.activation = activation
        self.chunks = chunks
        self.w_in = nn.Linear(dim, hidden * (2 if activation == "swiglu" else 1), bias=activation == "gelu")
        self.w_out = nn.Linear(hidden, dim, bias=activation == "gelu")
        self.dropout = nn.Dropout(dropout)

    def _transform(self, x: Tensor) -> Tensor:
        h = self.w_in(x)
        if self.activation == "swiglu":
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        else:
            h = F.gelu(h)
        return self.w_out(self.dropout(h))

    def forward(self, x: Tensor) -> Tensor:
        """``x (B, T, dim) -> (B, T, dim)``."""
        if self.chunks == 1 or x.shape[1] <= 1:
            return self._transform(x)
        return torch.cat([self._transform(part) for part in x.chunk(self.chunks, dim=1)], dim=1)


class AttentionBranch(nn.Module):
    """Pre-norm self- or cross-attention branch: ``dropout(attention(norm(x)))``.

    Args:
        config: the model config.
        attention: mechanism name, or a per-head mix's groups.
        options: mechanism options (empty for a mix).
        causal: causal self-attention.
        cross: attend to ``inputs.context`` instead of ``x`` itself.
    """

    def __init__(
        self, config: TransformerConfig, attention: LayerSpec, options: dict[str, Any], *, causal: bool, cross: bool
    ) -> None:
        super().__init__()
        self.causal = causal
        self.cross = cross
        self.norm = make_norm(config)
        self.attention = MultiHeadAttention(
            config.dim,
            config.heads,
            attention,
            kv_heads=config.kv_heads,
            rotary=config.position == "rotary" and not cross,
            rotary_base=config.rotary_base,
            position_bias=config.position if config.position in ("alibi", "t5") and not cross else None,
            bias=config.bias,
            **options,
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, inputs: LayerInputs, cache: AttentionCache | None) -> Tensor:
        """``x (B, T, dim) -> (B, T, dim)``, the branch output (not yet added to ``x``)."""
        h = self.norm(x)
        if self.cross:
            out = self.attention(h, inputs.context, attention_mask=inputs.context_mask, cache=cache)
        else:
            out = self.attention(
                h,
                causal=self.causal,
                attention_mask=inputs.attention_mask,
                cache=cache,
                positions=inputs.positions,
            )
        return self.dropout(out)


class FeedForwardBranch(nn.Module):
    """Pre-norm feed-forward branch: ``dropout(ff(norm(x)))``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.norm = make_norm(config)
        self.ff = FeedForward(
            config.dim,
            config.hidden_dim,
            activation=config.activation,
            dropout=config.dropout,
            chunks=config.ff_chunks,
        )
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, inputs: LayerInputs, cache: AttentionCache | None) -> Tensor:
        """``x (B, T, dim) -> (B, T, dim)``, the branch output."""
        return self.dropout(self.ff(self.norm(x)))


class TransformerLayer(nn.Module):
    """One layer: self-attention, optional cross-attention, feed-forward (each a branch).

    Args:
        config: the model config.
        attention: this layer's self-attention mechanism, or a per-head mix's groups.
        options: its options.
        causal: causal self-attention (decoders).
        cross_attention: add a cross-attention branch (encoder-decoder decoders).

    Attributes:
        mechanism: the mechanism's name; for a per-head mix a readable label
            (``sliding_window(window=64)×4 + linear×4``), not a registry name.
        mechanisms: the registered names the layer runs, one per head group (one for a single
            mechanism).
    """

    def __init__(
        self,
        config: TransformerConfig,
        attention: LayerSpec,
        options: dict[str, Any],
        *,
        causal: bool,
        cross_attention: bool = False,
    ) -> None:
        super().__init__()
        self.mechanisms: tuple[str, ...] = (
            (attention,) if isinstance(attention, str) else tuple(g.mechanism for g in attention)
        )
        self.mechanism = attention if isinstance(attention, str) else " + ".join(g.label for g in attention)
        self.self_attention = AttentionBranch(config, attention, options, causal=causal, cross=False)
        self.cross_attention = (
            AttentionBranch(config, config.cross_attention, config.cross_attention_options, causal=False, cross=True)
            if cross_attention
            else None
        )
        self.feed_forward = FeedForwardBranch(config)

    def branches(self) -> list[nn.Module]:
        """The residual branches in order."""
        out: list[nn.Module] = [self.self_attention]
        if self.cross_attention is not None:
            out.append(self.cross_attention)
        out.append(self.feed_forward)
        return out

    @staticmethod
    def branch_cache(branch: nn.Module, caches: tuple[AttentionCache, AttentionCache] | None) -> AttentionCache | None:
        """The cache a branch uses while decoding (self- or cross-attention), if any."""
        if caches is None or not isinstance(branch, AttentionBranch):
            return None
        return caches[1] if branch.cross else caches[0]
