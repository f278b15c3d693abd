"""What a mechanism can do, declared as data.

Every registered mechanism carries one :class:`Capabilities` record. The base class
checks each call against it and raises a single ``ValueError`` that lists every
reason a request cannot be honoured, so nothing is silently ignored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

DecodingKind = Literal["kv_cache", "window_cache", "recurrent", "bucket_cache"]
Family = Literal["exact", "sparse", "hashing", "kernel", "low_rank"]


@dataclass(frozen=True)
class Capabilities:
    """Declared abilities of an attention mechanism.

    Attributes:
        exact: True when the output equals softmax attention under the mechanism's
            own mask (``pattern``); False for approximations.
        causal: supports ``causal=True`` exactly (no information from later keys).
        key_padding: honours a padding ``attention_mask`` (bool ``(B, S)``, True = real
            token) exactly: padded keys change nothing.
        cross_attention: accepts keys/values whose length differs from the queries'.
        decoding: incremental decoding state: ``"kv_cache"`` (the base class's growing key/value
            cache), ``"window_cache"`` (a cache that forgets keys outside a window), ``"recurrent"``
            (a fixed-size state), ``"bucket_cache"`` (a growing cache of keys and values with their
            buckets or clusters and per-bucket counts, kept by the mechanism: the hashing family)
            or None (no incremental decoding).
        complexity: time complexity in the sequence length, e.g. ``"O(N^2)"``.
        family: which family of the library the mechanism belongs to.
        score_bias: accepts an additive positional ``score_bias`` (ALiBi, T5).
        custom_mask: accepts an arbitrary boolean ``mask`` function.
        error_budget: for approximate mechanisms, the documented relative Frobenius
            error against exact attention on the contract suite's structured inputs.
        summary: one line for listings.
    """

    exact: bool
    causal: bool
    key_padding: bool
    cross_attention: bool
    decoding: DecodingKind | None
    complexity: str
    family: Family = "exact"
    score_bias: bool = False
    custom_mask: bool = False
    error_budget: float | None = None
    summary: str = ""

    def __post_init__(self) -> None:
        if self.decoding not in (None, "kv_cache", "window_cache", "recurrent", "bucket_cache"):
            raise ValueError(
                "decoding must be 'kv_cache', 'window_cache', 'recurrent', 'bucket_cache' or None, "
                f"got {self.decoding!r}"
            )
        if not self.exact and self.error_budget is None:
            raise ValueError("an approximate mechanism must declare its error_budget")

    def as_dict(self) -> dict[str, Any]:
        """The record as a JSON-ready dict."""
        return asdict(self)
