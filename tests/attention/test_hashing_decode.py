"""Decoding states of the hashing family (lsh, routing, causal sinkhorn): cached generation equals recompute.

References: the mechanism's own forward over each prefix (what generation without a cache
computes: the contract), and brute-force definitions written here, from the bucket ids or the
block means alone, attended by the float64 oracle.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import attnkit
from attnkit.attention.lsh import LSHAttention, lsh_buckets
from attnkit.attention.reference import reference_attention
from attnkit.attention.routing import RoutingAttention
from attnkit.attention.sinkhorn import SinkhornAttention
from attnkit.core.base import KVState, repeat_kv_heads
from attnkit.kernels import hashing_decode
from tests.attention.test_hashing import brute_force_windows, lsh_union_mask, self_rule_mask
from tests.helpers import structured_qkv

B, H, D = 3, 2, 8
LENGTH = 61  # several chunks per bucket and several blocks; not a multiple of any of them
PIECES = [7, 1, 1, 3, 0, 1, 13, 2]  # a prompt, then mixed chunk sizes (an empty one too), then token by token

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "lsh": ("lsh", {"bucket_size": 4, "n_hashes": 3, "num_buckets": 5, "seed": 3}),
    "lsh-shared-qk": ("lsh", {"bucket_size": 3, "n_hashes": 2, "num_buckets": 4, "shared_qk": True}),
    # the bucket count follows the length (T // 8): every prefix from 16 on rehashes into more buckets
    "lsh-growing-buckets": ("lsh", {"bucket_size": 2, "n_hashes": 2}),
    "routing-local": ("routing", {"num_clusters": 3, "window": 4, "local": True, "seed": 1}),
    "routing": ("routing", {"num_clusters": 4, "window": 3, "local": False, "seed": 2}),
    "sinkhorn": ("sinkhorn", {"block_size": 5, "temperature": 0.5}),
    "sinkhorn-top1": ("sinkhorn", {"block_size": 6, "sort_top1": True}),
}


def build(case: str) -> attnkit.AttentionMechanism:
    name, options = CASES[case]
    return attnkit.build_attention(name, **options).double().eval()


def inputs(kv_heads: int = H, seed: int = 50) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 ``q (B, H, T, D)``, ``k``, ``v`` ``(B, kv_heads, T, D)`` and a left-padding mask ``(B, T)``."""
    q, k, v = structured_qkv(B, H, LENGTH, LENGTH, D, seed=seed, dtype=torch.float64)
    k, v = k[:, :kv_heads], v[:, :kv_heads]
    mask = torch.ones(B, LENGTH, dtype=torch.bool)
    mask[1, :4] = False  # left padding, as in batched generation
    mask[2, :9] = False
    return q, k, v, mask


def pieces(length: int = LENGTH) -> list[tuple[int, int]]:
    out, start = [], 0
    for size in PIECES + [1] * length:
        if start >= length:
            break
        out.append((start, min(start + size, length)))
        start = out[-1][1]
    return out


def decode(module: attnkit.AttentionMechanism, q, k, v, mask, state: Any = None) -> torch.Tensor:
    state = module.new_state() if state is None else state
    outs = [
        module.decode(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], state, attention_mask=mask[:, a:b])
        for a, b in pieces(q.shape[2])
    ]
    return torch.cat(outs, dim=2)


def recompute(module: attnkit.AttentionMechanism, q, k, v, mask) -> torch.Tensor:
    """Each piece's rows from a causal forward over the prefix that ends with it (generation without a cache)."""
    k, v = repeat_kv_heads(k, q.shape[1]), repeat_kv_heads(v, q.shape[1])
    rows = [
        module(q[:, :, :b], k[:, :, :b], v[:, :, :b], causal=True, attention_mask=mask[:, :b])[:, :, a:b]
        for a, b in pieces(q.shape[2])
    ]
    return torch.cat(rows, dim=2)


@pytest.mark.parametrize("case", list(CASES))
def test_cached_generation_equals_recompute_at_every_step(case: str) -> None:
    """Batch 3 with two left-padded rows, a prompt, multi-token chunks, then 40 single tokens."""
    module = build(case)
    q, k, v, mask = inputs()
    if CASES[case][1].get("shared_qk"):
        k = q
    torch.testing.assert_close(decode(module, q, k, v, mask), recompute(module, q, k, v, mask), atol=1e-10, rtol=0)


@pytest.mark.parametrize("case", [c for c in CASES if not CASES[c][1].get("shared_qk")])
def test_grouped_key_heads_decode_like_repeated_ones(case: str) -> None:
    """Grouped-query attention: one key/value head for both query heads, kept grouped in the state."""
    module = build(case)
    q, k, v, mask = inputs(kv_heads=1, seed=51)
    torch.testing.assert_close(decode(module, q, k, v, mask), recompute(module, q, k, v, mask), atol=1e-10, rtol=0)


