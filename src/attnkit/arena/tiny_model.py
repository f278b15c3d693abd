"""The arena's small quality model: a pre-norm Transformer over any registered mechanism.

Deliberately tiny (two layers of width 64 by default) so that ~16 mechanisms x 3 tasks
train in a few minutes on a laptop CPU. Every layer is an
:class:`attnkit.MultiHeadAttention` with the mechanism under test, with rotary and
learned absolute positions (both work with every mechanism). The head is per token
(MQAR, language modelling) or a masked mean over real tokens (ListOps).

Why not :class:`attnkit.models.Encoder`: the embeddings here add a width-2 causal
convolution ("token shift", the short convolution of H3/Based that Zoology pairs with
attention for associative recall). With it one attention layer can find "the token
after key k", and the exact model learns MQAR within the arena's 120-step budget; the
library's encoder of the same size stays at chance in that budget (measured: 11% vs 84%).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.attention.multi_head import MultiHeadAttention
from attnkit.core.errors import check_positive_int


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, attention: str, options: dict[str, Any], rotary: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, attention, rotary=rotary, **options)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, *, causal: bool, padding: Tensor | None) -> Tensor:
        x = x + self.attn(self.norm1(x), causal=causal, attention_mask=padding)
        return x + self.mlp(self.norm2(x))


class TinyTransformer(nn.Module):
    """Embeddings, ``depth`` attention blocks and a linear head.

    Args:
        vocab_size: input vocabulary.
        num_outputs: output classes per token (or per sequence with ``pooled``).
        dim: width.
        depth: number of blocks.
        heads: attention heads.
        max_len: longest input.
        attention: registered mechanism name.
        options: the mechanism's options.
        causal: causal self-attention (language modelling).
        pooled: one output per sequence (masked mean over real tokens) instead of per token.
        mask_padding: pass the padding mask to the attention; False for mechanisms that
            cannot honour one (they then attend to the pad tokens too; pooling still
            averages over real tokens only).
        rotary: rotary embeddings on queries and keys in every layer (relative positions
            make the look-up heads MQAR needs far quicker to learn than absolute ones).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        num_outputs: int,
        dim: int,
        depth: int,
        heads: int,
        max_len: int,
        attention: str,
        options: dict[str, Any],
        causal: bool,
        pooled: bool,
        mask_padding: bool = True,
        rotary: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int("vocab_size", vocab_size)
        check_positive_int("max_len", max_len)
        self.causal, self.pooled, self.mask_padding = causal, pooled, mask_padding
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_len, dim)
        self.shift = nn.Linear(dim, dim, bias=False)
        self.blocks = nn.ModuleList(_Block(dim, heads, attention, options, rotary) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_outputs)

    def forward(self, tokens: Tensor, padding: Tensor | None = None) -> Tensor:
        """Logits for ``tokens (B, T)`` long; ``padding (B, T)`` bool, True = real token.

        Returns:
            ``(B, T, num_outputs)``, or ``(B, num_outputs)`` when ``pooled``.
        """
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens)  # (B, T, dim)
        # A width-2 causal convolution (token shift, as in H3/Based): each position also sees
        # its predecessor, so one attention layer can match "the token after key k".
        x = x + self.shift(F.pad(x, (0, 0, 1, 0))[:, :-1]) + self.position(positions)
        for block in self.blocks:
            x = block(x, causal=self.causal, padding=padding if self.mask_padding else None)
        x = self.norm(x)
        if not self.pooled:
            return self.head(x)
        if padding is None:
            return self.head(x.mean(dim=1))
        weights = padding.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
        return self.head((x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0))
