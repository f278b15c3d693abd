"""Reformer LSH attention ("Reformer: The Efficient Transformer", Kitaev, Kaiser & Levskaya, 2020,
arXiv:2001.04451).

Every token is hashed ``n_hashes`` times with random rotations (angular LSH:
``argmax([x R; -x R])``, the cross-polytope hash); in each round tokens are sorted by
bucket, the buckets are cut into chunks of ``bucket_size`` tokens, and every chunk
attends to itself and to the previous chunk of the same bucket
(:mod:`attnkit.kernels.bucketed`). A key seen by a query in several rounds counts once
(equivalent to the paper's ``-log(count)`` duplicate correction), so the output is
exactly softmax attention over the union of the keys a query met in any round.

Conventions:
    * Hashing: queries and keys are hashed with the same rotations, each by its own
      direction, so a query meets the keys it is most aligned with. With ``shared_qk``
      (Reformer's shared-QK attention, keys = unit-normalised queries) both share one
      placement. Padded keys go to a bucket of their own, so their content changes nothing.
    * Self-token rule (``shared_qk`` only, where ``q · q̂`` would always win): a query
      attends to its own key only when no other key is visible to it; e.g. the first
      token under ``causal`` attends to itself.
    * Randomness: the rotations come from ``torch.Generator().manual_seed(seed)`` at every
      call, never the global RNG, so train, eval and a reversible layer's replay hash
      identically.
    * Causal without leaks: a token's bucket depends on its own vector only, and its slot
      inside its chunk on the earlier tokens of its bucket only; within chunks, keys are
      masked by original positions.
    * Exact limit: ``bucket_size >= T`` (one bucket, one chunk) is full attention (with the
      self-token rule under ``shared_qk``).

Decoding (exact, :class:`LSHState`): a token's bucket depends on its own vector only, and its
chunk on how many earlier tokens share its bucket, so a new token moves no earlier one, and the
keys the last query meets under a recompute of the whole prefix follow from every key's bucket
and chunk per round plus per-bucket counts of the queries and keys so far
(:mod:`attnkit.kernels.hashing_decode`). The state holds the keys and values, one integer per key
and round, and the counts: it grows ``O(T)``, and a step costs ``O(n_hashes · T)`` integer work
plus a softmax over at most ``2 · bucket_size · n_hashes`` keys. With the default
``num_buckets`` (``T // (4 · bucket_size)``) the bucket count itself grows with the length, and
each new count rehashes every token, as the recompute does: the state then also keeps the
queries, and rehashes (``O(T · D · n_hashes)``) once per ``4 · bucket_size`` tokens. Cached
generation equals recompute to rounding (one softmax instead of per-round ones merged).

Complexity ``O(n_hashes · T · bucket_size · D)`` time, ``O(n_hashes · T · bucket_size)``
memory. Supports causal, key padding and incremental decoding; no cross-attention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnkit.attention.families import approximate_capabilities
from attnkit.core.base import AttentionMechanism, repeat_kv_heads
from attnkit.core.errors import check_bool, check_non_negative_int, check_positive_int
from attnkit.core.registry import register
from attnkit.core.types import MaskFunction, ScoreBias
from attnkit.kernels.bucket_layout import bucket_layout
from attnkit.kernels.bucketed import bucketed_attention
from attnkit.kernels.hashing_decode import BucketCache, bucketed_step


def lsh_buckets(x: Tensor, num_buckets: int, n_hashes: int, seed: int) -> Tensor:
    """Angular LSH bucket ids.

    Args:
        x: ``(B, H, T, D)`` vectors to hash (only their direction matters).
        num_buckets: buckets per round; even counts use the cross-polytope hash
            ``argmax([xR; -xR])``, odd counts ``argmax(xR)``.
        n_hashes: independent rounds.
        seed: seeds the random rotations ``R`` (one ``D × ·`` Gaussian matrix per round,
            shared by all heads).

    Returns:
        long ``(B, H, n_hashes, T)`` in ``[0, num_buckets)``.
    """
    b, h, t_len, d = x.shape
    if num_buckets == 1:
        return torch.zeros(b, h, n_hashes, t_len, dtype=torch.long, device=x.device)
    cols = num_buckets // 2 if num_buckets % 2 == 0 else num_buckets
    gen = torch.Generator().manual_seed(seed)
    rotations = torch.randn(n_hashes, d, cols, generator=gen, dtype=torch.float32).to(x.device)
    with torch.no_grad():
        unit = torch.nn.functional.normalize(x.float(), dim=-1)
        rotated = torch.einsum("bhtd,rdc->bhrtc", unit, rotations)
        if num_buckets % 2 == 0:
            rotated = torch.cat([rotated, -rotated], dim=-1)
        return rotated.argmax(dim=-1)


@dataclass
class LSHState(BucketCache):
    """LSH's decoding state: a :class:`~attnkit.kernels.hashing_decode.BucketCache`, plus the queries
    when the bucket count follows the length (``num_buckets=None``), to rehash them when it changes.

    Attributes:
        queries: ``(B, H, S, D)`` every query so far, or None (fixed ``num_buckets``).
    """

    queries: Tensor | None = None


@register(
    "lsh",
    approximate_capabilities(
        "hashing",
        complexity="O(N log N)",
        error_budget=0.45,
        summary="Reformer LSH attention: multi-round angular hashing, chunked, duplicate-corrected",
    ),
    small_options={"bucket_size": 8, "n_hashes": 8, "num_buckets": 4},
    benchmark_options={"bucket_size": 64, "n_hashes": 4},
)
class LSHAttention(AttentionMechanism):
    """Reformer LSH attention.

    Args:
        bucket_size: tokens per chunk; each query sees at most ``2 * bucket_size`` keys per
            round (its chunk and the previous chunk of its bucket). Reformer's chunk length.
        n_hashes: hash rounds; more rounds, fewer missed keys (lower error, more time).
        num_buckets: buckets per round; default ``max(1, T // (4 * bucket_size))``: buckets
            hold about ``4 * bucket_size`` tokens. Each bucket's last chunk is padded (half a
            chunk on average), so buckets of four chunks waste about an eighth of the work
            where buckets of two wasted a quarter; on structured inputs they were also more
            accurate per round (``4 * bucket_size > T`` gives one bucket).
        shared_qk: Reformer's shared-QK attention: keys are the unit-normalised queries
            (pass the queries as ``k``) and the self-token rule applies.
        seed: seeds the random rotations (same seed, same buckets, in train and eval).
    """

    state_type = LSHState

    def __init__(
        self,
        *,
        bucket_size: int = 64,
        n_hashes: int = 4,
        num_buckets: int | None = None,
        shared_qk: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.bucket_size = check_positive_int("bucket_size", bucket_size, example=64)
        self.n_hashes = check_positive_int("n_hashes", n_hashes, example=4)
        self.num_buckets = None if num_buckets is None else check_positive_int("num_buckets", num_buckets, example=64)
        self.shared_qk = check_bool("shared_qk", shared_qk)
        self.seed = check_non_negative_int("seed", seed)

    def buckets_for(self, length: int) -> int:
        """Buckets per round used at sequence length ``length``."""
        return self.num_buckets if self.num_buckets is not None else max(1, length // (4 * self.bucket_size))

    def _keys(self, q: Tensor, k: Tensor) -> Tensor:
        """The keys attended: ``k``, or under ``shared_qk`` the unit-normalised queries (``k`` must be ``q``)."""
        if not self.shared_qk:
            return k
        if k is not q and (k.shape != q.shape or not torch.equal(k, q)):
            raise ValueError(
                "shared_qk=True computes the keys from the queries: pass the queries as k (got a different k tensor)"
            )
        return torch.nn.functional.normalize(q, dim=-1)

    def _buckets(
        self, q: Tensor, k: Tensor, attention_mask: Tensor | None, num_buckets: int
    ) -> tuple[Tensor, Tensor | None]:
        """Bucket ids ``(B, H, n_hashes, T)`` of the queries and of the keys (None: the queries' own)."""
        q_ids = lsh_buckets(q, num_buckets, self.n_hashes, self.seed)
        k_ids = None
        if not self.shared_qk:
            k_ids = lsh_buckets(k, num_buckets, self.n_hashes, self.seed)
        if attention_mask is not None:
            # Padded keys go to a bucket of their own past the real ones: whatever they
            # contain, they never move a real key (nor attend to anything).
            k_ids = torch.where(attention_mask[:, None, None, :], q_ids if k_ids is None else k_ids, num_buckets)
        return q_ids, k_ids

    def _attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool,
        attention_mask: Tensor | None,
        mask: MaskFunction | None,
        score_bias: ScoreBias | None,
        **call_kwargs: Any,
    ) -> Tensor:
        k = self._keys(q, k)
        num_buckets = self.buckets_for(q.shape[2])
        q_ids, k_ids = self._buckets(q, k, attention_mask, num_buckets)
        layout = bucket_layout(q_ids, num_buckets + (attention_mask is not None), self.bucket_size, k_ids)
        return bucketed_attention(
            q, k, v, layout, causal=causal, attention_mask=attention_mask, exclude_self=self.shared_qk
        )

    def new_state(self) -> LSHState:
        """An empty decoding state (see the module docstring): keys, values and their buckets per round."""
        return LSHState()

    def _decode(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        state: Any,
        *,
        attention_mask: Tensor | None,
        score_bias: ScoreBias | None,
    ) -> Tensor:
        k = self._keys(q, k)
        heads = q.shape[1]
        num_buckets = self.buckets_for(state.length + q.shape[2])
        if self.num_buckets is None:
            state.queries = q if state.queries is None else torch.cat([state.queries, q], dim=2)
            if state.placed and state.num_buckets != num_buckets + 1:
                self._place_again(state, num_buckets)
        q_ids, k_ids = self._buckets(q, repeat_kv_heads(k, heads), attention_mask, num_buckets)
        return bucketed_step(
            q,
            k,
            v,
            state,
            q_ids,
            q_ids if k_ids is None else k_ids,
            num_buckets=num_buckets + 1,  # + 1: the padded keys' bucket, whether or not any is padded
            chunk_size=self.bucket_size,
            attention_mask=attention_mask,
            exclude_self=self.shared_qk,
        )

    def _place_again(self, state: LSHState, num_buckets: int) -> None:
        """Rehash every cached token into ``num_buckets`` buckets (the count follows the length)."""
        assert state.queries is not None and state.keys is not None
        past = state.length
        queries = state.queries[:, :, :past]
        q_ids, k_ids = self._buckets(
            queries, repeat_kv_heads(state.keys, queries.shape[1]), state.key_padding, num_buckets
        )
        state.clear_places()
        state.place(q_ids, q_ids if k_ids is None else k_ids, num_buckets + 1, self.bucket_size)
