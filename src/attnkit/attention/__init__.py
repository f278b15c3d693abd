"""Attention mechanisms. Each import below registers one mechanism (or a family)."""

# Registration order is listing order: exact first, then the sparse, hashing and kernel families.
from attnkit.attention import full  # noqa: F401  isort: skip
from attnkit.attention import bigbird, fixed, longformer, sliding_window, strided, topk  # noqa: F401  isort: skip
from attnkit.attention import lsh, routing, sinkhorn  # noqa: F401  isort: skip
from attnkit.attention import linear, linformer, nystrom, performer  # noqa: F401  isort: skip
from attnkit.attention.reference import reference_attention  # isort: skip

__all__ = ["reference_attention"]
