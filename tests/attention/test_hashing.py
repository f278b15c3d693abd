"""Tests of the hashing and clustering family (lsh, routing, sinkhorn) and the bucketed core.

Independent references: brute-force Python loops rebuild which keys every query meets
(from the bucket ids alone) and the float64 oracle attends over that mask.
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnkit
from attnkit.attention.lsh import LSHAttention, lsh_buckets
from attnkit.attention.reference import reference_attention
from attnkit.attention.routing import RoutingAttention, update_routing_centroids
from attnkit.attention.sinkhorn import SinkhornAttention, sinkhorn_normalize
from attnkit.kernels import block_mix, chunk_softmax
from attnkit.kernels.bucket_layout import bucket_layout
from attnkit.kernels.chunk_softmax import chunk_attention
from tests.helpers import build, random_padding, relative_error, structured_qkv

NAMES = ["lsh", "routing", "sinkhorn"]


def brute_force_windows(q_ids: torch.Tensor, k_ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Which keys each query meets in one round, by the definition: same bucket, and the key's
    rank among its bucket's keys falls in the query's chunk or the one before (ranks count
    earlier tokens of the same bucket). ``q_ids``, ``k_ids``: ``(T,)``. Returns bool ``(T, T)``."""
    t_len = q_ids.shape[0]
    seen = torch.zeros(t_len, t_len, dtype=torch.bool)
    for i in range(t_len):
        q_rank = int((q_ids[:i] == q_ids[i]).sum())
        for j in range(t_len):
            if k_ids[j] != q_ids[i]:
                continue
            k_rank = int((k_ids[:j] == k_ids[j]).sum())
            seen[i, j] = k_rank // chunk in (q_rank // chunk, q_rank // chunk - 1)
    return seen


