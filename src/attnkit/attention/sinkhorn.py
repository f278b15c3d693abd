"""Sparse Sinkhorn attention ("Sparse Sinkhorn Attention", Tay, Bahri, Yang, Metzler & Juan,
ICML 2020, arXiv:2002.11296).

The sequence is cut into blocks of ``block_size`` tokens. A sort network scores every
(query block ``i``, key block ``j``) pair; Sinkhorn normalisation (``sinkhorn_iters``
alternating row/column normalisations in log space, at ``temperature``) turns the scores
into a soft permutation ``P``; the *sorted block* ``i`` is ``Σ_j P_ij · block_j`` (keys
and values). Every query block attends to its own block plus its sorted block: blocks are
plain reshapes of the sequence, and the ``2 · block_size`` keys of every block go through
one batched softmax (:func:`attnkit.kernels.block_mix.mixed_chunk_attention`: the sort, the
mix and the attention under one autograd, never any ``T × T`` tensor; it writes each
gradient of ``q``, ``k``, ``v`` once, in place). O(T · block_size · D + (T / block_size)² ·
block_size · D) time.

Sort network (parameter-free, so it works at any length): the score of ``(i, j)`` is
``q̄_i · k̄_j / sqrt(D)`` between the mean query of block ``i`` and the mean real key of
block ``j``; the projections before the mechanism are what learns. A block is not its
own sorted block (the diagonal is excluded), so with one block the result is exactly
full attention.

Causal variant: block ``i``'s sort scores use the mean query of block ``i - 1`` (every
query of block ``i`` has already seen it) and only key blocks ``j < i``, so nothing from
the future enters; the normalisation is then a row softmax, because a Sinkhorn column
normalisation would mix later rows into earlier ones (``sinkhorn_iters`` applies to the
bidirectional mode only). Block 0 attends to itself only. The own block is masked by
original positions.

Hard sort (``sort_top1=True``): only the largest entry of each row of ``P`` is kept, so a
query block's sorted block is one key block scaled by its weight, as in sinkhorn-transformer's
default (non-permutative) mode. The mix is then a gather instead of ``(nb × nb) @ (nb × c·D)``
products; the kept weight still carries the sort's gradient. Ties go to the lowest index.

Key padding: padded keys and values are zeroed before blocks are mixed and left out of
the block means; a sorted-block slot holding no real key is masked.

Decoding (causal, exact, :class:`SinkhornState`): blocks are cut from position 0, so appending
tokens never moves a block boundary, and in the causal variant block ``i``'s sorted block
depends only on blocks ``0 .. i-1`` (their key sums and counts, the query sum of block
``i - 1``, their keys and values), all complete before block ``i``'s first token. The state keeps
the keys and values, one query and one key sum per completed block, the current block's queries
(for its sum) and its sorted block, computed once at its first token (``O(T · D)``, a row of the
causal sort over the completed blocks) and attended by every query of the block with the
block's own keys so far. It grows ``O(T)``; a token costs ``O(block_size · D)`` plus that
once-per-block mix. Cached generation equals recompute to rounding (with ``sort_top1`` a near
tie between two blocks' sort weights could round to the other block). The bidirectional
variant's Sinkhorn column normalisation mixes every block into every row, so it has no
incremental form; decoding is causal, as everywhere in the library.
Supports causal, key padding and incremental decoding (causal); no cross-attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from attnkit.attention.families import approximate_capabilities
from attnkit.core.base import AttentionMechanism, KVState, repeat_kv_heads
from attnkit.core.errors import check_bool, check_non_negative_int, check_positive_float, check_positive_int
from attnkit.core.registry import register
from attnkit.core.types import MaskFunction, ScoreBias
from attnkit.kernels.block_mix import mixed_chunk_attention
from attnkit.kernels.chunk_softmax import chunk_attention
from attnkit.kernels.hashing_decode import softmax_over_seen
from attnkit.kernels.precision import upcast


def sinkhorn_normalize(log_scores: Tensor, iters: int) -> Tensor:
    """Sinkhorn-Knopp in log space: ``iters`` row then column normalisations.

    Args:
        log_scores: ``(..., n, n)``; ``-inf`` entries stay exactly 0 in the result. Every
            row and column needs at least one finite entry.
        iters: number of (row, column) rounds; 0 returns the row softmax.

    Returns:
        ``(..., n, n)`` nonnegative; rows sum to 1 (and columns approach 1 as ``iters`` grows).
    """
    if iters == 0:
        return torch.softmax(log_scores, dim=-1)
    out: Tensor = _SinkhornNormalize.apply(log_scores, iters)
    return out


class _SinkhornNormalize(torch.autograd.Function):
    """:func:`sinkhorn_normalize` as scaling vectors, with a hand-written backward.

    After round ``t`` the iterate is ``S - a_t 1ᵀ - 1 b_tᵀ`` (``S`` the log scores), with
    ``a_t = lse_row(S - 1 b_{t-1}ᵀ)`` and ``b_t = lse_col(S - a_t 1ᵀ)``, ``b_0 = 0``; the
    result is ``softmax_row(S - 1 b_Tᵀ)``. Only ``S`` and the ``2T`` vectors are saved (no
    ``T`` iterates of ``(n, n)``), the column reductions run on a contiguous ``Sᵀ``, and the
    backward recomputes each round's weights with one ``exp``.
    """

    @staticmethod
    def forward(ctx: Any, log_scores: Tensor, iters: int) -> Tensor:
        s = log_scores.contiguous()
        s_t = s.transpose(-1, -2).contiguous()  # columns as rows
        col = s.new_zeros(*s.shape[:-2], 1, s.shape[-1])  # b (..., 1, n)
        rows, cols = [], [col]
        for _ in range(iters):
            row = torch.logsumexp(s - col, dim=-1, keepdim=True)  # a (..., n, 1)
            col = torch.logsumexp(s_t - row.transpose(-1, -2), dim=-1, keepdim=True).transpose(-1, -2)
            rows.append(row)
            cols.append(col)
        p = torch.softmax(s - col, dim=-1)
        ctx.save_for_backward(s, p, *rows, *cols)
        ctx.iters = iters
        return p

    @staticmethod
    def backward(ctx: Any, d_p: Tensor) -> tuple[Tensor, None]:
        s, p, *vectors = ctx.saved_tensors
        rows, cols = vectors[: ctx.iters], vectors[ctx.iters :]
        d_s = p * (d_p - (p * d_p).sum(dim=-1, keepdim=True))  # the final row softmax of S - b_T
        d_col = -d_s.sum(dim=-2, keepdim=True)  # (..., 1, n)
        for t in reversed(range(ctx.iters)):
            # b_t = lse_col(S - a_t): column-softmax weights exp(S - a_t - b_t).
            weights = s.sub(rows[t]).sub_(cols[t + 1]).exp_()
            d_s.addcmul_(weights, d_col)
            d_row = -(weights @ d_col.transpose(-1, -2))  # (..., n, 1)
            # a_t = lse_row(S - b_{t-1}): row-softmax weights exp(S - a_t - b_{t-1}).
            weights = s.sub(rows[t]).sub_(cols[t]).exp_()
            d_s.addcmul_(weights, d_row)
            d_col = -(d_row.transpose(-1, -2) @ weights)
        return d_s, None


@dataclass
class SinkhornState(KVState):
    """Causal Sinkhorn's decoding state (see the module docstring); ``n`` blocks completed so far.

    Attributes:
        query_sums: ``(B, H, n, D)`` the sum of every completed block's queries.
        key_sums: ``(B, H, n, D)`` the sum of every completed block's real keys.
        key_counts: ``(B, 1, n)`` real keys per completed block.
        block_queries: ``(B, H, m, D)`` the queries of the current block so far, or None.
        sorted_keys: ``(B, H, block_size, D)`` the current block's sorted block, or None in block 0.
        sorted_values: ``(B, H, block_size, Dv)``.
        sorted_hidden: bool ``(B, H, 1, block_size)``: sorted-block slots that hold no real key.
    """

    query_sums: Tensor | None = None
    key_sums: Tensor | None = None
    key_counts: Tensor | None = None
    block_queries: Tensor | None = None
    sorted_keys: Tensor | None = None
    sorted_values: Tensor | None = None
    sorted_hidden: Tensor | None = None

    @property
    def completed(self) -> int:
        """Blocks completed so far."""
        return 0 if self.query_sums is None else self.query_sums.shape[2]

    @property
    def consumed(self) -> int:
        """Positions whose queries the state has seen (equals :attr:`length` between steps)."""
        return 0 if self.block_queries is None else self.block_queries.shape[2]


def _cat(first: Tensor | None, more: Tensor, dim: int) -> Tensor:
    return more if first is None else torch.cat([first, more], dim=dim)


@register(
    "sinkhorn",
    approximate_capabilities(
        "hashing",
        complexity="O(N·b + (N/b)^2·b)",
        error_budget=0.85,
        summary="Sparse Sinkhorn attention: own block + a Sinkhorn-sorted block",
    ),
    small_options={"block_size": 8},
    benchmark_options={"block_size": 64},
)
class SinkhornAttention(AttentionMechanism):
    """Sparse Sinkhorn attention.

    Args:
        block_size: tokens per block (``b``); each query sees its block and one sorted block.
        sinkhorn_iters: Sinkhorn normalisation rounds (bidirectional mode).
        temperature: divides the sort scores; lower is closer to a hard permutation.
        sort_top1: keep only the largest entry of each row of the sort matrix (after the
            normalisation): each query block's sorted block is one key block, scaled by that
            entry (a gather instead of the dense block mix; see the module docstring).
    """

    state_type = SinkhornState

    def __init__(
        self, *, block_size: int = 64, sinkhorn_iters: int = 8, temperature: float = 0.75, sort_top1: bool = False
    ) -> None:
        super().__init__()
        self.block_size = check_positive_int("block_size", block_size, example=64)
        self.sinkhorn_iters = check_non_negative_int("sinkhorn_iters", sinkhorn_iters)
        self.temperature = check_positive_float("temperature", temperature)
        self.sort_top1 = check_bool("sort_top1", sort_top1)

    def sort_matrix(self, q_blocks: Tensor, k_blocks: Tensor, key_weight: Tensor, *, causal: bool) -> Tensor:
        """The soft block permutation ``P (B, H, nb, nb)``; row ``i`` mixes the key blocks block ``i`` sees.

        Args:
            q_blocks: ``(B, H, nb, c, D)`` queries per block (empty slots zero).
            k_blocks: ``(B, H, nb, c, D)`` keys per block.
            key_weight: ``(B, H, nb, c)`` 1 for real keys, 0 for padded or empty slots.
            causal: use the causal sort (see the module docstring).
        """
        k_sum = (key_weight.unsqueeze(-2) @ k_blocks).squeeze(-2)
        return self.sort_from_sums(q_blocks.sum(dim=-2), k_sum, key_weight.sum(dim=-1), causal=causal)

    def sort_from_sums(self, q_sum: Tensor, k_sum: Tensor, key_count: Tensor, *, causal: bool) -> Tensor:
        """:meth:`sort_matrix` from the block sums ``(B, H, nb, D)`` of the queries and of the real keys.

        ``key_count (B, H, nb)``: real keys per block. The query mean divides by the block
        size (empty slots are zero; the scale is shared by every row).
        """
        nb, d = q_sum.shape[-2:]
        q_mean = q_sum / self.block_size
        k_mean = k_sum / key_count.clamp(min=1.0).unsqueeze(-1)
        i = torch.arange(nb, device=q_sum.device)
        if causal:
            context = torch.cat([torch.zeros_like(q_mean[..., :1, :]), q_mean[..., :-1, :]], dim=-2)
            allowed = i[None, :] < i[:, None]  # key block j strictly before query block i
        else:
            context = q_mean
            allowed = i[None, :] != i[:, None]
        scores = (context @ k_mean.transpose(-1, -2)) / (math.sqrt(d) * self.temperature)
        scores = scores.masked_fill(~allowed, float("-inf"))
        if causal:
            has_block = allowed.any(dim=-1, keepdim=True)
            safe = scores.masked_fill(~has_block, 0.0)
            sort = torch.softmax(safe, dim=-1) * has_block
        else:
            sort = sinkhorn_normalize(scores, self.sinkhorn_iters)
        if not self.sort_top1:
            return sort
        top, column = sort.max(dim=-1, keepdim=True)  # a row of zeros keeps a zero
        return torch.zeros_like(sort).scatter(-1, column, top)

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
        q, k, v = upcast(q), upcast(k), upcast(v)
        b, h, t_len, d = q.shape
        c = self.block_size
        nb = -(-t_len // c)
        pad = nb * c - t_len
        masked = attention_mask is not None or pad > 0

        if pad:  # (B, H, nb·c, E), empty slots zero
            q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        real = torch.ones(b, t_len, dtype=torch.bool, device=q.device)
        if attention_mask is not None:
            real = attention_mask
        real = torch.nn.functional.pad(real, (0, pad)).view(b, 1, nb, c)  # False on padded keys and empty slots
        # Own block: the block's keys, masked by padding and (causal) original position.
        own_blocked: Tensor | None = None
        if masked:
            own_blocked = ~real.unsqueeze(-2)  # (B, 1, nb, 1, c)
        if causal:
            later = torch.ones(c, c, dtype=torch.bool, device=q.device).triu_(1)  # key offset > query offset
            own_blocked = later if own_blocked is None else own_blocked | later
        groups = b * h * nb
        blocked = None if own_blocked is None else own_blocked.expand(b, h, nb, c, c).reshape(groups, c, c)
        if nb == 1:
            out, _ = chunk_attention(
                q.reshape(groups, c, d), k.reshape(groups, c, d), v.reshape(groups, c, -1), blocked, scale=d**-0.5
            )
        else:  # the sorted block, as extra keys every query of the block sees
            weight = real.to(q.dtype)  # (B, 1, nb, c)
            # The mix (B, H, nb, nb) comes from the block sums, inside the attention's autograd.
            sort = partial(self.sort_from_sums, key_count=weight.sum(dim=-1), causal=causal)
            out = mixed_chunk_attention(
                q,
                k,
                v,
                sort,
                blocked,
                blocks=nb,
                scale=d**-0.5,
                key_weight=weight if masked else None,
                hide_empty_slots=masked or causal,  # else every row of P has mass and every slot real keys
                one_per_row=self.sort_top1,
            )
        return out.reshape(b, h, nb * c, -1)[:, :, :t_len]

    # -- decoding ------------------------------------------------------------------------
    def new_state(self) -> SinkhornState:
        """An empty causal decoding state (see the module docstring)."""
        return SinkhornState()

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
        c = self.block_size
        if state.completed * c + state.consumed != state.length:
            raise ValueError(
                f"the state holds {state.length} keys but the queries of {state.completed * c + state.consumed}: "
                "it was filled as a plain key/value cache; start from new_state() and decode every position"
            )
        outs, start = [], 0
        while start < q.shape[2]:  # one piece per block the new tokens reach
            position = state.length
            stop = min(q.shape[2], start + c - position % c)
            if position % c == 0 and position > 0:  # a new block's first token: its sorted block
                self._sort_block(state)
            piece = slice(start, stop)
            state.append(k[:, :, piece], v[:, :, piece], None if attention_mask is None else attention_mask[:, piece])
            state.block_queries = _cat(state.block_queries, upcast(q[:, :, piece]), dim=2)
            outs.append(self._attend_block(upcast(q[:, :, piece]), state))
            if state.length % c == 0:
                self._close_block(state)
            start = stop
        return torch.cat(outs, dim=2)

    def _real(self, state: SinkhornState, start: int, stop: int, like: Tensor) -> Tensor:
        """``(B, 1, stop - start)`` 1 for the real keys at positions ``start .. stop - 1``, 0 for padded ones."""
        if state.key_padding is None:
            return like.new_ones(like.shape[0], 1, stop - start)
        return state.key_padding[:, None, start:stop].to(like.dtype)

    def _cached(self, x: Tensor | None, heads: int, start: int, stop: int) -> Tensor:
        """Cached keys or values ``(B, H_kv, S, E)`` at positions ``start .. stop - 1``, per query head, upcast."""
        assert x is not None
        return upcast(repeat_kv_heads(x[:, :, start:stop], heads))

    def _close_block(self, state: SinkhornState) -> None:
        """Add the block just completed to the sums and forget its queries (the next block's sort needs only sums)."""
        assert state.block_queries is not None
        c, end = self.block_size, state.length
        queries = state.block_queries
        real = self._real(state, end - c, end, queries)
        keys = self._cached(state.keys, queries.shape[1], end - c, end) * real.unsqueeze(-1)
        state.query_sums = _cat(state.query_sums, queries.sum(dim=-2, keepdim=True), dim=2)
        state.key_sums = _cat(state.key_sums, keys.sum(dim=-2, keepdim=True), dim=2)
        state.key_counts = _cat(state.key_counts, real.sum(dim=-1, keepdim=True), dim=2)
        state.block_queries = None

    def _sort_block(self, state: SinkhornState) -> None:
        """The sorted block of block ``i`` (= the blocks completed), mixed from blocks ``0 .. i-1``."""
        assert state.query_sums is not None and state.key_sums is not None and state.key_counts is not None
        c, i = self.block_size, state.completed
        b, h = state.query_sums.shape[:2]
        # Row i of the causal sort over blocks 0..i: block i's own sums enter no row <= i, zeros stand in.
        q_sum, k_sum, counts = (
            torch.cat([x, torch.zeros_like(x[:, :, :1])], dim=2)
            for x in (state.query_sums, state.key_sums, state.key_counts)
        )
        mix = self.sort_from_sums(q_sum, k_sum, counts, causal=True)[:, :, i, :i]  # (B, H, i)
        real = self._real(state, 0, i * c, mix).view(b, 1, i, c)
        keys, values = (self._cached(x, h, 0, i * c).view(b, h, i, c, -1) for x in (state.keys, state.values))
        state.sorted_keys = torch.einsum("bhj,bhjcd->bhcd", mix, keys * real.unsqueeze(-1))
        state.sorted_values = torch.einsum("bhj,bhjcd->bhcd", mix, values * real.unsqueeze(-1))
        mass = torch.einsum("bhj,bhjc->bhc", mix, real.expand(b, h, i, c))
        state.sorted_hidden = (mass <= 0).unsqueeze(2)  # a slot whose mix holds no real key

    def _attend_block(self, q: Tensor, state: SinkhornState) -> Tensor:
        """The last ``m`` queries ``q (B, H, m, D)`` over their block's keys so far and its sorted block."""
        c, end, m = self.block_size, state.length, q.shape[2]
        first = (end - 1) // c * c  # the block's first position
        keys = self._cached(state.keys, q.shape[1], first, end)
        values = self._cached(state.values, q.shape[1], first, end)
        own = torch.arange(first, end, device=q.device)
        seen = own <= torch.arange(end - m, end, device=q.device)[:, None]  # causal within the block: (m, L)
        seen = seen & self._real(state, first, end, q).bool().unsqueeze(-2)  # (B, 1, m, L)
        if first > 0:
            assert state.sorted_keys is not None and state.sorted_values is not None
            assert state.sorted_hidden is not None
            keys = torch.cat([keys, state.sorted_keys], dim=2)
            values = torch.cat([values, state.sorted_values], dim=2)
            seen = torch.cat([seen.expand(*q.shape[:2], m, -1), ~state.sorted_hidden.expand(-1, -1, m, -1)], dim=-1)
        weights = softmax_over_seen((q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5, seen)
        return weights @ values
