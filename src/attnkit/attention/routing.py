"""Routing attention ("Efficient Content-Based Sparse Attention with Routing Transformers", Roy,
Saffar, Vaswani & Grangier, TACL 2021, arXiv:2003.05997).

Queries and keys are routed to their nearest centroid (cosine similarity; one set of
``num_clusters`` centroids per head, shared by queries and keys), and every query attends
to the keys of its own cluster: the tokens of a cluster are cut into windows of
``window`` tokens and each query window meets the key window of the same rank and the one
before it (:mod:`attnkit.kernels.bucketed`), so memory is ``O(T · window)``.

Centroids: a buffer (in the state dict), initialised from ``seed`` as random unit vectors.
They move by online k-means (an exponential moving average with ``decay``) computed on a
no-grad path from the training-mode forward passes only: a training forward records the
batch's cluster means; :meth:`RoutingAttention.update_centroids` (or
:func:`update_routing_centroids` over a whole model, called after the optimizer step)
applies them. Gradients never move the centroids, eval passes never record anything, and
a replayed forward (activation checkpointing, reversible layers) routes identically
because the forward itself never changes the centroids.

Causal without leakage: a token's cluster depends only on its own query (or key) and the
fixed centroids; its place inside its cluster's windows depends only on earlier tokens
of the cluster (no top-k over the sequence, which would let later tokens push earlier
ones out); within windows, keys are masked by original positions.

With ``local=True`` (default) every query also sees its local window (its own
``window`` consecutive positions and the previous ones), as the paper mixes local and
routing attention; this is a second round of the bucketed core, and a key met both ways
counts once.

Exact limit: ``num_clusters=1`` with ``window >= T`` is full attention.

Decoding (exact, :class:`~attnkit.kernels.hashing_decode.BucketCache`): a token's cluster depends
on its own vector and the centroids only, and its window on how many earlier tokens share its
cluster (the local round: on its position), so a new token moves no earlier one, and the keys the
last query meets under a recompute of the whole prefix follow from every key's cluster and window
plus per-cluster counts of the queries and keys so far (:mod:`attnkit.kernels.hashing_decode`).
The state holds the keys and values, one integer per key and round, and the counts: it grows
``O(T)``, and a step costs ``O(T)`` integer work plus a softmax over at most ``4 · window`` keys.
It assumes the centroids stay put while decoding (they move only in
:meth:`RoutingAttention.update_centroids`; a state started before an update routes its tokens by
the old centroids, a recompute by the new). Decoding records no centroid statistics, even in
training mode: the k-means step learns from training forward passes only. Cached generation
equals recompute to rounding (one softmax instead of per-round ones merged).

Complexity ``O(T · window · D + T · num_clusters · D)``. Supports causal, key padding and
incremental decoding; no cross-attention.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnkit.attention.families import approximate_capabilities
from attnkit.core.base import AttentionMechanism, repeat_kv_heads
from attnkit.core.errors import check_bool, check_fraction, check_non_negative_int, check_positive_int
from attnkit.core.registry import register
from attnkit.core.types import MaskFunction, ScoreBias
from attnkit.kernels.bucket_layout import bucket_layout
from attnkit.kernels.bucketed import bucketed_attention
from attnkit.kernels.hashing_decode import BucketCache, bucketed_step

#: Tokens per pass of the routing and the centroid statistics: their ``(B, H, tokens, ·)``
#: temporaries stay well under the allocator's 32 MB mmap threshold (each larger one is
#: fresh memory, page-faulted on every call).
_TOKENS_PER_PASS = 2048


@register(
    "routing",
    approximate_capabilities(
        "hashing",
        complexity="O(N^1.5)",
        error_budget=1.0,
        summary="Routing Transformer: online k-means routing, attention within clusters",
    ),
    small_options={"num_clusters": 2, "window": 12, "local": True},
    benchmark_options={"num_clusters": 4, "window": 256, "local": False},
)
class RoutingAttention(AttentionMechanism):
    """Routing (k-means clustered) attention.

    Args:
        num_clusters: centroids per head (``k``).
        window: tokens per attention window; each query sees at most ``2 * window`` keys
            of its cluster (its window and the previous one).
        local: also attend to the local window (the ``window`` consecutive positions
            holding the query and the ``window`` before them), as the paper pairs routing
            with local attention; keys met both ways count once, in one softmax.
        decay: EMA decay of the centroid updates (``μ ← normalize(decay·μ + (1-decay)·mean)``).
        seed: seeds the initial centroids.
    """

    centroids: Tensor
    state_type = BucketCache

    def __init__(
        self,
        *,
        num_clusters: int = 4,
        window: int = 256,
        local: bool = True,
        decay: float = 0.999,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.num_clusters = check_positive_int("num_clusters", num_clusters, example=4)
        self.window = check_positive_int("window", window, example=256)
        self.local = check_bool("local", local)
        self.decay = check_fraction("decay", decay, example=0.999)
        self.seed = check_non_negative_int("seed", seed)
        # (H, num_clusters, D) once the head count and width are known (first call or a loaded state dict).
        self.register_buffer("centroids", torch.empty(0))
        self._pending: tuple[Tensor, Tensor] | None = None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        stored = state_dict.get(prefix + "centroids")
        if isinstance(stored, Tensor) and stored.shape != self.centroids.shape:
            self.centroids = torch.empty_like(stored, device=self.centroids.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _centroids_for(self, heads: int, dim: int, device: torch.device) -> Tensor:
        if self.centroids.numel() == 0:
            gen = torch.Generator().manual_seed(self.seed)
            init = torch.randn(heads, self.num_clusters, dim, generator=gen, dtype=torch.float32)
            self.centroids = nn.functional.normalize(init, dim=-1).to(device)
        if tuple(self.centroids.shape) != (heads, self.num_clusters, dim):
            raise ValueError(
                f"centroids were set up for (heads, clusters, head_dim) = {tuple(self.centroids.shape)}, "
                f"got inputs with {heads} heads of width {dim}"
            )
        return self.centroids

    def assign(self, x: Tensor) -> Tensor:
        """Nearest centroid of every vector: ``x (B, H, T, D)`` -> long ``(B, H, T)`` (no gradient)."""
        with torch.no_grad():
            centroids = self._centroids_for(x.shape[1], x.shape[3], x.device)
            # No need to normalise x: dividing a row of scores by |x| > 0 keeps its argmax
            # (and a zero vector scores 0 everywhere either way).
            ids = [
                torch.einsum("bhtd,hcd->bhtc", part.float(), centroids.float()).argmax(dim=-1)
                for part in x.split(_TOKENS_PER_PASS, dim=2)
            ]
            return torch.cat(ids, dim=2)

    def _record(self, q: Tensor, k: Tensor, q_ids: Tensor, k_ids: Tensor, attention_mask: Tensor | None) -> None:
        """Store this batch's per-cluster sums of unit queries and real unit keys (training only)."""
        with torch.no_grad():
            h, c, d = self.centroids.shape
            sums = torch.zeros(h * c + 1, d, device=q.device)  # + 1: a dummy row for padded keys
            counts = torch.zeros(h * c, device=q.device)
            head_row = torch.arange(h, device=q.device).view(1, h, 1) * c  # row of (head, cluster) in sums
            for x, ids, keys in ((q, q_ids, False), (k, k_ids, True)):
                rows = ids + head_row  # (B, H, T)
                if keys and attention_mask is not None:
                    rows = torch.where(attention_mask[:, None, :], rows, h * c)  # padded keys: a dummy row
                for part, part_rows in zip(x.split(_TOKENS_PER_PASS, dim=2), rows.split(_TOKENS_PER_PASS, dim=2)):
                    unit = nn.functional.normalize(part.float(), dim=-1)
                    sums.index_add_(0, part_rows.reshape(-1), unit.reshape(-1, d))
                counts += torch.bincount(rows.reshape(-1), minlength=h * c + 1)[: h * c].to(counts.dtype)
            # Overwritten, not accumulated: a replayed forward records the same.
            self._pending = (sums[: h * c].view(h, c, d), counts.view(h, c))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Apply the pending k-means step (called by training loops after each optimizer step)."""
        self.update_centroids()

    def update_centroids(self) -> bool:
        """Apply the EMA step recorded by the last training forward; return whether one was applied.

        ``μ_c ← normalize(decay · μ_c + (1 - decay) · mean of the unit vectors routed to c)``
        for every cluster that received a vector; the others stay put. Under
        ``torch.distributed``, the per-cluster sums and counts are summed over all ranks
        first (every rank must call this at the same step), so replicas keep identical
        centroids: the mean is that of the whole global batch.
        """
        if self._pending is None:
            return False
        sums, counts = self._pending
        self._pending = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sums, counts = sums.contiguous(), counts.contiguous()
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(counts)
        means = sums / counts.clamp(min=1.0).unsqueeze(-1)
        moved = nn.functional.normalize(self.decay * self.centroids + (1.0 - self.decay) * means, dim=-1)
        self.centroids.copy_(torch.where(counts.unsqueeze(-1) > 0, moved, self.centroids))
        return True

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
        q_ids, k_ids = self.assign(q), self.assign(k)
        if self.training:
            self._record(q, k, q_ids, k_ids, attention_mask)
        q_rounds, k_rounds = self._rounds(q_ids, k_ids, attention_mask)
        layout = bucket_layout(q_rounds, self.num_clusters + (attention_mask is not None), self.window, k_rounds)
        return bucketed_attention(q, k, v, layout, causal=causal, attention_mask=attention_mask)

    def _rounds(self, q_ids: Tensor, k_ids: Tensor, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per-round bucket ids ``(B, H, rounds, T)`` of the queries and keys from their clusters ``(B, H, T)``."""
        if attention_mask is not None:
            # Padded keys get a cluster of their own past the real ones, so they never move a real key.
            k_ids = torch.where(attention_mask[:, None, :], k_ids, self.num_clusters)
        q_ids, k_ids = q_ids.unsqueeze(2), k_ids.unsqueeze(2)
        if self.local:  # a second round where every token is in one bucket: chunks of consecutive positions
            q_ids = torch.cat([q_ids, torch.zeros_like(q_ids)], dim=2)
            k_ids = torch.cat([k_ids, torch.zeros_like(k_ids)], dim=2)
        return q_ids, k_ids

    def new_state(self) -> BucketCache:
        """An empty decoding state (see the module docstring): keys, values and their clusters and windows."""
        return BucketCache()

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
        # Centroids are per query head: grouped keys are routed once per head they serve.
        q_rounds, k_rounds = self._rounds(self.assign(q), self.assign(repeat_kv_heads(k, q.shape[1])), attention_mask)
        return bucketed_step(
            q,
            k,
            v,
            state,
            q_rounds,
            k_rounds,
            num_buckets=self.num_clusters + 1,  # + 1: the padded keys' cluster, whether or not any is padded
            chunk_size=self.window,
            attention_mask=attention_mask,
        )


def update_routing_centroids(model: nn.Module) -> int:
    """Apply the pending centroid updates of every :class:`RoutingAttention` in ``model``.

    Call it after each optimizer step of a training loop. Returns how many were updated.
    """
    return sum(int(m.update_centroids()) for m in model.modules() if isinstance(m, RoutingAttention))
