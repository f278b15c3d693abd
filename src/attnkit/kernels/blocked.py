"""The blocked CPU core shared by every pattern-based sparse mechanism.

A sparse pattern is *data*, a :class:`GatherPattern`: queries are cut into groups of
``group_size`` consecutive positions (or given explicitly, e.g. Longformer's global
rows), each group lists the key positions it may look at (``kv_index``), and an exact
element mask (:class:`~attnkit.masks.Mask`) removes the listed keys a particular query
must not see (window edges, causality). The core then, one chunk of groups at a time:

1. gathers the listed keys/values of each group: ``(B, H, c, W, D)``;
2. scores ``(B, H, c, group, W)`` with one batched matmul, adds an optional score bias,
   masks, and takes a numerically stable softmax (rows with nothing visible give zeros);
3. mixes the gathered values with a second batched matmul.

Cost is ``O(T·W·D)`` time and ``O(T·W)`` memory: the dense ``T×S`` matrix never exists.
:class:`_GatheredSoftmax` is a custom autograd function: the forward keeps each chunk's
probabilities ``(B, H, c, group, W)`` (when gradients are needed) and the backward reuses
them, gathering keys/values again and scattering their gradients back with ``index_add_``.
Keeping them, rather than keeping only the log-sum-exp and recomputing scores, mask and
exponentials as FlashAttention does (Dao et al. 2022, arXiv:2205.14135), saves one GEMM
and three passes per chunk: 14-22% of a forward+backward step measured (Longformer 16K,
BigBird 4K), for memory that is still linear in ``T``.

Conventions (as everywhere in attnkit): ``True`` = may attend; query ``i`` of ``T`` sits at
absolute position ``i + S - T``; the element mask receives *local* indices like every
:class:`Mask`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnkit.core.types import ScoreBias
from attnkit.kernels.precision import upcast
from attnkit.masks.functions import Mask

#: Target number of scores in one chunk's ``(B, H, c, group, W)`` working set (16 MiB of fp32).
#: Smaller chunks keep the softmax passes in cache (about 1.25x faster single-threaded, measured)
#: but multiply the small multi-threaded ops, which costs far more on a loaded 2-core machine
#: (2x slower at 4K, measured), so chunks stay large.
_CHUNK_SCORES = 1 << 22


@dataclass(frozen=True)
class GatherPattern:
    """Which keys each group of queries gathers, as index tensors.

    Attributes:
        group_size: queries per group.
        kv_index: int64 ``(Bk, Hk, G, W)`` key positions gathered for each of the ``G``
            groups (``Bk`` in {1, B}, ``Hk`` in {1, H}); ``-1`` marks an empty slot. A group
            must not list a key twice.
        element_mask: exact visibility of a listed key for a particular query, in local
            indices ``(b, h, q_idx, kv_idx)``; None when every listed key is visible.
        q_index: int64 ``(Bq, 1, G, group_size)`` query positions of each group (``-1`` = empty
            slot), or None for consecutive groups ``0..T-1`` (the last one padded).
        key_block: when > 1, ``kv_index`` is made of runs of ``key_block`` consecutive positions,
            each starting at a multiple of ``key_block`` (or all ``-1``): keys are then gathered
            and their gradients scattered a whole block at a time, which is much faster.
    """

    group_size: int
    kv_index: Tensor
    element_mask: Mask | None = None
    q_index: Tensor | None = None
    key_block: int = 1

    @property
    def num_groups(self) -> int:
        """Number of query groups ``G``."""
        return self.kv_index.shape[2]


def consecutive_groups(q_len: int, group_size: int) -> int:
    """Number of groups covering ``q_len`` consecutive queries."""
    return -(-q_len // group_size)


def span_pattern(
    q_len: int,
    kv_len: int,
    group_size: int,
    *,
    before: int,
    after: int,
    element_mask: Mask | None,
    device: torch.device | None = None,
) -> GatherPattern:
    """Consecutive query groups that each gather one contiguous span of keys.

    Group ``g`` covers absolute query positions ``p0 .. p0 + group_size - 1`` with
    ``p0 = g·group_size + S - T`` and gathers at least the keys ``p0 - before .. p0 +
    group_size - 1 + after`` (clipped to ``[0, S)``): the shape of every sliding-window pattern.
    When ``S - T`` is a multiple of ``group_size`` the span is widened to whole groups so it is
    gathered block-wise (``element_mask`` must then exclude the extra keys).
    """
    groups = consecutive_groups(q_len, group_size)
    offset = kv_len - q_len
    aligned = offset % group_size == 0 and group_size > 1
    if aligned:
        before, after = -(-before // group_size) * group_size, -(-after // group_size) * group_size
    start = torch.arange(groups, device=device) * group_size + offset - before
    keys = start[:, None] + torch.arange(group_size + before + after, device=device)
    keys = torch.where((keys >= 0) & (keys < kv_len), keys, -1)
    return GatherPattern(group_size, keys[None, None], element_mask, key_block=group_size if aligned else 1)


def dense_rows_pattern(
    q_index: Tensor, kv_len: int, element_mask: Mask | None, *, key_block: int = 64
) -> GatherPattern:
    """One group of chosen queries ``q_index (Bq, G)`` (``-1`` padded) that sees every key: the
    global rows of Longformer and BigBird, ``O(G·S)``. Keys are gathered ``key_block`` at a time."""
    key_block = min(key_block, kv_len)
    every_key = torch.arange(-(-kv_len // key_block) * key_block, device=q_index.device)
    every_key = torch.where(every_key < kv_len, every_key, -1).view(1, 1, 1, -1)
    return GatherPattern(
        q_index.shape[1], every_key, element_mask, q_index=q_index[:, None, None, :], key_block=key_block
    )


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """Rows of ``x (B, H, L, D)`` at ``index (Bk, Hk, c, W)`` (values in ``[0, L)``) -> ``(B, H, c, W, D)``."""
    b, h, length, dim = x.shape
    flat = _flat_index(index, b, h, length)
    return x.reshape(-1, dim).index_select(0, flat).view(b, h, *index.shape[2:], dim)


def _flat_index(index: Tensor, b: int, h: int, length: int) -> Tensor:
    base = (
        torch.arange(b, device=index.device).view(b, 1, 1, 1) * h
        + torch.arange(h, device=index.device).view(1, h, 1, 1)
    ) * length
    return (index + base).reshape(-1)


class _Plan:
    """Per-call index and mask tensors for each chunk of groups (no autograd)."""

    def __init__(
        self,
        pattern: GatherPattern,
        q_len: int,
        kv_len: int,
        batch: int,
        heads: int,
        width: int,
        attention_mask: Tensor | None,
        device: torch.device,
    ) -> None:
        groups = pattern.num_groups
        self.width = width  # keys gathered per group (W)
        per_group = batch * heads * pattern.group_size * width
        self.chunk = max(1, _CHUNK_SCORES // max(1, per_group))
        self.bounds = [(c0, min(groups, c0 + self.chunk)) for c0 in range(0, groups, self.chunk)]
        self.key_block = pattern.key_block
        self.null_row = -(-kv_len // self.key_block)  # index of the all-zero block (or row)
        self.rows: list[Tensor] = []  # what is gathered: key blocks (B·H-relative), (Bk, Hk, c, W / key_block)
        self.kv_index: list[Tensor] = []  # key positions, for masks and biases
        self.blocked: list[Tensor | None] = []  # True = not visible, (Bm, Hm, c, group, W); None: all visible
        kv_all = pattern.kv_index.to(device)
        if pattern.q_index is None:
            q_all = torch.arange(groups * pattern.group_size, device=device).view(1, 1, groups, pattern.group_size)
        else:
            q_all = pattern.q_index.to(device)
        q_valid_all = (q_all >= 0) & (q_all < q_len)
        batch_rows = torch.arange(batch, device=device).view(batch, 1, 1, 1)
        real = None  # key padding with one padded slot at position ``kv_len``
        if attention_mask is not None:
            real = torch.cat([attention_mask, attention_mask.new_zeros(batch, 1)], dim=1)
        for c0, c1 in self.bounds:
            kv = kv_all[:, :, c0:c1]
            valid = (kv >= 0) & (kv < kv_len)
            kv = torch.where(valid, kv, kv_len)  # slot ``kv_len`` is an all-zero row
            allowed = valid[..., None, :]  # (Bk, Hk, c, 1, W)
            if real is not None:
                allowed = allowed & real[batch_rows, kv][..., None, :]
            qi = q_all[:, :, c0:c1]
            allowed = allowed & q_valid_all[:, :, c0:c1, :, None]
            if pattern.element_mask is not None:
                bi = torch.arange(batch, device=device).view(batch, 1, 1, 1, 1)
                hi = torch.arange(heads, device=device).view(1, heads, 1, 1, 1)
                allowed = allowed & pattern.element_mask(
                    bi, hi, qi.clamp(0, q_len - 1)[..., :, None], kv.clamp(max=kv_len - 1)[..., None, :]
                )
            self.kv_index.append(kv)
            self.blocked.append(None if bool(allowed.all()) else ~allowed)
            first = kv.unflatten(-1, (-1, self.key_block))[..., 0] if self.key_block > 1 else kv
            self.rows.append(torch.where(first < kv_len, first // self.key_block, self.null_row))


class _Scratch:
    """Buffers reused by every chunk of one call, handed out as views of the size asked for.

    A fresh multi-megabyte tensor per chunk pays the page faults of its first touch again each
    time: measured at 16K (BigBird), gathering one chunk's keys into a new tensor took 11 ms, into
    a reused one 1 ms, and each new product output cost as much again.
    """

    def __init__(self, like: Tensor) -> None:
        self.like = like
        self.buffers: dict[str, Tensor] = {}

    def __call__(self, name: str, *shape: int) -> Tensor:
        size = math.prod(shape)
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < size:
            buffer = self.buffers[name] = self.like.new_empty(size)
        return buffer[:size].view(shape)


def _bmm(a: Tensor, b: Tensor, out: Tensor) -> Tensor:
    """``a (..., n, k) @ b (..., k, m)`` written to ``out (..., n, m)``, as one 3-D batched product.

    The leading dimensions are folded into one batch (views: callers pass contiguous buffers or
    their transposes). ``torch.matmul`` on these 5-D operands copied a transposed operand first:
    12.3 ms against 5.3 ms for ``(128, 64, 64) @ (128, 64, 512)ᵀ`` (measured, 2 threads).
    """
    torch.bmm(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]), out=out.view(-1, *out.shape[-2:]))
    return out


class _GatheredSoftmax(torch.autograd.Function):
    """Softmax attention of grouped queries over gathered keys; backward recomputes per chunk."""

    @staticmethod
    def forward(
        ctx: Any,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        bias: Tensor | None,
        plan: _Plan,
        scale: float,
    ) -> tuple[Tensor, Tensor]:
        # q: (B, H, G, group, D); k: (B, H, rows + 1, key_block·D), v likewise, the last row zeros;
        # bias: (Bb, H, G, group, W) or None.
        b, h, _, size, dim = q.shape
        d_v = v.shape[-1] // plan.key_block
        out = q.new_empty(b, h, q.shape[2], size, d_v)
        lse = q.new_empty(q.shape[:-1])
        keep = any(ctx.needs_input_grad)
        scratch = _Scratch(q)
        probs: list[Tensor] = []
        for i, (c0, c1) in enumerate(plan.bounds):
            c = c1 - c0
            qc = torch.mul(q[:, :, c0:c1], scale, out=scratch("q", b, h, c, size, dim))
            kc = _gather_keys(k, plan.rows[i], plan.key_block, scratch("kv", b, h, c, plan.width, dim))
            # kept for the backward when gradients are needed: a tensor of its own, else scratch
            scores = q.new_empty(b, h, c, size, plan.width) if keep else scratch("scores", b, h, c, size, plan.width)
            scores = _scores(_bmm(qc, kc.transpose(-1, -2), scores), plan.blocked[i], _chunk(bias, c0, c1))
            weights, norm, lse[:, :, c0:c1] = _softmax(scores)
            # Normalised weights in both modes, so outputs are bitwise equal with and without grad.
            # The backward reuses them (O(T·W), like the softmax output itself) instead of
            # recomputing scores, mask and exponentials: one GEMM and three passes fewer.
            weights = weights.div_(norm)
            if keep:
                probs.append(weights)
            vc = _gather_keys(v, plan.rows[i], plan.key_block, scratch("kv", b, h, c, plan.width, d_v))
            out[:, :, c0:c1] = _bmm(weights, vc, scratch("out", b, h, c, size, d_v))
        ctx.save_for_backward(q, k, v, bias, out)
        ctx.plan, ctx.scale, ctx.probs = plan, scale, probs
        return out, lse

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, grad_lse: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, bias, out = ctx.saved_tensors
        plan: _Plan = ctx.plan
        b, h, _, size, dim = q.shape
        d_v = out.shape[-1]
        dbias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[3] else None
        # dL/ds_ij = p_ij (dp_ij - Σ_j' p_ij' dp_ij' + dlse_i), with Σ_j' p_ij' dp_ij' = rowsum(dO ∘ O)
        delta = torch.linalg.vecdot(grad_out, out).sub_(grad_lse)  # (B, H, G, group)
        dq = torch.empty_like(q)
        dk = torch.zeros_like(k)
        dv = torch.zeros_like(v)
        scratch = _Scratch(q)
        for i, (c0, c1) in enumerate(plan.bounds):
            c, width = c1 - c0, plan.width
            do = scratch("do", b, h, c, size, d_v)
            do.copy_(grad_out[:, :, c0:c1])
            probs = ctx.probs[i]  # masked entries are exactly 0
            _add_rows(dv, plan.rows[i], _bmm(probs.transpose(-1, -2), do, scratch("grad", b, h, c, width, d_v)))
            vc = _gather_keys(v, plan.rows[i], plan.key_block, scratch("kv", b, h, c, width, d_v))
            # into scratch, not in place: the kept probabilities must survive a second backward (retain_graph)
            dscores = _bmm(do, vc.transpose(-1, -2), scratch("scores", b, h, c, size, width))
            dscores.sub_(delta[:, :, c0:c1, :, None]).mul_(probs)
            if dbias is not None:
                dbias[:, :, c0:c1] = dscores.sum(0, keepdim=True) if dbias.shape[0] == 1 else dscores
            kc = _gather_keys(k, plan.rows[i], plan.key_block, scratch("kv", b, h, c, width, dim))
            dq[:, :, c0:c1] = _bmm(dscores, kc, scratch("dq", b, h, c, size, dim)).mul_(ctx.scale)
            qc = torch.mul(q[:, :, c0:c1], ctx.scale, out=scratch("q", b, h, c, size, dim))
            _add_rows(dk, plan.rows[i], _bmm(dscores.transpose(-1, -2), qc, scratch("grad", b, h, c, width, dim)))
        return dq, dk, dv, dbias, None, None


def _add_rows(store: Tensor, rows: Tensor, grad: Tensor) -> None:
    """``store[b, h, rows[.., g, s]] += grad[b, h, g, s-th key block]``; ``grad (B, H, c, W, D)``."""
    b, h, _, width = store.shape
    blocks = grad.reshape(b, h, rows.shape[2], rows.shape[3], width)
    if rows.shape[0] == 1 and rows.shape[1] == 1:
        # one index list shared by the batch and heads: a few large slice additions per slot
        for slot in range(rows.shape[3]):
            store.index_add_(2, rows[0, 0, :, slot], blocks[:, :, :, slot])
    else:
        store.view(-1, width).index_add_(0, _flat_index(rows, b, h, store.shape[2]), blocks.reshape(-1, width))


def _gather_keys(store: Tensor, rows: Tensor, key_block: int, out: Tensor) -> Tensor:
    """Key blocks ``rows (Bk, Hk, c, W / key_block)`` of ``store (B, H, rows, key_block·D)`` into ``out (B, H, c, W, D)``."""
    b, h, length, width = store.shape
    flat = _flat_index(rows, b, h, length)
    torch.index_select(store.reshape(-1, width), 0, flat, out=out.view(-1, width))
    return out


def _chunk(x: Tensor | None, c0: int, c1: int) -> Tensor | None:
    return None if x is None else x[:, :, c0:c1]


def _scores(scores: Tensor, blocked: Tensor | None, bias: Tensor | None) -> Tensor:
    """In place: ``scores (B, H, c, group, W)`` plus the optional bias, blocked keys at ``-inf``."""
    if bias is not None:
        scores = scores.add_(bias)
    return scores if blocked is None else scores.masked_fill_(blocked, float("-inf"))


def _softmax(scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """In place: unnormalised weights ``exp(s - max)`` ``(B, H, c, group, W)``, their row sums
    ``(.., group, 1)`` (1 for empty rows, whose weights are all 0) and the log-sum-exp per row
    ``(.., group)`` (+inf when empty, so the backward's ``exp(s - lse)`` is 0 there)."""
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp_(scores.sub_(row_max))
    norm = weights.sum(dim=-1, keepdim=True)
    empty = norm == 0
    log_norm = torch.where(empty, torch.full_like(norm, float("inf")), row_max + norm.log())
    return weights, torch.where(empty, torch.ones_like(norm), norm), log_norm.squeeze(-1)


def gathered_attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: GatherPattern,
    *,
    attention_mask: Tensor | None = None,
    score_bias: ScoreBias | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact softmax attention over a :class:`GatherPattern`, in ``O(T·W)``, and each row's log-sum-exp.

    The log-sum-exp (``-inf`` for a row that saw nothing) lets :func:`merge_attention` join
    parts computed over different groupings (e.g. a window part and a global-token part).

    Args:
        q: ``(B, H, T, D)`` queries.
        k: ``(B, H, S, D)`` keys.
        v: ``(B, H, S, Dv)`` values.
        pattern: the groups and the keys each gathers.
        attention_mask: bool ``(B, S)``, True = real token.
        score_bias: additive bias ``(h, q_pos, kv_pos)`` evaluated on the gathered positions
            only (queries end-aligned: ``q_pos = i + S - T``); learned biases get gradients.
            It is materialised once, ``(.., H, T, W)`` floats.
        scale: score scale, default ``1/sqrt(D)``.

    Returns:
        ``out (B, H, T, Dv)`` (zeros for a query that sees no key or belongs to no group) and
        ``lse (B, H, T)``. Low-precision inputs are computed and returned in float32.
    """
    b, h, t_len, dim = q.shape
    s_len = k.shape[2]
    q, k, v = upcast(q), upcast(k), upcast(v)
    scale = scale if scale is not None else 1.0 / math.sqrt(dim)
    size = pattern.group_size
    groups = pattern.num_groups
    plan = _Plan(pattern, t_len, s_len, b, h, pattern.kv_index.shape[-1], attention_mask, q.device)
    # keys/values as rows of key_block positions, plus one all-zero row for empty slots
    kb = pattern.key_block
    rows = plan.null_row + 1
    k_store = torch.nn.functional.pad(k, (0, 0, 0, rows * kb - s_len)).view(b, h, rows, kb * dim)
    v_store = torch.nn.functional.pad(v, (0, 0, 0, rows * kb - s_len)).view(b, h, rows, kb * v.shape[-1])
    if pattern.q_index is None:
        q_index = torch.arange(groups * size, device=q.device).view(1, 1, groups, size)
        padded = torch.nn.functional.pad(q, (0, 0, 0, groups * size - t_len))
        grouped = padded.view(b, h, groups, size, dim)
    else:
        q_index = pattern.q_index.to(q.device)
        slots = torch.where(q_index >= 0, q_index, t_len)
        q_ext = torch.cat([q, q.new_zeros(b, h, 1, dim)], dim=2)
        grouped = _gather_rows(q_ext, slots.expand(-1, h, -1, -1)).view(b, h, groups, size, dim)
    bias = None
    if score_bias is not None:
        # Evaluated on the gathered positions only, inside autograd so learned biases (T5) train.
        heads = torch.arange(h, device=q.device).view(1, h, 1, 1, 1)
        q_pos = (q_index.clamp(min=0) + (s_len - t_len))[..., None]
        kv_pos = pattern.kv_index.to(q.device).clamp(min=0)[..., None, :]
        bias = torch.as_tensor(score_bias(heads, q_pos, kv_pos)).to(q.dtype)
        bias = bias.expand(bias.shape[0], h, groups, size, bias.shape[-1])
    out, lse = _GatheredSoftmax.apply(grouped, k_store, v_store, bias, plan, scale)
    out = out.view(b, h, groups * size, v.shape[-1])
    # +inf marks "nothing visible" inside the kernel; outside, such a row carries no mass.
    lse = lse.view(b, h, groups * size)
    lse = torch.where(lse == float("inf"), torch.full_like(lse, float("-inf")), lse)
    if pattern.q_index is None:
        return out[:, :, :t_len], lse[:, :, :t_len]
    dest = torch.where(q_index >= 0, q_index, t_len).reshape(q_index.shape[0], 1, -1)
    full_lse = lse.new_full((b, h, t_len + 1), float("-inf")).scatter(2, dest.expand(b, h, -1), lse)
    dest = dest[..., None].expand(b, h, -1, v.shape[-1])
    full = out.new_zeros(b, h, t_len + 1, v.shape[-1]).scatter(2, dest, out)
    return full[:, :, :t_len], full_lse[:, :, :t_len]


def gathered_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: GatherPattern,
    *,
    attention_mask: Tensor | None = None,
    score_bias: ScoreBias | None = None,
    scale: float | None = None,
) -> Tensor:
    """Exact softmax attention over a :class:`GatherPattern`, in ``O(T·W)``: the output ``(B, H, T, Dv)``
    of :func:`gathered_attention_with_lse` (same arguments) without the log-sum-exp."""
    out, _ = gathered_attention_with_lse(
        q, k, v, pattern, attention_mask=attention_mask, score_bias=score_bias, scale=scale
    )
    return out


def merge_attention(parts: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Combine softmax attention over disjoint key sets into softmax over their union.

    Args:
        parts: ``(out, lse)`` pairs from :func:`gathered_attention_with_lse`, ``out (B, H, T, Dv)``
            and ``lse (B, H, T)`` (``-inf`` where a part saw nothing). The key sets must be disjoint
            per query, or shared keys are counted twice.

    Returns:
        ``(B, H, T, Dv)``: ``Σ_i exp(lse_i - lse) out_i`` with ``lse = logsumexp_i lse_i``; zeros
        for rows that no part saw.
    """
    lse = torch.stack([p[1] for p in parts]).logsumexp(dim=0)
    seen = torch.isfinite(lse)
    safe = torch.where(seen, lse, torch.zeros_like(lse))
    out = torch.zeros_like(parts[0][0])
    for part_out, part_lse in parts:
        weight = torch.where(seen, torch.exp(part_lse - safe), torch.zeros_like(safe))
        out = out + weight[..., None] * part_out
    return out
