"""Mask functions and their algebra."""

from attnkit.masks.functions import (
    Mask,
    causal_mask,
    full_mask,
    key_padding_mask,
    materialize,
    sliding_window_mask,
)

__all__ = ["Mask", "causal_mask", "full_mask", "key_padding_mask", "materialize", "sliding_window_mask"]
