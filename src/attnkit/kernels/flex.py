"""FlexAttention backend for sparse patterns: ``torch.nn.attention.flex_attention`` with a ``BlockMask``.

FlexAttention ("FlexAttention: A Programming Model for Generating Optimized Attention
Kernels", Dong et al. 2024, arXiv:2412.05496) compiles a fused kernel from a ``mask_mod``
and a ``score_mod``; the ``BlockMask`` lets it skip key blocks the pattern never touches.
Every attnkit :class:`~attnkit.masks.Mask` already has the ``mask_mod`` signature, so a
pattern runs here unchanged. On CPU in torch 2.13 FlexAttention has no backward, so this
backend serves inference on CPU and training/inference on GPU; see
:class:`~attnkit.attention.pattern.PatternAttention` for the automatic choice.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from attnkit.core.types import ScoreBias
from attnkit.masks.functions import Mask

_COMPILED: dict[str, Callable[..., Any]] = {}


def _flex_fn(compiled: bool) -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if "flex" not in _COMPILED:
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["flex"]


def flex_pattern_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Mask,
    *,
    attention_mask: Tensor | None = None,
    score_bias: ScoreBias | None = None,
    scale: float | None = None,
    compiled: bool = True,
    block_size: int = 128,
) -> Tensor:
    """Softmax attention over ``mask`` (and key padding) with FlexAttention.

    Args:
        q: ``(B, H, T, D)`` queries.
        k: ``(B, H, S, D)`` keys.
        v: ``(B, H, S, Dv)`` values.
        mask: the pattern, local indices, queries end-aligned (as returned by ``pattern()``).
        attention_mask: bool ``(B, S)``, True = real token.
        score_bias: additive bias ``(h, q_pos, kv_pos)`` with ``q_pos = i + S - T``.
        scale: score scale, default ``1/sqrt(D)``.
        compiled: run under ``torch.compile`` (the fast path); False runs FlexAttention's
            eager reference, which materialises scores and is meant for tests.
        block_size: the ``BlockMask`` block size.

    Returns:
        ``(B, H, T, Dv)``; rows with no visible key are zeros.
    """
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask

    b, h, t_len, dim = q.shape
    s_len = k.shape[2]
    offset = s_len - t_len
    real = attention_mask  # bool (B, S), True = real key

    def mask_mod(bi: Tensor, hi: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
        seen = mask(bi, hi, qi, ki)
        return seen & real[bi, ki] if real is not None else seen

    score_mod = None
    if score_bias is not None:
        bias = score_bias

        def score_mod(score: Tensor, bi: Tensor, hi: Tensor, qi: Tensor, ki: Tensor) -> Tensor:
            return score + bias(hi, qi + offset, ki).to(score.dtype)

    block_mask = create_block_mask(
        mask_mod, b if real is not None else None, h, t_len, s_len, device=q.device, BLOCK_SIZE=block_size
    )
    scale = scale if scale is not None else 1.0 / math.sqrt(dim)
    # Compiled FlexAttention on CPU cannot return the log-sum-exp; its kernel writes zeros for a
    # row with nothing visible by itself (tests/kernels/test_flex.py checks both paths).
    want_lse = not (compiled and q.device.type == "cpu")
    aux_request = {"return_aux": AuxRequest(lse=True)} if want_lse else {}
    with warnings.catch_warnings():
        # the uncompiled path is chosen on purpose (tests); its "use torch.compile" hint is noise
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        result = _flex_fn(compiled)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, **aux_request)
    if not want_lse:
        return result
    out, aux = result
    # A row that sees nothing has lse = -inf; make its output exactly zero whatever the kernel wrote.
    return torch.where(torch.isfinite(aux.lse)[..., None], out, torch.zeros_like(out))