def lsh_union_mask(module: LSHAttention, q: torch.Tensor, k: torch.Tensor, kpm: torch.Tensor | None) -> torch.Tensor:
    """Bool ``(B, H, T, T)``: the keys a query meets in any hash round (padded keys are in no bucket)."""
    b, h, t_len, _ = q.shape
    nb = module.buckets_for(t_len)
    q_ids = lsh_buckets(q, nb, module.n_hashes, module.seed)
    k_ids = lsh_buckets(k, nb, module.n_hashes, module.seed)
    if kpm is not None:
        k_ids = k_ids.masked_fill(~kpm[:, None, None, :], -1)
    union = torch.zeros(b, h, t_len, t_len, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for r in range(module.n_hashes):
                union[bi, hi] |= brute_force_windows(q_ids[bi, hi, r], k_ids[bi, hi, r], module.bucket_size)
    return union


# -- the bucketed core --------------------------------------------------------------------


def test_layout_places_every_token_once_in_bucket_order() -> None:
    g = torch.Generator().manual_seed(0)
    q_ids = torch.randint(0, 4, (2, 3, 1, 29), generator=g)
    k_ids = torch.randint(0, 4, (2, 3, 1, 29), generator=g)
    layout = bucket_layout(q_ids, 4, 5, k_ids)
    for place, ids in ((layout.queries, q_ids), (layout.keys, k_ids)):
        slots = place.slot_of_token.reshape(-1, 29)
        assert all(len(set(row.tolist())) == 29 for row in slots)  # a permutation into the slots
        tok = place.token_of_slot.reshape(6, -1)
        filled = place.slot_filled.reshape(6, -1)
        flat_ids = ids.reshape(6, 29)
        for n in range(6):
            order = tok[n][filled[n]].tolist()
            expected = sorted(range(29), key=lambda t, n=n: (int(flat_ids[n, t]), t))
            assert order == expected
            assert filled[n].sum() == 29
    # Queries and keys of a bucket start at the same chunk.
    c = layout.chunk_size
    for n in range(6):
        qf, kf = q_ids.reshape(6, 29)[n], k_ids.reshape(6, 29)[n]
        q_slot, k_slot = layout.queries.slot_of_token.reshape(6, 29)[n], layout.keys.slot_of_token.reshape(6, 29)[n]
        for bucket in range(4):
            starts = [int(q_slot[qf == bucket].min()) // c] if (qf == bucket).any() else []
            starts += [int(k_slot[kf == bucket].min()) // c] if (kf == bucket).any() else []
            assert len(set(starts)) <= 1


# -- lsh -------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_lsh_equals_softmax_over_the_union_of_rounds(causal: bool, padded: bool) -> None:
    """The duplicate correction makes multi-round LSH exactly softmax over the keys seen in any round."""
    q, k, v = structured_qkv(2, 2, 23, 23, 8, seed=21, dtype=torch.float64, requires_grad=True)
    kpm = random_padding(2, 23, seed=2, min_real=10) if padded else None
    module = LSHAttention(bucket_size=3, n_hashes=3, seed=5)
    out = module(q, k, v, causal=causal, attention_mask=kpm)
    union = lsh_union_mask(module, q.detach(), k.detach(), kpm)
    ref = reference_attention(q, k, v, causal=causal, attention_mask=kpm, mask=union)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    # Every gradient too.
    w = torch.randn_like(ref)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=0)


def self_rule_mask(allowed: torch.Tensor) -> torch.Tensor:
    """A token sees itself only when nothing else is visible to it (and its own key is real)."""
    eye = torch.eye(allowed.shape[-1], dtype=torch.bool)
    others = allowed & ~eye
    alone = ~others.any(dim=-1, keepdim=True)
    return others | (allowed & eye & alone)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_lsh_one_bucket_shared_qk_is_full_attention_with_the_self_rule(causal: bool, padded: bool) -> None:
    q, _, v = structured_qkv(2, 2, 19, 19, 8, seed=22)
    kpm = random_padding(2, 19, seed=3, min_real=6) if padded else None
    module = attnkit.build_attention("lsh", bucket_size=32, n_hashes=2, shared_qk=True)
    out = module(q, q, v, causal=causal, attention_mask=kpm)
    allowed = torch.ones(2, 2, 19, 19, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(19, 19, dtype=torch.bool).tril()
    if kpm is not None:
        allowed &= kpm[:, None, None, :]
    keys = torch.nn.functional.normalize(q, dim=-1)
    ref = reference_attention(q, keys, v, mask=self_rule_mask(allowed))
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    if causal:  # the first token has nothing but itself
        torch.testing.assert_close(out[:, :, 0], v[:, :, 0], atol=1e-6, rtol=0)


def test_lsh_shared_qk_needs_the_queries_as_keys() -> None:
    q, k, v = structured_qkv(1, 2, 10, 10, 8)
    with pytest.raises(ValueError, match="shared_qk"):
        attnkit.build_attention("lsh", shared_qk=True)(q, k, v)


def test_lsh_more_hash_rounds_lower_error() -> None:
    q, k, v = structured_qkv(1, 4, 96, 96, 16, seed=23)
    ref = reference_attention(q, k, v)
    errors = [relative_error(LSHAttention(bucket_size=8, n_hashes=n, seed=1)(q, k, v), ref) for n in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert relative_error(LSHAttention(bucket_size=96, n_hashes=1)(q, k, v), ref) < 1e-6


# -- routing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_routing_one_cluster_is_full_attention(causal: bool, padded: bool) -> None:
    q, k, v = structured_qkv(2, 2, 21, 21, 8, seed=24)
    kpm = random_padding(2, 21, seed=4, min_real=5) if padded else None
    out = attnkit.build_attention("routing", num_clusters=1, window=21)(q, k, v, causal=causal, attention_mask=kpm)
    ref = reference_attention(q, k, v, causal=causal, attention_mask=kpm)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_routing_attends_within_clusters(causal: bool) -> None:
    q, k, v = structured_qkv(1, 2, 26, 26, 8, seed=25, dtype=torch.float64)
    module = RoutingAttention(num_clusters=3, window=4, local=False, seed=2).double()
    out = module(q, k, v, causal=causal)
    q_ids, k_ids = module.assign(q), module.assign(k)
    seen = torch.stack([brute_force_windows(q_ids[0, h], k_ids[0, h], 4) for h in range(2)])[None]
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=causal, mask=seen), atol=1e-10, rtol=0)


def test_routing_centroids_move_only_by_explicit_ema_updates_from_training() -> None:
    q, k, v = structured_qkv(2, 2, 17, 17, 8, seed=26, requires_grad=True)
    kpm = random_padding(2, 17, seed=6, min_real=8)
    module = RoutingAttention(num_clusters=3, window=4, decay=0.9, seed=3)
    module.eval()
    module(q, k, v, attention_mask=kpm)
    start = module.centroids.clone()
    assert "centroids" in module.state_dict()
    assert not module.update_centroids()  # eval recorded nothing
    module.train()
    out = module(q, k, v, attention_mask=kpm)
    out.square().sum().backward()
    assert torch.equal(module.centroids, start)  # neither the forward nor the gradients moved them
    assert not module.centroids.requires_grad
    # The EMA step by hand: unit queries (all) and unit real keys, per head and nearest centroid.
    expected = start.clone()
    for h in range(2):
        for c in range(3):
            vecs = []
            for bi in range(2):
                for t in range(17):
                    qt, kt = q[bi, h, t].detach(), k[bi, h, t].detach()
                    if int((start[h] @ (qt / qt.norm())).argmax()) == c:
                        vecs.append(qt / qt.norm())
                    if kpm[bi, t] and int((start[h] @ (kt / kt.norm())).argmax()) == c:
                        vecs.append(kt / kt.norm())
            if vecs:
                moved = 0.9 * start[h, c] + 0.1 * torch.stack(vecs).mean(0)
                expected[h, c] = moved / moved.norm()
    assert update_routing_centroids(module) == 1
    torch.testing.assert_close(module.centroids, expected, atol=1e-6, rtol=0)
    assert not module.update_centroids()  # applied once


def test_routing_state_dict_carries_centroids() -> None:
    q, k, v = structured_qkv(1, 2, 15, 15, 8, seed=27)
    a = RoutingAttention(num_clusters=3, window=4, seed=1)
    a(q, k, v)
    b = RoutingAttention(num_clusters=3, window=4, seed=2)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.centroids, b.centroids)
    assert torch.equal(a(q, k, v), b(q, k, v))
    with pytest.raises(ValueError, match="centroids were set up"):
        a(*structured_qkv(1, 3, 15, 15, 8))


# -- sinkhorn ---------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_sinkhorn_one_block_is_full_attention(causal: bool, padded: bool) -> None:
    q, k, v = structured_qkv(2, 2, 21, 21, 8, seed=28)
    kpm = random_padding(2, 21, seed=8, min_real=5) if padded else None
    out = attnkit.build_attention("sinkhorn", block_size=32)(q, k, v, causal=causal, attention_mask=kpm)
    ref = reference_attention(q, k, v, causal=causal, attention_mask=kpm)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)


