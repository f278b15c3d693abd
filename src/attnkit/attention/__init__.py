"""Attention mechanisms. Each import below registers one mechanism (or a family)."""

from attnkit.attention import full  # noqa: F401
from attnkit.attention import topk  # noqa: F401
from attnkit.attention import bigbird, fixed, longformer, sliding_window, strided  # noqa: F401
from attnkit.attention import lsh, routing, sinkhorn  # noqa: F401
from attnkit.attention import linear, linformer, nystrom, performer  # noqa: F401
from attnkit.attention.reference import reference_attention

__all__ = ["reference_attention"]
