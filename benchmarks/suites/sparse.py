"""Sparse family (issue 3): sliding_window, longformer, bigbird vs SDPA and the open implementations.

Anchors (`.venv-bench` only, never package dependencies), at matched settings:

- `local-attention` `LocalAttention(window_size=256, look_backward=1, look_forward=1 or 0)` (rotary
  off) against attnkit `sliding_window`. The anchor's query sees its 256-block and the neighbouring
  ones: 768 keys on average, at least ±256 around itself (causal: at least 257 keys, self
  included). attnkit rows: `window=256` (the issue's setting: ±128, or 256 keys causal) and the
  *matched* window guaranteeing the anchor's minimum context (`window=513`: ±256; causal
  `window=257`).
- HF transformers 4.57 `LongformerSelfAttention` (attention window 512 = ±256, one global token)
  against attnkit `longformer(window=513, num_global_tokens=1)`. The HF layer runs its q/k/v
  projections (512 → 512) inside; the `+ qkv proj` attnkit row adds the same three `nn.Linear`, so
  the two do the same work. HF has no causal mode.
- HF transformers 4.57 `BigBirdBlockSparseAttention` (block 64, 3 random blocks, first and last
  block global; training mode, where it uses random blocks) against attnkit
  `bigbird(block_size=64, num_random_blocks=3, num_global_blocks=2)`, with and without the
  projections. HF has no causal mode.

Parts: `window`, `longformer`, `bigbird` (1K–16K) and `long` (64K, where SDPA takes minutes:
attnkit and local-attention only). A ratio compares rows of the same part.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import DIM, HEADS, qkv
from benchmarks.suite import Case, Part, Suite, anchor


def local_attention_anchor(length: int, causal: bool, *, window_size: int = 256) -> Callable[[], torch.Tensor]:
    """``local_attention.LocalAttention`` on ``(1, 8, T, 64)``, one block back (and forward)."""
    from local_attention import LocalAttention

    attn = LocalAttention(
        window_size=window_size,
        causal=causal,
        look_backward=1,
        look_forward=0 if causal else 1,
        dim=DIM,
        use_rotary_pos_emb=False,
    )
    q, k, v = qkv(length)
    return lambda: attn(q, k, v)


def hf_longformer(length: int, causal: bool, *, window: int = 512, num_global: int = 1) -> Callable[[], torch.Tensor]:
    """HF ``LongformerSelfAttention`` (with its projections) on ``(1, T, 512)``, leading global tokens."""
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    config = LongformerConfig(
        hidden_size=HEADS * DIM, num_attention_heads=HEADS, attention_window=[window], attention_probs_dropout_prob=0.0
    )
    attn = LongformerSelfAttention(config, layer_id=0)
    x = torch.randn(1, length, HEADS * DIM, requires_grad=True)
    mask = torch.zeros(1, length)
    mask[:, :num_global] = 1.0  # > 0: global, 0: local, < 0: padding
    is_masked, is_global = mask < 0, mask > 0
    return lambda: attn(
        x, attention_mask=mask, is_index_masked=is_masked, is_index_global_attn=is_global, is_global_attn=True
    )[0]


def hf_bigbird(
    length: int, causal: bool, *, block_size: int = 64, num_random_blocks: int = 3
) -> Callable[[], torch.Tensor]:
    """HF ``BigBirdBlockSparseAttention`` (with its projections) on ``(1, T, 512)``, training mode."""
    from transformers import BigBirdConfig
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention, BigBirdModel

    config = BigBirdConfig(
        hidden_size=HEADS * DIM,
        num_attention_heads=HEADS,
        attention_type="block_sparse",
        block_size=block_size,
        num_random_blocks=num_random_blocks,
        max_position_embeddings=length,
        attention_probs_dropout_prob=0.0,
    )
    attn = BigBirdBlockSparseAttention(config, seed=0).train()
    x = torch.randn(1, length, HEADS * DIM, requires_grad=True)
    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(
        torch.ones(1, length), block_size
    )
    return lambda: attn(
        x, band_mask=band, from_mask=from_mask, to_mask=to_mask, from_blocked_mask=blocked, to_blocked_mask=blocked
    )[0]


HERE = "benchmarks.suites.sparse"
OURS = "benchmarks.common:attnkit_mechanism"
PROJECTED = "benchmarks.common:attnkit_projected"
SDPA = Case("sdpa", "benchmarks.common:sdpa", role="sdpa")
LOCAL = "local-attention (256-blocks)"
HF_LONGFORMER = "HF LongformerSelfAttention (w512, 1 global)"
HF_BIGBIRD = "HF BigBird block-sparse 4.57 (b64, r3)"
WINDOW_ROWS = (
    "attnkit sliding_window (w256)",
    "attnkit sliding_window (matched: w513)",
    "attnkit sliding_window (matched: w257)",
)
LONGFORMER: dict[str, Any] = {"name": "longformer", "window": 513, "num_global_tokens": 1}
BIGBIRD: dict[str, Any] = {"name": "bigbird", "block_size": 64, "num_random_blocks": 3, "num_global_blocks": 2}
WITHOUT_PROJECTIONS = "the HF layer runs its q/k/v projections inside: the matched row is '+ qkv proj'"

WINDOW_CASES = (
    Case(WINDOW_ROWS[0], OURS, {"name": "sliding_window", "window": 256}),
    Case(WINDOW_ROWS[1], OURS, {"name": "sliding_window", "window": 513}, bidirectional_only=True),
    Case(WINDOW_ROWS[2], OURS, {"name": "sliding_window", "window": 257}, causal_only=True),
    anchor(LOCAL, f"{HERE}:local_attention_anchor"),
)
LENGTHS = (1024, 4096, 16384)

SUITE = Suite(
    name="sparse",
    title="sliding window, Longformer and BigBird vs SDPA, local-attention and HF (issue 3)",
    description=__doc__ or "",
    parts=(
        Part("window", (SDPA, *WINDOW_CASES), lengths=LENGTHS, repeats=3),
        Part(
            "longformer",
            (
                SDPA,
                Case("attnkit longformer (w513, 1 global)", OURS, LONGFORMER),
                Case("attnkit longformer + qkv proj", PROJECTED, LONGFORMER),
                anchor(HF_LONGFORMER, f"{HERE}:hf_longformer", bidirectional_only=True),
            ),
            lengths=LENGTHS,
            repeats=3,
        ),
        Part(
            "bigbird",
            (
                SDPA,
                Case("attnkit bigbird (b64, r3, g2)", OURS, BIGBIRD),
                Case("attnkit bigbird + qkv proj", PROJECTED, BIGBIRD),
                anchor(HF_BIGBIRD, f"{HERE}:hf_bigbird", bidirectional_only=True),
            ),
            lengths=LENGTHS,
            repeats=3,
        ),
        Part("long", WINDOW_CASES, lengths=(65536,), repeats=3),
    ),
    anchors={
        **{label: (LOCAL,) for label in WINDOW_ROWS},
        "attnkit longformer (w513, 1 global)": (HF_LONGFORMER,),
        "attnkit longformer + qkv proj": (HF_LONGFORMER,),
        "attnkit bigbird (b64, r3, g2)": (HF_BIGBIRD,),
        "attnkit bigbird + qkv proj": (HF_BIGBIRD,),
    },
    unmatched={
        ("attnkit longformer (w513, 1 global)", None): WITHOUT_PROJECTIONS,
        ("attnkit bigbird (b64, r3, g2)", None): WITHOUT_PROJECTIONS,
    },
)
