"""Linear attention over feature maps: the entry point of the kernel family, and where its parts live.

Kernel attention replaces ``exp(q·k)`` by ``φ(q)·φ(k)`` ("Transformers are RNNs", Katharopoulos
et al. 2020, arXiv:2006.16236)::

    out_t = Σ_{s visible} (φ(q_t)·φ(k_s)) v_s / Σ_{s visible} φ(q_t)·φ(k_s)

:func:`kernel_attention` applies the library's conventions (end-aligned causal order, padded keys
removed exactly, queries with no visible key or an all-zero normaliser output zeros) and hands
the work to one of the cores:

- :mod:`attnkit.kernels.causal_prefix`: causal, as chunked prefix sums (time O(T·C·F + T·F·Dv),
  memory O(T·(F + Dv + C) + (T/C)·F·Dv)), with optional per-key log-scale stabilisers;
- :mod:`attnkit.kernels.bidirectional`: bidirectional, a group of heads at a time (O(N·F·Dv));
- :mod:`attnkit.kernels.recurrent`: decoding, one token at a time from a running state
  (:class:`PrefixState`, :func:`kernel_decode`);
- :mod:`attnkit.kernels.linear_features`: feature maps applied in blocks, and shared helpers;
- :mod:`attnkit.kernels.buffers`: the pool of large CPU work buffers.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from attnkit.kernels.bidirectional import grouped_linear_attention
from attnkit.kernels.causal_prefix import CausalSettings, causal_prefix
from attnkit.kernels.linear_features import NEG, FeatureMap, apply_features, drop_padded
from attnkit.kernels.precision import upcast
from attnkit.kernels.recurrent import PrefixState, kernel_decode
from attnkit.kernels.recurrent import causal_linear_attention as causal_linear_attention
from attnkit.kernels.recurrent import recurrent_step as recurrent_step

__all__ = [
    "NEG",
    "FeatureMap",
    "PrefixState",
    "apply_features",
    "kernel_attention",
    "kernel_decode",
    "upcast",
]


def kernel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    attention_mask: Tensor | None = None,
    key_log_scale: Tensor | None = None,
    feature_map: FeatureMap | None = None,
    normalize: bool = True,
    chunk_size: int = 64,
) -> Tensor:
    """Linear attention over features, with the library's conventions.

    Args:
        q: ``(B, H, T, F)`` query features, or queries when ``feature_map`` is given.
        k: ``(B, H, S, F)`` key features, or keys when ``feature_map`` is given.
        v: ``(B, H, S, Dv)`` values.
        causal: end-aligned causal (query ``i`` sees keys ``j <= i + S - T``).
        attention_mask: bool ``(B, S)``, True = real key; padded keys are removed exactly.
        key_log_scale: ``(B, H, S)`` detached per-key log-scales of ``k`` (see module docstring).
        feature_map: ``φ``, applied here to ``q`` and ``k`` (inside the kernels, a group of
            heads or a block of rows at a time), or None when they are features already.
        normalize: divide by ``Σ φ(q)·φ(k)`` (rows whose normaliser is not positive give zeros).
        chunk_size: chunk length of the causal core.

    Returns:
        ``(B, H, T, Dv)`` in the features' dtype.
    """
    t_len, s_len = q.shape[2], k.shape[2]
    if not causal:
        if key_log_scale is not None:
            if attention_mask is not None:  # padded keys must not set the maximum
                key_log_scale = key_log_scale.masked_fill(~attention_mask[:, None, :], NEG)
            k = k * (key_log_scale - key_log_scale.amax(dim=-1, keepdim=True)).exp()[..., None]
        return grouped_linear_attention(
            q, k, v, attention_mask=attention_mask, feature_map=feature_map, normalize=normalize
        )
    if feature_map is not None and attention_mask is not None:
        # padded keys are zeroed as features: map first (without padding, φ is applied in the core)
        q, k, feature_map = apply_features(q, feature_map), apply_features(k, feature_map), None
    k, v, key_log_scale = drop_padded(k, v, key_log_scale, attention_mask)
    settings = CausalSettings(chunk_size=chunk_size, normalize=normalize, feature_map=feature_map)
    if t_len <= s_len:
        # queries sit at the last T positions: give the first S - T positions empty queries
        q_full = F.pad(q, (0, 0, s_len - t_len, 0)) if t_len < s_len else q
        out = causal_prefix(q_full, k, v, settings=settings, key_log_scale=key_log_scale).out
        # no slice when nothing is cut: its backward would copy the gradient into a fresh zeroed tensor
        return out[:, :, s_len - t_len :] if t_len < s_len else out
    # the first T - S queries see no key at all
    out = causal_prefix(q[:, :, t_len - s_len :], k, v, settings=settings, key_log_scale=key_log_scale).out
    return F.pad(out, (0, 0, t_len - s_len, 0))
