"""The Transformer family: encoder, decoder-only language model, encoder-decoder, classifier.

All four are built from one :class:`~attnkit.models.config.TransformerConfig` and the same
layers (:mod:`attnkit.models.layers`); they differ in causality, cross-attention and the
head. Conventions (shared with the training and arena code):

- ``input_ids``: long ``(B, T)``; ``attention_mask``: bool ``(B, T)``, True = real token
  (0/1 integer masks are accepted too). Padding may sit on either side.
- Absolute positions count real tokens only (``cumsum(mask) - 1``), so a left-padded
  row gets the same positions, and the same outputs, as the unpadded sequence.
- Models return logits (or hidden states); losses are computed outside.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.core.registry import attention_capabilities
from attnkit.core.validation import check_ids, check_mask
from attnkit.models.cache import ModelCache
from attnkit.models.config import LayerSpec, TransformerConfig
from attnkit.models.generation import LanguageModelGeneration, Seq2SeqGeneration
from attnkit.models.layers import LayerInputs
from attnkit.models.pretrained import PreTrainedModel, register_architecture
from attnkit.models.stack import TokenEmbedding, TransformerStack


def positions_from_mask(mask: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    """Absolute positions ``(B, T)``: the index among real tokens (padding gets its neighbour's)."""
    if mask is None:
        return torch.arange(length, device=device).expand(batch, length)
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def _check_causal(specs: list[tuple[LayerSpec, dict[str, Any]]], what: str) -> None:
    for i, (spec, _) in enumerate(specs):
        names = [spec] if isinstance(spec, str) else [g.mechanism for g in spec]
        for name in names:
            if not attention_capabilities(name).causal:
                where = "" if isinstance(spec, str) else " in a per-head mix"
                raise ValueError(
                    f"{what} layer {i} uses attention {name!r}{where}, which has no causal mode; "
                    "a decoder needs causal attention (pick another mechanism for that layer)"
                )


class _TokenModel(PreTrainedModel):
    """Shared plumbing: embed ids at their positions, run a stack, with or without a cache."""

    def _run(
        self,
        embed: TokenEmbedding,
        stack: TransformerStack,
        ids: Tensor,
        mask: Tensor | None,
        *,
        cache: ModelCache | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        b, t = ids.shape
        if cache is None:
            positions = positions_from_mask(mask, b, t, ids.device)
            caches = None
        else:
            if not isinstance(cache, ModelCache):
                raise ValueError(f"cache must come from model.new_cache(), got {type(cache).__name__}")
            if cache.next_position is None:
                cache.next_position = torch.zeros(b, dtype=torch.long, device=ids.device)
                cache.batch = b
            if cache.next_position.shape[0] != b:
                raise ValueError(f"the cache holds {cache.next_position.shape[0]} rows but the input has {b}")
            # Positions continue from the real tokens already consumed (as cumsum over the whole mask).
            real = mask if mask is not None else torch.ones(b, t, dtype=torch.bool, device=ids.device)
            positions = (cache.next_position[:, None] + real.long().cumsum(dim=1) - 1).clamp(min=0)
            cache.next_position = cache.next_position + real.sum(dim=1)
            cache.length += t
            caches = cache.layers
        x = embed(ids, positions, attention_mask=mask, cache=cache)
        inputs = LayerInputs(
            attention_mask=mask, positions=positions, context=context, context_mask=context_mask, caches=caches
        )
        return stack(x, inputs)


@register_architecture
class Encoder(_TokenModel):
    """Bidirectional Transformer encoder: ``(input_ids, attention_mask) -> hidden (B, T, dim)``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        self.embed = TokenEmbedding(config)
        self.encoder = TransformerStack(config, config.layer_attention(), causal=False)
        self.init_weights()

    def named_stacks(self) -> list[tuple[str, TransformerStack]]:
        return [("encoder", self.encoder)]

    def forward(self, input_ids: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
        """Encode ``input_ids (B, T)``; returns hidden states ``(B, T, dim)`` (final-normed)."""
        ids = check_ids("input_ids", input_ids, self.config.vocab_size, allow_empty=True)
        mask = check_mask("attention_mask", attention_mask, ids)
        return self._run(self.embed, self.encoder, ids, mask)


@register_architecture
class SequenceClassifier(_TokenModel):
    """Encoder plus a pooled linear head: ``(input_ids, attention_mask) -> logits (B, num_classes)``.

    Pooling (``config.pooling``) is over real tokens only: their mean, the first token, or
    the last real token.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        if config.num_classes is None:
            raise ValueError("SequenceClassifier needs config.num_classes (e.g. num_classes=2)")
        self.embed = TokenEmbedding(config)
        self.encoder = TransformerStack(config, config.layer_attention(), causal=False)
        self.head = nn.Linear(config.dim, config.num_classes)
        self.init_weights()

    def named_stacks(self) -> list[tuple[str, TransformerStack]]:
        return [("encoder", self.encoder)]

    def forward(self, input_ids: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
        """Classify ``input_ids (B, T)``; returns logits ``(B, num_classes)``."""
        ids = check_ids("input_ids", input_ids, self.config.vocab_size)
        mask = check_mask("attention_mask", attention_mask, ids)
        hidden = self._run(self.embed, self.encoder, ids, mask)  # (B, T, dim)
        b, t = ids.shape
        real = mask if mask is not None else torch.ones(b, t, dtype=torch.bool, device=ids.device)
        if self.config.pooling == "mean":
            weights = real.to(hidden.dtype)[..., None]
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        elif self.config.pooling == "first":
            first = real.long().argmax(dim=1)  # index of the first real token
            pooled = hidden[torch.arange(b, device=ids.device), first]
        else:
            last = t - 1 - real.long().flip(1).argmax(dim=1)
            pooled = hidden[torch.arange(b, device=ids.device), last]
        return self.head(pooled)


class _LMHead(nn.Module):
    """Output projection to the vocabulary, optionally tied to the token embedding."""

    def __init__(self, config: TransformerConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.proj = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.proj.weight = embedding.weight

    def forward(self, hidden: Tensor) -> Tensor:
        """``(B, T, dim) -> (B, T, vocab_size)``."""
        return F.linear(hidden, self.proj.weight)


@register_architecture
class MaskedLanguageModel(_TokenModel):
    """Bidirectional encoder with a vocabulary head (BERT-style masked-LM pretraining):
    ``(input_ids, attention_mask) -> logits (B, T, V)`` at every position.

    Its ``embed.*`` and ``encoder.*`` weights are an :class:`Encoder`'s, so a
    :class:`SequenceClassifier` or :class:`EncoderDecoder` fine-tunes from them (``init_from``).
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        self.embed = TokenEmbedding(config)
        self.encoder = TransformerStack(config, config.layer_attention(), causal=False)
        self.lm_head = _LMHead(config, self.embed.tokens)
        self.init_weights()

    def named_stacks(self) -> list[tuple[str, TransformerStack]]:
        return [("encoder", self.encoder)]

    def forward(self, input_ids: Tensor, *, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``(B, T, vocab_size)`` for every position of ``input_ids (B, T)``."""
        ids = check_ids("input_ids", input_ids, self.config.vocab_size, allow_empty=True)
        mask = check_mask("attention_mask", attention_mask, ids)
        return self.lm_head(self._run(self.embed, self.encoder, ids, mask))


@register_architecture
class LanguageModel(LanguageModelGeneration, _TokenModel):
    """Decoder-only causal language model: ``(input_ids, attention_mask) -> logits (B, T, V)``."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        specs = config.layer_attention()
        _check_causal(specs, "LanguageModel")
        self.embed = TokenEmbedding(config)
        self.decoder = TransformerStack(config, specs, causal=True)
        self.lm_head = _LMHead(config, self.embed.tokens)
        self.init_weights()

    def named_stacks(self) -> list[tuple[str, TransformerStack]]:
        return [("decoder", self.decoder)]

    def new_cache(self) -> ModelCache:
        """A fresh decoding cache (pass it as ``cache`` to feed tokens incrementally)."""
        return ModelCache(self.decoder.new_caches())

    def forward(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        cache: ModelCache | None = None,
    ) -> Tensor:
        """Next-token logits for every position.

        Args:
            input_ids: long ``(B, T)``.
            attention_mask: bool ``(B, T)``, True = real token.
            cache: from :meth:`new_cache`: ``input_ids`` then holds only the new tokens
                (and ``attention_mask`` only theirs); logits equal a full recompute.

        Returns:
            ``(B, T, vocab_size)`` logits.
        """
        ids = check_ids("input_ids", input_ids, self.config.vocab_size, allow_empty=True)
        mask = check_mask("attention_mask", attention_mask, ids)
        return self.lm_head(self._run(self.embed, self.decoder, ids, mask, cache=cache))


@register_architecture
class EncoderDecoder(Seq2SeqGeneration, _TokenModel):
    """Encoder-decoder with cross-attention (teacher forcing in ``forward``; causal decoder).

    Source and target share one vocabulary and one token embedding (tied to the output
    projection when ``tie_embeddings``).
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        decoder_specs = config.layer_attention(decoder=True)
        _check_causal(decoder_specs, "EncoderDecoder decoder")
        if not attention_capabilities(config.cross_attention).cross_attention:
            raise ValueError(
                f"cross_attention={config.cross_attention!r} cannot attend to a context of another length; "
                "use cross_attention='full'"
            )
        self.embed = TokenEmbedding(config)
        self.encoder = TransformerStack(config, config.layer_attention(), causal=False)
        self.decoder = TransformerStack(config, decoder_specs, causal=True, cross_attention=True)
        self.lm_head = _LMHead(config, self.embed.tokens)
        self.init_weights()

    def named_stacks(self) -> list[tuple[str, TransformerStack]]:
        return [("encoder", self.encoder), ("decoder", self.decoder)]

    def new_cache(self) -> ModelCache:
        """A fresh decoder cache (cross-attention keys/values are projected once, on first use)."""
        return ModelCache(self.decoder.new_caches())

    def encode(self, src_ids: Tensor, *, src_mask: Tensor | None = None) -> Tensor:
        """Encode the source: ``src_ids (B, S)`` -> memory ``(B, S, dim)``."""
        ids = check_ids("src_ids", src_ids, self.config.vocab_size, allow_empty=True)
        mask = check_mask("src_mask", src_mask, ids)
        return self._run(self.embed, self.encoder, ids, mask)

    def decode(
        self,
        tgt_ids: Tensor,
        memory: Tensor,
        *,
        src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
        cache: ModelCache | None = None,
    ) -> Tensor:
        """Decoder logits ``(B, T, V)`` for ``tgt_ids (B, T)`` attending to ``memory (B, S, dim)``."""
        ids = check_ids("tgt_ids", tgt_ids, self.config.vocab_size, allow_empty=True)
        mask = check_mask("tgt_mask", tgt_mask, ids)
        if not isinstance(memory, Tensor) or memory.dim() != 3 or memory.shape[-1] != self.config.dim:
            got = tuple(memory.shape) if isinstance(memory, Tensor) else type(memory).__name__
            raise ValueError(f"memory must have shape (B, S, {self.config.dim}), got {got}")
        context_mask = None
        if src_mask is not None:
            context_mask = check_mask("src_mask", src_mask, memory[..., 0])
        hidden = self._run(self.embed, self.decoder, ids, mask, cache=cache, context=memory, context_mask=context_mask)
        return self.lm_head(hidden)

    def forward(
        self,
        src_ids: Tensor,
        tgt_ids: Tensor,
        *,
        src_mask: Tensor | None = None,
        tgt_mask: Tensor | None = None,
    ) -> Tensor:
        """Teacher-forced logits ``(B, T_tgt, V)`` for ``src_ids (B, S)`` and ``tgt_ids (B, T_tgt)``."""
        memory = self.encode(src_ids, src_mask=src_mask)
        return self.decode(tgt_ids, memory, src_mask=src_mask, tgt_mask=tgt_mask)


__all__ = ["Encoder", "EncoderDecoder", "LanguageModel", "SequenceClassifier", "check_ids", "check_mask"]