def test_sinkhorn_normalisation_is_doubly_stochastic() -> None:
    scores = torch.randn(3, 6, 6, dtype=torch.float64)
    scores = scores.masked_fill(torch.eye(6, dtype=torch.bool), float("-inf"))
    p = sinkhorn_normalize(scores, 200)
    torch.testing.assert_close(p.sum(-1), torch.ones(3, 6, dtype=torch.float64))
    torch.testing.assert_close(p.sum(-2), torch.ones(3, 6, dtype=torch.float64), atol=1e-8, rtol=0)
    assert torch.all(p.diagonal(dim1=-2, dim2=-1) == 0)


@pytest.mark.parametrize("sort_top1", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_sinkhorn_matches_a_brute_force_loop(causal: bool, sort_top1: bool) -> None:
    """Each query: softmax over its own block's visible keys and the P-mixed sorted block."""
    t_len, c, d = 14, 4, 6
    q, k, v = structured_qkv(1, 1, t_len, t_len, d, seed=29, dtype=torch.float64)
    kpm = torch.ones(1, t_len, dtype=torch.bool)
    kpm[0, [2, 9, 13]] = False
    module = SinkhornAttention(block_size=c, sinkhorn_iters=5, sort_top1=sort_top1).double()
    out = module(q, k, v, causal=causal, attention_mask=kpm)
    nb = 4
    qb, kb, vb = (torch.nn.functional.pad(x[0, 0], (0, 0, 0, nb * c - t_len)).view(nb, c, d) for x in (q, k, v))
    real = torch.nn.functional.pad(kpm[0].double(), (0, nb * c - t_len)).view(nb, c)
    perm = module.sort_matrix(qb[None, None], (kb * real[..., None])[None, None], real[None, None], causal=causal)[0, 0]
    for i in range(t_len):
        blk = i // c
        keys, vals = [], []
        for j in range(blk * c, min(blk * c + c, t_len)):
            if kpm[0, j] and (not causal or j <= i):
                keys.append(k[0, 0, j])
                vals.append(v[0, 0, j])
        for s in range(c):
            if float((perm[blk] * real[:, s]).sum()) > 0:
                keys.append((perm[blk, :, None] * kb[:, s] * real[:, s, None]).sum(0))
                vals.append((perm[blk, :, None] * vb[:, s] * real[:, s, None]).sum(0))
        w = torch.softmax(torch.stack(keys) @ q[0, 0, i] / d**0.5, dim=0)
        torch.testing.assert_close(out[0, 0, i], w @ torch.stack(vals), atol=1e-10, rtol=0)


def test_mixed_chunk_attention_rejects_a_soft_mix_as_one_per_row() -> None:
    q = torch.randn(1, 1, 12, 4, requires_grad=True)
    with pytest.raises(ValueError, match="one nonzero entry per row"):
        block_mix.mixed_chunk_attention(q, q, q, _toy_sort, None, blocks=3, scale=0.5, one_per_row=True)


@pytest.mark.parametrize("causal", [False, True])
def test_sinkhorn_top1_keeps_each_rows_largest_soft_weight(causal: bool) -> None:
    """The hard sort matrix is the soft one with every entry but the row maximum set to 0."""
    q, k, _ = structured_qkv(2, 3, 40, 40, 8, seed=36, dtype=torch.float64)
    qb, kb = (x.reshape(2, 3, 5, 8, 8) for x in (q, k))
    ones = torch.ones(1, 1, 5, 8, dtype=torch.float64)
    soft = SinkhornAttention(block_size=8, sinkhorn_iters=4).double().sort_matrix(qb, kb, ones, causal=causal)
    hard = SinkhornAttention(block_size=8, sinkhorn_iters=4, sort_top1=True).sort_matrix(qb, kb, ones, causal=causal)
    for row_soft, row_hard in zip(soft.reshape(-1, 5), hard.reshape(-1, 5)):
        j = int(row_soft.argmax())
        want = torch.zeros(5, dtype=torch.float64)
        if row_soft[j] > 0:
            want[j] = row_soft[j]
        assert torch.equal(row_hard, want)


def _log_space_sinkhorn(scores: torch.Tensor, iters: int) -> torch.Tensor:
    """The definition, iterate by iterate (autograd differentiates it)."""
    x = scores
    for _ in range(iters):
        x = x - torch.logsumexp(x, dim=-1, keepdim=True)
        x = x - torch.logsumexp(x, dim=-2, keepdim=True)
    return torch.softmax(x, dim=-1)


@pytest.mark.parametrize("iters", [1, 3, 8])
def test_sinkhorn_normalize_and_its_gradient_match_the_iterates(iters: int) -> None:
    gen = torch.Generator().manual_seed(33)
    scores = 3 * torch.randn(2, 7, 7, generator=gen, dtype=torch.float64)
    scores = scores.masked_fill(torch.eye(7, dtype=torch.bool), float("-inf")).requires_grad_()
    out, ref = sinkhorn_normalize(scores, iters), _log_space_sinkhorn(scores, iters)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    assert torch.all(out.diagonal(dim1=-2, dim2=-1) == 0)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * w).sum(), scores)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), scores)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda s: sinkhorn_normalize(s, iters), (scores,))


