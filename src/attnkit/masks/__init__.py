"""Mask functions and their algebra."""

from attnkit.masks.functions import (
    Mask,
    causal_mask,
    full_mask,
    materialize,
    real_keys_mask,
    sliding_window_mask,
)
from attnkit.masks.patterns import block_table_mask, fixed_mask, longformer_mask, strided_mask

__all__ = [
    "Mask",
    "block_table_mask",
    "causal_mask",
    "fixed_mask",
    "full_mask",
    "longformer_mask",
    "materialize",
    "real_keys_mask",
    "sliding_window_mask",
    "strided_mask",
]