# -- independent references: what the last query sees, from the definitions --------------------


def test_lsh_decoding_equals_softmax_over_the_brute_force_union_of_rounds() -> None:
    module = build("lsh")
    q, k, v, mask = inputs(seed=52)
    union = lsh_union_mask(module, q, k, mask)  # row i depends on tokens <= i only (ranks count earlier ones)
    ref = reference_attention(q, k, v, causal=True, attention_mask=mask, mask=union)
    torch.testing.assert_close(decode(module, q, k, v, mask), ref, atol=1e-10, rtol=0)


def test_lsh_shared_qk_decoding_keeps_the_self_token_rule() -> None:
    module = build("lsh-shared-qk")
    q, _, v, mask = inputs(seed=53)
    assert isinstance(module, LSHAttention)
    ids = lsh_buckets(q, 4, 2, module.seed)
    keys = torch.nn.functional.normalize(q, dim=-1)
    seen = torch.zeros(B, H, LENGTH, LENGTH, dtype=torch.bool)
    for b in range(B):
        key_ids = ids[b].masked_fill(~mask[b], -1)  # padded keys: in no query's bucket
        for h in range(H):
            for r in range(2):
                seen[b, h] |= brute_force_windows(ids[b, h, r], key_ids[h, r], 3)
    seen &= torch.ones(LENGTH, LENGTH, dtype=torch.bool).tril() & mask[:, None, None, :]
    ref = reference_attention(q, keys, v, mask=self_rule_mask(seen))
    torch.testing.assert_close(decode(module, q, q, v, mask), ref, atol=1e-10, rtol=0)


