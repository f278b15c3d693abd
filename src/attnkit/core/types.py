"""Shared type aliases.

Shape legend used across the library: ``B`` batch, ``H`` heads, ``T`` query length,
``S`` key/value length, ``D`` head dimension, ``Dv`` value head dimension.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

#: An additive score bias ``(h, q_pos, kv_pos) -> float tensor`` over broadcastable index
#: tensors. Mechanisms call it with ``q_pos = q_idx + (S - T)`` (queries aligned to the end
#: of the keys) and ``kv_pos = kv_idx``, so only ``q_pos - kv_pos`` carries meaning: relative
#: schemes such as ALiBi and T5 buckets depend on nothing else.
ScoreBias = Callable[[Tensor, Tensor, Tensor], Tensor]

#: A boolean mask function ``(b, h, q_idx, kv_idx) -> bool tensor`` over broadcastable index
#: tensors, True = "may attend" (FlexAttention's ``mask_mod``). :class:`attnkit.masks.Mask`
#: implements it and adds the ``&``, ``|``, ``~`` algebra; the layers below masks name only
#: this signature, so they do not depend on the mask package.
MaskFunction = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
