"""The kernels' precision rule: half-precision inputs are computed in float32.

Softmax normalisers and linear-attention sums run over thousands of keys, and float16 or
bfloat16 accumulation would lose most of their digits. The blocked gather core, the bucketed
core, the linear-attention kernels, and the mechanisms that compute on the inputs before a
kernel does (Sinkhorn's block sort, top-k selection, BigBird's global rows) therefore compute
half-precision inputs in float32 (:func:`upcast`), and
:class:`~attnkit.core.base.AttentionMechanism` casts the output back to the input dtype.
float32 and float64 inputs are used as they are; PyTorch's SDPA and FlexAttention handle half
precision themselves.
"""

from __future__ import annotations

from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """``x`` in float32 if it is half precision (float16, bfloat16), else ``x`` itself."""
    return x.float() if x.element_size() < 4 else x