def test_lsh_growing_bucket_count_rehashes_like_the_recompute() -> None:
    """Token by token, row i is hashed into (i + 1) // 8 buckets, as a forward over the first i + 1 tokens hashes it."""
    module = build("lsh-growing-buckets")
    q, k, v, mask = inputs(seed=54)
    got = decode(module, q, k, v, mask)
    assert isinstance(module, LSHAttention)
    assert pieces()[-33] == (28, 29)  # single tokens from row 28 on
    for i in (30, 31, 32, 39, 40, 55, 60):  # around the steps where the count changes (32, 40, 48, 56)
        union = lsh_union_mask(module, q[:, :, : i + 1], k[:, :, : i + 1], mask[:, : i + 1])
        ref = reference_attention(
            q[:, :, i : i + 1],
            k[:, :, : i + 1],
            v[:, :, : i + 1],
            attention_mask=mask[:, : i + 1],
            mask=union[..., i:, :],
        )
        torch.testing.assert_close(got[:, :, i : i + 1], ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("local", [False, True])
def test_routing_decoding_equals_softmax_over_brute_force_clusters(local: bool) -> None:
    module = build("routing-local" if local else "routing")
    assert isinstance(module, RoutingAttention)
    q, k, v, mask = inputs(seed=55)
    got = decode(module, q, k, v, mask)
    q_ids, k_ids = module.assign(q), module.assign(k)
    w = module.window
    seen = torch.zeros(B, H, LENGTH, LENGTH, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            seen[b, h] = brute_force_windows(q_ids[b, h], k_ids[b, h].masked_fill(~mask[b], -1), w)
    if local:  # the window holding the query and the one before it, by position
        blocks = torch.arange(LENGTH) // w
        seen |= (blocks[None, :] <= blocks[:, None]) & (blocks[None, :] >= blocks[:, None] - 1)
    ref = reference_attention(q, k, v, causal=True, attention_mask=mask, mask=seen)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)


def brute_force_causal_sinkhorn(module: SinkhornAttention, q, k, v, mask) -> torch.Tensor:
    """Per query: softmax over its block's earlier real keys and the sorted block of the paper's causal sort.

    Block ``i``'s sort weights: softmax over key blocks ``j < i`` of ``mean q(block i-1) · mean real
    k(block j) / (sqrt(D) · temperature)`` (the query mean over the whole block); with
    ``sort_top1`` only the largest weight is kept. Sorted slot ``s`` is ``Σ_j P_ij k_js`` over real keys.
    """
    c = module.block_size
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                blk = i // c
                keys = [k[b, h, j] for j in range(blk * c, i + 1) if mask[b, j]]
                vals = [v[b, h, j] for j in range(blk * c, i + 1) if mask[b, j]]
                if blk > 0:
                    prev = q[b, h, (blk - 1) * c : blk * c].sum(0) / c
                    means = []
                    for j in range(blk):
                        real = [k[b, h, t] for t in range(j * c, j * c + c) if mask[b, t]]
                        means.append(torch.stack(real).mean(0) if real else torch.zeros(q.shape[-1]).double())
                    p = torch.softmax(torch.stack(means) @ prev / (q.shape[-1] ** 0.5 * module.temperature), dim=0)
                    if module.sort_top1:
                        p = torch.where(torch.arange(blk) == p.argmax(), p, torch.zeros_like(p))
                    for s in range(c):
                        rows = [j for j in range(blk) if mask[b, j * c + s] and p[j] > 0]
                        if rows:
                            keys.append(sum(p[j] * k[b, h, j * c + s] for j in rows))
                            vals.append(sum(p[j] * v[b, h, j * c + s] for j in rows))
                if keys:
                    w = torch.softmax(torch.stack(keys) @ q[b, h, i] / q.shape[-1] ** 0.5, dim=0)
                    out[b, h, i] = w @ torch.stack(vals)
    return out


@pytest.mark.parametrize("case", ["sinkhorn", "sinkhorn-top1"])
def test_sinkhorn_decoding_equals_a_brute_force_causal_sort(case: str) -> None:
    module = build(case)
    assert isinstance(module, SinkhornAttention)
    q, k, v, mask = inputs(seed=56)
    mask[0, 20:26] = False  # a whole block of padded keys (block_size 5 or 6) in mid-sequence
    torch.testing.assert_close(
        decode(module, q, k, v, mask), brute_force_causal_sinkhorn(module, q, k, v, mask), atol=1e-10, rtol=0
    )


# -- what the state is and does ------------------------------------------------------------------


@pytest.mark.parametrize("case", ["lsh", "routing-local", "sinkhorn"])
def test_steps_after_the_prompt_never_recompute_the_prefix(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the prompt runs the forward's core; every later step works from the state."""
    module = build(case)
    q, k, v, mask = inputs(seed=57)
    state = module.new_state()
    module.decode(q[:, :, :9], k[:, :, :9], v[:, :, :9], state, attention_mask=mask[:, :9])

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a decoding step recomputed the prefix")

    monkeypatch.setattr(type(module), "_attend", refuse)  # the forward: the only caller of the cores below
    monkeypatch.setattr(hashing_decode, "bucketed_attention", refuse)
    monkeypatch.setattr(hashing_decode, "bucket_layout", refuse)
    for t in range(9, 30):
        module.decode(
            q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state, attention_mask=mask[:, t : t + 1]
        )


@pytest.mark.parametrize("case", ["lsh", "routing-local", "sinkhorn"])
def test_the_state_grows_linearly_with_the_tokens(case: str) -> None:
    """Keys and values plus a fixed number of integers (or block sums) per token: nothing T × T."""
    module = build(case)
    sizes = []
    q, k, v, mask = inputs(seed=58)
    for length in (30, 60):
        state = module.new_state()
        decode(module, q[:, :, :length], k[:, :, :length], v[:, :, :length], mask[:, :length], state=state)
        # the key/value stores hold head-room past the filled views; count the views
        tensors = [x for name, x in vars(state).items() if isinstance(x, torch.Tensor) and not name.endswith("store")]
        sizes.append(sum(x.numel() for x in tensors))
    per_token = B * H * D * 2 + B + B * H * 3 * 2  # keys, values, padding, a few integers (or sums) per head
    assert sizes[1] - sizes[0] <= 30 * per_token
    assert sizes[1] < 2.2 * sizes[0]


@pytest.mark.parametrize("name", ["lsh", "routing", "sinkhorn"])
def test_a_state_filled_as_a_plain_kv_cache_is_refused(name: str) -> None:
    """A key/value cache (Transformers', through KVState.append) lacks the queries' buckets: say so, never guess."""
    module = attnkit.build_attention(name, **attnkit.get_spec(name).small_options).eval()
    q, k, v = structured_qkv(1, 2, 9, 9, 8)
    state = module.new_state()
    assert isinstance(state, KVState)
    KVState.append(state, k[:, :, :8], v[:, :, :8], None)
    with pytest.raises(ValueError, match=r"plain key/value cache.*new_state"):
        module.decode(q[:, :, 8:], k[:, :, 8:], v[:, :, 8:], state)


def test_routing_decoding_records_no_centroid_statistics() -> None:
    module = build("routing-local").train()
    assert isinstance(module, RoutingAttention)
    q, k, v, mask = inputs(seed=59)
    decode(module, q, k, v, mask)
    assert not module.update_centroids()  # nothing pending: the k-means step learns from training forwards only


@pytest.mark.parametrize("name", ["lsh", "routing", "sinkhorn"])
def test_half_precision_decoding_matches_recompute(name: str) -> None:
    module = attnkit.build_attention(name, **attnkit.get_spec(name).small_options).eval()
    q, k, v, mask = (x.bfloat16() if x.is_floating_point() else x for x in inputs(seed=60))
    out = decode(module, q, k, v, mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, recompute(module, q, k, v, mask), atol=1e-2, rtol=0)
