"""Token embeddings with absolute positions, and the stack of layers every model is built on."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from attnkit.attention.multi_head import AttentionCache
from attnkit.models.cache import ModelCache
from attnkit.models.config import TransformerConfig
from attnkit.models.layers import LayerInputs, TransformerLayer, make_norm
from attnkit.models.reversible import coupled_forward, reversible_forward
from attnkit.positions import LearnedPositions, SinusoidalPositions


class TokenEmbedding(nn.Module):
    """Token embedding (plus the token shift), absolute positions (``sinusoidal``/``learned``), dropout.

    Rotary, ALiBi and T5 positions live in the attention layers; here they add nothing. With
    ``token_shift``, each token's embedding ``e_t`` becomes ``e_t + W e_{t-1}``, where ``e_{t-1}`` is
    zero before the first position and where position ``t-1`` is padding (so a left-padded row
    equals the unpadded sequence).
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.tokens = nn.Embedding(config.vocab_size, config.dim)
        self.positions: SinusoidalPositions | LearnedPositions | None = None
        if config.position == "sinusoidal":
            self.positions = SinusoidalPositions(config.dim)
        elif config.position == "learned":
            self.positions = LearnedPositions(config.dim, config.max_len)
        self.dropout = nn.Dropout(config.dropout)
        self.shift = nn.Linear(config.dim, config.dim, bias=False) if config.token_shift else None

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        *,
        attention_mask: Tensor | None = None,
        cache: ModelCache | None = None,
    ) -> Tensor:
        """``input_ids (B, T)`` at absolute ``positions (B, T)`` -> ``(B, T, dim)``.

        ``attention_mask`` (bool ``(B, T)``, True = real token) and ``cache`` (whose
        ``previous_token`` it reads and updates) matter only with the token shift.
        """
        x = self.tokens(input_ids)
        if self.shift is not None:
            x = x + self.shift(self._previous_tokens(x, attention_mask, cache))
        top = int(positions.max()) if positions.numel() > 0 else -1  # -1: no token (T = 0)
        if isinstance(self.positions, LearnedPositions):
            if top >= self.positions.max_len:
                raise ValueError(
                    f"position {top} is beyond max_len={self.positions.max_len} of the learned positions "
                    "(use a shorter input, or a config with a larger max_len or position='rotary')"
                )
            x = x + self.positions.embedding(positions)
        elif isinstance(self.positions, SinusoidalPositions):
            table = self.positions(top + 1)  # (P, dim)
            x = x + table[positions].to(x.dtype)
        return self.dropout(x)

    @staticmethod
    def _previous_tokens(tokens: Tensor, attention_mask: Tensor | None, cache: ModelCache | None) -> Tensor:
        """``(B, T, dim)``: the embedding of each position's predecessor (zeros: none, or padding)."""
        real = tokens if attention_mask is None else tokens * attention_mask[..., None].to(tokens.dtype)
        first = tokens.new_zeros(tokens.shape[0], 1, tokens.shape[2])
        if cache is not None and cache.previous_token is not None:
            first = cache.previous_token[:, None].to(tokens.dtype)
        if cache is not None and tokens.shape[1] > 0:
            cache.previous_token = real[:, -1]
        return torch.cat([first, real[:, :-1]], dim=1)


class TransformerStack(nn.Module):
    """Layers plus the final norm; plain residual, checkpointed or reversible.

    Args:
        config: the model config.
        layer_specs: ``(mechanism, options)`` per layer.
        causal: causal self-attention.
        cross_attention: layers also attend to a context (decoder of an encoder-decoder).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_specs: list[tuple[str, dict[str, Any]]],
        *,
        causal: bool,
        cross_attention: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(config, name, options, causal=causal, cross_attention=cross_attention)
            for name, options in layer_specs
        )
        self.norm = make_norm(config)
        self.reversible = config.reversible
        self.checkpointing = config.checkpointing
        #: With ``reversible``: rebuild activations in backward (True) or let autograd store them.
        self.recompute = True

    def layer_list(self) -> list[TransformerLayer]:
        """The layers, typed."""
        return [cast(TransformerLayer, layer) for layer in self.layers]

    def new_caches(self) -> list[tuple[AttentionCache, AttentionCache]]:
        """One ``(self-attention, cross-attention)`` cache pair per layer."""
        return [
            (
                layer.self_attention.attention.new_cache(),
                layer.cross_attention.attention.new_cache() if layer.cross_attention is not None else AttentionCache(),
            )
            for layer in self.layer_list()
        ]

    def _branches(self, inputs: LayerInputs) -> tuple[list[nn.Module], list[AttentionCache | None] | None]:
        branches: list[nn.Module] = []
        caches: list[AttentionCache | None] = []
        for i, layer in enumerate(self.layer_list()):
            for branch in layer.branches():
                branches.append(branch)
                pair = inputs.caches[i] if inputs.caches is not None else None
                caches.append(TransformerLayer.branch_cache(branch, pair))
        return branches, (caches if inputs.caches is not None else None)

    @staticmethod
    def _run_layer(layer: TransformerLayer, x: Tensor, inputs: LayerInputs, pair: Any) -> Tensor:
        for branch in layer.branches():
            x = x + branch(x, inputs, TransformerLayer.branch_cache(branch, pair))
        return x

    def forward(self, x: Tensor, inputs: LayerInputs) -> Tensor:
        """``x (B, T, dim) -> (B, T, dim)`` through every layer and the final norm."""
        if self.reversible:
            branches, caches = self._branches(inputs)
            if caches is not None:
                x = coupled_forward(branches, x, x, inputs, caches)
            else:
                x = reversible_forward(branches, x, inputs, recompute=self.recompute)
            return self.norm(x)
        use_checkpoint = self.checkpointing and torch.is_grad_enabled() and inputs.caches is None
        for i, layer in enumerate(self.layer_list()):
            pair = inputs.caches[i] if inputs.caches is not None else None
            if use_checkpoint:
                x = checkpoint(self._run_layer, layer, x, inputs, pair, use_reentrant=False)
            else:
                x = self._run_layer(layer, x, inputs, pair)
        return self.norm(x)