def _toy_sort(q_sum: torch.Tensor, k_sum: torch.Tensor) -> torch.Tensor:
    """A differentiable mix from block sums: a row softmax, block 0's row zero (it sees no block)."""
    scores = 0.3 * q_sum @ k_sum.transpose(-1, -2)
    first = torch.zeros(scores.shape[-2], 1, dtype=scores.dtype)
    first[0] = 1.0
    return torch.softmax(scores, dim=-1) * (1 - first)


def _toy_top1_sort(q_sum: torch.Tensor, k_sum: torch.Tensor) -> torch.Tensor:
    """:func:`_toy_sort` with only each row's largest entry kept (block 0's row stays zero)."""
    mix = _toy_sort(q_sum, k_sum)
    top, column = mix.max(dim=-1, keepdim=True)
    return torch.zeros_like(mix).scatter(-1, column, top)


@pytest.mark.parametrize("one_per_row", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("blocked", [False, True])
def test_mixed_chunk_attention_and_its_gradients_match_a_dense_reference(
    weighted: bool, blocked: bool, one_per_row: bool
) -> None:
    """Output and every gradient (through the mix and the block sums too) equal dense float64 autograd.

    With ``one_per_row`` the mix keeps one entry per row and the core gathers instead of
    multiplying; the reference still applies the mix as a dense product."""
    gen = torch.Generator().manual_seed(34)
    n_b, n_h, nb, c, d, d_v = 2, 2, 4, 3, 5, 4
    q, k = (torch.randn(n_b, n_h, nb * c, d, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(n_b, n_h, nb * c, d_v, generator=gen, dtype=torch.float64)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    weight = (torch.rand(n_b, 1, nb, c, generator=gen) < 0.7).double() if weighted else None
    own = torch.rand(n_b * n_h * nb, c, c, generator=gen) < 0.3 if blocked else None
    sort = _toy_top1_sort if one_per_row else _toy_sort
    out = block_mix.mixed_chunk_attention(
        q, k, v, sort, own, blocks=nb, scale=0.4, key_weight=weight, hide_empty_slots=True, one_per_row=one_per_row
    )
    # The reference: block sums, mix, sorted keys and values, one masked softmax over both.
    w = torch.ones(1, 1, nb, c, dtype=torch.float64) if weight is None else weight
    kb, vb = (x.reshape(n_b, n_h, nb, c, -1) * w[..., None] for x in (k, v))
    mix = sort(q.reshape(n_b, n_h, nb, c, d).sum(-2), kb.sum(-2))
    if one_per_row:  # the reference's own check that the case is what it claims: one block per row
        assert torch.all((mix != 0).sum(-1) <= 1) and torch.all((mix[..., 1:, :] != 0).sum(-1) == 1)
    keys = torch.cat([k.reshape(n_b, n_h, nb, c, d), torch.einsum("bhij,bhjsd->bhisd", mix, kb)], dim=-2)
    values = torch.cat([v.reshape(n_b, n_h, nb, c, d_v), torch.einsum("bhij,bhjsd->bhisd", mix, vb)], dim=-2)
    hidden_extra = (mix @ w <= 0)[..., None, :].expand(n_b, n_h, nb, c, c)
    hidden_own = torch.zeros(n_b, n_h, nb, c, c, dtype=torch.bool) if own is None else own.view(n_b, n_h, nb, c, c)
    hidden = torch.cat([hidden_own, hidden_extra], dim=-1)
    scores = (q.reshape(n_b, n_h, nb, c, d) @ keys.transpose(-1, -2) * 0.4).masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key: zeros
    ref = (probs @ values).reshape(n_b, n_h, nb * c, d_v)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    seed = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad((out * seed).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * seed).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    assert torch.autograd.gradcheck(  # backward run many times over one graph (retain_graph)
        lambda *x: block_mix.mixed_chunk_attention(
            *x, sort, own, blocks=nb, scale=0.4, key_weight=weight, hide_empty_slots=True, one_per_row=one_per_row
        ),
        (q, k, v),
    )


@pytest.mark.parametrize("sort_top1", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("iters", [0, 3])
def test_sinkhorn_gradients_match_dense_autograd(causal: bool, iters: int, sort_top1: bool) -> None:
    """Whole blocks, no padding (the path without masks): every gradient equals plain float64 autograd."""
    t_len, c, d = 16, 4, 6
    q, k, v = structured_qkv(2, 2, t_len, t_len, d, seed=35, dtype=torch.float64, requires_grad=True)
    module = SinkhornAttention(block_size=c, sinkhorn_iters=iters, sort_top1=sort_top1).double()
    out = module(q, k, v, causal=causal)
    nb = t_len // c
    qb, kb, vb = (x.reshape(2, 2, nb, c, d) for x in (q, k, v))
    perm = module.sort_matrix(qb, kb, torch.ones(1, 1, nb, c, dtype=torch.float64), causal=causal)
    keys = torch.cat([kb, torch.einsum("bhij,bhjsd->bhisd", perm, kb)], dim=-2)
    values = torch.cat([vb, torch.einsum("bhij,bhjsd->bhisd", perm, vb)], dim=-2)
    hidden = torch.zeros(nb, c, 2 * c, dtype=torch.bool)
    if causal:
        hidden[:, :, :c] = torch.ones(c, c, dtype=torch.bool).triu(1)
        hidden[0, :, c:] = True  # block 0 has no sorted block
    scores = (qb @ keys.transpose(-1, -2) / d**0.5).masked_fill(hidden, float("-inf"))
    ref = (torch.softmax(scores, dim=-1) @ values).reshape(2, 2, t_len, d)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    with torch.no_grad():  # inference keeps no probabilities: a path of its own
        torch.testing.assert_close(module(q, k, v, causal=causal), ref, atol=1e-12, rtol=0)
    seed = torch.randn_like(ref)
    grads = torch.autograd.grad((out * seed).sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad((ref * seed).sum(), (q, k, v))):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


# -- the whole family ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_output_in_train_eval_and_replay(name: str) -> None:
    q, k, v = structured_qkv(2, 2, 45, 45, 8, seed=30)
    spec = attnkit.get_spec(name)
    module = attnkit.build_attention(name, **spec.small_options)
    outs = []
    for mode in ("train", "train", "eval", "train"):
        module.train(mode == "train")
        outs.append(module(q, k, v, causal=True))
    twin = attnkit.build_attention(name, **spec.small_options)
    twin.load_state_dict(module.state_dict())
    outs.append(twin.eval()(q, k, v, causal=True))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("cut", [5, 40, 70])
def test_no_leak_with_many_buckets(name: str, cut: int) -> None:
    """Longer than the contract's length, with many buckets whose sizes depend on the future."""
    opts = {"lsh": {"bucket_size": 4, "n_hashes": 3}, "routing": {"num_clusters": 5, "window": 4}}
    module = attnkit.build_attention(name, **opts.get(name, {"block_size": 6}))
    q, k, v = structured_qkv(1, 2, 83, 83, 8, seed=31, requires_grad=True)
    out = module(q, k, v, causal=True)
    future = torch.arange(83) > cut
    with torch.no_grad():
        q2, k2, v2 = (torch.where(future[None, None, :, None], -3.0 * t.flip(2), t) for t in (q, k, v))
    assert torch.equal(module(q2, k2, v2, causal=True)[:, :, : cut + 1], out[:, :, : cut + 1])
    out[:, :, : cut + 1].sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.all(t.grad[:, :, future] == 0)


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [
        ("lsh", "bucket_size", 0),
        ("lsh", "n_hashes", -1),
        ("lsh", "shared_qk", "yes"),
        ("routing", "num_clusters", 0),
        ("routing", "decay", 1.0),
        ("routing", "window", 2.5),
        ("sinkhorn", "block_size", 0),
        ("sinkhorn", "temperature", 0.0),
        ("sinkhorn", "sinkhorn_iters", -1),
        ("sinkhorn", "sort_top1", "yes"),
    ],
)
def test_bad_options_name_the_argument(name: str, option: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"{option} must be"):
        attnkit.build_attention(name, **{option: value})


@pytest.mark.parametrize("name", NAMES)
def test_error_within_budget_on_other_seeds(name: str) -> None:
    spec = attnkit.get_spec(name)
    budget = spec.capabilities.error_budget
    assert budget is not None
    module = attnkit.build_attention(name, **spec.small_options).eval()
    for seed in (40, 41, 42):
        q, k, v = structured_qkv(2, 3, 37, 37, 16, seed=seed)
        for causal in (False, True):
            ref = reference_attention(q, k, v, causal=causal)
            assert relative_error(module(q, k, v, causal=causal), ref) <= budget


@pytest.mark.parametrize("name", NAMES)
def test_reversible_recompute_replays_the_same_buckets(name: str) -> None:
    """Reversible layers rerun the forward in backward: gradients must equal ordinary autograd's."""
    config = attnkit.TransformerConfig(
        vocab_size=23, dim=16, depth=2, heads=2, attention=name, attention_options=attnkit.get_spec(name).small_options
    )
    torch.manual_seed(0)
    model = attnkit.LanguageModel(dataclasses.replace(config, reversible=True)).train()
    ids = torch.randint(0, 23, (2, 29), generator=torch.Generator().manual_seed(1))
    grads = []
    for recompute in (True, False):
        for _, stack in model.named_stacks():
            stack.recompute = recompute
        model.zero_grad()
        model(ids).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key in grads[0]:
        torch.testing.assert_close(grads[0][key], grads[1][key], atol=1e-5, rtol=1e-4, msg=key)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("causal", [False, True])
def test_memory_never_holds_a_t_by_s_matrix(name: str, causal: bool) -> None:
    """Forward and backward at T=1024 (one head): no tensor comes near T² elements."""
    t_len = 1024
    opts = {"lsh": {"bucket_size": 16, "n_hashes": 2}, "routing": {"num_clusters": 8, "window": 16}}
    module = attnkit.build_attention(name, **opts.get(name, {"block_size": 16}))
    q, k, v = structured_qkv(1, 1, t_len, t_len, 8, seed=32, requires_grad=True)
    kpm = torch.ones(1, t_len, dtype=torch.bool)
    kpm[0, -100:] = False
    with _LargestTensor() as probe:
        module(q, k, v, causal=causal, attention_mask=kpm).sum().backward()
    # Scores are (rounds x slots x 2*chunk): ~2 * 1.6T * 32 here; T^2 would be 16x more.
    assert probe.largest < t_len * t_len / 4, probe.largest


@pytest.mark.parametrize("blocked", [False, True])
def test_chunk_attention_with_extra_keys_is_softmax_over_both(blocked: bool) -> None:
    """Output, log-sum-exp and every gradient equal a dense float64 softmax over the concatenated keys."""
    gen = torch.Generator().manual_seed(31)
    g, c, e, d = 5, 3, 4, 6
    q, k, v = (torch.randn(g, n, d, generator=gen, dtype=torch.float64, requires_grad=True) for n in (c, c, c))
    k2, v2 = (torch.randn(g, e, d, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    own = torch.rand(g, c, c, generator=gen) < 0.4 if blocked else None
    extra = torch.rand(g, 1, e, generator=gen) < 0.4 if blocked else None
    if blocked:
        assert own is not None and extra is not None
        own[0], extra[0] = True, True  # group 0: rows with no visible key output zeros
    out, lse = chunk_attention(q, k, v, own, scale=0.3, extra=(k2, v2, extra))
    hidden = torch.zeros(g, c, c + e, dtype=torch.bool)
    if own is not None and extra is not None:
        hidden = torch.cat([own, extra.expand(g, c, e)], dim=-1)
    scores = (q @ torch.cat([k, k2], 1).transpose(1, 2) * 0.3).masked_fill(hidden, float("-inf"))
    ref_lse = torch.logsumexp(scores, dim=-1)
    probs = torch.where(hidden, 0.0, torch.exp(scores - ref_lse.masked_fill(hidden.all(-1), 0.0)[..., None]))
    ref = probs @ torch.cat([v, v2], 1)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=0)
    w, w_lse = torch.randn_like(ref), torch.randn_like(ref_lse).masked_fill(hidden.all(-1), 0.0)
    inputs = (q, k, v, k2, v2)
    grads = torch.autograd.grad((out * w).sum() + (lse.nan_to_num(neginf=0.0) * w_lse).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * w).sum() + (ref_lse.nan_to_num(neginf=0.0) * w_lse).sum(), inputs)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    assert torch.autograd.gradcheck(
        lambda *x: chunk_attention(x[0], x[1], x[2], own, scale=0.3, extra=(x[3], x[4], extra))[0], inputs
    )


@pytest.mark.parametrize("causal", [False, True])
def test_core_block_loops_match_the_references(monkeypatch: pytest.MonkeyPatch, causal: bool) -> None:
    """One group per block in the core's loops, one sequence per segment of the mixed backward
    (the benchmark sizes run many): same references."""
    monkeypatch.setattr(chunk_softmax, "BLOCK_SCORES", 1)
    monkeypatch.setattr(block_mix, "MIX_SEGMENT_FLOATS", 1)
    test_lsh_equals_softmax_over_the_union_of_rounds(causal, padded=True)
    test_routing_attends_within_clusters(causal)
    test_sinkhorn_matches_a_brute_force_loop(causal, sort_top1=False)
    test_sinkhorn_matches_a_brute_force_loop(causal, sort_top1=True)
    test_sinkhorn_gradients_match_dense_autograd(causal, iters=3, sort_top1=False)
    test_sinkhorn_gradients_match_dense_autograd(causal, iters=0, sort_top1=True)
    test_mixed_chunk_attention_and_its_gradients_match_a_dense_reference(
        weighted=causal, blocked=True, one_per_row=False
    )
    test_mixed_chunk_attention_and_its_gradients_match_a_dense_reference(weighted=True, blocked=True, one_per_row=True)
    test_chunk_attention_with_extra_keys_is_softmax_over_both(blocked=True)


def _routing_update_on_rank(rank: int, store: str, q: torch.Tensor, k: torch.Tensor, out_dir: str) -> None:
    """One replica: a training forward on its share of the batch, then the EMA step."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        module = RoutingAttention(num_clusters=3, window=4, decay=0.5, seed=3)
        module(q[rank : rank + 1], k[rank : rank + 1], k[rank : rank + 1])
        assert module.update_centroids()
        torch.save(module.centroids, f"{out_dir}/centroids{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_routing_centroid_update_is_global_under_torch_distributed(tmp_path: pathlib.Path) -> None:
    """Two gloo replicas, one sequence each: both end with the centroids of one process fed both sequences."""
    import torch.multiprocessing as mp

    q, k, _ = structured_qkv(2, 2, 19, 19, 8, seed=28)
    args = (str(tmp_path / "store"), q, k, str(tmp_path))
    mp.spawn(_routing_update_on_rank, args=args, nprocs=2, join=True)
    single = RoutingAttention(num_clusters=3, window=4, decay=0.5, seed=3)
    single(q, k, k)
    single.update_centroids()
    replicas = [torch.load(tmp_path / f"centroids{rank}.pt") for rank in range(2)]
    assert torch.equal(replicas[0], replicas[1])  # identical replicas
    assert not torch.equal(
        replicas[0], RoutingAttention(num_clusters=3, window=4, seed=3)._centroids_for(2, 8, q.device)
    )
    torch.testing.assert_close(replicas[0], single.centroids, atol=1e-6, rtol=0)


def test_routing_runs_after_the_module_is_cast_to_bfloat16() -> None:
    # model.to(torch.bfloat16) casts the centroids too; the nearest-centroid search runs in float32
    # either way (it failed: "expected m1 and m2 to have the same dtype").
    layer = build("routing")
    q, k, v = structured_qkv(1, 2, 24, 24, 8, seed=3)
    expected = layer(q, k, v)
    layer.to(torch.bfloat16)
    out = layer(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.double() - expected.double()).abs().max() < 0.1
