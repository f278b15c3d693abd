"""Token embeddings with absolute positions, and the stack of layers every model is built on."""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from attnkit.attention.multi_head import AttentionCache
from attnkit.models.cache import ModelCache
from attnkit.models.config import LayerSpec, TransformerConfig
from attnkit.models.layers import LayerInputs, TransformerLayer, make_norm
from attnkit.models.reversible import coupled_forward, reversible_forward
from attnkit.positions import LearnedPositions, SinusoidalPositions


class TokenShift(nn.Module):
    """Depthwise causal convolution of width ``k`` over token embeddings (``token_shift = k``).

    ``y_t = sum_{j=0}^{k-1} w_j * e_{t-j}`` (``*`` per channel): the short convolution H3 and Based
    put before attention ("Hungry Hungry Hippos", Fu et al. 2023, arXiv:2212.14052; Zoology, Arora
    et al. 2023, arXiv:2312.04927). Cost ``O(T · k · dim)``.

    Args:
        dim: embedding width.
        width: kernel width ``k`` (at least 2: the current token and ``k - 1`` earlier ones).

    Attributes:
        weight: ``(k, dim)``; row ``j`` multiplies the embedding ``j`` positions back. Row 0 starts at
            one (the embedding passes through unchanged) and the others uniform in ``±1/sqrt(k)``, the
            range of ``nn.Conv1d``'s default for this kernel (measured: all-zero earlier taps make
            MQAR take twice the steps to learn).
    """

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(width, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity on the current token, small random weights on the earlier ones."""
        bound = 1.0 / math.sqrt(self.width)
        with torch.no_grad():
            self.weight[0].fill_(1.0)
            self.weight[1:].uniform_(-bound, bound)

    def new_history(self, x: Tensor) -> Tensor:
        """The history before a sequence's first token: zeros ``(B, k - 1, dim)`` like ``x (B, T, dim)``."""
        return x.new_zeros(x.shape[0], self.width - 1, x.shape[2])

    def forward(self, x: Tensor, history: Tensor) -> tuple[Tensor, Tensor]:
        """Convolve ``x (B, T, dim)`` continuing ``history (B, k - 1, dim)``.

        Returns:
            ``(y, history)``: ``y (B, T, dim)`` and the last ``k - 1`` embeddings of
            ``[history, x]`` (the history of whatever comes next).
        """
        t = x.shape[1]
        window = torch.cat([history.to(x.dtype), x], dim=1)  # (B, k - 1 + T, dim); window[:, k-1+i] = x_i
        lag = self.width - 1
        y = x * self.weight[0]
        for j in range(1, self.width):
            y = y + window[:, lag - j : lag - j + t] * self.weight[j]  # e_{t-j} for every t
        return y, window[:, t:]


class TokenEmbedding(nn.Module):
    """Token embedding (through the token shift), absolute positions (``sinusoidal``/``learned``), dropout.

    Rotary, ALiBi and T5 positions live in the attention layers; here they add nothing. With
    ``token_shift = k``, the token embeddings pass through :class:`TokenShift` before positions are
    added; padded positions enter it as zeros (so a left-padded row equals the unpadded sequence).
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
        self.shift = TokenShift(config.dim, config.token_shift) if config.token_shift else None

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
        ``shift_history`` it reads and updates) matter only with the token shift.
        """
        x = self.tokens(input_ids)
        if self.shift is not None:
            x = self._shift(self.shift, x, attention_mask, cache)
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
    def _shift(shift: TokenShift, x: Tensor, attention_mask: Tensor | None, cache: ModelCache | None) -> Tensor:
        """The token shift of ``x (B, T, dim)``, continuing (and advancing) the cache's history."""
        if attention_mask is not None:
            x = x * attention_mask[..., None].to(x.dtype)  # padding contributes nothing
        history = None if cache is None else cache.shift_history
        y, history = shift(x, shift.new_history(x) if history is None else history)
        if cache is not None:
            cache.shift_history = history
        return y


class TransformerStack(nn.Module):
    """Layers plus the final norm; plain residual, checkpointed or reversible.

    Args:
        config: the model config.
        layer_specs: ``(mechanism or per-head mix, options)`` per layer (``config.layer_attention()``).
        causal: causal self-attention.
        cross_attention: layers also attend to a context (decoder of an encoder-decoder).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_specs: list[tuple[LayerSpec, dict[str, Any]]],
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
